"""Weight fake-quantizers for the full-QAT baseline (plain PyTorch).

GPLQ keeps the weights FP32 during stage 1 and quantizes them afterwards.
The baseline it is compared against, full quantization-aware training,
fake-quantizes the weights from the first iteration too, with a learned
LSQ step per output channel. This module adds that to the same layers
whose inputs stage 1 quantizes (``quant_cfg.w_bits``), so the two differ
only in when the weights are quantized.

Each such layer gets a ``weight_quantizer`` and a subclass of its own class
whose ``forward`` runs the parent's forward with the fake-quantized weight
in place of the parameter (the parameter itself is untouched, so
state_dict keys, optimizers and DDP see the FP32 weight as usual).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .ptq import weight_scales
from .quantizers import MIN_STEP, check_bits, quant_range

_ORIGINAL_CLASS = '_fp32_weight_class'
_QAT_CLASSES: dict[type, type] = {}


class WeightQuantizer(nn.Module):
    """LSQ fake quantizer of a weight: signed, symmetric, one learned step
    per output channel (dim 0). The step starts from stage 2's percentile
    clipping (:func:`init_from`), so QAT and GPLQ start from the same
    quantized weights."""

    def __init__(self, bits: int, num_channels: int) -> None:
        super().__init__()
        check_bits(bits, 'w_bits')
        self.bits = bits
        self.q_min, self.q_max = quant_range(bits, True)
        self.step = nn.Parameter(torch.ones(num_channels))
        self.register_buffer('zero_point', torch.zeros(num_channels),
                             persistent=False)
        self.register_buffer('calibrated', torch.tensor(False))

    def extra_repr(self) -> str:
        return f'bits={self.bits}, per_out_channel={self.step.numel()}'

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, method: str = 'percentile'
                  ) -> None:
        """Set the steps from ``weight`` as stage 2 would quantize it."""
        scale = weight_scales(weight, self.bits, method)
        self.step.copy_(scale.to(self.step))
        self.calibrated.fill_(True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[0] != self.step.numel():
            raise ValueError(f'weight quantizer has {self.step.numel()} '
                             f'steps, the weight {weight.shape[0]} output '
                             'channels')
        per_channel = weight.numel() / weight.shape[0]
        grad = 1.0 / math.sqrt(per_channel * self.q_max)
        step = self.step.abs().clamp_min(MIN_STEP).float()
        out = torch._fake_quantize_learnable_per_channel_affine(
            weight.float(), step, self.zero_point, 0, self.q_min, self.q_max,
            grad)
        return out.to(weight.dtype)


class _FakeQuantWeightForward:
    """Mixin: the parent's forward, seeing the fake-quantized weight."""

    def forward(self, *args, **kwargs):
        weight = self._parameters['weight']
        self._parameters['weight'] = self.weight_quantizer(weight)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._parameters['weight'] = weight


def _qat_class(cls: type) -> type:
    if cls not in _QAT_CLASSES:
        _QAT_CLASSES[cls] = type(f'WeightQAT{cls.__name__}',
                                 (_FakeQuantWeightForward, cls), {})
    return _QAT_CLASSES[cls]


def add_weight_quantizer(module: nn.Module, bits: int) -> None:
    """Fake-quantize ``module.weight`` (a Linear or Conv2d) from now on."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError('weight quantizers go on Linear and Conv2d layers, '
                        f'not {type(module).__name__}')
    if hasattr(module, 'weight_quantizer'):
        raise ValueError('the layer already has a weight quantizer')
    module.weight_quantizer = WeightQuantizer(bits, module.weight.shape[0])
    setattr(module, _ORIGINAL_CLASS, type(module))
    module.__class__ = _qat_class(type(module))


def remove_weight_quantizer(module: nn.Module) -> None:
    """Undo :func:`add_weight_quantizer` (the FP32 weight stays)."""
    original = module.__dict__.pop(_ORIGINAL_CLASS, None)
    if original is not None:
        del module.weight_quantizer
        module.__class__ = original


def iter_weight_quantizers(model: nn.Module
                           ) -> Iterator[tuple[nn.Module, WeightQuantizer]]:
    """``(layer, quantizer)`` for every fake-quantized weight."""
    for module in model.modules():
        quantizer = getattr(module, 'weight_quantizer', None)
        if isinstance(quantizer, WeightQuantizer):
            yield module, quantizer


def init_weight_quantizers(model: nn.Module, method: str = 'percentile'
                           ) -> int:
    """Initialise every uncalibrated weight step from the current weights
    (call it after the FP32 checkpoint is loaded). Returns how many."""
    done = 0
    for module, quantizer in iter_weight_quantizers(model):
        if not bool(quantizer.calibrated):
            quantizer.init_from(module.weight, method)
            done += 1
    return done
