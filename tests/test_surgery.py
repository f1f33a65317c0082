"""Model surgery on Swin and timm ViT backbones and whole detectors."""
import copy

import pytest
import torch
from mmdet.models.backbones import ResNet, SwinTransformer
from mmdet.models.backbones.swin import WindowMSA
from timm.layers.attention import Attention
from torch import nn

from gplq_mmdet import (
    TimmViT,
    act_quant_disabled,
    calibrate_act_quant,
    iter_quantizers,
    prepare_act_quant,
    remove_act_quant,
)
from gplq_mmdet.attention import QuantTimmAttention, QuantWindowMSA
from gplq_mmdet.surgery import UnsupportedModelError, quant_config_of


def _swin() -> SwinTransformer:
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=32, depths=(1, 1, 2, 1),
                           num_heads=(1, 2, 4, 8), window_size=7)
    swin.eval()  # mmdet's Swin.train() returns None, so no chaining
    return swin


def _vit(name: str = 'vit_small_patch14_dinov2', **kw) -> TimmViT:
    torch.manual_seed(0)
    return TimmViT(name, **kw).eval()


def _calibrate(model, inputs):
    return calibrate_act_quant(model, inputs, model, num_batches=len(inputs))


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_swin_every_linear_and_both_matmuls_quantized():
    swin = _swin()
    n_linear = _count(swin, nn.Linear)
    n_attn = _count(swin, WindowMSA)
    assert n_attn == 5  # depths 1+1+2+1, including shifted windows
    prepare_act_quant(swin, dict(a_bits=4))
    names = dict(iter_quantizers(swin))
    linears = [m for m in swin.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == n_linear
    assert all(isinstance(m.input_quantizer.step, nn.Parameter)
               for m in linears)
    attns = [m for m in swin.modules() if isinstance(m, WindowMSA)]
    assert all(type(m) is QuantWindowMSA for m in attns)
    # Linear inputs + 4 matmul operands per block + the patch embedding.
    assert len(names) == n_linear + 4 * n_attn + 1
    patch = swin.patch_embed.projection.input_quantizer
    assert patch.bits == 8 and patch.granularity == 'per_tensor'
    reduction = swin.stages[0].downsample.reduction.input_quantizer
    assert reduction.bits == 4 and reduction.granularity == 'per_channel'
    w_msa = swin.stages[0].blocks[0].attn.w_msa
    assert not w_msa.attn_quantizer.signed
    assert w_msa.q_quantizer.granularity == 'per_tensor'


@pytest.mark.parametrize('build', [_swin, _vit])
def test_disabled_quantizers_are_bit_identical(build):
    fp32 = build()
    quant = prepare_act_quant(copy.deepcopy(fp32), dict(a_bits=4))
    x = torch.randn(2, 3, 96, 96)
    _calibrate(quant, [x])
    with torch.no_grad():
        ref = fp32(x)
        with act_quant_disabled(quant):
            off = quant(x)
        on = quant(x)
    for r, o, q in zip(ref, off, on, strict=True):
        assert torch.equal(r, o)
        assert not torch.equal(r, q)
        cos = nn.functional.cosine_similarity(r.flatten(), q.flatten(), 0)
        assert cos > 0.5
    # Flags are restored after the context.
    assert all(bool(q.enabled) for _, q in iter_quantizers(quant))


def test_timm_attention_quantized_even_with_fused_kernel():
    vit = _vit()
    attns = [m for m in vit.modules() if isinstance(m, Attention)]
    assert len(attns) == 12 and all(m.fused_attn for m in attns)
    n_linear = _count(vit, nn.Linear)
    prepare_act_quant(vit, dict(a_bits=4))
    assert all(type(m) is QuantTimmAttention for m in attns)
    assert len(dict(iter_quantizers(vit))) == n_linear + 4 * 12 + 1
    _calibrate(vit, [torch.randn(1, 3, 64, 64)])
    # Calibration reached every operand: the fused path was not taken.
    for m in attns:
        for name in ('q_quantizer', 'k_quantizer', 'v_quantizer',
                     'attn_quantizer'):
            assert bool(getattr(m, name).calibrated), name


def test_quantizing_only_the_attention_path_changes_outputs():
    vit = _vit()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = vit(x)[2]
    prepare_act_quant(vit, dict(a_bits=8, attn_bits=3))
    _calibrate(vit, [x])
    for name, q in iter_quantizers(vit):
        q.enable(name.endswith(('q_quantizer', 'k_quantizer')))
    with torch.no_grad():
        assert not torch.equal(vit(x)[2], ref)


def test_remove_restores_the_fp32_model():
    fp32 = _swin()
    model = copy.deepcopy(fp32)
    keys = set(model.state_dict())
    prepare_act_quant(model, dict(a_bits=3, a_granularity='per_tensor'))
    x = torch.randn(1, 3, 64, 64)
    _calibrate(model, [x])
    assert set(model.state_dict()) > keys
    assert quant_config_of(model).a_bits == 3
    remove_act_quant(model)
    assert quant_config_of(model) is None
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, (QuantWindowMSA,)) for m in model.modules())
    with torch.no_grad():
        for a, b in zip(fp32(x), model(x), strict=True):
            assert torch.equal(a, b)


