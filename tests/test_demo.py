"""The README's main-job command, end to end on tiny data."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_makes_data_trains_evaluates_and_reports(tmp_path):
    work, data = tmp_path / 'work', tmp_path / 'data'
    cmd = [sys.executable, 'tools/demo.py', '--quick', '--work-dir',
           str(work), '--data-root', str(data)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / 'results.json').read_text())
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'):
        assert 0.0 <= results['metrics'][key] <= 1.0
    assert results['train_seconds'] > 0
    assert '| FP32 Swin-N Mask R-CNN |' in proc.stdout
    assert (data / 'annotations' / 'instances_val.json').is_file()

    # A rerun reuses the trained checkpoint instead of training again.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'reusing' in again.stdout
    rerun = json.loads((work / 'results.json').read_text())
    assert rerun['metrics'] == results['metrics']
