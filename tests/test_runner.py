"""The tiny Swin Mask R-CNN trains, evaluates, saves, loads and resumes
through the mmengine Runner, with torch.load's weights_only safety on."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from gplq_mmdet.checkpoint import UnsafeCheckpointError, safe_load

from .conftest import SWIN_CONFIG, point_config_at


def _runner(tiny_shapes: Path, work_dir: Path, **overrides) -> Runner:
    cfg = point_config_at(Config.fromfile(str(SWIN_CONFIG)), tiny_shapes,
                          work_dir)
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 1
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0)]
    cfg.merge_from_dict(overrides)
    return Runner.from_cfg(cfg)


@pytest.fixture(scope='module')
def trained(fp32_run):
    return fp32_run


def test_train_then_evaluate_reports_coco_map(trained):
    runner, work = trained
    assert runner.iter >= 2 and runner.epoch == 1
    metrics = runner.val_loop.run()
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                'coco/segm_mAP_50'):
        assert key in metrics
        assert -1.0 <= metrics[key] <= 1.0
    losses = runner.message_hub.get_scalar('train/loss').current()
    assert torch.isfinite(torch.tensor(losses))


def test_runner_checkpoint_loads_with_weights_only(trained):
    runner, work = trained
    ckpt = work / 'epoch_1.pth'
    assert ckpt.is_file()
    # Plain torch.load with its default safety refuses mmengine's extras...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    # ...our loader allow-lists them and nothing else.
    loaded = safe_load(ckpt)
    assert {'meta', 'state_dict', 'optimizer', 'message_hub'} <= set(loaded)
    model_state = runner.model.state_dict()
    assert loaded['state_dict'].keys() == model_state.keys()
    for key, value in model_state.items():
        assert torch.equal(loaded['state_dict'][key], value.cpu()), key


def test_load_and_resume_round_trip(trained, tiny_shapes, tmp_path):
    runner, work = trained
    ckpt = str(work / 'epoch_1.pth')
    reference = {k: v.clone() for k, v in runner.model.state_dict().items()}

    loaded = _runner(tiny_shapes, tmp_path / 'load', load_from=ckpt)
    loaded.load_or_resume()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[key]), key

    resumed = _runner(tiny_shapes, tmp_path / 'resume', load_from=ckpt,
                      resume=True)
    resumed.train_loop._max_epochs = 2
    resumed.train()
    assert resumed.epoch == 2
    assert resumed.iter == 2 * runner.iter
    assert (tmp_path / 'resume' / 'epoch_2.pth').is_file()


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_shapes):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {}, 'meta': {'hook': _RunsCode(marker)}}, bad)
    with pytest.raises(UnsafeCheckpointError, match='refused to load'):
        safe_load(bad)
    # Through mmengine, as `load_from` in any config would do it.
    runner = _runner(tiny_shapes, tmp_path / 'w', load_from=str(bad))
    with pytest.raises(UnsafeCheckpointError, match='allow-list'):
        runner.load_or_resume()
    assert not marker.exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        safe_load(tmp_path / 'nope.pth')


class _ReachesNumpyMethod:
    """Unpickles to ``getattr(numpy.ndarray, 'tofile')``, a method that
    writes files: the reason a general ``getattr`` is not allowed."""

    def __reduce__(self):
        import numpy as np

        return getattr, (np.ndarray, 'tofile')


def test_getattr_beyond_history_statistics_is_refused(tmp_path):
    bad = tmp_path / 'getattr.pth'
    torch.save({'meta': {'x': _ReachesNumpyMethod()}}, bad)
    with pytest.raises(UnsafeCheckpointError, match='refused getattr'):
        safe_load(bad)