def test_state_dict_round_trip_keeps_steps():
    model = prepare_act_quant(_swin(), dict(a_bits=4))
    _calibrate(model, [torch.randn(1, 3, 64, 64)])
    state = model.state_dict()
    key = 'stages.0.blocks.0.attn.w_msa.q_quantizer.step'
    assert key in state and bool(
        state['stages.0.blocks.0.attn.w_msa.q_quantizer.calibrated'])
    fresh = prepare_act_quant(_swin(), dict(a_bits=4))
    fresh.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), fresh(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_token'])
def test_other_granularities_run(granularity):
    model = prepare_act_quant(_swin(), dict(a_granularity=granularity,
                                            attn_granularity=granularity))
    x = torch.randn(1, 3, 64, 64)
    _calibrate(model, [x])
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(x))


def test_bad_input_is_explained():
    with pytest.raises(UnsupportedModelError, match='ResNet backbone'):
        prepare_act_quant(ResNet(18), dict(a_bits=4))
    with pytest.raises(ValueError, match='a_bits=9 is out of range'):
        prepare_act_quant(_swin(), dict(a_bits=9))
    with pytest.raises(ValueError, match="scope='neck' is unknown"):
        prepare_act_quant(_swin(), dict(scope='neck'))
    with pytest.raises(ValueError, match='bare backbone'):
        prepare_act_quant(_swin(), dict(scope='all'))
    with pytest.raises(ValueError, match='unknown quant_cfg key.*a_bit\\b'):
        prepare_act_quant(_swin(), dict(a_bit=4))
    model = prepare_act_quant(_swin(), {})
    with pytest.raises(ValueError, match='already has activation'):
        prepare_act_quant(model, {})
    with pytest.raises(ValueError, match='yielded no batches'):
        calibrate_act_quant(model, [], model, num_batches=4)
    # A failed calibration leaves no quantizer stuck in observing mode.
    assert not any(q.calibrating for _, q in iter_quantizers(model))


def test_scope_all_quantizes_neck_and_heads_through_the_registry():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from gplq_mmdet.hooks import detector_forward

    from .conftest import SWIN_CONFIG

    register_all_modules()
    cfg = Config.fromfile(str(SWIN_CONFIG))
    model = MODELS.build(dict(type='ActQuantDetector', detector=cfg.model,
                              quant_cfg=dict(scope='all')))
    assert type(model).__name__ == 'MaskRCNN'  # not a wrapper: same keys
    assert quant_config_of(model).scope == 'all'
    lateral = model.neck.lateral_convs[0].conv
    assert lateral.input_quantizer.channel_dim == 1
    assert lateral.input_quantizer.step.numel() == lateral.in_channels
    assert hasattr(model.rpn_head.rpn_conv, 'input_quantizer')
    assert hasattr(model.roi_head.bbox_head.shared_fcs[0], 'input_quantizer')
    assert hasattr(model.roi_head.mask_head.conv_logits, 'input_quantizer')
    assert not hasattr(model.roi_head.mask_head.upsample, 'input_quantizer')
    names = [n for n, _ in iter_quantizers(model)]
    assert any(n.startswith('backbone.') for n in names)
    # Calibrate through the whole detector, heads included.
    from mmdet.structures import DetDataSample
    sample = DetDataSample(metainfo=dict(img_shape=(64, 64),
                                         ori_shape=(64, 64),
                                         pad_shape=(64, 64),
                                         batch_input_shape=(64, 64),
                                         scale_factor=(1.0, 1.0)))
    batch = dict(inputs=[torch.randint(0, 255, (3, 64, 64)).float()],
                 data_samples=[sample])
    model.eval()
    calibrate_act_quant(model, [batch], detector_forward(model), 1)
    assert all(bool(q.calibrated) for _, q in iter_quantizers(model))


def test_per_token_cannot_quantize_convolutions():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from .conftest import SWIN_CONFIG

    register_all_modules()
    cfg = Config.fromfile(str(SWIN_CONFIG))
    with pytest.raises(ValueError, match="need 'per_channel' or"):
        MODELS.build(dict(type='ActQuantDetector', detector=cfg.model,
                          quant_cfg=dict(scope='all',
                                         a_granularity='per_token')))
