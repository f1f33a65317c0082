"""Find the quantizers and layers responsible for a quantized detector's
accuracy loss.

From a stage-1 config and checkpoint (activation steps + FP32 weights) it
quantizes the weights as stage 2 does (round-to-nearest, ``--method``) and
then, on ``--batches`` training batches (test pipeline):

1. per-layer quantization error: for every quantized Linear/Conv2d, the
   relative error of its output from quantizing its own input, and its own
   weight, in an otherwise FP32 model;
2. sensitivity sweep: the relative error of the neck features with every
   quantizer on, and with every quantizer on except one group (a layer kind
   such as ``vit.blocks.*.mlp.fc2`` for inputs ``A`` or weights ``W``, an
   attention operand, or a whole block);
3. with ``--map-groups K``: COCO mAP of the full W4A4 model and of the K
   groups whose removal helps most kept at FP32 (mmdet's test loop).

Writes ``<work-dir>/sensitivity.{md,json}``.

Example::

    CFG=configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py
    python tools/sensitivity.py $CFG \\
        work_dirs/benchmark/vit/gplq_w4a4_mimic_stage1/epoch_1.pth \\
        --map-groups 3
"""
import argparse
import copy
import json
import os.path as osp
import sys
from datetime import date

from mmengine.runner import Runner

import gplq_mmdet  # noqa: F401  (registers the plugin's modules)
from gplq_mmdet.api import (
    Stage2Error,
    calibration_loader,
    check_matches,
    checkpoint_state,
)
from gplq_mmdet.checkpoint import atomic_write_text
from gplq_mmdet.cli import add_common_args, load_config, run_tool
from gplq_mmdet.hooks import unwrap_model
from gplq_mmdet.ptq import CLIP_METHODS
from gplq_mmdet.sensitivity import Switchboard, layer_errors, sweep
from gplq_mmdet.stage2 import (
    WeightQuantConfig,
    quantize_weights_,
    weight_quant_targets,
)
from gplq_mmdet.surgery import iter_quantizers, quant_config_of


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='stage-1 config file')
    parser.add_argument('checkpoint', help='stage-1 checkpoint')
    parser.add_argument('--w-bits', type=int, default=4)
    parser.add_argument('--method', default='percentile',
                        help=f'weight clipping: {", ".join(CLIP_METHODS)}')
    parser.add_argument('--batches', type=int, default=4,
                        help='training batches the errors are measured on')
    parser.add_argument('--top', type=int, default=12,
                        help='rows of each table in the markdown report')
    parser.add_argument('--map-groups', type=int, default=0, metavar='K',
                        help='also evaluate COCO mAP with each of the K '
                        'most harmful groups kept FP32')
    add_common_args(parser)
    args = parser.parse_args()
    for name in ('batches', 'top'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1')
    if args.map_groups < 0:
        parser.error('--map-groups must be >= 0')
    return args


def main() -> int:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} not found')
    weights_cfg = WeightQuantConfig(w_bits=args.w_bits, method=args.method)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    model = unwrap_model(runner.model)
    if quant_config_of(model) is None or quant_config_of(model).w_bits:
        raise Stage2Error('use a GPLQ stage-1 config (activation quantizers,'
                          ' FP32 weights)')
    state = checkpoint_state(args.checkpoint)
    check_matches(model, state, args.checkpoint)
    if not any(f'{n}.step' in state for n, _ in iter_quantizers(model)):
        raise Stage2Error(f'{args.checkpoint} has no activation steps: pass '
                          'a stage-1 checkpoint')
    runner.load_or_resume()
    model.eval()
    loader = calibration_loader(runner, args.batches)
    batches = [b for _, b in zip(range(args.batches), loader, strict=False)]

    quantized = quantize_weights_(copy.deepcopy(model), weights_cfg)
    names = {m: n for n, m in quantized.named_modules()}
    qweights = {names[m]: m.weight.detach().clone()
                for _, m, _ in weight_quant_targets(quantized)}
    del quantized
    board = Switchboard(model, qweights)

    def forward(batch):
        data = model.data_preprocessor(batch, False)
        return model.extract_feat(data['inputs'])

    layers = layer_errors(board, forward, batches)
    swept = sweep(board, forward, batches)
    bits = f'W{args.w_bits}A{quant_config_of(model).a_bits}'
    maps = []
    if args.map_groups:
        groups = board.groups()
        board.set(board.switches)
        full = runner.test()
        maps.append(dict(group=f'none (full {bits})',
                         bbox_mAP=float(full['coco/bbox_mAP'])))
        for row in swept['groups'][:args.map_groups]:
            keep = set(groups[row['group']])
            board.set([s for s in board.switches if s not in keep])
            metrics = runner.test()
            maps.append(dict(group=row['group'],
                             bbox_mAP=float(metrics['coco/bbox_mAP'])))
        board.set(board.switches)

    lines = [f'## Quantization sensitivity ({bits})', '',
             f'Relative feature (neck) error of the full {bits} model: '
             f"{swept['full_error']:.4f}", '',
             '### Sweep: everything quantized except one group', '',
             '| group kept FP32 | switches | feature error | share of the '
             'error removed |', '|---|---|---|---|']
    lines += [f"| {r['group']} | {r['switches']} | {r['error_without']:.4f}"
              f" | {r['share_removed']:.1%} |"
              for r in swept['groups'][:args.top]]
    if maps:
        lines += ['', '| group kept FP32 | box mAP |', '|---|---|']
        lines += [f"| {m['group']} | {m['bbox_mAP']:.3f} |" for m in maps]
    lines += ['', '### Per-layer error (own output, rest FP32)', '',
              '| layer | input quantized | weight quantized |',
              '|---|---|---|']
    worst = sorted(layers, key=lambda r: -max(r['input_error'],
                                              r.get('weight_error', 0.0)))
    lines += [f"| {r['layer']} | {r['input_error']:.4f} | "
              f"{r.get('weight_error', float('nan')):.4f} |"
              for r in worst[:args.top]]
    lines += ['', f'Command: python tools/sensitivity.py {args.config} '
              f'{args.checkpoint} --batches {args.batches}'
              f'{f" --map-groups {args.map_groups}" if maps else ""}; date: '
              f'{date.today().isoformat()}']
    report = '\n'.join(lines) + '\n'
    atomic_write_text(report, osp.join(cfg.work_dir, 'sensitivity.md'))
    atomic_write_text(json.dumps(dict(
        bits=bits, layers=layers, sweep=swept, map=maps,
        checkpoint=osp.abspath(args.checkpoint), batches=args.batches),
        indent=1), osp.join(cfg.work_dir, 'sensitivity.json'))
    print('\n' + report)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main, 'sensitivity'))
