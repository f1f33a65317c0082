"""The README's main-job command, end to end on tiny data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(work: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, 'tools/demo.py', '--quick', '--work-dir',
           str(work), '--data-root', str(data)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('demo')
    work, data = tmp / 'work', tmp / 'data'
    return work, data, _demo(work, data)


def test_demo_quick_makes_data_trains_evaluates_and_reports(demo_run):
    work, data, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / 'results.json').read_text())
    assert list(results['rows']) == ['FP32', 'PTQ-only W4A4',
                                     'GPLQ W32A4 (stage 1)',
                                     'GPLQ W4A4 (stage 1 + 2)',
                                     'GPLQ W4A4 + QwT']
    for row in results['rows'].values():
        for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'):
            assert 0.0 <= row['metrics'][key] <= 1.0
        assert row['minutes'] > 0
    assert '| GPLQ W4A4 (stage 1 + 2) |' in proc.stdout
    assert (data / 'annotations' / 'instances_val.json').is_file()
    assert (work / 'stage2' / 'quantized_w4a4.pth').is_file()


@pytest.mark.slow
def test_demo_rerun_reuses_trainings_and_reproduces_every_number(demo_run):
    work, data, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / 'results.json').read_text())
    again = _demo(work, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('reusing') == 2
    rerun = json.loads((work / 'results.json').read_text())
    for label, row in results['rows'].items():
        assert rerun['rows'][label]['metrics'] == row['metrics'], label
