"""Stage-1 hooks: step calibration and the PCA feature-mimic loss.

Both run in ``before_train``, after mmengine has loaded ``load_from`` (the
FP32 checkpoint) or resumed, and before the first iteration.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from mmdet.registry import HOOKS
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import safe_load, state_dict_mismatch
from .losses import PCAMimicLoss, as_samples
from .qat import init_weight_quantizers
from .surgery import (
    calibrate_act_quant,
    iter_quantizers,
    quant_config_of,
    remove_act_quant,
)

MIMIC_KEY = 'gplq_mimic'
FEATURES = ('neck', 'backbone')
MIMIC_MODES = ('pca', 'none')


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP/mmengine wrapper, or the model itself."""
    return model.module if is_model_wrapper(model) else model


def training_set_loader(runner, shuffle: bool, dataset: Any = None
                        ) -> DataLoader:
    """A loader of its own over the training set, shared by stage-1 set-up
    and stage-2 calibration: the config's ``train_dataloader`` with a plain
    ``DefaultSampler`` (this rank's share, fixed seed) and no batch sampler
    or persistent workers. ``dataset``: an already built dataset to reuse,
    else the config's is built."""
    cfg = copy.deepcopy(runner.cfg.train_dataloader).to_dict()
    cfg.pop('batch_sampler', None)
    cfg.update(sampler=dict(type='DefaultSampler', shuffle=shuffle, seed=0),
               persistent_workers=False)
    if dataset is not None:
        cfg['dataset'] = dataset
    return Runner.build_dataloader(cfg, seed=0)


def setup_loader(runner) -> DataLoader:
    """Training batches for calibration and the PCA fit: the runner's
    training set and pipeline, shuffled, through :func:`training_set_loader`.

    Iterating ``runner.train_dataloader`` partway instead would leave mmdet's
    ``AspectRatioBatchSampler`` holding images from the abandoned pass, so
    the epoch would get extra batches, and a different number per rank
    (rank 0 alone fits the PCA basis): under DDP the ranks would then wait
    for each other forever."""
    return training_set_loader(runner, shuffle=True,
                               dataset=runner.train_dataloader.dataset)


def detector_forward(model: nn.Module):
    """One batch through the whole detector (backbone, neck, heads)."""

    def forward(data: dict) -> Any:
        data = model.data_preprocessor(data, False)
        return model._run_forward(data, mode='tensor')

    return forward


