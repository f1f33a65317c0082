"""Model surgery: put activation fake-quantizers into a detector and take
them out again.

Where quantizers go (selected by module type, never by name):

* the patch-embedding convolution input, ``patch_embed_bits`` per tensor;
* the input of every ``nn.Linear`` in the backbone (Swin: qkv, proj, fc1,
  fc2 and the patch-merging reduction; ViT: qkv, proj, fc1, fc2);
* both operands of both attention matmuls of every attention block
  (:mod:`gplq_mmdet.attention`);
* with ``scope='all'``, also the input of every ``nn.Conv2d`` and
  ``nn.Linear`` outside the backbone (neck, RPN and RoI heads).
  Transposed convolutions (the mask head's upsampling) stay FP32.

With ``quant_cfg.w_bits`` set (the full-QAT baseline), each of those
Linear/Conv2d layers also gets a ``weight_quantizer`` (:mod:`.qat`).

Each quantized Linear/Conv2d gets an ``input_quantizer`` submodule applied
by a forward pre-hook whose handle is kept, so :func:`remove_act_quant`
restores the original model exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import MATMUL_QUANTIZERS, QUANT_ATTENTION, head_dim
from .config import QuantConfig
from .qat import add_weight_quantizer, remove_weight_quantizer
from .quantizers import ActQuantizer
from .qwt import detach_qwt, register_qwt_loading, unregister_qwt_loading

_HANDLE = '_input_quantizer_handle'
_ORIGINAL_CLASS = '_fp32_class'
CFG_ATTR = 'gplq_quant_cfg'


class UnsupportedModelError(TypeError):
    """The model is not one surgery knows how to quantize."""


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), ) + tuple(args[1:])


def _quantize_image(module: nn.Conv2d, args: tuple) -> tuple:
    """The patch embedding's input is the image batch: refuse one that the
    detector would silently misread before it is quantized."""
    x = args[0]
    if x.dim() != 4 or x.shape[1] != module.in_channels:
        raise ValueError(
            f'the backbone expects images of shape N x {module.in_channels} '
            f'x H x W, got {tuple(x.shape)}: convert grayscale or RGBA images'
            f' to {module.in_channels} channels (in an mmdet pipeline: '
            "LoadImageFromFile with color_type='color')")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f'the input batch holds {bad} NaN/Inf values: check the images '
            'and the data preprocessor (mean/std) before quantizing or '
            'training on them')
    return _quantize_input(module, args)


def _add_input_quantizer(module: nn.Module, quantizer: ActQuantizer,
                         hook: Callable = _quantize_input) -> None:
    module.input_quantizer = quantizer
    setattr(module, _HANDLE, module.register_forward_pre_hook(hook))


def patch_embed_conv(backbone: nn.Module) -> nn.Conv2d:
    """The convolution that embeds image patches, for supported backbones."""
    from mmdet.models.backbones import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    from .backbones import TimmViT

    if isinstance(backbone, SwinTransformer):
        return backbone.patch_embed.projection
    if isinstance(backbone, TimmViT):
        backbone = backbone.vit
    if isinstance(backbone, VisionTransformer):
        return backbone.patch_embed.proj
    raise UnsupportedModelError(
        f'cannot quantize a {type(backbone).__name__} backbone: supported '
        'are mmdet SwinTransformer (type=QuantSwinTransformer), timm '
        'VisionTransformer models (type=QuantTimmViT) and their detectors')


def split_detector(model: nn.Module) -> tuple[nn.Module, bool]:
    """(backbone, is_detector) for a detector or a bare backbone."""
    from mmdet.models.detectors import BaseDetector

    if isinstance(model, BaseDetector):
        return model.backbone, True
    return model, False


def _conv_or_linear_quantizer(module: nn.Module,
                              cfg: QuantConfig) -> ActQuantizer:
    if isinstance(module, nn.Linear):
        return ActQuantizer(cfg.a_bits, cfg.a_granularity,
                            num_channels=module.in_features)
    if cfg.a_granularity == 'per_token':
        raise ValueError(
            "a_granularity='per_token' applies to token sequences; with "
            "scope='all' the neck and head convolutions need 'per_channel' "
            "or 'per_tensor'")
    return ActQuantizer(cfg.a_bits, cfg.a_granularity,
                        num_channels=module.in_channels, channel_dim=1)


def prepare_act_quant(model: nn.Module,
                      cfg: QuantConfig | dict | None = None) -> nn.Module:
    """Insert activation fake-quantizers in place; return ``model``.

    ``model`` is an mmdet detector or a supported backbone. New quantizers
    are enabled but uncalibrated (step 1): run :func:`calibrate_act_quant`
    before use.

    Example::

        >>> from mmdet.models.backbones import SwinTransformer
        >>> swin = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1),
        ...                        num_heads=(1, 2, 4, 8))
        >>> _ = prepare_act_quant(swin, dict(a_bits=4))
        >>> len(list(iter_quantizers(swin))) > 0
        True
    """
    cfg = QuantConfig.from_dict(cfg)
    backbone, is_detector = split_detector(model)
    patch_conv = patch_embed_conv(backbone)
    if any(True for _ in iter_quantizers(model)):
        raise ValueError('the model already has activation quantizers; '
                         'call remove_act_quant(model) first')
    if cfg.scope == 'all' and not is_detector:
        raise ValueError(
            "scope='all' quantizes the neck and heads, which a bare backbone "
            "does not have: pass the whole detector (type='ActQuantDetector'"
            " in a config) or use scope='backbone'")

    _add_input_quantizer(patch_conv, ActQuantizer(cfg.patch_embed_bits,
                                                  'per_tensor'),
                         _quantize_image)
    for module in backbone.modules():
        if isinstance(module, nn.Linear):
            _add_input_quantizer(module, _conv_or_linear_quantizer(module,
                                                                   cfg))
        quant_cls = QUANT_ATTENTION.get(type(module))
        if quant_cls is not None and cfg.quantize_attention:
            width = head_dim(module)
            bits, gran = cfg.matmul_bits, cfg.attn_granularity
            module.q_quantizer = ActQuantizer(bits, gran, num_channels=width)
            module.k_quantizer = ActQuantizer(bits, gran, num_channels=width)
            module.v_quantizer = ActQuantizer(bits, gran, num_channels=width)
            module.attn_quantizer = ActQuantizer(bits, 'per_tensor',
                                                 signed=False)
            setattr(module, _ORIGINAL_CLASS, type(module))
            module.__class__ = quant_cls
    if cfg.scope == 'all':
        for name, module in model.named_modules():
            if name == 'backbone' or name.startswith('backbone.'):
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                _add_input_quantizer(module,
                                     _conv_or_linear_quantizer(module, cfg))
    if cfg.w_bits is not None:
        for module in list(model.modules()):
            if hasattr(module, 'input_quantizer'):
                add_weight_quantizer(module, cfg.patch_embed_bits
                                     if module is patch_conv else cfg.w_bits)
    setattr(model, CFG_ATTR, cfg)
    register_qwt_loading(model)
    return model


def remove_act_quant(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_act_quant`: hooks, quantizers (weight
    quantizers too), attention classes, QwT compensations. The FP32
    parameters are left as they are."""
    detach_qwt(model)
    for module in model.modules():
        unregister_qwt_loading(module)
        remove_weight_quantizer(module)
        module.__dict__.pop(CFG_ATTR, None)
        handle = module.__dict__.pop(_HANDLE, None)
        if handle is not None:
            handle.remove()
            del module.input_quantizer
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            for name in MATMUL_QUANTIZERS:
                delattr(module, name)
            module.__class__ = original
    return model


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The settings ``prepare_act_quant`` applied to ``model`` or to one of
    its submodules (a wrapper backbone), or None."""
    for module in model.modules():
        cfg = module.__dict__.get(CFG_ATTR)
        if cfg is not None:
            return cfg
    return None


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """``(qualified name, quantizer)`` for every activation quantizer."""
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            yield name, module


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    for _, quantizer in iter_quantizers(model):
        quantizer.enable(enabled)


@contextmanager
def act_quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model with every activation quantizer off (FP32 numerics),
    restoring each quantizer's own flag afterwards."""
    saved = [(q, bool(q.enabled)) for _, q in iter_quantizers(model)]
    try:
        for q, _ in saved:
            q.disable()
        yield model
    finally:
        for q, flag in saved:
            q.enable(flag)


def calibrate_act_quant(model: nn.Module, batches: Iterable[Any],
                        forward: Callable[[Any], Any],
                        num_batches: int) -> int:
    """Initialise every quantizer's step from ``num_batches`` batches.

    ``forward(batch)`` runs the model on one batch; activations are observed
    at FP32 (no quantization during calibration). Returns the number of
    batches used.
    """
    quantizers = [q for _, q in iter_quantizers(model)]
    if not quantizers:
        raise ValueError('the model has no activation quantizers: run '
                         'prepare_act_quant first')
    if num_batches < 1:
        raise ValueError(f'num_batches must be >= 1, got {num_batches}')
    for q in quantizers:
        q.begin_calibration()
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if used == num_batches:
                    break
                forward(batch)
                used += 1
        if used == 0:
            raise ValueError(
                'the calibration data yielded no batches: check that the '
                'dataset is not empty (after filtering) and the loader '
                'drop_last/batch_size settings')
        for q in quantizers:
            q.end_calibration()
    finally:
        for q in quantizers:
            q._observer = None
    return used
