"""Stage-2 weight quantization of an act-quantized Swin and its packing."""
import pytest
import torch
from mmdet.models.backbones import SwinTransformer
from torch import nn

from gplq_mmdet import calibrate_act_quant, prepare_act_quant
from gplq_mmdet.stage2 import (
    WeightQuantConfig,
    packed_state,
    quantize_weights_,
    unpack_state,
    weight_quant_targets,
)


def _stage1_swin() -> SwinTransformer:
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8))
    swin.eval()
    prepare_act_quant(swin, dict(a_bits=4))
    calibrate_act_quant(swin, [torch.randn(2, 3, 64, 64)], swin, 1)
    return swin


@pytest.mark.parametrize('gptq', [False, True])
def test_weights_land_on_their_grid(gptq):
    swin = _stage1_swin()
    batches = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    quantize_weights_(swin, WeightQuantConfig(w_bits=4, gptq=gptq),
                      batches, swin)
    targets = weight_quant_targets(swin)
    assert sum(is_patch for _, _, is_patch in targets) == 1
    assert len(targets) == sum(isinstance(m, nn.Linear)
                               for m in swin.modules()) + 1
    for _, module, is_patch in targets:
        bits = 8 if is_patch else 4
        rows = module.weight.reshape(module.weight.shape[0], -1)
        q = rows / module.weight_scale[:, None]
        torch.testing.assert_close(q, torch.round(q), atol=1e-4, rtol=0)
        assert q.abs().max() <= 2**(bits - 1) + 1e-4
        assert module.weight_bits == bits


def test_packed_state_round_trip_and_size():
    swin = _stage1_swin()
    quantize_weights_(swin, dict(w_bits=4, method='mse'))
    packed = packed_state(swin)
    restored = unpack_state(packed)
    reference = swin.state_dict()
    for key, value in restored.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6,
                                   rtol=0)
    qkv = packed['packed_weights']['stages.0.blocks.0.attn.w_msa.qkv.weight']
    assert qkv['data'].numel() == swin.stages[0].blocks[0].attn.w_msa.qkv \
        .weight.numel() // 2
    fp32_bytes = sum(reference[k].numel() * 4
                     for k in packed['packed_weights'])
    packed_bytes = sum(e['data'].numel() + e['scale'].numel() * 4
                       for e in packed['packed_weights'].values())
    assert packed_bytes < fp32_bytes / 6  # ~1/8 of FP32 plus scales


def test_needs_stage1_and_valid_settings():
    swin = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8))
    with pytest.raises(ValueError, match='no activation quantizers'):
        quantize_weights_(swin, dict(w_bits=4))
    with pytest.raises(ValueError, match='w_bits=1 is out of range'):
        WeightQuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="'best' is unknown"):
        WeightQuantConfig(method='best')
    with pytest.raises(ValueError, match='needs calibration batches'):
        quantize_weights_(_stage1_swin(), dict(gptq=True))


def test_mmengine_loads_a_packed_checkpoint_as_dequantized_weights(
        tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint

    swin = _stage1_swin()
    quantize_weights_(swin, dict(w_bits=3))
    path = tmp_path / 'w3a4.pth'
    torch.save(dict(packed_state(swin), meta=dict(note='test')), path)
    fresh = _stage1_swin()
    torch.nn.init.zeros_(fresh.stages[0].blocks[0].attn.w_msa.qkv.weight)
    load_checkpoint(fresh, str(path), strict=True, logger='silent')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(swin(x), fresh(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
