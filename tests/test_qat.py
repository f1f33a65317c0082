"""The full-QAT baseline: LSQ weight fake-quantizers (quant_cfg.w_bits)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import SwinTransformer
from torch import nn

from gplq_mmdet import calibrate_act_quant, prepare_act_quant, remove_act_quant
from gplq_mmdet.config import QuantConfig
from gplq_mmdet.ptq import dequantize, quantize_weight
from gplq_mmdet.qat import (
    WeightQuantizer,
    add_weight_quantizer,
    init_weight_quantizers,
    iter_weight_quantizers,
)


def _swin() -> SwinTransformer:
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8), window_size=7)
    swin.eval()
    return swin


def test_weight_quantizer_matches_closed_form_and_learns():
    torch.manual_seed(0)
    w = torch.randn(6, 10, requires_grad=True)
    q = WeightQuantizer(4, 6)
    q.init_from(w)
    s = q.step.detach()
    expected = torch.clamp(torch.round(w.detach() / s[:, None]), -8, 7) * \
        s[:, None]
    out = q(w)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # straight-through
    assert q.step.grad is not None and q.step.grad.abs().sum() > 0


def test_init_matches_stage2_quantization():
    """QAT starts from exactly the weights stage 2 would produce."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    add_weight_quantizer(layer, 4)
    assert init_weight_quantizers(layer) == 1
    assert init_weight_quantizers(layer) == 0  # already initialised
    x = torch.randn(3, 16)
    ints, scale = quantize_weight(layer.weight, 4, 'percentile')
    torch.testing.assert_close(
        layer(x), F.linear(x, dequantize(ints, scale), layer.bias),
        rtol=0, atol=1e-5)
    assert isinstance(layer.weight, nn.Parameter)  # parameter untouched


def test_conv_weights_are_quantized_per_output_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    ref = copy.deepcopy(conv)
    add_weight_quantizer(conv, 8)
    init_weight_quantizers(conv)
    x = torch.randn(1, 3, 8, 8)
    ints, scale = quantize_weight(ref.weight, 8, 'percentile')
    with torch.no_grad():
        ref.weight.copy_(dequantize(ints, scale))
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=1e-5)


def test_w_bits_adds_weight_quantizers_to_the_act_quantized_layers():
    swin = _swin()
    fp32_keys = set(swin.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fp32_out = swin(x)[0]
    prepare_act_quant(swin, dict(a_bits=4, w_bits=4))
    layers = [m for m in swin.modules() if hasattr(m, 'input_quantizer')]
    pairs = dict(iter_weight_quantizers(swin))
    assert set(pairs) == set(layers)
    assert swin.patch_embed.projection.weight_quantizer.bits == 8
    assert all(q.bits == 4 for m, q in pairs.items()
               if m is not swin.patch_embed.projection)
    extra = set(swin.state_dict()) - fp32_keys
    assert all('_quantizer.' in k for k in extra)
    assert any(k.endswith('weight_quantizer.step') for k in extra)
    init_weight_quantizers(swin)
    calibrate_act_quant(swin, [x], swin, 1)
    outs = swin(x)
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(q.step.grad is not None for q in pairs.values())
    remove_act_quant(swin)
    assert set(swin.state_dict()) == fp32_keys
    assert not any(True for _ in iter_weight_quantizers(swin))
    with torch.no_grad():
        torch.testing.assert_close(swin(x)[0], fp32_out)


def test_w_bits_is_validated():
    with pytest.raises(ValueError, match='w_bits=1 is out of range'):
        QuantConfig(w_bits=1)
    with pytest.raises(TypeError, match='Linear and Conv2d'):
        add_weight_quantizer(nn.LayerNorm(4), 4)
