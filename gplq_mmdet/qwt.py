"""QwT compensation ("Quantization without Tears") for stage 2.

After the weights are quantized, each transformer block of the backbone,
in order, gets a linear residual ``y += W x + b`` fitted in closed form
(ridge regression) from the block's input ``x`` in the W4A4 model to the
gap between the W32A4 block output ``Y`` and the W4A4 block output
``Y_q``::

    [W b] = (Y - Y_q) X^T (X X^T + lambda I)^-1      (X with a row of ones)

Blocks are fitted one after another, so each fit sees the inputs that the
already-compensated earlier blocks produce. Every 4th calibration batch
(the last one when there are fewer than 4) is held out: a block keeps its
compensation only if it lowers the block's output error on those batches;
the kept map is then refitted on all batches.

The compensation of a block is a ``qwt_compensation`` submodule whose
``weight``/``bias`` buffers are in the state_dict, applied by a forward
hook whose handle it keeps. A model prepared by
:func:`register_qwt_loading` re-creates these modules when it loads a
checkpoint that has them, so quantized checkpoints evaluate with mmdet's
own ``tools/test.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

ATTR = 'qwt_compensation'
_LOAD_HOOK = '_qwt_load_hook_handle'
_HOLDOUT_EVERY = 4


class QwTCompensation(nn.Module):
    """``W x + b`` added to a block's output (buffers: not trained)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer('weight', torch.zeros(out_features, in_features))
        self.register_buffer('bias', torch.zeros(out_features))
        self._handle: RemovableHandle | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _block_types() -> tuple[type, ...]:
    from mmdet.models.backbones.swin import SwinBlock
    from timm.models.vision_transformer import Block

    return SwinBlock, Block


