"""Range estimators that initialise quantizer steps from calibration data.

Plain PyTorch. An observer sees activations batch by batch (its ``update``
never changes them) and then returns the clipping range the quantizer turns
into a step: per-channel min/max for per-channel quantizers, the 1st/99th
percentile for per-tensor ones and, for per-token quantizers, the ratio of
each token's percentile range to its absolute maximum. Non-finite values
(NaN, Inf) are left out of every statistic.
"""
from __future__ import annotations

import torch

#: torch.quantile refuses more than 2**24 elements; a strided subsample of
#: at most this many keeps percentiles cheap and deterministic.
MAX_PERCENTILE_SAMPLES = 1 << 20


class CalibrationError(RuntimeError):
    """Calibration saw no usable data."""


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Flattened finite values of ``x`` in float32."""
    flat = x.detach().reshape(-1).float()
    return flat[torch.isfinite(flat)]


def _subsample(flat: torch.Tensor) -> torch.Tensor:
    if flat.numel() <= MAX_PERCENTILE_SAMPLES:
        return flat
    stride = -(-flat.numel() // MAX_PERCENTILE_SAMPLES)
    return flat[::stride]


class MinMaxObserver:
    """Running maximum of ``|x|`` per channel (``channel_dim``) or overall.

    For a symmetric signed quantizer the range is ``max |x|``; for an
    unsigned one it is ``max x`` clipped at 0, which for non-negative
    tensors is the same number.
    """

    def __init__(self, channel_dim: int | None, signed: bool = True) -> None:
        self.channel_dim = channel_dim
        self.signed = signed
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        x = x.abs() if self.signed else x.clamp_min(0)
        if self.channel_dim is None:
            cur = x.amax().reshape(1)
        else:
            cur = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[
                self.channel_dim]).amax(0)
        self.value = cur if self.value is None else torch.maximum(
            self.value, cur)

    def range(self) -> torch.Tensor:
        if self.value is None:
            raise CalibrationError('the observer saw no batches')
        return self.value


class _BatchMeanObserver:
    """Shared part of the percentile observers: a running mean of one
    clipping statistic, and the 1st/99th percentile pair it uses."""

    #: What ``range()`` says when no usable value was seen.
    empty_message = 'the observer saw no usable values'

    def __init__(self, signed: bool = True, low: float = 0.01,
                 high: float = 0.99) -> None:
        self.signed = signed
        self.low, self.high = low, high
        self.total = 0.0
        self.count = 0

    def _bound(self, q: torch.Tensor) -> torch.Tensor:
        """The clipping bound from ``q = (low, high)`` percentiles."""
        return (torch.maximum(q[0].abs(), q[1].abs()) if self.signed
                else q[1].clamp_min(0))

    def range(self) -> torch.Tensor:
        if self.count == 0:
            raise CalibrationError(self.empty_message)
        return torch.tensor([self.total / self.count])


class PercentileObserver(_BatchMeanObserver):
    """Mean over batches of the 1st/99th percentile range of a tensor."""

    empty_message = ('the observer saw no finite values: every calibration '
                     'batch was empty or non-finite')

    def update(self, x: torch.Tensor) -> None:
        flat = _subsample(_finite(x))
        if flat.numel() == 0:
            return
        q = torch.quantile(flat, torch.tensor([self.low, self.high],
                                              device=flat.device))
        self.total += float(self._bound(q))
        self.count += 1


class TokenRatioObserver(_BatchMeanObserver):
    """Mean ratio of each token's 1st/99th percentile range to its ``|x|``
    maximum: the clipping ratio a per-token dynamic quantizer applies."""

    empty_message = ('the observer saw no token with a non-zero finite '
                     'value')

    def update(self, x: torch.Tensor) -> None:
        tokens = x.detach().float().reshape(-1, x.shape[-1])
        tokens = tokens[torch.isfinite(tokens).all(1)]
        if tokens.numel() == 0:
            return
        rows = tokens[::max(1, tokens.shape[0] // 4096)]
        q = torch.quantile(
            rows, torch.tensor([self.low, self.high], device=rows.device),
            dim=1)
        bound = self._bound(q)
        peak = rows.abs().amax(1) if self.signed else rows.clamp_min(0).amax(1)
        keep = peak > 0
        if keep.any():
            self.total += float((bound[keep] / peak[keep]).sum())
            self.count += int(keep.sum())
