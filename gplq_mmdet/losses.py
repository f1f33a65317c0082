"""PCA feature-mimicking loss (plain PyTorch).

GPLQ keeps the activation-quantized student close to the FP32 teacher with
``|| (f_s - mu) V - (f_t - mu) V ||^2`` averaged over samples, where ``V``
holds the top-k principal directions of teacher features, ``k`` the smallest
multiple of 32 that explains about 60% of their variance (no whitening).
For detection a "sample" is one spatial position of one feature map and the
features are its channels; each pyramid level has its own basis.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def as_samples(feature: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` maps or ``(N, L, C)`` tokens -> ``(M, C)`` rows."""
    if feature.dim() == 4:
        return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
    if feature.dim() == 3:
        return feature.reshape(-1, feature.shape[-1])
    if feature.dim() == 2:
        return feature
    raise ValueError(f'cannot mimic a feature of shape {tuple(feature.shape)}'
                     ': expected (N, C, H, W), (N, L, C) or (N, C)')


def choose_k(eigenvalues: torch.Tensor, explained: float = 0.6,
             multiple: int = 32) -> int:
    """Smallest multiple of ``multiple`` whose leading components explain at
    least ``explained`` of the variance (all components if fewer)."""
    if not 0 < explained <= 1:
        raise ValueError(f'explained={explained} must be in (0, 1]')
    vals = eigenvalues.clamp_min(0).sort(descending=True).values
    dim = vals.numel()
    total = vals.sum()
    if total <= 0:
        return min(multiple, dim)
    ratio = vals.cumsum(0) / total
    need = int((ratio < explained - 1e-7).sum()) + 1
    k = -(-need // multiple) * multiple
    return min(k, dim)


class PCABasis(nn.Module):
    """Mean and top-k principal directions of one feature, in buffers.

    ``dim`` fixes the buffer shapes so a saved basis loads into a fresh
    module; ``fit`` sets them (``k`` may be smaller than ``dim``, the
    unused columns stay zero and ``k`` is stored too).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer('mean', torch.zeros(dim))
        self.register_buffer('basis', torch.zeros(dim, dim))
        self.register_buffer('k', torch.tensor(0))
        self.register_buffer('explained', torch.tensor(0.0))

    @property
    def fitted(self) -> bool:
        return int(self.k) > 0

    def fit(self, samples: torch.Tensor, explained: float = 0.6,
            multiple: int = 32) -> None:
        samples = samples.double()
        if samples.shape[0] < 2:
            raise ValueError('need at least 2 samples to fit a PCA basis')
        mean = samples.mean(0)
        centred = samples - mean
        cov = centred.T @ centred / (samples.shape[0] - 1)
        vals, vecs = torch.linalg.eigh(cov)
        order = vals.argsort(descending=True)
        vals, vecs = vals[order], vecs[:, order]
        k = choose_k(vals, explained, multiple)
        self.mean.copy_(mean.float())
        self.basis.zero_()
        self.basis[:, :k] = vecs[:, :k].float()
        self.k.fill_(k)
        total = vals.clamp_min(0).sum()
        self.explained.fill_(
            float(vals[:k].clamp_min(0).sum() / total) if total > 0 else 1.0)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        k = int(self.k)
        return (rows - self.mean) @ self.basis[:, :k]


class PCAMimicLoss(nn.Module):
    """Mean over levels of the per-sample squared distance in PCA space."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.levels = nn.ModuleList(PCABasis(d) for d in dims)

    @property
    def fitted(self) -> bool:
        return all(level.fitted for level in self.levels)

    def fit(self, features: Sequence[torch.Tensor], explained: float = 0.6,
            multiple: int = 32) -> None:
        """``features[i]``: teacher samples ``(M, C_i)`` of level ``i``."""
        if len(features) != len(self.levels):
            raise ValueError(f'{len(features)} feature levels for '
                             f'{len(self.levels)} bases')
        for level, rows in zip(self.levels, features, strict=True):
            level.fit(rows, explained, multiple)

    def forward(self, student: Sequence[torch.Tensor],
                teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError('PCAMimicLoss used before fit()')
        if len(student) != len(self.levels) or len(teacher) != len(
                self.levels):
            raise ValueError(
                f'expected {len(self.levels)} feature levels, got '
                f'{len(student)} (student) and {len(teacher)} (teacher)')
        # In float32 even under AMP: the projections are matmuls, which
        # autocast would run in half precision.
        total = student[0].new_zeros((), dtype=torch.float32)
        with torch.autocast(student[0].device.type, enabled=False):
            for level, s, t in zip(self.levels, student, teacher,
                                   strict=True):
                diff = level.project(as_samples(s).float()) - level.project(
                    as_samples(t).float().detach())
                total = total + diff.pow(2).sum(1).mean()
        return total / len(self.levels)
