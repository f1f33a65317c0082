"""tools/benchmark.py --quick: every kind of row, end to end on tiny data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gplq_mmdet.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
# One row of each kind: cost (three measured trainings), PTQ-only, GPLQ
# (stage 1 + 2) and full QAT; FP32 is always evaluated.
ROWS = ['cost', 'ptq_w4a4_per_channel', 'gplq_w4a4_mimic', 'qat_w4a4_1x']


def _run(args, timeout=600):
    return subprocess.run([sys.executable, 'tools/benchmark.py', *args],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_plot_and_caches(
        tmp_path, fp32_checkpoint):
    work = tmp_path / 'bench'
    args = ['--quick', '--tracks', 'swin', '--work-dir', str(work),
            '--data-root', str(tmp_path / 'shapes'), '--fp32-checkpoint',
            f'swin={fp32_checkpoint}']
    proc = _run(args + ['--rows', *ROWS])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / 'benchmark.json').read_text())
    rows = report['tracks']['swin']
    assert set(rows) == {'fp32', 'cost_fp32-finetune', 'cost_gplq-stage1',
                         'cost_qat', 'ptq_w4a4_per_channel',
                         'gplq_w4a4_mimic', 'qat_w4a4_1x'}
    for key, row in rows.items():
        if key.startswith('cost_'):
            assert row['sec_per_iter'] > 0 and row['peak_mem_mb'] > 0
            assert row['sampled_peak_mb'] > 0
            continue
        for metric in ('bbox_mAP', 'segm_mAP'):
            assert 0.0 <= row['metrics'][metric] <= 1.0
    gplq, qat = rows['gplq_w4a4_mimic'], rows['qat_w4a4_1x']
    assert gplq['bits'] == 'W4A4' and 'bbox_mAP' in gplq['stage1_metrics']
    assert gplq['train_seconds'] > 0 and gplq['ptq_seconds'] > 0
    assert gplq['train_peak_mb'] > 100  # a detector training, in MB
    # The QAT baseline really trained weight quantizers.
    state = safe_load(qat['checkpoint'])['state_dict']
    assert any(k.endswith('weight_quantizer.step') for k in state)
    assert not any(k.endswith('weight_quantizer.step') for k in safe_load(
        gplq['checkpoint'])['state_dict'])
    goals = {g['goal']: g for g in report['goals']['swin']}
    assert len(goals) == 5
    qat_goal = goals['GPLQ W4A4 within 1 mAP point of full QAT at 5x budget']
    assert qat_goal['met'] is None  # the 5x row was left out
    assert isinstance(goals['GPLQ W4A4 beats PTQ-only W4A4 by >= 1 mAP '
                            'point']['met'], bool)
    md = (work / 'benchmark.md').read_text()
    assert '| GPLQ (PCA mimic) | W4A4 |' in md and 'Command: ' in md
    assert (work / 'benchmark.png').read_bytes()[:4] == b'\x89PNG'

    # A rerun reuses the finished rows.
    again = _run(args + ['--rows', 'ptq_w4a4_per_channel'])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('reusing') == 2  # FP32 test and the PTQ row


@pytest.mark.parametrize('args, message', [
    (['--rows', 'bogus'], 'unknown bogus'),
    (['--fp32-checkpoint', 'swin=/nonexistent.pth'], 'not found'),
    (['--fp32-checkpoint', 'resnet=x.pth'], 'use TRACK=PATH'),
])
def test_bad_arguments_are_refused(args, message):
    proc = _run(args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
