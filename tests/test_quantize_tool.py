"""tools/quantize.py end to end on tiny data: stage 2, PTQ-only, W32A4,
the packed checkpoint, and bad input that leaves nothing behind."""
import json
import subprocess
import sys

import pytest
import torch

from gplq_mmdet import safe_load
from gplq_mmdet.cli import data_root_options

from .conftest import ROOT, STAGE1_CONFIG, SWIN_CONFIG


def _options(data) -> list[str]:
    loaders = []
    for name in ('train_dataloader', 'test_dataloader', 'val_dataloader'):
        loaders += [f'{name}.batch_size=2', f'{name}.num_workers=0',
                    f'{name}.persistent_workers=False']
    return data_root_options(data) + loaders


def _quantize(config, checkpoint, work, data, *extra):
    cmd = [sys.executable, 'tools/quantize.py', str(config), str(checkpoint),
           '--work-dir', str(work), '--calib-batches', '2', *extra,
           '--cfg-options', *_options(data)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _evaluate(checkpoint, work, data) -> dict:
    """tools/test.py on a quantized checkpoint; its metrics."""
    proc = subprocess.run(
        [sys.executable, 'tools/test.py', str(STAGE1_CONFIG),
         str(checkpoint), '--work-dir', str(work),
         '--cfg-options', *_options(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / 'metrics.json').read_text())


@pytest.fixture(scope='module')
def w4a4(stage1_run, tiny_shapes, tmp_path_factory):
    _, _, work = stage1_run
    out = tmp_path_factory.mktemp('w4a4')
    proc = _quantize(STAGE1_CONFIG, work / 'epoch_1.pth', out, tiny_shapes,
                     '--w-bits', '4', '--method', 'percentile')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_stage2_writes_packed_checkpoint_and_results(w4a4):
    out, proc = w4a4
    results = json.loads((out / 'results_w4a4.json').read_text())
    assert results['meta']['bits'] == 'W4A4'
    assert results['meta']['scope'] == 'backbone'
    assert 0 <= results['metrics']['coco/bbox_mAP'] <= 1
    assert 'coco/segm_mAP' in results['metrics']
    assert 'W4A4 (GPLQ, scope backbone)' in proc.stdout
    ckpt = safe_load(out / 'quantized_w4a4.pth')
    packed = ckpt['packed_weights']
    qkv = packed['backbone.stages.0.blocks.0.attn.w_msa.qkv.weight']
    assert int(qkv['bits']) == 4 and qkv['data'].dtype == torch.uint8
    assert ckpt['meta']['gplq']['weights']['w_bits'] == 4
    assert any(k.endswith('_quantizer.step') for k in ckpt['state_dict'])


def test_same_inputs_same_bytes_and_map(w4a4, stage1_run, tiny_shapes,
                                        tmp_path):
    out, _ = w4a4
    _, _, work = stage1_run
    again = _quantize(STAGE1_CONFIG, work / 'epoch_1.pth', tmp_path,
                      tiny_shapes)
    assert again.returncode == 0, again.stderr[-2000:]
    first = safe_load(out / 'quantized_w4a4.pth')
    second = safe_load(tmp_path / 'quantized_w4a4.pth')
    for key, entry in first['packed_weights'].items():
        assert torch.equal(entry['data'], second['packed_weights'][key]
                           ['data']), key
    m1 = json.loads((out / 'results_w4a4.json').read_text())['metrics']
    m2 = json.loads((tmp_path / 'results_w4a4.json').read_text())['metrics']
    assert m1 == m2


def test_packed_checkpoint_evaluates_to_the_same_map(w4a4, tiny_shapes,
                                                     tmp_path):
    out, _ = w4a4
    reloaded = _evaluate(out / 'quantized_w4a4.pth', tmp_path, tiny_shapes)
    produced = json.loads((out / 'results_w4a4.json').read_text())['metrics']
    assert reloaded == produced


def test_ptq_only_and_act_only(fp32_checkpoint, stage1_run, tiny_shapes,
                               tmp_path):
    proc = _quantize(STAGE1_CONFIG, fp32_checkpoint, tmp_path / 'ptq',
                     tiny_shapes, '--ptq-only')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'ptq' / 'results_w4a4_ptq-only.json').is_file()
    _, _, work = stage1_run
    act = _quantize(STAGE1_CONFIG, work / 'epoch_1.pth', tmp_path / 'act',
                    tiny_shapes, '--act-only')
    assert act.returncode == 0, act.stderr[-3000:]
    meta = json.loads((tmp_path / 'act' / 'results_w32a4.json')
                      .read_text())['meta']
    assert meta['bits'] == 'W32A4' and meta['weights'] is None


def test_qwt_compensations_are_saved_and_evaluate_to_the_same_map(
        stage1_run, tiny_shapes, tmp_path):
    _, _, work = stage1_run
    out = tmp_path / 'qwt'
    proc = _quantize(STAGE1_CONFIG, work / 'epoch_1.pth', out, tiny_shapes,
                     '--qwt')
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'results_w4a4_qwt.json').read_text())
    rows = results['meta']['qwt']
    # The nano Swin has 1 + 1 + 2 + 1 transformer blocks.
    assert [r['block'] for r in rows] == [
        'backbone.stages.0.blocks.0', 'backbone.stages.1.blocks.0',
        'backbone.stages.2.blocks.0', 'backbone.stages.2.blocks.1',
        'backbone.stages.3.blocks.0']
    for r in rows:
        assert r['kept'] == (r['mse_after'] < r['mse_before'])
    state = safe_load(out / 'quantized_w4a4_qwt.pth')['state_dict']
    saved = {k.rsplit('.qwt_compensation.', 1)[0] for k in state
             if '.qwt_compensation.' in k}
    assert saved == {r['block'] for r in rows if r['kept']}
    reloaded = _evaluate(out / 'quantized_w4a4_qwt.pth', tmp_path / 'eval',
                         tiny_shapes)
    assert reloaded == results['metrics']


