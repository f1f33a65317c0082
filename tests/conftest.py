"""Shared fixtures: a tiny generated dataset and configs pointed at it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWIN_CONFIG = ROOT / 'configs' / 'mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py'
STAGE1_CONFIG = (ROOT / 'configs' /
                 'gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py')


@pytest.fixture(scope='session')
def tiny_shapes(tmp_path_factory) -> Path:
    """Six training and four validation images of 96 px."""
    from gplq_mmdet.datagen import ShapesConfig, generate

    out = tmp_path_factory.mktemp('data') / 'shapes'
    return generate(out, ShapesConfig(num_train=6, num_val=4, image_size=96,
                                      seed=3))


def point_config_at(cfg, data_root: Path, work_dir: Path,
                    image_size: int = 96):
    """Make a shapes config read ``data_root`` at ``image_size`` px, with
    single-process loaders and a tiny schedule."""
    cfg = copy.deepcopy(cfg)
    root = str(data_root) + '/'
    cfg.work_dir = str(work_dir)
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[name]
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.batch_size = 2
        loader.dataset.data_root = root
        for step in loader.dataset.pipeline:
            if step['type'] == 'Resize':
                step['scale'] = (image_size, image_size)
    for name in ('val_evaluator', 'test_evaluator'):
        cfg[name].ann_file = root + 'annotations/instances_val.json'
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 1
    cfg.log_level = 'WARNING'
    return cfg


@pytest.fixture(scope='session')
def fp32_run(tiny_shapes, tmp_path_factory):
    """One epoch (two iterations) of FP32 training through the Runner."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    work = tmp_path_factory.mktemp('fp32')
    cfg = point_config_at(Config.fromfile(str(SWIN_CONFIG)), tiny_shapes,
                          work)
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 1
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner, work


@pytest.fixture(scope='session')
def fp32_checkpoint(fp32_run) -> Path:
    return fp32_run[1] / 'epoch_1.pth'


def stage1_config(data: Path, work: Path, fp32: Path, **hook_overrides):
    """The nano Swin stage-1 config on tiny data, started from ``fp32``."""
    from mmengine.config import Config

    cfg = point_config_at(Config.fromfile(str(STAGE1_CONFIG)), data, work)
    cfg.load_from = str(fp32)
    cfg.custom_hooks[0].num_batches = 2
    cfg.custom_hooks[1].teacher_checkpoint = str(fp32)
    cfg.custom_hooks[1].num_fit_batches = 2
    cfg.custom_hooks[1].update(hook_overrides)
    return cfg


@pytest.fixture(scope='session')
def stage1_run(tiny_shapes, tmp_path_factory, fp32_checkpoint):
    """One stage-1 epoch through the Runner: (runner, config, work dir)."""
    from mmengine.runner import Runner

    work = tmp_path_factory.mktemp('stage1')
    cfg = stage1_config(tiny_shapes, work, fp32_checkpoint)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner, cfg, work
