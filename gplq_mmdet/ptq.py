"""Weight post-training quantization (GPLQ stage 2), plain PyTorch.

Symmetric, per output channel (dim 0), 2..8 bits, signed range
``[-2**(b-1), 2**(b-1) - 1]``. The clipping range of each channel comes
from one of ``CLIP_METHODS``:

* ``minmax``: ``max |w|``;
* ``percentile``: among the ``PERCENTILES`` of ``|w|`` (RepQ-ViT style),
  per channel the one whose quantized weights have the lowest L2 error;
* ``mse``: the same choice over ``max |w| * r`` for a grid of ratios ``r``.

``gptq_quantize`` (Frantar et al.) quantizes columns in order and spreads
each column's error over the columns not yet quantized, weighted by the
inverse Hessian ``H = 2 X X^T / n`` of the layer's own inputs.
``pack_int``/``unpack_int`` store b-bit integers densely (two 4-bit values
per byte).
"""
from __future__ import annotations

import math

import torch

from .quantizers import check_bits, quant_range

CLIP_METHODS = ('minmax', 'percentile', 'mse')
PERCENTILES = (0.999, 0.9999, 0.99999)
MSE_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


def check_clip_method(method: str) -> None:
    if method not in CLIP_METHODS:
        raise ValueError(f'weight clipping method {method!r} is unknown: use '
                         f'one of {", ".join(CLIP_METHODS)}')


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """Out-channel rows: ``(out, in * kh * kw)`` for Linear and Conv."""
    return weight.detach().reshape(weight.shape[0], -1).float()


def fake_quant_rows(rows: torch.Tensor, scale: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """``clamp(round(w / s), q_min, q_max) * s`` with one ``s`` per row."""
    q_min, q_max = quant_range(bits, True)
    s = scale.reshape(-1, *([1] * (rows.dim() - 1)))
    return torch.clamp(torch.round(rows / s), q_min, q_max) * s


def _best_per_row(rows: torch.Tensor, bounds: list[torch.Tensor],
                  bits: int) -> torch.Tensor:
    """Scale per row from the candidate clipping bound with least L2 error."""
    q_max = quant_range(bits, True)[1]
    best_err = best_scale = None
    for bound in bounds:
        scale = bound.clamp_min(1e-12) / q_max
        err = (fake_quant_rows(rows, scale, bits) - rows).pow(2).sum(1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def weight_scales(weight: torch.Tensor, bits: int = 4,
                  method: str = 'percentile') -> torch.Tensor:
    """One positive step per output channel of ``weight``."""
    check_bits(bits, 'w_bits')
    check_clip_method(method)
    rows = _rows(weight)
    absw = rows.abs()
    peak = absw.amax(1)
    if method == 'minmax':
        bounds = [peak]
    elif method == 'percentile':
        # torch.quantile's linear interpolation, row by row.
        bounds = [torch.quantile(absw, p, dim=1) for p in PERCENTILES]
        bounds.append(peak)  # never worse than min/max
    else:
        bounds = [peak * r for r in MSE_RATIOS]
    scale = _best_per_row(rows, bounds, bits)
    # An all-zero channel still gets a usable step.
    return torch.where(peak > 0, scale, torch.ones_like(scale))


def quantize_weight(weight: torch.Tensor, bits: int = 4,
                    method: str = 'percentile'
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(int values shaped like weight, scales)``."""
    scale = weight_scales(weight, bits, method)
    q_min, q_max = quant_range(bits, True)
    ints = torch.clamp(torch.round(_rows(weight) / scale[:, None]), q_min,
                       q_max)
    return ints.reshape(weight.shape).to(torch.int8), scale


def dequantize(ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (ints.float().reshape(ints.shape[0], -1) * scale[:, None]).reshape(
        ints.shape)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor,
                  bits: int = 4, method: str = 'percentile',
                  damp: float = 0.01, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for a Linear weight ``(out, in)`` with input Hessian ``(in, in)``.

    The per-row scales come from ``method`` on the original weights; the
    columns are then rounded one by one (in blocks of ``block_size`` with a
    lazy update of the rest), each rounding error compensated on the later
    columns through the Cholesky factor of ``H^-1``. ``damp`` adds
    ``damp * mean(diag H)`` to the diagonal. Returns ``(ints, scales)``.
    """
    check_bits(bits, 'w_bits')
    if weight.dim() != 2:
        raise ValueError('gptq_quantize expects a Linear weight (out, in), '
                         f'got shape {tuple(weight.shape)}')
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f'Hessian shape {tuple(hessian.shape)} does not '
                         f'match {cols} input features')
    q_min, q_max = quant_range(bits, True)
    # On the CPU in float64, where the Hessian was accumulated.
    w = weight.detach().cpu().double().clone()
    h = hessian.detach().cpu().double().clone()
    scale = weight_scales(weight.detach().cpu(), bits, method).double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    ints = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            col = block[:, i]
            q = torch.clamp(torch.round(col / scale), q_min, q_max)
            ints[:, start + i] = q
            err = (col - q * scale) / hblock[i, i]
            block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return ints.to(torch.int8), scale.float()


def pack_int(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed b-bit integers -> a dense uint8 bit stream (little-endian
    within each byte; two 4-bit values per byte)."""
    check_bits(bits)
    q_min, q_max = quant_range(bits, True)
    flat = ints.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < q_min or flat.max() > q_max):
        raise ValueError(f'values outside the {bits}-bit range '
                         f'[{q_min}, {q_max}]')
    codes = (flat - q_min).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    bitstream = ((codes[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64)).to(torch.uint8)
    return (bitstream.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int8 values of ``shape``."""
    check_bits(bits)
    count = math.prod(shape)
    need = -(-count * bits // 8)
    if packed.numel() != need:
        raise ValueError(f'{packed.numel()} packed bytes for {count} '
                         f'{bits}-bit values; expected {need}')
    shifts = torch.arange(8, dtype=torch.uint8)
    bitstream = ((packed[:, None] >> shifts) & 1).reshape(-1)
    codes = bitstream[:count * bits].reshape(count, bits).to(torch.int64)
    values = (codes << torch.arange(bits)).sum(1)
    return (values + quant_range(bits, True)[0]).to(torch.int8).reshape(
        shape)
