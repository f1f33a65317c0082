"""GPLQ stage 2: quantize the weights of a stage-1 checkpoint, save a packed
checkpoint and report COCO mAP with mmdet's test loop.

Same interface as mmdet's tools/test.py (config, checkpoint, --work-dir,
--cfg-options, --launcher) plus the weight settings. A stage-2 config
(``gplq-w4a4_*``) names the stage-1 checkpoint (``stage1_checkpoint``) and
the weight settings (``gplq_stage2``); the command line overrides both.
Writes
``<work-dir>/quantized_<bits>.pth`` (loadable by tools/test.py) and
``<work-dir>/results_<bits>.json``; both appear only when complete.

Examples::

    CFG=configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py
    python tools/quantize.py $CFG work_dirs/stage1/epoch_1.pth --w-bits 4
    # PTQ-only baseline from an FP32 checkpoint (steps calibrated here)
    python tools/quantize.py $CFG work_dirs/demo/fp32/epoch_20.pth --ptq-only
    # COCO: checkpoint and settings from the stage-2 config
    python tools/quantize.py \
        configs/gplq-w4a4_mask-rcnn_swin-t-p4-w7_fpn_1x-1e_coco.py
"""
import argparse
import json
import os.path as osp
import sys

from mmengine.runner import Runner

import gplq_mmdet  # noqa: F401  (registers the plugin's modules)
from gplq_mmdet.api import (
    quantize_runner,
    save_quantized,
    stage2_options,
)
from gplq_mmdet.checkpoint import atomic_write_text
from gplq_mmdet.cli import add_common_args, load_config, run_tool
from gplq_mmdet.ptq import CLIP_METHODS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='stage-1 or stage-2 config file')
    parser.add_argument('checkpoint', nargs='?',
                        help='stage-1 (or FP32 with --ptq-only) checkpoint; '
                        "default: the config's stage1_checkpoint")
    parser.add_argument('--w-bits', type=int,
                        help='weight bits (default 4)')
    parser.add_argument('--method',
                        help='weight clipping (default percentile): '
                        f'{", ".join(CLIP_METHODS)}')
    parser.add_argument('--gptq', action=argparse.BooleanOptionalAction,
                        help='GPTQ error feedback on Linear layers '
                        '(default off)')
    parser.add_argument('--qwt', action=argparse.BooleanOptionalAction,
                        help='QwT: fit a closed-form linear compensation '
                        'per transformer block after quantizing (default '
                        'off)')
    parser.add_argument('--calib-batches', type=int,
                        help='calibration batches (default 32)')
    parser.add_argument('--ptq-only', action='store_true',
                        help='FP32 checkpoint: calibrate activation steps '
                        'here instead of using stage-1 steps')
    parser.add_argument('--act-only', action='store_true',
                        help='report W32A4: keep FP32 weights')
    add_common_args(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cfg = load_config(args)
    if args.checkpoint is None:
        args.checkpoint = cfg.get('stage1_checkpoint')
        if args.checkpoint is None:
            raise ValueError(f'no checkpoint: pass one after the config, or '
                             f'use a stage-2 config (stage1_checkpoint); '
                             f'{args.config} names none')
        if not osp.isfile(args.checkpoint):
            raise FileNotFoundError(
                f'the stage-1 checkpoint {args.checkpoint!r} named by '
                f'{args.config} does not exist: run stage 1 first, or pass '
                'the checkpoint after the config')
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} not found')
    options = stage2_options(
        cfg.get('gplq_stage2'),
        dict(w_bits=args.w_bits, method=args.method, gptq=args.gptq,
             qwt=args.qwt, calib_batches=args.calib_batches),
        ptq_only=args.ptq_only, act_only=args.act_only)
    cfg.load_from = args.checkpoint
    cfg.setdefault('randomness', dict(seed=0))
    runner = Runner.from_cfg(cfg)
    meta = quantize_runner(runner, args.checkpoint, options)
    tag = (meta['bits'].lower() + ('_ptq-only' if args.ptq_only else '')
           + ('_qwt' if options.weights.qwt else ''))
    save_quantized(runner.model, meta,
                   osp.join(cfg.work_dir, f'quantized_{tag}.pth'))
    metrics = runner.test()
    results = dict(meta=meta, metrics={k: float(v)
                                       for k, v in metrics.items()})
    out = osp.join(cfg.work_dir, f'results_{tag}.json')
    atomic_write_text(json.dumps(results, indent=1, sort_keys=True), out)
    method = 'PTQ only' if args.ptq_only else 'GPLQ'
    if meta['qwt'] is not None:
        kept = sum(row['kept'] for row in meta['qwt'])
        method += f" + QwT on {kept}/{len(meta['qwt'])} blocks"
    scores = f"box mAP {metrics['coco/bbox_mAP']:.3f}"
    if 'coco/segm_mAP' in metrics:  # detectors without masks have none
        scores += f", mask mAP {metrics['coco/segm_mAP']:.3f}"
    print(f"\n{meta['bits']} ({method}, scope {meta['scope']}): {scores}; "
          f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main, 'quantize'))
