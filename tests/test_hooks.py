"""Stage-1 hooks with a mock runner, and a short stage-1 Runner run."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import Runner

from gplq_mmdet import (
    ActQuantCalibrationHook,
    FeatureMimicHook,
    iter_quantizers,
    safe_load,
)

from .conftest import point_config_at, stage1_config

_stage1_cfg = stage1_config


def _mock_runner(cfg, tmp_path) -> SimpleNamespace:
    register_all_modules()
    runner = Runner.from_cfg(cfg)  # builds model and loaders only
    return SimpleNamespace(model=runner.model, cfg=runner.cfg,
                           train_dataloader=runner.train_dataloader)


def test_calibration_hook_initialises_every_step(tiny_shapes, tmp_path,
                                                 fp32_checkpoint):
    cfg = _stage1_cfg(tiny_shapes, tmp_path, fp32_checkpoint)
    runner = _mock_runner(cfg, tmp_path)
    quantizers = dict(iter_quantizers(runner.model))
    assert quantizers and not any(bool(q.calibrated)
                                  for q in quantizers.values())
    hook = ActQuantCalibrationHook(num_batches=2)
    hook.before_train(runner)
    assert all(bool(q.calibrated) for q in quantizers.values())
    assert runner.model.training  # mode restored after calibrating
    steps = {n: q.step.detach().clone() for n, q in quantizers.items()}
    hook.before_train(runner)  # already calibrated: left alone
    assert all(torch.equal(steps[n], q.step) for n, q in quantizers.items())
    ckpt = {}
    hook.before_save_checkpoint(runner, ckpt)
    assert ckpt['meta']['gplq']['scope'] == 'backbone'
    assert ckpt['meta']['gplq']['a_bits'] == 4


def test_mimic_hook_zero_for_identical_and_positive_when_quantized(
        tiny_shapes, tmp_path, fp32_checkpoint):
    cfg = _stage1_cfg(tiny_shapes, tmp_path, fp32_checkpoint)
    runner = _mock_runner(cfg, tmp_path)
    model = runner.model
    from mmengine.runner.checkpoint import load_checkpoint
    load_checkpoint(model, str(fp32_checkpoint), strict=False,
                    logger='silent')
    ActQuantCalibrationHook(num_batches=2).before_train(runner)
    hook = FeatureMimicHook(teacher_checkpoint=str(fp32_checkpoint),
                            num_fit_batches=2)
    hook.before_train(runner)
    assert hook.pca.fitted
    for level in hook.pca.levels:
        assert int(level.k) % 32 == 0 or int(level.k) == level.mean.numel()
        assert float(level.explained) >= 0.6 - 1e-6
    data = next(iter(runner.train_dataloader))
    data = model.data_preprocessor(data, True)
    model.eval()  # no drop path: the student differs only by quantization
    losses = model.loss(data['inputs'], data['data_samples'])
    assert 'loss_mimic' in losses and losses['loss_mimic'] > 0
    for _, q in iter_quantizers(model):
        q.disable()
    same = model.loss(data['inputs'], data['data_samples'])
    assert same['loss_mimic'].item() == pytest.approx(0.0, abs=1e-6)
    ckpt = {}
    hook.before_save_checkpoint(runner, ckpt)
    assert 'gplq_mimic' in ckpt
    hook.after_train(runner)
    assert 'loss' not in model.__dict__ and hook._handle is None


def test_teacher_checkpoint_must_match_student(tiny_shapes, tmp_path,
                                               fp32_checkpoint):
    cfg = _stage1_cfg(tiny_shapes, tmp_path, fp32_checkpoint)
    runner = _mock_runner(cfg, tmp_path)
    state = safe_load(fp32_checkpoint)['state_dict']
    wrong = {k: v for k, v in state.items() if not k.startswith('neck.')}
    wrong['extra.weight'] = torch.zeros(1)
    bad = tmp_path / 'wrong.pth'
    torch.save({'state_dict': wrong}, bad)
    hook = FeatureMimicHook(teacher_checkpoint=str(bad))
    with pytest.raises(ValueError, match='does not match the student'):
        hook.before_train(runner)


def test_bad_hook_arguments():
    with pytest.raises(ValueError, match="mode='l2' is unknown"):
        FeatureMimicHook(mode='l2')
    with pytest.raises(ValueError, match="features='rpn' is unknown"):
        FeatureMimicHook(features='rpn')
    with pytest.raises(ValueError, match='positive integer'):
        ActQuantCalibrationHook(num_batches=0)


def test_calibration_hook_needs_quantizers(tiny_shapes, tmp_path):
    from .conftest import SWIN_CONFIG
    cfg = point_config_at(Config.fromfile(str(SWIN_CONFIG)), tiny_shapes,
                          tmp_path)
    runner = _mock_runner(cfg, tmp_path)
    with pytest.raises(ValueError, match='no activation quantizers'):
        ActQuantCalibrationHook().before_train(runner)


def test_stage1_runner_logs_finite_mimic_loss_and_saves_state(
        stage1_run, fp32_checkpoint):
    runner, cfg, work = stage1_run
    fp32_weight = safe_load(fp32_checkpoint)['state_dict'][
        'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight']
    mimic = runner.message_hub.get_scalar('train/loss_mimic').current()
    assert mimic > 0 and torch.isfinite(torch.tensor(mimic))
    ckpt = safe_load(work / 'epoch_1.pth')
    state = ckpt['state_dict']
    steps = [k for k in state if k.endswith('_quantizer.step')]
    assert steps and all(bool(state[k.replace('.step', '.calibrated')])
                         for k in steps)
    assert 'gplq_mimic' in ckpt and ckpt['meta']['gplq']['a_bits'] == 4
    # The FP32 weights moved only a little (tiny learning rate).
    weight = state['backbone.stages.0.blocks.0.attn.w_msa.qkv.weight']
    assert 0 < (weight - fp32_weight).abs().max() < 1e-3
    # The stage-1 checkpoint builds and loads into the quantized model with
    # no missing or unexpected keys.
    model = MODELS.build(copy.deepcopy(cfg.model))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
