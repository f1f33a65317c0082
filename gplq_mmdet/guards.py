"""Hooks that make a long stage-1 run safe to leave alone.

* ``QuantGuardHook`` stops on a non-finite loss before it reaches the
  weights, with a checkpoint of the last good state, and keeps every
  activation step positive and finite.
* ``ResumableEpochHook`` saves resume points inside the (single, long)
  stage-1 epoch, so a run killed after hours resumes with mmengine's
  ``--resume`` where it stopped instead of at the start of the epoch.
"""
from __future__ import annotations

import itertools
import os
import os.path as osp
from collections.abc import Iterator
from typing import Any

import torch
from mmdet.registry import HOOKS
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.logging import MMLogger

from .checkpoint import atomic_write_text
from .hooks import unwrap_model
from .quantizers import MIN_STEP
from .surgery import iter_quantizers


class NonFiniteLossError(FloatingPointError):
    """A stage-1 loss became NaN or Inf (the message says what to do)."""


def _save_checkpoint_atomically(runner, filename: str) -> str:
    """``runner.save_checkpoint`` into a temporary name, then rename, so an
    interrupted save never leaves a truncated checkpoint behind. The
    checkpoint records the current iteration as done (``by_epoch=False``),
    so a resumed run continues after it."""
    tmp = f'.{filename}.partial'
    runner.save_checkpoint(runner.work_dir, tmp, by_epoch=False,
                           save_optimizer=True, save_param_scheduler=True)
    path = osp.join(runner.work_dir, filename)
    if dist.is_main_process():
        os.replace(osp.join(runner.work_dir, tmp), path)
    return path


@HOOKS.register_module()
class QuantGuardHook(Hook):
    """Numerical guard for stage 1.

    * Every iteration, each detection and mimic loss term is checked before
      the backward pass. If one is NaN/Inf the weights and steps are still
      those of the previous iteration: they are saved as
      ``nonfinite_loss_iter_<N>.pth`` and training stops with
      :class:`NonFiniteLossError`. Resuming from that file skips the batch.
    * After every iteration, each activation step must be finite and at
      least ``MIN_STEP``: a step that is not is clamped (non-finite entries
      go back to their last good value) and a warning names the quantizer.

    Its priority is below ``FeatureMimicHook``'s, so the mimic term is
    guarded too.

    Example::

        custom_hooks = [..., dict(type='QuantGuardHook')]
    """

    priority = 'LOW'

    def __init__(self) -> None:
        self._runner = None
        self._last_good: dict[str, torch.Tensor] = {}
        self.clamped = 0

    def before_train(self, runner) -> None:
        self._runner = runner
        model = unwrap_model(runner.model)
        self._last_good = {name: q.step.detach().clone()
                           for name, q in iter_quantizers(model)}
        inner_loss = model.loss

        def guarded_loss(batch_inputs: torch.Tensor,
                         batch_data_samples: list) -> dict:
            losses = inner_loss(batch_inputs, batch_data_samples)
            self._check_losses(losses)
            return losses

        model.loss = guarded_loss

    def _check_losses(self, losses: dict[str, Any]) -> None:
        bad = {}
        for name, value in losses.items():
            if 'loss' not in name:
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            total = sum(v.detach().float().sum() for v in values)
            if not torch.isfinite(total):
                bad[name] = float(total)
        if not bad:
            return
        runner = self._runner
        path = _save_checkpoint_atomically(
            runner, f'nonfinite_loss_iter_{runner.iter + 1}.pth')
        raise NonFiniteLossError(
            f'stage 1 stopped at iteration {runner.iter + 1}: loss terms '
            f'{bad} are not finite. The weights and activation steps of the '
            f'last good iteration are in {path}; resume with `tools/train.py'
            f' CONFIG --resume {path}` (it skips this batch) after checking '
            'the data and lowering the learning rate, or turn the mimic loss '
            "down (FeatureMimicHook loss_weight) if 'loss_mimic' is the term")

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Any = None, outputs: Any = None) -> None:
        model = unwrap_model(runner.model)
        named = list(iter_quantizers(model))
        if not named:
            return
        flags = torch.stack([
            (~torch.isfinite(q.step)).any() | (q.step.abs() < MIN_STEP).any()
            for _, q in named])
        if bool(flags.any()):
            self._repair(runner, [(n, q) for (n, q), f in
                                  zip(named, flags.tolist(), strict=True)
                                  if f])
        for name, q in named:
            self._last_good[name].copy_(q.step.detach())

    def _repair(self, runner, named: list) -> None:
        logger = MMLogger.get_current_instance()
        for name, q in named:
            with torch.no_grad():
                step = q.step
                finite = torch.isfinite(step)
                tiny = int((finite & (step.abs() < MIN_STEP)).sum())
                step.copy_(torch.where(finite, step, self._last_good[name]))
                step.copy_(step.abs().clamp_min(MIN_STEP))
            self.clamped += 1
            logger.warning(
                f'QuantGuardHook: iteration {runner.iter + 1}: the step of '
                f'{name} had {int((~finite).sum())} non-finite entries '
                f'(restored to their last good values) and {tiny} below '
                f'{MIN_STEP:g} (clamped). Frequent clamping means the steps '
                'learn too fast: lower their lr_mult')

    def after_train(self, runner) -> None:
        unwrap_model(runner.model).__dict__.pop('loss', None)
        self._runner = None


