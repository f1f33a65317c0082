"""Export a quantized detector's backbone and neck to ONNX with
QuantizeLinear/DequantizeLinear pairs, and check it in onnxruntime.

Takes the config and a checkpoint of tools/quantize.py (packed W4A4: int8
weight initializers with per-channel DequantizeLinear) or of stage 1
(W32A4: only the activations carry QDQ pairs). The exported graph has a
fixed input size, by default that of the first test image after mmdet's
test pipeline and data preprocessor; ``--verify`` runs that image through
onnxruntime (CPU) and through the PyTorch model and reports the largest
difference of every output.

Example::

    CFG=configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py
    python tools/export_onnx.py $CFG work_dirs/w4a4/quantized_w4a4.pth \\
        --out work_dirs/w4a4/backbone_neck_w4a4.onnx --verify
"""
import argparse
import json
import os.path as osp
import sys

import torch
from mmdet.registry import MODELS
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

import gplq_mmdet  # noqa: F401  (registers the plugin's modules)
from gplq_mmdet.api import check_matches, load_checkpoint_dict, state_of
from gplq_mmdet.checkpoint import atomic_write_text
from gplq_mmdet.cli import add_common_args, load_config, run_tool
from gplq_mmdet.export import (
    DEFAULT_OPSET,
    export_onnx,
    exportable_copy,
    run_onnxruntime,
)
from gplq_mmdet.stage2 import restore_weight_quant

#: Largest difference between onnxruntime's and PyTorch's outputs that
#: --verify accepts, relative to the largest |output| of that level. The
#: QDQ arithmetic is the same; float32 summation order differs (about 2e-5
#: of the range through the FP32 ViT-S), and where that moves a value
#: across a 4-bit rounding boundary the difference grows (measured: 1e-6
#: on the nano Swin, 7e-4 on ViT-S/14 at 160 px).
TOLERANCE = 2e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='the gplq config of the checkpoint')
    parser.add_argument('checkpoint', help='tools/quantize.py or stage-1 '
                        'checkpoint')
    parser.add_argument('--out', help='ONNX file (default: next to the '
                        'checkpoint, same name with .onnx)')
    parser.add_argument('--image-size', type=int, nargs=2,
                        metavar=('H', 'W'), help='input size (default: the '
                        'first preprocessed test image)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET)
    parser.add_argument('--verify', action='store_true',
                        help='compare onnxruntime with PyTorch on the first '
                        'test image and write <out>.verify.json')
    add_common_args(parser)
    return parser.parse_args()


def first_test_image(cfg, model) -> torch.Tensor:
    """The first test image as the detector sees it (normalized, padded)."""
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.num_workers = 0
    loader_cfg.persistent_workers = False
    loader_cfg.batch_size = 1
    batch = next(iter(Runner.build_dataloader(loader_cfg)))
    return model.data_preprocessor(batch, False)['inputs']


def main() -> int:
    args = parse_args()
    cfg = load_config(args)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ckpt = load_checkpoint_dict(args.checkpoint)
    state = state_of(ckpt)
    model = MODELS.build(cfg.model)
    check_matches(model, state, args.checkpoint)
    model.load_state_dict(state, strict=False)
    restore_weight_quant(model, ckpt)
    model.eval()
    image = first_test_image(cfg, model)
    if args.image_size is not None:
        image = torch.nn.functional.interpolate(
            image, size=tuple(args.image_size), mode='bilinear')
    out = args.out or osp.splitext(args.checkpoint)[0] + '.onnx'
    summary = export_onnx(model, out, tuple(image.shape[-2:]), args.opset)
    print(f'wrote {summary.path}: {summary.quantize_linear} QuantizeLinear, '
          f'{summary.dequantize_linear} DequantizeLinear, '
          f'{summary.int8_weights} int8 weight tensors, input '
          f'1x3x{image.shape[-2]}x{image.shape[-1]}')
    if not args.verify:
        return 0
    with torch.no_grad():
        reference = exportable_copy(model)(image)
    report = dict(onnx=summary.path, tolerance_relative=TOLERANCE, levels={})
    ok = True
    for level in ('basic', 'all'):
        outputs = run_onnxruntime(summary.path, image, level)
        rows = []
        for name, ref, got in zip(summary.outputs, reference, outputs,
                                  strict=True):
            diff = (ref - got).abs()
            rows.append(dict(output=name, max_abs_diff=float(diff.max()),
                             mean_abs_diff=float(diff.mean()),
                             max_abs_output=float(ref.abs().max())))
        report['levels'][level] = rows
        worst = max(r['max_abs_diff'] / max(r['max_abs_output'], 1e-12)
                    for r in rows)
        print(f'onnxruntime ({level} optimizations) vs PyTorch: largest '
              f'difference {worst:.2e} of the output range')
        if level == 'basic':
            ok = worst <= TOLERANCE
    atomic_write_text(json.dumps(report, indent=1),
                      osp.splitext(summary.path)[0] + '.verify.json')
    if not ok:
        print(f'export_onnx: error: onnxruntime differs from PyTorch by more '
              f'than {TOLERANCE:g} of the output range', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main, 'export_onnx'))
