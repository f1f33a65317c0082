"""Stage 2 through an mmengine Runner: what ``tools/quantize.py`` does.

Order matters: ``Runner.test()`` loads ``load_from`` before testing, which
would overwrite weights quantized earlier. :func:`quantize_runner` therefore
loads the checkpoint first (``runner.load_or_resume()`` marks it loaded),
then calibrates/quantizes in place, and only then may ``runner.test()``
run.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from mmengine.logging import MMLogger
from mmengine.runner import Runner

from . import __version__
from .checkpoint import atomic_save, safe_load, state_dict_mismatch
from .hooks import detector_forward, training_set_loader, unwrap_model
from .qwt import compensate_qwt_, qwt_summary
from .stage2 import (
    PACKED_KEY,
    WeightQuantConfig,
    packed_state,
    quantize_weights_,
    unpack_state,
)
from .surgery import calibrate_act_quant, iter_quantizers, quant_config_of


class Stage2Error(ValueError):
    """Bad input to stage 2 (the message says what to do)."""


@dataclass(frozen=True)
class Stage2Options:
    """What ``tools/quantize.py`` was asked to do."""

    weights: WeightQuantConfig
    calib_batches: int = 32
    ptq_only: bool = False
    act_only: bool = False

    def __post_init__(self) -> None:
        if self.calib_batches < 1:
            raise Stage2Error(f'--calib-batches must be >= 1, got '
                              f'{self.calib_batches}')
        if self.ptq_only and self.act_only:
            raise Stage2Error('--ptq-only and --act-only exclude each other')
        if self.act_only and self.weights.qwt:
            raise Stage2Error('--qwt compensates weight quantization; it has '
                              'nothing to do with --act-only')
        if self.weights.qwt and self.calib_batches < 2:
            raise Stage2Error('--qwt needs --calib-batches >= 2 (every 4th '
                              'batch checks the fit)')


def stage2_options(settings: dict | None, overrides: dict[str, Any],
                   ptq_only: bool = False, act_only: bool = False
                   ) -> Stage2Options:
    """Stage-2 options from a config's ``gplq_stage2`` dict, with the
    command line's values (those not ``None``) taking precedence."""
    merged = dict(settings or {})
    allowed = {f.name for f in fields(WeightQuantConfig)} | {'calib_batches'}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise Stage2Error(f'gplq_stage2 has unknown keys {unknown}; known: '
                          f'{", ".join(sorted(allowed))}')
    merged.update({k: v for k, v in overrides.items() if v is not None})
    calib_batches = merged.pop('calib_batches', 32)
    return Stage2Options(weights=WeightQuantConfig(**merged),
                         calib_batches=calib_batches, ptq_only=ptq_only,
                         act_only=act_only)


def load_checkpoint_dict(path: str) -> dict[str, Any]:
    """A checkpoint file, safely loaded; it must hold a dict."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise Stage2Error(f'{path} is not a checkpoint dict')
    return ckpt


def state_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The (unpacked) state dict of a plain, Runner or packed checkpoint."""
    if PACKED_KEY in ckpt:
        return unpack_state(ckpt)
    return ckpt.get('state_dict', ckpt)


def checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    """The (unpacked) state dict of the checkpoint file ``path``."""
    return state_of(load_checkpoint_dict(path))


def check_matches(model: torch.nn.Module, state: dict, path: str) -> None:
    """The checkpoint must hold every tensor of the model, with the same
    shapes, except quantizer state, and nothing else."""
    optional = frozenset(
        f'{name}.{key}' for name, q in iter_quantizers(model)
        for key in q.state_dict())
    problem = state_dict_mismatch(model.state_dict(), state, optional)
    if problem is not None:
        raise Stage2Error(
            f'checkpoint {path} does not match the config: {problem}. Use '
            'the config the checkpoint was trained with (the stage-1 config '
            'for a stage-1 checkpoint).')


