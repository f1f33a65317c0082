"""The bad-input matrix: every case names the problem and the fix, and
leaves no partial file behind (README, "What is guaranteed").

Library cases run in-process; the cases about files run the tools as a
user would. Tool cases that other modules already cover end to end (a
checkpoint without stage-1 steps, a checkpoint that does not fit the
config, too many calibration batches, --w-bits 9, unknown --method:
tests/test_quantize_tool.py) are repeated here at the library level.
"""
import errno
import os
import re
import subprocess
import sys

import pytest
import torch
from mmdet.models.backbones import ResNet, SwinTransformer

from gplq_mmdet import (
    QuantConfig,
    calibrate_act_quant,
    iter_quantizers,
    prepare_act_quant,
)
from gplq_mmdet.api import Stage2Error, Stage2Options, check_matches
from gplq_mmdet.checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    safe_load,
)
from gplq_mmdet.observers import CalibrationError
from gplq_mmdet.ptq import pack_int, quantize_weight, unpack_int
from gplq_mmdet.quantizers import MIN_STEP, ActQuantizer
from gplq_mmdet.stage2 import WeightQuantConfig
from gplq_mmdet.surgery import UnsupportedModelError

from .conftest import ROOT, STAGE1_CONFIG
from .test_quantize_tool import _options, _quantize
from .test_stage2 import _stage1_swin as _swin


@pytest.mark.parametrize('make, error, message', [
    (lambda: QuantConfig(a_bits=9), ValueError,
     r'a_bits=9 is out of range: use an integer from 2 to 8'),
    (lambda: ActQuantizer(bits=1), ValueError, r'bits=1 is out of range'),
    (lambda: WeightQuantConfig(w_bits=16), ValueError,
     r'w_bits=16 is out of range'),
    (lambda: prepare_act_quant(ResNet(18), {}), UnsupportedModelError,
     r'cannot quantize a ResNet backbone: supported are'),
    (lambda: QuantConfig(scope='neck'), ValueError,
     r"scope='neck' is unknown: use 'backbone' or 'all'"),
    (lambda: WeightQuantConfig(method='l1'), ValueError,
     r"'l1' is unknown"),
    (lambda: QuantConfig(a_granularity='per_row'), ValueError,
     r"a_granularity='per_row' is unknown: use one of per_tensor"),
    (lambda: Stage2Options(WeightQuantConfig(), calib_batches=0),
     Stage2Error, r'--calib-batches must be >= 1'),
], ids=['a-bits', 'quantizer-bits', 'w-bits', 'backbone', 'scope',
        'method', 'granularity', 'calib-zero'])
def test_settings_are_refused_with_the_fix(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_unsupported_layer_type_for_the_granularity():
    conv = torch.nn.Conv2d(3, 8, 1)
    quantizer = ActQuantizer(4, 'per_channel', num_channels=8)
    with pytest.raises(ValueError, match='has 8 steps but the input has 3'):
        quantizer(torch.randn(1, 5, 3))
    from gplq_mmdet.surgery import _conv_or_linear_quantizer

    with pytest.raises(ValueError, match="'per_token' applies to token"):
        _conv_or_linear_quantizer(conv, QuantConfig(a_granularity='per_token'))


def test_empty_calibration_set():
    model = prepare_act_quant(SwinTransformer(
        embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), {})
    with pytest.raises(ValueError, match='yielded no batches'):
        calibrate_act_quant(model, [], model, num_batches=4)
    assert not any(q.calibrating for _, q in iter_quantizers(model))


def test_calibration_that_sees_only_non_finite_values():
    quantizer = ActQuantizer(4, 'per_tensor')
    quantizer.begin_calibration()
    quantizer(torch.full((4, 4), float('nan')))
    with pytest.raises(CalibrationError, match='no finite values'):
        quantizer.end_calibration()


@pytest.mark.parametrize('channels', [1, 4])
def test_image_with_the_wrong_number_of_channels(channels):
    swin = _swin()
    with pytest.raises(ValueError, match=(
            rf'expects images of shape N x 3 x H x W, got \(1, {channels}, '
            r'64, 64\): convert grayscale or RGBA')):
        swin(torch.randn(1, channels, 64, 64))


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_nan_or_inf_in_the_input_batch(value):
    swin = _swin()
    image = torch.randn(1, 3, 64, 64)
    image[0, 1, 5, 7] = value
    with pytest.raises(ValueError, match='holds 1 NaN/Inf values'):
        swin(image)
    # ... and in calibration, which stops instead of learning from it.
    fresh = prepare_act_quant(SwinTransformer(
        embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), {})
    with pytest.raises(ValueError, match='NaN/Inf'):
        calibrate_act_quant(fresh, [image], fresh, 1)
    assert not any(q.calibrating for _, q in iter_quantizers(fresh))


def test_all_zero_activation_channel():
    quantizer = ActQuantizer(4, 'per_channel', num_channels=3)
    x = torch.randn(8, 3)
    x[:, 1] = 0
    quantizer.begin_calibration()
    quantizer(x)
    quantizer.end_calibration()
    assert quantizer.step[1] == MIN_STEP
    x.requires_grad_(True)
    out = quantizer(x)
    out.sum().backward()
    assert torch.equal(out[:, 1], torch.zeros(8))
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(quantizer.step.grad).all()


def test_weight_with_an_all_zero_output_channel():
    weight = torch.randn(4, 6)
    weight[2] = 0
    for method in ('minmax', 'percentile', 'mse'):
        ints, scale = quantize_weight(weight, 4, method)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.equal(ints[2], torch.zeros(6, dtype=torch.int8))
        assert torch.equal(unpack_int(pack_int(ints, 4), 4, ints.shape),
                           ints)


def test_checkpoint_keys_that_do_not_match_the_model():
    swin = _swin()
    state = dict(swin.state_dict())
    state.pop('norm0.weight')
    state['extra.weight'] = torch.zeros(1)
    with pytest.raises(Stage2Error, match=(
            r"does not match the config: missing \['norm0.weight'\], "
            r"unexpected \['extra.weight'\]")):
        check_matches(swin, state, 'x.pth')


def test_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'quantized_w4a4.pth'
    atomic_save({'version': 1}, target)

    def full_disk(obj, path):
        with open(path, 'wb') as f:
            f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError, match='disk full while writing .*nothing '
                       'was written. Free space'):
        atomic_save({'version': 2}, target)
    monkeypatch.undo()
    assert safe_load(target) == {'version': 1}  # the user's file survives
    assert [p.name for p in tmp_path.iterdir()] == ['quantized_w4a4.pth']


