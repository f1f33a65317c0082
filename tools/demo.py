"""The README's main job: the whole GPLQ pipeline on the nano Swin track.

1. make the generated COCO-format data (tools/make_shapes_coco.py);
2. train the FP32 Swin-N Mask R-CNN and evaluate it (tools/train.py,
   tools/test.py);
3. GPLQ stage 1: one epoch of activation-only QAT (tools/train.py with the
   gplq-w32a4 config);
4. stage 2 and the baselines (tools/quantize.py): GPLQ W32A4 (activations
   only), GPLQ W4A4 without and with QwT compensation, and PTQ-only W4A4
   from the FP32 checkpoint;
5. print the COCO mAP table and write ``<work-dir>/results.{md,json}``.

Each step is the command a user would type; finished trainings are reused
on a rerun (delete their folder to redo them).

Example::

    python tools/demo.py                 # full run, about an hour
    python tools/demo.py --quick         # same steps on tiny data, ~3 min
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

from gplq_mmdet.cli import (
    data_root_options,
    default_echo,
    run_step,
    shapes_data_command,
)

ROOT = Path(__file__).resolve().parents[1]
FP32_CONFIG = 'configs/mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py'
STAGE1_CONFIG = 'configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py'
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


def cached_training(cmd: list[str], work: Path, log: Path) -> dict:
    """Run a training command once; reuse its checkpoint afterwards."""
    record_file = work / 'train_record.json'
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if Path(record['checkpoint']).is_file():
            print(f"reusing {record['checkpoint']} (trained in "
                  f"{record['seconds'] / 60:.1f} min); delete {work} to "
                  'retrain')
            return record
    seconds = run_step(cmd + ['--work-dir', str(work)], log, ROOT,
                       default_echo)
    last = (work / 'last_checkpoint').read_text().strip()
    record = dict(seconds=seconds, checkpoint=last)
    record_file.write_text(json.dumps(record))
    return record


def main() -> None:
    args = parse_args()
    suffix = '-quick' if args.quick else ''
    work = Path(args.work_dir or f'work_dirs/demo{suffix}').resolve()
    data = Path(args.data_root or f'data/shapes{suffix}').resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    make = shapes_data_command(py, data, args.quick)
    run_step(make, work / 'make_data.log', ROOT, default_echo)
    data_opts = data_root_options(data)
    quick_train = (['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                    'param_scheduler.1.end=1',
                    'default_hooks.checkpoint.interval=1']
                   if args.quick else [])
    calib = ['--calib-batches', '2' if args.quick else '32']

    rows: dict[str, dict] = {}
    fp32 = cached_training(
        [py, 'tools/train.py', FP32_CONFIG, '--cfg-options'] + data_opts +
        quick_train, work / 'fp32', work / 'train_fp32.log')
    run_step([py, 'tools/test.py', FP32_CONFIG, fp32['checkpoint'],
              '--work-dir', str(work / 'fp32_test'), '--cfg-options'] +
             data_opts, work / 'test_fp32.log', ROOT, default_echo)
    rows['FP32'] = dict(
        metrics=json.loads((work / 'fp32_test' / 'metrics.json').read_text()),
        minutes=fp32['seconds'] / 60, step='FP32 training')

    seconds = run_step(
        [py, 'tools/quantize.py', STAGE1_CONFIG, fp32['checkpoint'],
         '--ptq-only', '--work-dir', str(work / 'ptq_only')] + calib +
        ['--cfg-options'] + data_opts, work / 'ptq_only.log', ROOT)
    rows['PTQ-only W4A4'] = dict(
        metrics=json.loads((work / 'ptq_only' / 'results_w4a4_ptq-only.json')
                           .read_text())['metrics'],
        minutes=seconds / 60, step='calibration + weight PTQ + test')

    teacher = [f"load_from={fp32['checkpoint']}",
               f"custom_hooks.1.teacher_checkpoint={fp32['checkpoint']}"]
    quick_stage1 = (['custom_hooks.0.num_batches=1',
                     'custom_hooks.1.num_fit_batches=1']
                    if args.quick else [])
    stage1 = cached_training(
        [py, 'tools/train.py', STAGE1_CONFIG, '--cfg-options'] + data_opts +
        teacher + quick_stage1, work / 'stage1', work / 'train_stage1.log')
    for label, extra, tag, step in (
            ('GPLQ W32A4 (stage 1)', ['--act-only'], 'w32a4',
             'stage-1 training'),
            ('GPLQ W4A4 (stage 1 + 2)', [], 'w4a4', 'weight PTQ + test'),
            ('GPLQ W4A4 + QwT', ['--qwt'], 'w4a4_qwt',
             'weight PTQ + QwT + test')):
        seconds = run_step(
            [py, 'tools/quantize.py', STAGE1_CONFIG, stage1['checkpoint'],
             '--work-dir', str(work / 'stage2')] + extra + calib +
            ['--cfg-options'] + data_opts, work / f'quantize_{tag}.log',
            ROOT)
        rows[label] = dict(
            metrics=json.loads((work / 'stage2' / f'results_{tag}.json')
                               .read_text())['metrics'],
            minutes=(stage1['seconds'] if tag == 'w32a4' else seconds) / 60,
            step=step)

    fp32_box = rows['FP32']['metrics']['coco/bbox_mAP']
    header = ('| model | ' + ' | '.join(METRICS) +
              ' | box retention | wall time of the step |')
    lines = [header, '|' + '---|' * (len(METRICS) + 3)]
    for label, row in rows.items():
        m = row['metrics']
        keep = (f"{m['coco/bbox_mAP'] / fp32_box:.1%}" if fp32_box > 0
                else 'n/a')
        lines.append(f'| {label} | ' + ' | '.join(
            f"{m['coco/' + k]:.3f}" for k in METRICS) +
            f" | {keep} | {row['minutes']:.1f} min ({row['step']}) |")
    machine = (f'{platform.machine()}, {len(os.sched_getaffinity(0))} CPU '
               f'cores, Python {platform.python_version()}')
    report = ('\n'.join(lines) + '\n\nCommand: python tools/demo.py'
              f'{" --quick" if args.quick else ""}; machine: {machine}; '
              f'date: {date.today().isoformat()}\n')
    (work / 'results.md').write_text(report)
    (work / 'results.json').write_text(json.dumps(
        dict(rows=rows, machine=machine, date=date.today().isoformat(),
             quick=args.quick, fp32_config=FP32_CONFIG,
             stage1_config=STAGE1_CONFIG), indent=1))
    print('\n' + report)


if __name__ == '__main__':
    main()