@pytest.mark.parametrize('config, use_fp32, extra, message', [
    (STAGE1_CONFIG, True, [], 'has no stage-1 activation steps'),
    (STAGE1_CONFIG, False, ['--w-bits', '9'], 'w_bits=9 is out of range'),
    (STAGE1_CONFIG, False, ['--method', 'best'], "'best' is unknown"),
    (STAGE1_CONFIG, False, ['--calib-batches', '500'],
     'is more than the 3 batches'),
    (STAGE1_CONFIG, False, ['--qwt', '--act-only'],
     'nothing to do with --act-only'),
    (STAGE1_CONFIG, False, ['--qwt', '--calib-batches', '1'],
     '--qwt needs --calib-batches >= 2'),
    (SWIN_CONFIG, False, [], 'has no activation quantizers'),
])
def test_bad_input_is_explained_and_writes_nothing(
        config, use_fp32, extra, message, fp32_checkpoint, stage1_run,
        tiny_shapes, tmp_path):
    ckpt = fp32_checkpoint if use_fp32 else stage1_run[2] / 'epoch_1.pth'
    proc = _quantize(config, ckpt, tmp_path, tiny_shapes, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not list(tmp_path.glob('quantized_*'))
    assert not list(tmp_path.glob('results_*'))


def test_checkpoint_that_does_not_fit_the_config(tiny_shapes, tmp_path):
    bad = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.foo': torch.zeros(1)}}, bad)
    proc = _quantize(STAGE1_CONFIG, bad, tmp_path / 'w', tiny_shapes)
    assert proc.returncode == 2
    assert 'does not match the config' in proc.stderr


def test_stage2_killed_midway_leaves_nothing_and_rerun_is_identical(
        w4a4, stage1_run, tiny_shapes, tmp_path):
    import signal
    import time

    out = tmp_path / 'out'
    cmd = [sys.executable, 'tools/quantize.py', str(STAGE1_CONFIG),
           str(stage1_run[2] / 'epoch_1.pth'), '--work-dir', str(out),
           '--calib-batches', '2', '--cfg-options', *_options(tiny_shapes)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # killed once the checkpoint is loaded
        if 'Load checkpoint' in line:
            break
        assert time.monotonic() < deadline
    else:
        pytest.fail('quantize.py ended before it loaded the checkpoint')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob('quantized_*')) and not list(
        out.glob('results_*'))
    # A temporary file as a SIGKILL during the final write would leave it.
    stale = out / '.quantized_w4a4.pth.x1y2z3.partial'
    stale.write_bytes(b'PK half')
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not stale.exists()
    first = safe_load(w4a4[0] / 'quantized_w4a4.pth')
    second = safe_load(out / 'quantized_w4a4.pth')
    for key, entry in first['packed_weights'].items():
        assert torch.equal(entry['data'], second['packed_weights'][key]
                           ['data']), key
        assert torch.equal(entry['scale'], second['packed_weights'][key]
                           ['scale']), key
    metrics = json.loads((w4a4[0] / 'results_w4a4.json').read_text())
    rerun = json.loads((out / 'results_w4a4.json').read_text())
    assert rerun['metrics'] == metrics['metrics']
