"""Measure GPLQ stage 1 on an offline track and write a markdown table.

From an FP32 checkpoint of the track it:

1. measures time per iteration and peak memory of FP32 fine-tuning and of
   stage 1 on the same model and batch (tools/measure_train_cost.py, one
   process each, one after the other in this run);
2. evaluates the FP32 model, then trains and evaluates three one-epoch
   stage-1 variants: per-channel activations with the PCA mimic loss (the
   default), per-tensor activations with it, and per-channel without it;
3. writes ``<work-dir>/stage1_report.{md,json}``.

Example::

    python tools/stage1_report.py swin --fp32-checkpoint \
        work_dirs/demo/fp32/epoch_20.pth
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

from gplq_mmdet.cli import data_root_options, default_echo, run_step

ROOT = Path(__file__).resolve().parents[1]
# (FP32 config, stage-1 config, options that make the FP32 fine-tuning
# train the same parameters as stage 1: the ViT is frozen in its FP32
# config but trained in stage 1).
TRACKS = {
    'swin': ('configs/mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py',
             'configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py', []),
    'vit': ('configs/mask-rcnn_vit-s-p14-dinov2_simple-fpn_6e_shapes.py',
            'configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_'
            'shapes.py', ['model.backbone.frozen=False']),
}
VARIANTS = {
    'W32A4 per-channel, PCA mimic': [],
    'W32A4 per-tensor, PCA mimic':
    ['model.backbone.quant_cfg.a_granularity=per_tensor'],
    'W32A4 per-channel, no mimic': ['custom_hooks.1.mode=none'],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('track', choices=sorted(TRACKS))
    parser.add_argument('--fp32-checkpoint', required=True)
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument('--work-dir', default=None,
                        help='default: work_dirs/stage1_<track>')
    parser.add_argument('--cost-iters', type=int, default=30)
    parser.add_argument('--quick', action='store_true',
                        help='few iterations: exercises the code paths only')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fp32_cfg, stage1_cfg, finetune = TRACKS[args.track]
    ckpt = str(Path(args.fp32_checkpoint).resolve())
    if not Path(ckpt).is_file():
        sys.exit(f'stage1_report: FP32 checkpoint {ckpt} not found; train '
                 f'it with tools/train.py {fp32_cfg}')
    work = Path(args.work_dir or f'work_dirs/stage1_{args.track}').resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = data_root_options(Path(args.data_root).resolve())
    teacher = [f'load_from={ckpt}',
               f'custom_hooks.1.teacher_checkpoint={ckpt}']
    py = sys.executable
    quick = (['train_cfg.max_epochs=1', 'custom_hooks.0.num_batches=1',
              'custom_hooks.1.num_fit_batches=1'] if args.quick else [])

    # 1. cost: FP32 fine-tuning (same lr, batch, no quantizers) vs stage 1.
    cost = {}
    iters = 6 if args.quick else args.cost_iters
    warmup = 2 if args.quick else 5
    for name, cfg, extra in (
            ('FP32 fine-tuning', fp32_cfg, [f'load_from={ckpt}',
                                            'optim_wrapper.optimizer.lr=1e-6']
             + finetune),
            ('GPLQ stage 1', stage1_cfg, teacher)):
        log = work / f'cost_{name.split()[0].lower()}.log'
        run_step([py, 'tools/measure_train_cost.py', cfg, '--iters',
                  str(iters), '--warmup', str(warmup), '--work-dir',
                  str(work / 'cost'), '--cfg-options'] + data + extra, log,
                 ROOT)
        cost[name] = json.loads(Path(log).read_text().strip().splitlines()
                                [-1])

    # 2. accuracy: FP32, then each stage-1 variant.
    rows = {}
    run_step([py, 'tools/test.py', fp32_cfg, ckpt, '--work-dir',
              str(work / 'fp32'), '--cfg-options'] + data,
             work / 'test_fp32.log', ROOT, default_echo)
    rows['FP32'] = json.loads((work / 'fp32' / 'metrics.json').read_text())
    for label, options in VARIANTS.items():
        slug = label.lower().replace(' ', '_').replace(',', '')
        vdir = work / slug
        seconds = run_step(
            [py, 'tools/train.py', stage1_cfg, '--work-dir', str(vdir),
             '--cfg-options'] + data + teacher + quick + options,
            work / f'train_{slug}.log', ROOT, default_echo)
        stage1_ckpt = (vdir / 'last_checkpoint').read_text().strip()
        run_step([py, 'tools/test.py', stage1_cfg, stage1_ckpt, '--work-dir',
                  str(vdir / 'test'), '--cfg-options'] + data + options,
                 work / f'test_{slug}.log', ROOT, default_echo)
        rows[label] = json.loads((vdir / 'test' / 'metrics.json').read_text())
        rows[label]['train_seconds'] = seconds

    fp32_box = rows['FP32']['coco/bbox_mAP']
    lines = ['| model | box mAP | mask mAP | box AP50 | retention (box) | '
             'stage-1 wall time |', '|---|---|---|---|---|---|']
    for label, m in rows.items():
        keep = m['coco/bbox_mAP'] / fp32_box if fp32_box > 0 else float('nan')
        wall = (f"{m['train_seconds'] / 60:.1f} min" if 'train_seconds' in m
                else '-')
        lines.append(f"| {label} | {m['coco/bbox_mAP']:.3f} | "
                     f"{m['coco/segm_mAP']:.3f} | {m['coco/bbox_mAP_50']:.3f}"
                     f' | {keep:.1%} | {wall} |')
    f32, s1 = cost['FP32 fine-tuning'], cost['GPLQ stage 1']
    lines += ['', f"| run (batch {f32['batch_size']}) | s / iter | "
              'peak memory (MB) |', '|---|---|---|']
    for name, c in cost.items():
        lines.append(f"| {name} | {c['sec_per_iter']:.3f} | "
                     f"{c['peak_mem_mb']:.0f} |")
    lines.append(f"\nStage 1 / FP32 time per iteration: "
                 f"{s1['sec_per_iter'] / f32['sec_per_iter']:.2f}x; memory "
                 f"measured as {s1['mem_method']}.")
    lines.append(f'\nCommand: python tools/stage1_report.py {args.track} '
                 f'--fp32-checkpoint {args.fp32_checkpoint}'
                 f'{" --quick" if args.quick else ""}; machine: '
                 f'{platform.machine()}, {len(os.sched_getaffinity(0))} CPU '
                 f'cores, no GPU; date: {date.today().isoformat()}')
    report = '\n'.join(lines) + '\n'
    (work / 'stage1_report.md').write_text(report)
    (work / 'stage1_report.json').write_text(json.dumps(
        dict(rows=rows, cost=cost, track=args.track, quick=args.quick),
        indent=1))
    print('\n' + report)


if __name__ == '__main__':
    main()
