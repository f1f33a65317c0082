"""A test-only hook that records, on every rank, what stage 1 must keep
identical across ranks under DDP (imported by the DDP test's config)."""
from __future__ import annotations

import os.path as osp

import torch
from mmdet.registry import HOOKS
from mmengine import dist
from mmengine.hooks import Hook

from gplq_mmdet.hooks import FeatureMimicHook, unwrap_model
from gplq_mmdet.surgery import iter_quantizers


@HOOKS.register_module()
class DDPProbeHook(Hook):
    """Saves ``probe_rank{r}.pt``: the activation steps after calibration and
    after training, the PCA basis, whether a teacher exists, the indices of
    the images this rank trained on and the model wrapper's type."""

    priority = 'LOWEST'  # after calibration and the mimic hook's set-up

    def before_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        mimic = next(h for h in runner.hooks
                     if isinstance(h, FeatureMimicHook))
        self.record = dict(
            rank=dist.get_rank(), world_size=dist.get_world_size(),
            wrapper=type(runner.model).__name__,
            teacher=mimic.teacher is not None,
            pca={k: v.cpu().clone() for k, v in mimic.pca.state_dict()
                 .items()},
            calibrated={n: q.step.detach().cpu().clone()
                        for n, q in iter_quantizers(model)},
            images=[])

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: dict | None = None) -> None:
        self.record['images'] += [s.img_id for s in
                                  data_batch['data_samples']]

    def after_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        self.record['trained'] = {n: q.step.detach().cpu().clone()
                                  for n, q in iter_quantizers(model)}
        torch.save(self.record, osp.join(
            runner.work_dir, f'probe_rank{dist.get_rank()}.pt'))
