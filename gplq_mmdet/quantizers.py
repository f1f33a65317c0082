"""LSQ fake-quantizers for activations (plain PyTorch).

Uniform, symmetric (zero point 0), ``bits`` in 2..8, signed range
``[-2**(b-1), 2**(b-1) - 1]`` or unsigned ``[0, 2**b - 1]`` for non-negative
tensors such as softmax outputs. The step is learned with LSQ (Esser et al.):
rounding is straight-through and the step gradient is scaled by
``1 / sqrt(N * q_max)`` with ``N`` the number of elements one step covers.

The arithmetic is torch's fused learnable fake-quant kernels
(``torch._fake_quantize_learnable_per_{tensor,channel}_affine``), whose
conventions this module inherits and the tests pin down:

* forward: ``(clamp(nearbyint(x * (1/s)), q_min, q_max)) * s`` (ties to
  even);
* input gradient: 1 where ``nearbyint(x/s)`` lies in ``[q_min, q_max]``
  (so up to half a step beyond the clipping range), 0 elsewhere;
* step gradient: ``nearbyint(x/s) - x/s`` inside, ``q_min`` or ``q_max``
  outside, times the LSQ scale.

Granularity: ``per_tensor`` (one step), ``per_channel`` (one step per index
of ``channel_dim``, by default the last dimension) and ``per_token`` (a
dynamic step per token, ``ratio * max|token| / q_max``, where the clipping
``ratio`` is the learned parameter).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .observers import MinMaxObserver, PercentileObserver, TokenRatioObserver

GRANULARITIES = ('per_tensor', 'per_channel', 'per_token')
MIN_BITS, MAX_BITS = 2, 8
#: Floor of a step (and of a per-token ratio): keeps it positive and the
#: kernel's ``1/s`` finite.
MIN_STEP = 1e-8


def check_bits(bits: int, what: str = 'bits') -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not (
            MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f'{what}={bits!r} is out of range: use an integer '
                         f'from {MIN_BITS} to {MAX_BITS}')


def check_granularity(granularity: str, what: str = 'granularity') -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f'{what}={granularity!r} is unknown: use one of '
                         f'{", ".join(GRANULARITIES)}')


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a symmetric quantizer."""
    if signed:
        return -(2**(bits - 1)), 2**(bits - 1) - 1
    return 0, 2**bits - 1


class ActQuantizer(nn.Module):
    """Learnable-step fake quantizer for one activation tensor.

    Args:
        bits: bit width, 2..8.
        granularity: ``per_tensor``, ``per_channel`` or ``per_token``.
        signed: signed range; ``False`` for non-negative tensors.
        num_channels: size of ``channel_dim``, needed for ``per_channel``.
        channel_dim: the channel dimension for ``per_channel`` (``-1`` for
            Linear inputs and attention operands, ``1`` for NCHW
            convolution inputs).

    Its state (step or ratio, enable flag, calibrated flag) lives in
    parameters and buffers, so it follows ``state_dict``, ``.to()`` and DDP.
    """

    def __init__(self, bits: int = 4, granularity: str = 'per_channel',
                 signed: bool = True, num_channels: int | None = None,
                 channel_dim: int = -1) -> None:
        super().__init__()
        check_bits(bits)
        check_granularity(granularity)
        if granularity == 'per_channel' and not (
                isinstance(num_channels, int) and num_channels > 0):
            raise ValueError('a per_channel quantizer needs num_channels > 0'
                             f', got {num_channels!r}')
        self.bits = bits
        self.granularity = granularity
        self.signed = signed
        self.channel_dim = channel_dim
        self.q_min, self.q_max = quant_range(bits, signed)
        n = num_channels if granularity == 'per_channel' else 1
        # per_token learns a clipping ratio; the others learn the step.
        self.step = nn.Parameter(torch.ones(n))
        self.register_buffer('zero_point', torch.zeros(n), persistent=False)
        self.register_buffer('enabled', torch.tensor(True))
        self.register_buffer('calibrated', torch.tensor(False))
        self._observer = None

    def extra_repr(self) -> str:
        sign = 'signed' if self.signed else 'unsigned'
        return (f'bits={self.bits}, {self.granularity}, {sign}, '
                f'channels={self.step.numel()}, '
                f'enabled={bool(self.enabled)}')

    # -- state -----------------------------------------------------------
    def enable(self, on: bool = True) -> None:
        self.enabled.fill_(on)

    def disable(self) -> None:
        self.enable(False)

    def effective_step(self) -> torch.Tensor:
        """The positive step (or ratio) the forward pass uses."""
        return self.step.abs().clamp_min(MIN_STEP)

    # -- calibration -----------------------------------------------------
    def begin_calibration(self) -> None:
        """Observe (without quantizing) the tensors that pass through."""
        if self.granularity == 'per_channel':
            self._observer = MinMaxObserver(self.channel_dim, self.signed)
        elif self.granularity == 'per_tensor':
            self._observer = PercentileObserver(self.signed)
        else:
            self._observer = TokenRatioObserver(self.signed)

    def end_calibration(self) -> None:
        """Set the step from what was observed since begin_calibration."""
        if self._observer is None:
            raise RuntimeError('end_calibration() without begin_calibration()')
        observer, self._observer = self._observer, None
        bound = observer.range().to(self.step.device)
        if self.granularity == 'per_token':
            value = bound  # a ratio of the token maximum
        else:
            value = bound / self.q_max
        with torch.no_grad():
            self.step.copy_(value.clamp_min(MIN_STEP).expand_as(self.step))
            self.calibrated.fill_(True)

    @property
    def calibrating(self) -> bool:
        return self._observer is not None

    # -- forward ---------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if not bool(self.enabled):
            return x
        dtype = x.dtype
        xf = x.float()
        step = self.effective_step().float()
        if self.granularity == 'per_tensor':
            grad = 1.0 / math.sqrt(xf.numel() * self.q_max)
            out = torch._fake_quantize_learnable_per_tensor_affine(
                xf, step, self.zero_point, self.q_min, self.q_max, grad)
        elif self.granularity == 'per_channel':
            axis = self.channel_dim % xf.dim()
            if xf.shape[axis] != step.numel():
                raise ValueError(
                    f'per_channel quantizer has {step.numel()} steps but the '
                    f'input has {xf.shape[axis]} channels in dim {axis}')
            grad = 1.0 / math.sqrt(xf.numel() / step.numel() * self.q_max)
            out = torch._fake_quantize_learnable_per_channel_affine(
                xf, step, self.zero_point, axis, self.q_min, self.q_max, grad)
        else:
            out = self._per_token(xf, step)
        return out.to(dtype)

    def _per_token(self, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        peak = rows.detach().abs() if self.signed else \
            rows.detach().clamp_min(0)
        peak = peak.amax(1).clamp_min(MIN_STEP)
        step = ratio * peak / self.q_max
        grad = 1.0 / math.sqrt(rows.shape[1] * self.q_max)
        zero = torch.zeros_like(step)
        out = torch._fake_quantize_learnable_per_channel_affine(
            rows, step, zero, 0, self.q_min, self.q_max, grad)
        return out.reshape(x.shape)