def calibration_loader(runner: Runner, num_batches: int):
    """Training images through the test pipeline (no random augmentation),
    in order: calibration is deterministic."""
    dataset = copy.deepcopy(runner.cfg.train_dataloader.dataset)
    dataset.pipeline = copy.deepcopy(runner.cfg.test_dataloader.dataset
                                     .pipeline)
    loader = training_set_loader(runner, shuffle=False, dataset=dataset)
    available = len(loader)
    if num_batches > available:
        raise Stage2Error(
            f'--calib-batches {num_batches} is more than the {available} '
            f'batches of the training set ({len(loader.dataset)} images, '
            f'batch {loader.batch_size}); use at most {available}')
    return loader


def quantize_runner(runner: Runner, checkpoint: str,
                    options: Stage2Options) -> dict[str, Any]:
    """Load ``checkpoint`` into the runner's model, make sure activation
    steps exist (stage 1, or PTQ-only calibration), quantize the weights
    and return the metadata describing what was done."""
    model = unwrap_model(runner.model)
    if quant_config_of(model) is None:
        raise Stage2Error(
            'the config has no activation quantizers: use a stage-1 config '
            "(backbone type 'QuantSwinTransformer'/'QuantTimmViT')")
    if quant_config_of(model).w_bits is not None:
        raise Stage2Error(
            'the config fake-quantizes the weights already (quant_cfg.w_bits'
            ' is set: the full-QAT baseline); evaluate its checkpoint with '
            'tools/test.py, or use the GPLQ stage-1 config for stage 2')
    state = checkpoint_state(checkpoint)
    check_matches(model, state, checkpoint)
    runner.load_or_resume()
    named = list(iter_quantizers(model))
    quantizers = [q for _, q in named]
    has_steps = any(f'{name}.step' in state for name, _ in named)
    logger = MMLogger.get_current_instance()
    loader = calibration_loader(runner, options.calib_batches)
    model.eval()
    forward = detector_forward(model)
    if options.ptq_only:
        if has_steps:
            raise Stage2Error(
                f'{checkpoint} already holds stage-1 activation steps; '
                '--ptq-only starts from an FP32 checkpoint')
        used = calibrate_act_quant(model, loader, forward,
                                   options.calib_batches)
        logger.info(f'PTQ-only: calibrated {len(quantizers)} activation '
                    f'steps on {used} batches')
    elif not has_steps or not all(bool(q.calibrated) for q in quantizers):
        raise Stage2Error(
            f'{checkpoint} has no stage-1 activation steps. Run stage 1 '
            '(tools/train.py with a gplq-w32a4 config) first, or pass '
            '--ptq-only to calibrate the steps on the calibration set')
    qwt = None
    if not options.act_only:
        batches = [b for _, b in zip(range(options.calib_batches), loader,
                                     strict=False)]
        reference = copy.deepcopy(model) if options.weights.qwt else None
        quantize_weights_(model, options.weights, batches, forward)
        if reference is not None:
            results = compensate_qwt_(
                model, reference, batches,
                lambda module, batch: detector_forward(module)(batch),
                options.weights.qwt_ridge)
            del reference
            qwt = qwt_summary(results)
            kept = [r for r in results if r.kept]
            logger.info(f'QwT: compensated {len(kept)} of {len(results)} '
                        'blocks (held-out MSE before -> after: ' + ', '.join(
                            f'{r.error_before:.3g}->{r.error_after:.3g}'
                            for r in results) + ')')
    act = quant_config_of(model)
    return dict(
        gplq_version=__version__, torch_version=str(torch.__version__),
        activations=act.to_dict(),
        weights=None if options.act_only else options.weights.to_dict(),
        ptq_only=options.ptq_only, calib_batches=options.calib_batches,
        qwt=qwt,
        source_checkpoint=os.path.abspath(checkpoint),
        bits=f'W{32 if options.act_only else options.weights.w_bits}'
        f'A{act.a_bits}', scope=act.scope)


def save_quantized(model: torch.nn.Module, meta: dict,
                   path: str | os.PathLike) -> None:
    """Packed integer weights, scales, activation steps and ``meta``."""
    model = unwrap_model(model)
    state = (packed_state(model) if meta['weights'] is not None
             else dict(state_dict={k: v.cpu() for k, v in
                                   model.state_dict().items()}))
    atomic_save(dict(state, meta=dict(gplq=meta)), path)