@HOOKS.register_module()
class ActQuantCalibrationHook(Hook):
    """Initialise every activation step from ``num_batches`` training
    batches before the first iteration (skipped when all steps are already
    calibrated, e.g. on resume). Under DDP the steps are averaged over ranks
    so every rank quantizes alike. Saves the quantization settings in the
    checkpoint's ``meta['gplq']``. For the full-QAT baseline
    (``quant_cfg.w_bits``) it first sets the weight steps from the loaded
    weights, as stage 2 would, and calibrates the activations behind the
    fake-quantized weights.

    Example::

        custom_hooks = [dict(type='ActQuantCalibrationHook', num_batches=8)]
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, num_batches: int = 8) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f'num_batches must be a positive integer, got '
                             f'{num_batches!r}')
        self.num_batches = num_batches

    def before_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        quantizers = [q for _, q in iter_quantizers(model)]
        if not quantizers:
            raise ValueError(
                'ActQuantCalibrationHook found no activation quantizers: use '
                "a quantized backbone (type='QuantSwinTransformer' or "
                "'QuantTimmViT') or type='ActQuantDetector'")
        cfg = quant_config_of(model)
        scope = cfg.scope if cfg is not None else 'unknown'
        logger = MMLogger.get_current_instance()
        weights = init_weight_quantizers(model)
        if weights:
            logger.info(f'initialised {weights} weight quantizers (full QAT)'
                        ' from the loaded weights')
        if all(bool(q.calibrated) for q in quantizers):
            logger.info(f'activation quantizers ({len(quantizers)}, scope='
                        f'{scope}) already calibrated; not recalibrating')
            return
        was_training = model.training
        model.eval()
        used = calibrate_act_quant(model, setup_loader(runner),
                                   detector_forward(model), self.num_batches)
        model.train(was_training)
        if dist.get_world_size() > 1:
            for q in quantizers:
                dist.all_reduce(q.step.data, op='mean')
        logger.info(f'calibrated {len(quantizers)} activation quantizers '
                    f'(scope={scope}) on {used} batches')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        cfg = quant_config_of(unwrap_model(runner.model))
        if cfg is not None:
            checkpoint.setdefault('meta', {})['gplq'] = cfg.to_dict()


@HOOKS.register_module()
class FeatureMimicHook(Hook):
    """Adds ``loss_weight * L_pca`` against a frozen FP32 teacher to the
    detection losses, logged as ``loss_mimic``.

    The teacher is a copy of the student without quantizers, with the
    weights of ``teacher_checkpoint`` (default: the student's weights when
    training starts, i.e. ``load_from``). The PCA basis (one per pyramid
    level, over channels) is fitted on teacher features of
    ``num_fit_batches`` training batches and saved in checkpoints, so a
    resumed run keeps it. ``mode='none'`` turns the loss off, for ablations.

    Example::

        custom_hooks = [dict(type='FeatureMimicHook', loss_weight=1.0,
                             teacher_checkpoint=fp32_checkpoint)]
    """

    priority = 'NORMAL'

    def __init__(self, mode: str = 'pca', loss_weight: float = 1.0,
                 features: str = 'neck',
                 teacher_checkpoint: str | None = None,
                 num_fit_batches: int = 16, explained_variance: float = 0.6,
                 multiple: int = 32, max_fit_samples: int = 4096) -> None:
        if mode not in MIMIC_MODES:
            raise ValueError(f'mode={mode!r} is unknown: use one of '
                             f'{", ".join(MIMIC_MODES)}')
        if features not in FEATURES:
            raise ValueError(f'features={features!r} is unknown: use one of '
                             f'{", ".join(FEATURES)}')
        if num_fit_batches < 1:
            raise ValueError('num_fit_batches must be >= 1')
        self.mode = mode
        self.loss_weight = float(loss_weight)
        self.features = features
        self.teacher_checkpoint = teacher_checkpoint
        self.num_fit_batches = num_fit_batches
        self.explained_variance = explained_variance
        self.multiple = multiple
        self.max_fit_samples = max_fit_samples
        self.teacher: nn.Module | None = None
        self.pca: PCAMimicLoss | None = None
        self._saved_pca: dict | None = None
        self._handle = None
        self._captured: Sequence[torch.Tensor] | None = None

    # -- set-up -----------------------------------------------------------
    def _feature_module(self, model: nn.Module) -> nn.Module:
        if self.features == 'neck' and getattr(model, 'with_neck', False):
            return model.neck
        return model.backbone

    def _teacher_features(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            feats = self.teacher.backbone(inputs)
            if self.features == 'neck' and self.teacher.with_neck:
                feats = self.teacher.neck(feats)
        return list(feats)

    def _build_teacher(self, model: nn.Module) -> nn.Module:
        teacher = remove_act_quant(copy.deepcopy(model))
        if self.teacher_checkpoint is not None:
            ckpt = safe_load(self.teacher_checkpoint)
            state = ckpt.get('state_dict', ckpt)
            problem = state_dict_mismatch(teacher.state_dict(), state)
            if problem is not None:
                raise ValueError(
                    f'teacher_checkpoint {self.teacher_checkpoint!r} does '
                    f'not match the student model: {problem}. Point it at '
                    'the FP32 checkpoint of this same detector config.')
            teacher.load_state_dict(state)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _fit_pca(self, runner, model: nn.Module) -> None:
        rows: list[list[torch.Tensor]] | None = None
        gen = torch.Generator().manual_seed(0)
        for i, data in enumerate(setup_loader(runner)):
            if i == self.num_fit_batches:
                break
            inputs = model.data_preprocessor(data, False)['inputs']
            feats = self._teacher_features(inputs)
            if rows is None:
                rows = [[] for _ in feats]
            for bucket, f in zip(rows, feats, strict=True):
                samples = as_samples(f).float().cpu()
                if samples.shape[0] > self.max_fit_samples:
                    pick = torch.randperm(samples.shape[0], generator=gen)
                    samples = samples[pick[:self.max_fit_samples]]
                bucket.append(samples)
        if rows is None:
            raise ValueError('FeatureMimicHook: the training loader yielded '
                             'no batches to fit the PCA basis on')
        self.pca = PCAMimicLoss([b[0].shape[1] for b in rows])
        self.pca.fit([torch.cat(b) for b in rows], self.explained_variance,
                     self.multiple)

    def before_train(self, runner) -> None:
        logger = MMLogger.get_current_instance()
        if self.mode == 'none':
            logger.info('FeatureMimicHook: mode=none, no mimic loss')
            return
        model = unwrap_model(runner.model)
        self.teacher = self._build_teacher(model)
        device = next(model.parameters()).device
        if self._saved_pca is not None:
            dims = [v.shape[0] for k, v in self._saved_pca.items()
                    if k.endswith('.mean')]
            self.pca = PCAMimicLoss(dims)
            self.pca.load_state_dict(self._saved_pca)
            logger.info('FeatureMimicHook: PCA basis restored from the '
                        'checkpoint')
        else:
            if dist.get_rank() == 0:
                self._fit_pca(runner, model)
                dims = [lv.mean.numel() for lv in self.pca.levels]
            else:
                dims = None
            if dist.get_world_size() > 1:
                holder = [dims]  # broadcast in place (returns None)
                dist.broadcast_object_list(holder)
                dims = holder[0]
                if self.pca is None:
                    self.pca = PCAMimicLoss(dims)
                self.pca.to(device)
                for buf in self.pca.buffers():
                    dist.broadcast(buf, src=0)
        self.pca.to(device)
        ks = [int(lv.k) for lv in self.pca.levels]
        explained = [round(float(lv.explained), 3) for lv in self.pca.levels]
        logger.info(f'FeatureMimicHook: PCA on {self.features} features, '
                    f'k per level {ks}, explained variance {explained}')

        def capture(module, args, output) -> None:
            self._captured = output

        self._handle = self._feature_module(model).register_forward_hook(
            capture)
        original_loss = model.loss

        def loss_with_mimic(batch_inputs: torch.Tensor,
                            batch_data_samples: list) -> dict:
            self._captured = None
            losses = original_loss(batch_inputs, batch_data_samples)
            if self._captured is None:
                raise RuntimeError('FeatureMimicHook saw no student features'
                                   ' during the loss forward')
            teacher = self._teacher_features(batch_inputs)
            losses['loss_mimic'] = self.loss_weight * self.pca(
                list(self._captured), teacher)
            self._captured = None
            return losses

        model.loss = loss_with_mimic

    def after_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        model.__dict__.pop('loss', None)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.teacher = None

    # -- checkpoints -------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.pca is not None:
            checkpoint[MIMIC_KEY] = {
                k: v.cpu() for k, v in self.pca.state_dict().items()
            }

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if MIMIC_KEY in checkpoint:
            self._saved_pca = checkpoint[MIMIC_KEY]
