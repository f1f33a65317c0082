"""Stage 2 on a model: quantize the weights of the act-quantized layers and
save/load them packed.

A layer's weights are quantized exactly when its input is (same scope as
stage 1): every Linear/Conv2d that carries an ``input_quantizer``. The
patch-embedding convolution, whose input stays at 8 bits, keeps 8-bit
weights by default. Quantized weights are written back in place
(``param.data.copy_``), so optimizers, DDP wrappers and hooks keep working,
and each quantized layer keeps its integer weights' per-channel scale in a
``weight_scale`` buffer for packing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .ptq import (
    check_clip_method,
    dequantize,
    gptq_quantize,
    pack_int,
    quantize_weight,
    unpack_int,
)
from .quantizers import check_bits
from .surgery import patch_embed_conv, quant_config_of, split_detector

PACKED_KEY = 'packed_weights'


@dataclass(frozen=True)
class WeightQuantConfig:
    """Stage-2 settings.

    Attributes:
        w_bits: bits of the weights of every act-quantized layer.
        method: clipping, one of ``ptq.CLIP_METHODS``.
        gptq: GPTQ error feedback with Hessians from the calibration data
            (Linear layers; convolutions use round-to-nearest).
        patch_embed_bits: bits of the patch-embedding weights.
        damp: GPTQ diagonal damping, relative to ``mean(diag H)``.
        block_size: GPTQ lazy-update block.
        qwt: fit QwT compensations block by block after quantizing
            (:mod:`gplq_mmdet.qwt`).
        qwt_ridge: QwT's lambda, relative to the mean diagonal of X X^T.
    """

    w_bits: int = 4
    method: str = 'percentile'
    gptq: bool = False
    patch_embed_bits: int = 8
    damp: float = 0.01
    block_size: int = 128
    qwt: bool = False
    qwt_ridge: float = 1e-3

    def __post_init__(self) -> None:
        check_bits(self.w_bits, 'w_bits')
        check_bits(self.patch_embed_bits, 'patch_embed_bits')
        check_clip_method(self.method)
        if not 0 <= self.damp < 1:
            raise ValueError(f'damp={self.damp} must be in [0, 1)')
        if not self.qwt_ridge >= 0:
            raise ValueError(f'qwt_ridge={self.qwt_ridge} must be >= 0')

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_quant_targets(model: nn.Module) -> list[tuple[str, nn.Module,
                                                         bool]]:
    """``(name, layer, is_patch_embedding)`` for every layer whose weights
    stage 2 quantizes: the act-quantized Linear/Conv2d layers."""
    if quant_config_of(model) is None:
        raise ValueError('the model has no activation quantizers: run stage '
                         '1 (or prepare_act_quant) first')
    patch_conv = patch_embed_conv(split_detector(model)[0])
    return [(name, module, module is patch_conv)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            and hasattr(module, 'input_quantizer')]


def _hessians(layers: list[nn.Linear], batches: Iterable[Any],
              forward: Callable[[Any], Any]) -> dict[nn.Module, torch.Tensor]:
    """``2 X X^T / n`` of each layer's actual (act-quantized) inputs."""
    sums = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            for m in layers}
    counts = dict.fromkeys(layers, 0)

    def record(module, args, output) -> None:
        x = args[0].detach().reshape(-1, module.in_features).double().cpu()
        sums[module] += x.T @ x
        counts[module] += x.shape[0]

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in layers if counts[m] == 0]
    if missing:
        raise ValueError(f'{len(missing)} layers saw no calibration input; '
                         'the calibration data is empty')
    return {m: 2 * sums[m] / counts[m] for m in layers}


def quantize_weights_(model: nn.Module, cfg: WeightQuantConfig | dict,
                      batches: Iterable[Any] | None = None,
                      forward: Callable[[Any], Any] | None = None
                      ) -> nn.Module:
    """Quantize the weights of the act-quantized layers in place.

    ``batches`` and ``forward`` (one batch through the model) are needed
    for GPTQ only. Returns ``model``.
    """
    cfg = cfg if isinstance(cfg, WeightQuantConfig) else WeightQuantConfig(
        **cfg)
    targets = weight_quant_targets(model)
    hessians = {}
    if cfg.gptq:
        if batches is None or forward is None:
            raise ValueError('gptq=True needs calibration batches and a '
                             'forward function')
        linears = [m for _, m, _ in targets if isinstance(m, nn.Linear)]
        hessians = _hessians(linears, batches, forward)
    for _, module, patch in targets:
        bits = cfg.patch_embed_bits if patch else cfg.w_bits
        weight = module.weight
        if module in hessians:
            ints, scale = gptq_quantize(weight, hessians[module], bits,
                                        cfg.method, cfg.damp, cfg.block_size)
        else:
            ints, scale = quantize_weight(weight, bits, cfg.method)
        with torch.no_grad():
            weight.copy_(dequantize(ints, scale).to(weight))
        module.register_buffer('weight_scale', scale.to(weight.device))
        module.weight_bits = bits
    model.gplq_weight_cfg = cfg
    return model


def packed_state(model: nn.Module) -> dict[str, Any]:
    """The model's state with every quantized weight packed to its bits:
    ``{'state_dict': rest, 'packed_weights': {name: {...}}}``."""
    state = model.state_dict()
    packed = {}
    for name, module in model.named_modules():
        if not hasattr(module, 'weight_scale'):
            continue
        key = f'{name}.weight'
        scale = module.weight_scale.detach().cpu()
        weight = state.pop(key).detach().cpu().float()
        rows = weight.reshape(weight.shape[0], -1)
        ints = torch.round(rows / scale[:, None]).to(torch.int8)
        bits = module.weight_bits
        packed[key] = dict(data=pack_int(ints, bits), scale=scale,
                           shape=torch.tensor(weight.shape),
                           bits=torch.tensor(bits))
        state.pop(f'{name}.weight_scale', None)
    return dict(state_dict={k: v.detach().cpu() for k, v in state.items()},
                packed_weights=packed)


def unpack_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A plain state dict (dequantized FP32 weights) from a packed one."""
    state = dict(checkpoint['state_dict'])
    for key, entry in checkpoint[PACKED_KEY].items():
        shape = tuple(int(s) for s in entry['shape'])
        ints = unpack_int(entry['data'], int(entry['bits']), shape)
        state[key] = dequantize(ints, entry['scale'])
    return state


def restore_weight_quant(model: nn.Module, checkpoint: dict[str, Any]
                         ) -> int:
    """Give the layers of a packed checkpoint's quantized weights their
    ``weight_scale`` and ``weight_bits`` again (a loaded state dict holds
    only the dequantized weights). Returns how many layers got them."""
    modules = dict(model.named_modules())
    for key, entry in checkpoint.get(PACKED_KEY, {}).items():
        name = key[:-len('.weight')]
        if name not in modules:
            raise ValueError(f'the packed weight {key} has no layer in the '
                             'model; use the config the checkpoint was '
                             'quantized with')
        module = modules[name]
        module.register_buffer('weight_scale', entry['scale'].to(
            module.weight.device))
        module.weight_bits = int(entry['bits'])
    return len(checkpoint.get(PACKED_KEY, {}))