def test_stale_partial_file_of_a_killed_writer_is_removed(tmp_path):
    stale = tmp_path / '.results.json.abc123.partial'
    stale.write_text('{"half": ')
    atomic_save({'ok': True}, tmp_path / 'results.json')
    assert not stale.exists()
    assert safe_load(tmp_path / 'results.json') == {'ok': True}


@pytest.mark.parametrize('content, message', [
    (None, 'is empty'),
    ('truncated', 'is not a PyTorch checkpoint, or it is truncated'),
    ('garbage', 'is not a PyTorch checkpoint'),
])
def test_missing_truncated_or_corrupted_checkpoint(tmp_path, content,
                                                   message):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.randn(64, 64)}}, good)
    bad = tmp_path / 'bad.pth'
    data = good.read_bytes()
    bad.write_bytes({None: b'', 'truncated': data[:len(data) // 2],
                     'garbage': os.urandom(4096)}[content])
    with pytest.raises(CorruptCheckpointError, match=message):
        safe_load(bad)
    with pytest.raises(FileNotFoundError, match='nope.pth.* not found'):
        safe_load(tmp_path / 'nope.pth')


@pytest.mark.parametrize('kind, message', [
    ('truncated', 'is not a PyTorch checkpoint, or it is truncated: copy it '
     'again or rerun the step that wrote it'),
    ('missing', "checkpoint '.*missing.pth' not found"),
])
def test_quantize_tool_on_a_broken_checkpoint_writes_nothing(
        kind, message, stage1_run, tiny_shapes, tmp_path):
    ckpt = tmp_path / f'{kind}.pth'
    if kind == 'truncated':
        data = (stage1_run[2] / 'epoch_1.pth').read_bytes()
        ckpt.write_bytes(data[:len(data) // 3])
    out = tmp_path / 'out'
    proc = _quantize(STAGE1_CONFIG, ckpt, out, tiny_shapes)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not list(out.glob('quantized_*')) and not list(
        out.glob('results_*')) and not list(out.glob('.*partial'))


def test_work_dir_that_is_not_writable(stage1_run, tiny_shapes, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    proc = _quantize(STAGE1_CONFIG, stage1_run[2] / 'epoch_1.pth',
                     blocker / 'out', tiny_shapes)
    assert proc.returncode == 2
    assert 'is not writable' in proc.stderr
    assert 'pass a writable --work-dir' in proc.stderr
    assert blocker.read_text() == 'not a folder'


class _RunsCode:
    """Unpickling this runs a shell command: a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.mark.parametrize('tool', ['train', 'test', 'quantize',
                                  'export_onnx'])
def test_every_tool_refuses_a_checkpoint_with_pickled_code(
        tool, tiny_shapes, tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {}, 'meta': {'x': _RunsCode(marker)}}, bad)
    work = tmp_path / 'work'
    options = _options(tiny_shapes)
    cmd = {
        'train': ['tools/train.py', str(STAGE1_CONFIG)],
        'test': ['tools/test.py', str(STAGE1_CONFIG), str(bad)],
        'quantize': ['tools/quantize.py', str(STAGE1_CONFIG), str(bad)],
        'export_onnx': ['tools/export_onnx.py', str(STAGE1_CONFIG),
                        str(bad)],
    }[tool]
    load = [f'load_from={bad}'] if tool == 'train' else []
    proc = subprocess.run(
        [sys.executable, *cmd, '--work-dir', str(work), '--cfg-options',
         *load, *options], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'refused to load' in proc.stderr and 'allow-list' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not marker.exists()
    assert not list(tmp_path.rglob('*.onnx')) and not list(
        tmp_path.rglob('quantized_*'))
