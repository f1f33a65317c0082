"""The README's main job: make the data, train the FP32 tiny Swin Mask R-CNN,
evaluate it with mmdet's CocoMetric and print the mAP table.

Each step is the same command a user would type (tools/make_shapes_coco.py,
tools/train.py, tools/test.py); finished steps are reused on a rerun.
Results go to ``<work-dir>/results.{md,json}``.

Example::

    python tools/demo.py                 # full run, about 30 minutes
    python tools/demo.py --quick         # same steps on tiny data, ~1 min
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

from gplq_mmdet.cli import data_root_options, default_echo, run_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py'
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP',
           'segm_mAP_50', 'segm_mAP_75')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default=None,
                        help='default: work_dirs/demo (work_dirs/demo-quick '
                        'with --quick)')
    parser.add_argument('--data-root', default=None,
                        help='default: data/shapes (data/shapes-quick)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data and one epoch: checks the pipeline, '
                        'the mAP means nothing')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    suffix = '-quick' if args.quick else ''
    work = Path(args.work_dir or f'work_dirs/demo{suffix}').resolve()
    data = Path(args.data_root or f'data/shapes{suffix}').resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    make = [py, 'tools/make_shapes_coco.py', str(data)]
    if args.quick:
        make += ['--num-train', '16', '--num-val', '8', '--image-size', '96']
    run_step(make, work / 'make_data.log', ROOT, default_echo)

    data_opts = data_root_options(data)
    train_opts = list(data_opts)
    if args.quick:
        train_opts += ['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                       'param_scheduler.1.end=1',
                       'default_hooks.checkpoint.interval=1']
    fp32_dir = work / 'fp32'
    record_file = fp32_dir / 'train_record.json'
    record = (json.loads(record_file.read_text())
              if record_file.is_file() else {})
    if Path(record.get('checkpoint', '')).is_file():
        print(f"reusing {record['checkpoint']} (trained in "
              f"{record['seconds'] / 60:.1f} min); delete {fp32_dir} to "
              'retrain')
    else:
        seconds = run_step([py, 'tools/train.py', str(CONFIG), '--work-dir',
                       str(fp32_dir), '--cfg-options'] + train_opts,
                      work / 'train_fp32.log', ROOT, default_echo)
        last = (fp32_dir / 'last_checkpoint').read_text().strip()
        record = dict(seconds=seconds, checkpoint=last)
        record_file.write_text(json.dumps(record))
    checkpoint, train_s = record['checkpoint'], record['seconds']

    test_dir = work / 'fp32_test'
    run_step([py, 'tools/test.py', str(CONFIG), checkpoint, '--work-dir',
         str(test_dir), '--cfg-options'] + data_opts,
        work / 'test_fp32.log', ROOT, default_echo)
    metrics = json.loads((test_dir / 'metrics.json').read_text())

    header = '| model | ' + ' | '.join(METRICS) + ' | train time |'
    rule = '|' + '---|' * (len(METRICS) + 2)
    row = ('| FP32 Swin-N Mask R-CNN | '
           + ' | '.join(f"{metrics['coco/' + m]:.3f}" for m in METRICS)
           + f' | {train_s / 60:.1f} min |')
    machine = (f'{platform.machine()}, {_cpu_count()} CPU cores, '
               f'Python {platform.python_version()}')
    table = '\n'.join([header, rule, row])
    report = (f'{table}\n\nCommand: python tools/demo.py'
              f'{" --quick" if args.quick else ""}; machine: {machine}; '
              f'date: {date.today().isoformat()}\n')
    (work / 'results.md').write_text(report)
    (work / 'results.json').write_text(json.dumps(
        dict(metrics=metrics, train_seconds=train_s, machine=machine,
             date=date.today().isoformat(), quick=args.quick,
             config=str(CONFIG.relative_to(ROOT))), indent=1))
    print('\n' + report)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == '__main__':
    main()
