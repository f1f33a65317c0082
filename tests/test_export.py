"""ONNX export with QDQ pairs: graph contents, onnxruntime against the
PyTorch fake-quantized model, the export tool and its bad input."""
import json
import subprocess
import sys

import onnx
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from gplq_mmdet import calibrate_act_quant, iter_quantizers, remove_act_quant
from gplq_mmdet.api import save_quantized
from gplq_mmdet.export import (
    ExportError,
    export_onnx,
    exportable_copy,
    run_onnxruntime,
)
from gplq_mmdet.stage2 import quantize_weights_, weight_quant_targets

from .conftest import ROOT, STAGE1_CONFIG
from .test_quantize_tool import _options


def _w4a4_detector(**quant_overrides):
    from mmdet.registry import MODELS

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(STAGE1_CONFIG))
    cfg.model.backbone.quant_cfg.update(quant_overrides)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    calibrate_act_quant(model, [torch.randn(2, 3, 96, 96)],
                        lambda x: model.neck(model.backbone(x)), 1)
    quantize_weights_(model, dict(w_bits=4))
    return model


def _features(model, image):
    with torch.no_grad():
        return model.neck(model.backbone(image))


@pytest.mark.parametrize('granularity', ['per_channel', 'per_token'])
def test_onnxruntime_matches_the_fake_quantized_model(tmp_path, granularity):
    model = _w4a4_detector(a_granularity=granularity)
    image = torch.randn(1, 3, 96, 96)
    reference = _features(model, image)
    summary = export_onnx(model, tmp_path / 'm.onnx', (96, 96))
    outputs = run_onnxruntime(summary.path, image)
    assert len(outputs) == len(reference) == 5
    for ref, got in zip(reference, outputs, strict=True):
        assert got.shape == ref.shape
        # float32 summation order only: no quantization level differs.
        assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()
    # the model itself is untouched by the export
    for ref, again in zip(reference, _features(model, image), strict=True):
        assert torch.equal(ref, again)


def test_vit_exports_with_its_position_embedding_fixed(tmp_path):
    """timm resamples DINOv2's position embedding with antialiased bicubic
    interpolation, which ONNX lacks; a fixed-size export uses the
    resampled constant."""
    from mmdet.registry import MODELS

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(ROOT / 'configs' / (
        'gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py')))
    cfg.model.backbone.init_cfg = None  # random weights will do
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    image = torch.randn(1, 3, 112, 112)
    calibrate_act_quant(model, [image], lambda x: model.neck(
        model.backbone(x)), 1)
    quantize_weights_(model, dict(w_bits=4))
    reference = _features(model, image)
    summary = export_onnx(model, tmp_path / 'vit.onnx', (112, 112))
    assert summary.int8_weights == len(weight_quant_targets(model))
    for ref, got in zip(reference, run_onnxruntime(summary.path, image),
                        strict=True):
        # float32 order differences, amplified where a value sits on a
        # 4-bit rounding boundary (tools/export_onnx.py TOLERANCE)
        assert (ref - got).abs().max() <= 2e-3 * ref.abs().max()
        assert (ref - got).abs().mean() <= 1e-3 * ref.abs().mean()


def test_graph_has_one_qdq_pair_per_quantizer_and_int8_weights(tmp_path):
    model = _w4a4_detector()
    quantizers = [q for _, q in iter_quantizers(model)]
    layers = weight_quant_targets(model)
    summary = export_onnx(model, tmp_path / 'm.onnx', (96, 96))
    assert summary.quantize_linear == len(quantizers)
    assert summary.dequantize_linear == len(quantizers) + len(layers)
    assert summary.int8_weights == len(layers)
    graph = onnx.load(summary.path).graph
    clips = [n for n in graph.node if n.op_type == 'Clip']
    assert len(clips) >= len(quantizers)
    # 4-bit weights in int8 containers: every value within [-8, 7]
    weights = {i.name: onnx.numpy_helper.to_array(i)
               for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1}
    for name, values in weights.items():
        low = -128 if 'patch_embed' in name else -8  # 8-bit patch embedding
        assert values.min() >= low and values.max() <= -low - 1, name
    qkv = next(m for name, m, _ in layers if name.endswith('qkv'))
    copy = exportable_copy(model)
    ints = copy.backbone.stages[0].blocks[0].attn.w_msa.qkv.weight_int
    assert ints.dtype == torch.int8 and ints.abs().max() <= 8
    torch.testing.assert_close(ints.float() * qkv.weight_scale[:, None],
                               qkv.weight, rtol=0, atol=1e-6)


def test_uncalibrated_or_unquantized_models_are_refused(tmp_path):
    from mmdet.registry import MODELS

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(STAGE1_CONFIG))
    model = MODELS.build(cfg.model).eval()
    with pytest.raises(ExportError, match='never calibrated'):
        export_onnx(model, tmp_path / 'm.onnx', (96, 96))
    with pytest.raises(ExportError, match='no activation quantizers'):
        export_onnx(remove_act_quant(model), tmp_path / 'm.onnx', (96, 96))
    with pytest.raises(ExportError, match='opset'):
        export_onnx(_w4a4_detector(), tmp_path / 'm.onnx', (96, 96),
                    opset=11)
    assert not list(tmp_path.iterdir())


def test_export_tool_on_a_packed_checkpoint(tiny_shapes, tmp_path):
    model = _w4a4_detector()
    ckpt = tmp_path / 'quantized_w4a4.pth'
    meta = dict(weights=dict(w_bits=4), bits='W4A4')
    save_quantized(model, meta, ckpt)
    out = tmp_path / 'export' / 'model.onnx'
    proc = subprocess.run(
        [sys.executable, 'tools/export_onnx.py', str(STAGE1_CONFIG),
         str(ckpt), '--out', str(out), '--verify', '--cfg-options',
         *_options(tiny_shapes)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'int8 weight tensors' in proc.stdout
    report = json.loads((tmp_path / 'export' / 'model.verify.json')
                        .read_text())
    for row in report['levels']['basic']:
        assert row['max_abs_diff'] <= 1e-4 * row['max_abs_output']
    graph = onnx.load(str(out)).graph
    assert sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
               for i in graph.initializer) == len(weight_quant_targets(model))


def test_export_tool_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, 'tools/export_onnx.py', str(STAGE1_CONFIG),
         str(tmp_path / 'nope.pth'), '--out', str(tmp_path / 'm.onnx')],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert 'not found' in proc.stderr
    assert not list(tmp_path.iterdir())
