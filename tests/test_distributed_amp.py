"""Stage 1 under DDP (two CPU processes over gloo, launched the way GPU
users launch it: tools/dist_train.sh, i.e. torchrun) and under AMP
(autocast in float16 and bfloat16 on the CPU)."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from gplq_mmdet.cli import data_root_options
from gplq_mmdet.losses import PCAMimicLoss
from gplq_mmdet.quantizers import ActQuantizer
from gplq_mmdet.surgery import iter_quantizers, remove_act_quant

from .conftest import ROOT, STAGE1_CONFIG

HALF = [torch.float16, torch.bfloat16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_stage1_under_torchrun_with_two_ranks(tiny_shapes, fp32_checkpoint,
                                              tmp_path):
    work = tmp_path / 'work'
    config = tmp_path / 'ddp_stage1.py'
    base = Config.fromfile(str(STAGE1_CONFIG))
    hooks = copy.deepcopy(base.custom_hooks)
    hooks[0]['num_batches'] = 2
    hooks[1].update(teacher_checkpoint=str(fp32_checkpoint),
                    num_fit_batches=2)
    hooks.append(dict(type='DDPProbeHook'))
    config.write_text(
        f"_base_ = ['{STAGE1_CONFIG}']\n"
        "custom_imports = dict(imports=['gplq_mmdet', 'ddp_probe'],\n"
        "                      allow_failed_imports=False)\n"
        f"load_from = '{fp32_checkpoint}'\n"
        f'custom_hooks = {hooks!r}\n'
        "log_level = 'WARNING'\n")
    options = data_root_options(tiny_shapes) + [
        'train_dataloader.batch_size=1', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
        'train_dataloader.dataset.pipeline.2.scale=(96,96)',
        'val_dataloader.dataset.pipeline.1.scale=(96,96)']
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
               OMP_NUM_THREADS='1',
               PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}")
    out = subprocess.run(
        ['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir',
         str(work), '--cfg-options', *options],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    probes = [torch.load(work / f'probe_rank{r}.pt', weights_only=True)
              for r in (0, 1)]
    for rank, probe in enumerate(probes):
        assert probe['rank'] == rank and probe['world_size'] == 2
        assert probe['wrapper'] == 'MMDistributedDataParallel'
        assert probe['teacher']  # a frozen FP32 teacher on every rank
    first, second = probes
    # The ranks saw different images (DistributedSampler) ...
    assert first['images'] and second['images']
    assert not set(first['images']) & set(second['images'])
    # ... yet calibrated to the same steps (averaged over the ranks), use
    # one PCA basis (fitted on rank 0, broadcast) and stay in step.
    for key in ('calibrated', 'pca', 'trained'):
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            torch.testing.assert_close(first[key][name], second[key][name],
                                       atol=0, rtol=0, msg=f'{key} {name}')
    assert int(first['pca']['levels.0.k']) > 0
    moved = [n for n in first['trained']
             if not torch.equal(first['trained'][n], first['calibrated'][n])]
    assert moved, 'training did not update the steps'
    assert (work / 'epoch_1.pth').is_file()

    # The same checkpoint evaluated by two ranks (tools/dist_test.sh).
    out = subprocess.run(
        ['bash', 'tools/dist_test.sh', str(config), str(work / 'epoch_1.pth'),
         '2', '--work-dir', str(tmp_path / 'test'), '--cfg-options',
         *options], cwd=ROOT, env=dict(env, PORT=str(free_port())),
        capture_output=True, text=True, timeout=300)
    (tmp_path / 'test.log').write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    metrics = json.loads((tmp_path / 'test' / 'metrics.json').read_text())
    assert 0 <= metrics['coco/bbox_mAP'] <= 1


@pytest.mark.parametrize('dtype', HALF, ids=str)
@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_quantizer_computes_in_float32_under_autocast(dtype, granularity):
    torch.manual_seed(0)
    q = ActQuantizer(4, granularity, num_channels=16)
    with torch.no_grad():
        q.step.copy_(torch.linspace(0.05, 0.4, q.step.numel()))
    q.calibrated.fill_(True)
    x = (torch.randn(8, 16) * 2).to(dtype).requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        out = q(x)
    assert out.dtype == dtype
    # Exactly the float32 fake-quantization of the same values, rounded
    # once to the input's precision at the end.
    with torch.no_grad():
        reference = q(x.detach().float()).to(dtype)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    out.float().pow(2).sum().backward()
    assert q.step.grad.dtype == torch.float32
    assert torch.isfinite(q.step.grad).all() and q.step.grad.abs().sum() > 0
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_pca_mimic_loss_is_float32_under_autocast(dtype):
    torch.manual_seed(0)
    teacher = [torch.randn(2, 64, 8, 8), torch.randn(2, 64, 4, 4)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    loss = PCAMimicLoss([64, 64])
    loss.fit([t.permute(0, 2, 3, 1).reshape(-1, 64) for t in teacher], 0.6,
             8)
    expected = loss(student, teacher)
    with torch.autocast('cpu', dtype=dtype):
        got = loss([s.to(dtype) for s in student],
                   [t.to(dtype) for t in teacher])
    assert got.dtype == torch.float32
    # Only the rounding of the features to half precision differs.
    half = loss([s.to(dtype).float() for s in student],
                [t.to(dtype).float() for t in teacher])
    torch.testing.assert_close(got, half, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_stage1_backbone_and_mimic_loss_under_autocast(dtype):
    """The quantized Swin and FPN of the stage-1 config, calibrated, then
    one mimic-loss step against the FP32 teacher in autocast: finite loss
    and gradients, and a loss that moves no more than rounding the input to
    the half type's precision already moves it (4-bit bins flip). The whole
    detector cannot run in autocast on the CPU: mmcv's CPU NMS has no half
    kernel; on a GPU mmdet's AmpOptimWrapper runs it."""
    register_all_modules()
    cfg = Config.fromfile(str(STAGE1_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.eval()  # no stochastic depth: the same function every call
    teacher = remove_act_quant(copy.deepcopy(model))
    x = torch.randn(2, 3, 96, 96)
    quantizers = [q for _, q in iter_quantizers(model)]
    for q in quantizers:
        q.begin_calibration()
    with torch.no_grad():
        model.extract_feat(x)
    for q in quantizers:
        q.end_calibration()
    with torch.no_grad():
        target = list(teacher.extract_feat(x))
    loss = PCAMimicLoss([t.shape[1] for t in target])
    loss.fit([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in target])

    with torch.no_grad():
        full = loss(list(model.extract_feat(x)), target)
        eps = torch.finfo(dtype).eps
        noise = max(
            float((loss(list(model.extract_feat(
                x * (1 + eps * torch.randn(x.shape, generator=torch.Generator(
                ).manual_seed(seed))))), target) - full).abs() / full)
            for seed in range(3))
    model.zero_grad()
    with torch.autocast('cpu', dtype=dtype):
        value = loss(list(model.extract_feat(x)), target)
    value.backward()
    grads = [q.step.grad for q in quantizers]
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float((value.detach() - full).abs() / full) <= noise
