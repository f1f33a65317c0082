"""The COCO recipes (configs/gplq-w*_coco.py) without COCO or a GPU.

For every model: the stage-1 and stage-2 configs build; a model-zoo style
checkpoint of the FP32 model (random weights, the FP32 config's keys) loads
into the quantized model with only quantizer state missing; one stage-1
iteration (calibration, PCA fit, mimic loss) and one evaluation run on
generated COCO-format data with COCO's 80 categories at 128 px; stage 2
quantizes that checkpoint with the stage-2 config's settings and evaluates.
The architecture and quantization layout are the config's; only the data,
the image size and the number of calibration batches change.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.datasets import CocoDataset
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import Runner

from gplq_mmdet.api import stage2_options
from gplq_mmdet.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
RECIPES = sorted(p.name[len('gplq-w32a4_'):-len('.py')]
                 for p in CONFIGS.glob('gplq-w32a4_*_coco.py'))
IMAGE_SIZE = 128
RESIZES = ('Resize', 'RandomResize', 'RandomChoiceResize', 'RandomChoice',
           'RandomCrop')


def test_every_coco_recipe_has_both_stages():
    assert len(RECIPES) == 5, RECIPES
    for stem in RECIPES:
        assert (CONFIGS / f'gplq-w4a4_{stem}.py').is_file(), stem


@pytest.fixture(scope='module')
def coco80(tmp_path_factory) -> Path:
    """Two generated images per split whose annotation files carry COCO's 80
    category names (the shapes become the first six), so the recipes' COCO
    datasets and metrics read them unchanged."""
    from gplq_mmdet.datagen import ShapesConfig, generate

    root = generate(tmp_path_factory.mktemp('coco80') / 'data',
                    ShapesConfig(num_train=2, num_val=1,
                                 image_size=IMAGE_SIZE, seed=5))
    names = CocoDataset.METAINFO['classes']
    for split in ('train', 'val'):
        path = root / 'annotations' / f'instances_{split}.json'
        ann = json.loads(path.read_text())
        ann['categories'] = [dict(id=i + 1, name=n, supercategory='thing')
                             for i, n in enumerate(names)]
        path.write_text(json.dumps(ann))
    return root


def shrink_pipeline(pipeline: list, size: int) -> list:
    """The pipeline with every resize/crop step replaced by one resize to
    ``size`` (the multi-scale 3x recipes nest them in RandomChoice)."""
    out, resized = [], False
    for step in pipeline:
        if step['type'] in RESIZES:
            if not resized:
                out.append(dict(type='Resize', keep_ratio=True,
                                scale=(size, size)))
                resized = True
            continue
        out.append(step)
    return out


def point_at(cfg: Config, data: Path, work: Path) -> Config:
    """Read the generated data, single-process, at IMAGE_SIZE (twice that
    with a stride-128 level, e.g. RetinaNet's P7, which needs at least two
    positions for its PCA basis)."""
    size = IMAGE_SIZE * (2 if cfg.model.neck.num_outs > 4 and
                         cfg.model.neck.get('add_extra_convs') else 1)
    cfg.work_dir = str(work)
    for name, split in (('train_dataloader', 'train'),
                        ('val_dataloader', 'val'),
                        ('test_dataloader', 'val')):
        loader = cfg[name]
        loader.update(num_workers=0, persistent_workers=False)
        dataset = loader.dataset
        dataset.update(data_root=f'{data}/',
                       ann_file=f'annotations/instances_{split}.json',
                       data_prefix=dict(img=f'images/{split}/'),
                       pipeline=shrink_pipeline(dataset.pipeline, size))
    for name in ('val_evaluator', 'test_evaluator'):
        cfg[name].ann_file = f'{data}/annotations/instances_val.json'
    # Random weights score every class about 1/80: keep those detections,
    # so COCO evaluation has results to score.
    test_cfg = cfg.model.test_cfg
    for part in (test_cfg, test_cfg.get('rcnn')):
        if part is not None and 'score_thr' in part:
            part.score_thr = 0.0
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = 'ERROR'
    return cfg


def fp32_config(stage1: Path) -> Config:
    """The FP32 config a stage-1 config starts from: its first base."""
    text = stage1.read_text()
    first = text.split('_base_ = [')[1].split("'")[1]
    if first.startswith('./'):
        first = str(CONFIGS / first[2:])
    return Config.fromstring(
        f"_base_ = '{first}'\n"
        "custom_imports = dict(imports=['gplq_mmdet'])\n", '.py')


def zoo_checkpoint(model: torch.nn.Module, path: Path, style: str) -> None:
    """What model-zoo files hold: mmdet 2.x (mmcv runner) or mmdet 3.x
    (mmengine runner: message hub of numpy-backed HistoryBuffers)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = dict(state_dict=state, optimizer=optimizer.state_dict())
    if style == 'mmdet2':
        ckpt['meta'] = dict(
            mmdet_version='2.16.0', mmcv_version='1.3.9',
            CLASSES=CocoDataset.METAINFO['classes'], epoch=12, iter=87960,
            config="model = dict(type='MaskRCNN')", env_info='CUDA: True',
            seed=0, exp_name='zoo.py', time='Thu Sep  2 12:09:37 2021',
            hook_msgs=dict(last_ckpt='/work_dirs/epoch_12.pth'))
    else:
        hub = MessageHub('zoo')
        hub.update_scalar('train/loss', 0.5)
        hub.update_scalar('train/lr', np.float64(1e-4))
        hub.update_info('iter', 87960)
        ckpt['message_hub'] = hub.state_dict()
        assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'],
                          HistoryBuffer)
        ckpt['meta'] = dict(
            epoch=12, iter=87960, seed=0, experiment_name='zoo',
            time='20230328_153519', mmengine_version='0.10.7',
            dataset_meta=dict(classes=CocoDataset.METAINFO['classes'],
                              palette=CocoDataset.METAINFO['palette']))
        ckpt['param_schedulers'] = [dict(base_lrs=[1e-4], last_epoch=12)]
    torch.save(ckpt, path)