def qwt_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every transformer block (mmdet ``SwinBlock``,
    timm ViT ``Block``) in forward order."""
    types = _block_types()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, types)]


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs['x']


def _compensate(block: nn.Module, args: tuple, kwargs: dict,
                output: torch.Tensor) -> torch.Tensor:
    return output + getattr(block, ATTR)(_block_input(args, kwargs))


def attach_qwt(block: nn.Module, in_features: int,
               out_features: int) -> QwTCompensation:
    """Give ``block`` a (zero) compensation and the hook that applies it."""
    detach_qwt(block)
    comp = QwTCompensation(in_features, out_features)
    ref = next(block.parameters(), None)
    if ref is not None:
        comp.to(ref.device)
    setattr(block, ATTR, comp)
    comp._handle = block.register_forward_hook(_compensate, with_kwargs=True)
    return comp


def detach_qwt(model: nn.Module) -> None:
    """Remove every compensation module and its hook from ``model``."""
    for module in list(model.modules()):
        comp = module._modules.get(ATTR)
        if comp is not None:
            if comp._handle is not None:
                comp._handle.remove()
            del module._modules[ATTR]


def _materialize(model: nn.Module, state_dict: dict, prefix: str,
                 *args: Any) -> None:
    """Load-state-dict pre-hook: create the compensations a checkpoint has
    before the traversal reaches them."""
    suffix = f'.{ATTR}.weight'
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        block_name = key[len(prefix):-len(suffix)]
        try:
            block = model.get_submodule(block_name)
        except AttributeError:
            continue  # reported as an unexpected key by the loader
        if ATTR not in block._modules:
            out_features, in_features = value.shape
            attach_qwt(block, in_features, out_features)


def register_qwt_loading(model: nn.Module) -> None:
    """Let ``model`` load checkpoints that carry QwT compensations."""
    if _LOAD_HOOK not in model.__dict__:
        model.__dict__[_LOAD_HOOK] = model.register_load_state_dict_pre_hook(
            _materialize)


def unregister_qwt_loading(model: nn.Module) -> None:
    handle = model.__dict__.pop(_LOAD_HOOK, None)
    if handle is not None:
        handle.remove()


class _StopForward(Exception):
    """Raised by a capture hook once the block of interest has run."""


@dataclass
class _Moments:
    """Sufficient statistics of ``E ~ W [x; 1]`` in float64."""

    xx: torch.Tensor
    ex: torch.Tensor
    ee: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> _Moments:
        return cls(torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64),
                   torch.zeros(d_out, d_in + 1, dtype=torch.float64))

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        e = e.reshape(-1, e.shape[-1]).double().cpu()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.xx += xa.T @ xa
        self.ex += e.T @ xa
        self.ee += float((e * e).sum())
        self.count += len(x)

    def __add__(self, other: _Moments) -> _Moments:
        return _Moments(self.xx + other.xx, self.ex + other.ex,
                        self.ee + other.ee, self.count + other.count)

    def solve(self, ridge: float) -> torch.Tensor:
        d = self.xx.shape[0] - 1
        lam = ridge * float(self.xx.diagonal()[:d].mean().clamp_min(1e-12))
        eye = torch.eye(d + 1, dtype=torch.float64)
        return torch.linalg.solve(self.xx + lam * eye, self.ex.T).T

    def error(self, w: torch.Tensor) -> float:
        """Mean squared ``E - W x`` (w=0: the error without compensation)."""
        sse = (self.ee - 2 * float((w * self.ex).sum())
               + float((w @ self.xx @ w.T).trace()))
        return max(sse, 0.0) / max(self.count * self.ex.shape[0], 1)


def _capture(block: nn.Module, store: dict) -> RemovableHandle:
    def hook(module, args, kwargs, output):
        store['x'] = _block_input(args, kwargs).detach()
        store['y'] = output.detach()
        raise _StopForward

    return block.register_forward_hook(hook, with_kwargs=True)


def _run_to(block: nn.Module, forward: Callable[[Any], Any],
            batch: Any) -> dict:
    store: dict = {}
    handle = _capture(block, store)
    try:
        forward(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not store:
        raise RuntimeError(f'{type(block).__name__} did not run in the '
                           'forward pass')
    return store


@dataclass(frozen=True)
class QwTResult:
    """What the fit did to one block (errors are held-out MSEs)."""

    block: str
    error_before: float
    error_after: float
    kept: bool


def compensate_qwt_(model: nn.Module, reference: nn.Module,
                    batches: Sequence[Any],
                    forward: Callable[[nn.Module, Any], Any],
                    ridge: float = 1e-3) -> list[QwTResult]:
    """Fit and attach QwT compensations to ``model``'s blocks in place.

    Args:
        model: the weight-quantized model (W4A4).
        reference: the same model before weight quantization (W32A4); the
            targets are its block outputs.
        batches: calibration batches (at least 2: every 4th is held out).
        forward: ``forward(module, batch)`` runs ``module`` on a batch.
        ridge: lambda relative to the mean diagonal of ``X X^T``.
    """
    if len(batches) < 2:
        raise ValueError(
            f'QwT needs at least 2 calibration batches (one part fits, the '
            f'other checks the fit), got {len(batches)}')
    if ridge < 0:
        raise ValueError(f'ridge={ridge} must be >= 0')
    blocks = qwt_blocks(model)
    ref_blocks = dict(qwt_blocks(reference))
    if not blocks or set(ref_blocks) != {n for n, _ in blocks}:
        raise ValueError('QwT needs a Swin or timm ViT backbone, and the '
                         'reference model must have the same blocks')
    results = []
    with torch.no_grad():
        for name, block in blocks:
            parts = {True: None, False: None}  # held out?
            for i, batch in enumerate(batches):
                quant = _run_to(block, lambda b: forward(model, b), batch)
                target = _run_to(ref_blocks[name],
                                 lambda b: forward(reference, b), batch)
                x, gap = quant['x'], target['y'] - quant['y']
                held = (i % _HOLDOUT_EVERY == _HOLDOUT_EVERY - 1
                        or (len(batches) < _HOLDOUT_EVERY
                            and i == len(batches) - 1))
                if parts[held] is None:
                    parts[held] = _Moments.zeros(x.shape[-1], gap.shape[-1])
                parts[held].add(x, gap)
            fit, check = parts[False], parts[True]
            w = fit.solve(ridge)
            zero = torch.zeros_like(w)
            before, after = check.error(zero), check.error(w)
            kept = after < before
            if kept:
                w = (fit + check).solve(ridge)
                comp = attach_qwt(block, w.shape[1] - 1, w.shape[0])
                comp.weight.copy_(w[:, :-1].to(comp.weight))
                comp.bias.copy_(w[:, -1].to(comp.bias))
            results.append(QwTResult(name, before, after, kept))
    return results


def qwt_summary(results: Iterable[QwTResult]) -> list[dict[str, Any]]:
    """JSON-ready rows for checkpoint metadata and results files."""
    return [dict(block=r.block, mse_before=r.error_before,
                 mse_after=r.error_after, kept=r.kept) for r in results]