class _SkipFirstBatches:
    """A train dataloader that leaves out the first ``skip`` batches of its
    next pass (the part of an interrupted epoch already trained)."""

    def __init__(self, loader, skip: int) -> None:
        self.loader = loader
        self.skip = skip

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.skip, None)

    def __len__(self) -> int:
        return len(self.loader) - self.skip

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


RESUME_PREFIX = 'resume_iter_'


def _resume_points(work_dir: str) -> list[str]:
    """The work dir's resume points, oldest first."""
    names = [n for n in os.listdir(work_dir)
             if n.startswith(RESUME_PREFIX) and n.endswith('.pth')]
    names.sort(key=lambda n: int(n[len(RESUME_PREFIX):-len('.pth')]))
    return [osp.join(work_dir, n) for n in names]


@HOOKS.register_module()
class ResumableEpochHook(Hook):
    """Resume points inside an epoch.

    Every ``interval`` iterations it saves ``resume_iter_<N>.pth`` (weights,
    optimizer, steps, PCA basis, written atomically), points the work dir's
    ``last_checkpoint`` at it for ``--resume``, and keeps only the newest
    ``max_keep``. After the epoch's own checkpoint is written, the epoch's
    resume points are deleted. A run resumed from one of them skips the
    batches of that epoch it had already trained (they are still loaded,
    not trained on; the order is the same when the config sets
    ``randomness.seed``, as the stage-1 configs do).

    Example::

        custom_hooks = [..., dict(type='ResumableEpochHook', interval=500)]
    """

    priority = 'LOWEST'

    def __init__(self, interval: int = 500, max_keep: int = 1) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive integer, got '
                             f'{interval!r}')
        if not isinstance(max_keep, int) or max_keep < 1:
            raise ValueError(f'max_keep must be a positive integer, got '
                             f'{max_keep!r}')
        self.interval = interval
        self.max_keep = max_keep
        self._original_loader = None

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        per_epoch = len(loop.dataloader)
        done = runner.iter - runner.epoch * per_epoch
        if 0 < done < per_epoch:
            self._original_loader = loop.dataloader
            loop.dataloader = _SkipFirstBatches(loop.dataloader, done)
            MMLogger.get_current_instance().info(
                f'ResumableEpochHook: resuming epoch {runner.epoch + 1} '
                f'after {done} of its {per_epoch} batches; skipping them')

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Any = None, outputs: Any = None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        if self.is_last_train_iter(runner) or self.end_of_epoch(
                runner.train_dataloader, batch_idx):
            return  # the epoch checkpoint follows
        path = _save_checkpoint_atomically(
            runner, f'{RESUME_PREFIX}{runner.iter + 1}.pth')
        if dist.is_main_process():
            atomic_write_text(path, osp.join(runner.work_dir,
                                             'last_checkpoint'))
            for old in _resume_points(runner.work_dir)[:-self.max_keep]:
                os.remove(old)

    def after_train_epoch(self, runner) -> None:
        if self._original_loader is not None:
            runner.train_loop.dataloader = self._original_loader
            self._original_loader = None
        if not dist.is_main_process():
            return
        # Only once the epoch checkpoint has replaced them as the latest;
        # this includes the points of an earlier, interrupted process. An
        # epoch without a checkpoint (CheckpointHook interval > 1) and
        # without resume points has no ``last_checkpoint`` yet.
        last = osp.join(runner.work_dir, 'last_checkpoint')
        if not osp.isfile(last):
            return
        with open(last) as f:
            current = osp.abspath(f.read().strip())
        for path in _resume_points(runner.work_dir):
            if osp.abspath(path) != current:
                os.remove(path)