@pytest.mark.parametrize('stem', RECIPES)
def test_recipe_end_to_end_on_generated_coco(stem, coco80, tmp_path):
    register_all_modules()
    stage1_path = CONFIGS / f'gplq-w32a4_{stem}.py'
    stage1 = Config.fromfile(str(stage1_path))
    # The paper's stage-1 settings (METHOD.md).
    assert stage1.train_cfg.max_epochs == 1
    assert stage1.param_scheduler == []
    assert stage1.optim_wrapper.optimizer.type == 'AdamW'
    assert stage1.optim_wrapper.optimizer.lr == 1e-6
    assert stage1.train_dataloader.batch_size == 1
    assert stage1.auto_scale_lr.base_batch_size == 8
    assert stage1.load_from == stage1.fp32_checkpoint
    assert stage1.custom_hooks[1].teacher_checkpoint == stage1.fp32_checkpoint

    # A model-zoo style FP32 checkpoint loads with only quantizers missing.
    fp32 = fp32_config(stage1_path)
    fp32.model.backbone.init_cfg = None
    fp32_model = MODELS.build(fp32.model)
    fp32_model.init_weights()
    ckpt = tmp_path / 'fp32.pth'
    zoo_checkpoint(fp32_model, ckpt,
                   'mmdet2' if stage1.fp32_checkpoint.startswith('http')
                   else 'mmdet3')
    quant_model = MODELS.build(stage1.model)
    result = quant_model.load_state_dict(safe_load(ckpt)['state_dict'],
                                         strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all('_quantizer.' in k for k in result.missing_keys), [
        k for k in result.missing_keys if '_quantizer.' not in k]
    del quant_model

    # Stage 1: calibration, PCA fit, one iteration with the mimic loss and
    # the end-of-epoch evaluation (W32A4).
    cfg = point_at(stage1, coco80, tmp_path / 'stage1')
    cfg.train_dataloader.dataset.indices = 1
    cfg.load_from = str(ckpt)
    cfg.custom_hooks[0].num_batches = 1
    cfg.custom_hooks[1].update(teacher_checkpoint=str(ckpt),
                               num_fit_batches=1)
    if cfg.optim_wrapper.type == 'AmpOptimWrapper':
        # mmengine's AMP needs a GPU, and mmcv's CPU NMS has no bfloat16
        # kernel; test_amp.py covers the quantized parts under autocast.
        cfg.optim_wrapper.type = 'OptimWrapper'
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = runner.message_hub.get_scalar('train/loss_mimic').current()
    assert np.isfinite(losses) and losses > 0
    assert np.isfinite(runner.message_hub.get_scalar('train/loss').current())
    stage1_map = runner.message_hub.get_scalar('val/coco/bbox_mAP').current()
    assert 0 <= stage1_map <= 1
    stage1_ckpt = tmp_path / 'stage1' / 'epoch_1.pth'
    saved = safe_load(stage1_ckpt)
    assert saved['meta']['gplq']['a_bits'] == 4
    del runner

    # Stage 2 through tools/quantize.py with the stage-2 config's settings
    # (pointed at the generated data), then the COCO test loop.
    stage2 = Config.fromfile(str(CONFIGS / f'gplq-w4a4_{stem}.py'))
    assert stage2.stage1_checkpoint == (
        f'work_dirs/gplq-w32a4_{stem}/epoch_1.pth')
    assert stage2.gplq_stage2.w_bits == 4
    config = tmp_path / f'gplq-w4a4_{stem}.py'
    point_at(stage2, coco80, tmp_path / 'stage2').dump(str(config))
    out = subprocess.run(
        [sys.executable, 'tools/quantize.py', str(config), str(stage1_ckpt),
         '--calib-batches', '1'], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads(
        (tmp_path / 'stage2' / 'results_w4a4.json').read_text())
    assert results['meta']['bits'] == 'W4A4'
    assert results['meta']['weights']['method'] == 'percentile'
    assert 0 <= results['metrics']['coco/bbox_mAP'] <= 1
    assert 'W4A4 (GPLQ' in out.stdout
    assert (tmp_path / 'stage2' / 'quantized_w4a4.pth').is_file()


def test_stage2_settings_come_from_the_config_and_flags_override():
    settings = Config.fromfile(
        str(CONFIGS / f'gplq-w4a4_{RECIPES[0]}.py')).gplq_stage2
    options = stage2_options(settings, dict(w_bits=None, method=None,
                                            gptq=None, qwt=None,
                                            calib_batches=None))
    assert (options.weights.w_bits, options.weights.method,
            options.weights.gptq, options.calib_batches) == (
                4, 'percentile', False, 32)
    options = stage2_options(dict(settings, qwt=True),
                             dict(w_bits=3, qwt=False, calib_batches=4))
    assert (options.weights.w_bits, options.weights.qwt,
            options.calib_batches) == (3, False, 4)
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        stage2_options(dict(bits=4), {})
    with pytest.raises(ValueError, match='w_bits'):
        stage2_options(dict(w_bits=1), {})


def test_quantize_names_a_missing_stage1_checkpoint(tmp_path):
    start = time.time()
    config = CONFIGS / f'gplq-w4a4_{RECIPES[0]}.py'
    out = subprocess.run(
        [sys.executable, 'tools/quantize.py', str(config), '--work-dir',
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert 'run stage 1 first' in out.stderr
    assert time.time() - start < 60


def test_model_zoo_url_is_downloaded_checked_and_safely_loaded(
        tmp_path, monkeypatch):
    """A config's http(s) checkpoint (load_from, teacher_checkpoint): one
    download into torch's hub cache, the model zoo's SHA-256 prefix checked,
    then the same safe loading as a local file, also through mmengine."""
    from mmengine.runner.checkpoint import CheckpointLoader

    source = tmp_path / 'served.pth'
    zoo_checkpoint(torch.nn.Linear(3, 2), source, 'mmdet2')
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    url = ('https://download.openmmlab.com/mmdetection/v2.0/swin/'
           f'mask_rcnn_swin_20210902_120937-{digest[:8]}.pth')
    served = []

    def fake_urlopen(request, *args, **kwargs):
        served.append(request.full_url)
        return urllib.request.urlopen(source.as_uri())

    monkeypatch.setattr(torch.hub, 'urlopen', fake_urlopen)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    loaded = safe_load(url)
    assert served == [url]
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / url.split('/')[-1]
    assert cached.read_bytes() == source.read_bytes()
    assert loaded['meta']['CLASSES'][0] == 'person'
    torch.testing.assert_close(loaded['state_dict']['weight'],
                               safe_load(source)['state_dict']['weight'])
    again = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert served == [url]  # from the cache
    assert again['meta']['epoch'] == 12

    bad = url.replace(digest[:8], '0' * 8)
    with pytest.raises(OSError, match='could not download'):
        safe_load(bad)
    assert not (cached.parent / bad.split('/')[-1]).exists()
