"""Every shipped config loads, builds its detector and runs a forward."""
from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / 'configs').glob(
    '*.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds_and_runs(path):
    register_all_modules()
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports['imports'] == ['gplq_mmdet']
    # Pretrained weights are tested where they are made (test_dinov2.py);
    # a fresh checkout does not have them.
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.eval()
    size = 96
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, size, size))
    assert len(feats) == cfg.model.neck.num_outs
    # The first FPN level has the stride of its backbone output: 4 for the
    # first Swin stage or the ViT pyramid, 8 for RetinaNet's (stages 1-3).
    first = cfg.model.backbone.get('out_indices', (0, 1, 2, 3))[
        cfg.model.neck.get('start_level', 0)]
    stride = 4 * 2**first
    assert feats[0].shape == (1, cfg.model.neck.out_channels, size // stride,
                              size // stride)
    if 'classes' in cfg:  # the generated-data tracks
        assert model.roi_head.bbox_head.num_classes == len(cfg.classes)
    quant = cfg.model.backbone.get('quant_cfg')
    if quant is not None:  # stage-1 configs: quantizers, one epoch, hooks
        assert any(n.endswith('input_quantizer')
                   for n, _ in model.named_modules())
        assert cfg.train_cfg.max_epochs == 1
        hooks = [h['type'] for h in cfg.custom_hooks]
        assert hooks == ['ActQuantCalibrationHook', 'FeatureMimicHook',
                         'QuantGuardHook', 'ResumableEpochHook']
        assert cfg.randomness.seed == 0  # resumed epochs keep their order
        assert cfg.load_from == cfg.custom_hooks[1].teacher_checkpoint
