"""Stage 1 left alone: the non-finite loss guard, step clamping and
resuming a run killed in the middle of its epoch."""
import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from mmengine.runner import Runner

from gplq_mmdet import QuantGuardHook, ResumableEpochHook, iter_quantizers
from gplq_mmdet.guards import NonFiniteLossError
from gplq_mmdet.quantizers import MIN_STEP

from .conftest import ROOT, STAGE1_CONFIG, stage1_config
from .test_quantize_tool import _options


def test_nonfinite_loss_stops_with_a_usable_checkpoint(
        tiny_shapes, tmp_path, fp32_checkpoint):
    cfg = stage1_config(tiny_shapes, tmp_path, fp32_checkpoint,
                        loss_weight=float('nan'))
    runner = Runner.from_cfg(cfg)
    with pytest.raises(NonFiniteLossError, match=r"loss_mimic.*resume"):
        runner.train()
    saved = tmp_path / 'nonfinite_loss_iter_1.pth'
    assert saved.is_file()
    assert not list(tmp_path.glob('.*.partial'))
    # Nothing was stepped with the NaN loss: the weights are the FP32 ones
    # and every step is the calibrated, finite one.
    from gplq_mmdet import safe_load
    state = safe_load(saved)['state_dict']
    fp32 = safe_load(fp32_checkpoint)['state_dict']
    key = 'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight'
    assert torch.equal(state[key], fp32[key])
    steps = [v for k, v in state.items() if k.endswith('_quantizer.step')]
    assert steps and all(torch.isfinite(s).all() and (s > 0).all()
                         for s in steps)
    # Resuming from it with a sane loss finishes the epoch, skipping the
    # batch that failed.
    cfg = stage1_config(tiny_shapes, tmp_path, fp32_checkpoint)
    cfg.resume = True
    cfg.load_from = str(saved)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert (tmp_path / 'epoch_1.pth').is_file()
    assert runner.iter == 3  # 6 images at batch 2, the first one skipped


def test_steps_are_clamped_finite_and_positive_with_a_warning(
        tiny_shapes, tmp_path, fp32_checkpoint, caplog):
    cfg = stage1_config(tiny_shapes, tmp_path, fp32_checkpoint)
    model = Runner.from_cfg(cfg).model
    quantizer = next(q for _, q in iter_quantizers(model)
                     if q.step.numel() >= 3)
    with torch.no_grad():
        quantizer.step.fill_(0.5)
    runner = SimpleNamespace(model=model, iter=6)
    hook = QuantGuardHook()
    hook.before_train(runner)
    with torch.no_grad():
        quantizer.step[0] = float('nan')
        quantizer.step[1] = -0.25
        quantizer.step[2] = 0.0
    hook.after_train_iter(runner, 0)
    step = quantizer.step.detach()
    assert step[0] == 0.5  # the last good value
    assert step[1] == 0.25 and step[2] == MIN_STEP
    assert torch.isfinite(step).all() and (step >= MIN_STEP).all()
    assert hook.clamped == 1
    hook.after_train_iter(runner, 1)  # nothing more to clamp
    assert hook.clamped == 1


def test_resume_hook_arguments_are_checked():
    with pytest.raises(ValueError, match='interval must be a positive'):
        ResumableEpochHook(interval=0)
    with pytest.raises(ValueError, match='max_keep must be a positive'):
        ResumableEpochHook(max_keep=0)


def test_epoch_without_checkpoint_keeps_its_resume_points(tmp_path):
    """A multi-epoch run that saves every k epochs (the 5x QAT baseline)
    ends epochs with no ``last_checkpoint`` or with it on a resume point;
    neither may fail or delete the newest resume point."""
    from types import SimpleNamespace

    hook = ResumableEpochHook(interval=2)
    runner = SimpleNamespace(work_dir=str(tmp_path))
    hook.after_train_epoch(runner)  # no last_checkpoint yet: nothing to do
    point = tmp_path / 'resume_iter_2.pth'
    point.write_bytes(b'x')
    (tmp_path / 'last_checkpoint').write_text(str(point))
    hook.after_train_epoch(runner)
    assert point.is_file()


def _train_cmd(data, work, fp32, *extra):
    fp32 = str(fp32)
    return [sys.executable, 'tools/train.py', str(STAGE1_CONFIG),
            '--work-dir', str(work), *extra, '--cfg-options',
            *_options(data), f'load_from={fp32}',
            f'custom_hooks.1.teacher_checkpoint={fp32}',
            'custom_hooks.0.num_batches=2', 'custom_hooks.1.num_fit_batches=2',
            'custom_hooks.3.interval=1']


@pytest.fixture(scope='module')
def sixteen_images(tmp_path_factory):
    from gplq_mmdet.datagen import ShapesConfig, generate

    return generate(tmp_path_factory.mktemp('data16') / 'shapes',
                    ShapesConfig(num_train=16, num_val=2, image_size=96,
                                 seed=11))


def test_stage1_killed_mid_epoch_resumes_where_it_stopped(
        sixteen_images, tmp_path, fp32_checkpoint):
    from gplq_mmdet import safe_load

    proc = subprocess.Popen(
        _train_cmd(sixteen_images, tmp_path, fp32_checkpoint), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob('resume_iter_3.pth')):
        assert proc.poll() is None, 'stage 1 ended before it was killed'
        assert time.monotonic() < deadline, 'no resume point appeared'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'epoch_1.pth').exists()
    latest = (tmp_path / 'last_checkpoint').read_text().strip()
    done = safe_load(latest)['meta']['iter']
    assert 3 <= done < 8
    # mmengine's --resume (no path: the work dir's last_checkpoint)
    again = subprocess.run(
        _train_cmd(sixteen_images, tmp_path, fp32_checkpoint, '--resume'),
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f'after {done} of its 8 batches' in again.stdout
    final = safe_load(tmp_path / 'epoch_1.pth')
    assert final['meta']['iter'] == 8  # the rest of the epoch, not more
    assert not list(tmp_path.glob('resume_iter_*'))  # gone after the epoch
    steps = {k: v for k, v in final['state_dict'].items()
             if k.endswith('.step')}
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(str(STAGE1_CONFIG)).model)
    expected = {f'{n}.step': q.step.shape
                for n, q in iter_quantizers(model)}
    assert {k: v.shape for k, v in steps.items()} == expected
    assert all(torch.isfinite(v).all() for v in steps.values())
    logs = sorted(tmp_path.glob('*/vis_data/scalars.json'))
    last = [json.loads(line) for line in logs[-1].read_text().splitlines()]
    losses = [row['loss'] for row in last if 'loss' in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
