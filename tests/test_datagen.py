"""The offline shapes dataset: deterministic, valid COCO, sane masks."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gplq_mmdet.datagen import META_FILE, DataGenError, ShapesConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*')) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = ShapesConfig(num_train=5, num_val=3, image_size=80, seed=7)
    a = _digest(generate(tmp_path / 'a', cfg))
    b = _digest(generate(tmp_path / 'b', cfg))
    assert a == b
    assert len(a) == 5 + 3 + 2 + 1  # images, two annotation files, meta
    other = ShapesConfig(num_train=5, num_val=3, image_size=80, seed=8)
    c = _digest(generate(tmp_path / 'c', other))
    assert c['images/train/train_000000.png'] != \
        a['images/train/train_000000.png']


def test_valid_coco_with_masks_inside_boxes(tiny_shapes):
    for split, count in (('train', 6), ('val', 4)):
        coco = COCO(str(tiny_shapes / f'annotations/instances_{split}.json'))
        assert len(coco.imgs) == count
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
            ['circle', 'square', 'triangle', 'star']
        assert len(coco.anns) >= count  # at least one object on most images
        for ann in coco.anns.values():
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann['area'] > 0
            x, y, w, h = ann['bbox']
            ys, xs = np.nonzero(mask)
            # Every mask pixel lies in its box and the box is tight.
            assert xs.min() == x and ys.min() == y
            assert xs.max() == x + w - 1 and ys.max() == y + h - 1
            img = coco.imgs[ann['image_id']]
            assert mask.shape == (img['height'], img['width'])
            assert ann['iscrowd'] == 0
        for img in coco.imgs.values():
            pixels = cv2.imread(
                str(tiny_shapes / 'images' / split / img['file_name']))
            assert pixels.shape == (96, 96, 3)


def test_ground_truth_scores_perfect_map(tiny_shapes):
    """pycocotools accepts the files: GT evaluated against itself is 1.0."""
    gt = COCO(str(tiny_shapes / 'annotations/instances_val.json'))
    dets = [dict(image_id=a['image_id'], category_id=a['category_id'],
                 bbox=a['bbox'], score=1.0) for a in gt.anns.values()]
    ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_occluded_objects_have_visible_masks_only(tmp_path):
    cfg = ShapesConfig(num_train=40, num_val=0, image_size=96, seed=1,
                       max_objects=6)
    out = generate(tmp_path / 'd', cfg)
    coco = COCO(str(out / 'annotations/instances_train.json'))
    per_image = {}
    for ann in coco.anns.values():
        per_image.setdefault(ann['image_id'], []).append(
            coco.annToMask(ann).astype(bool))
    # Visible masks never overlap: later objects hide earlier ones.
    for masks in per_image.values():
        total = np.sum(masks, axis=0)
        assert total.max() <= 1
    assert max(len(m) for m in per_image.values()) >= 3


def test_photo_backgrounds(tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(photos / 'p.png'),
                rng.integers(0, 255, (120, 200, 3), dtype=np.uint8))
    cfg = ShapesConfig(num_train=2, num_val=1, image_size=80,
                       background_dir=str(photos), seed=0)
    out = generate(tmp_path / 'e', cfg)
    assert len(list((out / 'images/train').iterdir())) == 2
    (photos / 'p.png').unlink()
    with pytest.raises(DataGenError, match='holds no images'):
        generate(tmp_path / 'f', cfg)


def test_reuse_and_refuse_to_overwrite(tmp_path):
    cfg = ShapesConfig(num_train=2, num_val=1, image_size=80)
    out = generate(tmp_path / 'g', cfg)
    stamp = (out / META_FILE).stat().st_mtime_ns
    generate(out, cfg)  # same settings: reused as it is
    assert (out / META_FILE).stat().st_mtime_ns == stamp
    other = ShapesConfig(num_train=3, num_val=1, image_size=80)
    with pytest.raises(DataGenError, match='--overwrite'):
        generate(out, other)
    generate(out, other, overwrite=True)
    assert json.loads((out / META_FILE).read_text())['num_train'] == 3

    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    with pytest.raises(DataGenError, match='not made by this generator'):
        generate(mine, cfg, overwrite=True)
    assert (mine / 'notes.txt').read_text() == 'keep me'


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_train=-1), 'num_train must be a non-negative integer'),
    (dict(num_val=-5), 'num_val must be a non-negative integer'),
    (dict(num_train=0, num_val=0), 'at least one image'),
    (dict(image_size=32), 'too small'),
    (dict(classes=('circle', 'dog')), "unknown class name.*'dog'"),
    (dict(classes=()), 'classes is empty'),
    (dict(max_objects=0), 'max_objects must be >= 1'),
    (dict(min_scale=0.5, max_scale=0.2), 'min_scale <= max_scale'),
    (dict(background_dir='/no/such/folder'), 'is not a folder'),
])
def test_bad_settings_are_explained(kwargs, message):
    with pytest.raises(DataGenError, match=message):
        ShapesConfig(**kwargs)


def test_unwritable_output(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(DataGenError, match='is a file, not a folder'):
        generate(blocker / 'sub', ShapesConfig(num_train=1, num_val=0,
                                               image_size=80))
    # A read-only file system refuses even root.
    with pytest.raises(DataGenError, match='not writable|cannot write'):
        generate('/proc/gplq_shapes', ShapesConfig(num_train=1, num_val=0,
                                                   image_size=80))


def test_cli_reports_errors_without_traceback(tmp_path):
    tool = ROOT / 'tools' / 'make_shapes_coco.py'
    bad = subprocess.run(
        [sys.executable, str(tool), str(tmp_path / 'x'), '--num-train',
         '-3'], capture_output=True, text=True)
    assert bad.returncode == 2
    assert 'num_train must be a non-negative integer' in bad.stderr
    assert 'Traceback' not in bad.stderr
    unknown = subprocess.run(
        [sys.executable, str(tool), str(tmp_path / 'x'), '--classes',
         'circle', 'banana'], capture_output=True, text=True)
    assert unknown.returncode == 2 and 'banana' in unknown.stderr
    good = subprocess.run(
        [sys.executable, str(tool), str(tmp_path / 'y'), '--num-train', '2',
         '--num-val', '1', '--image-size', '80'], capture_output=True,
        text=True)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / 'y/annotations/instances_val.json').is_file()


def test_rle_roundtrip_matches_rendered_mask(tmp_path):
    from gplq_mmdet.datagen import render_image

    cfg = ShapesConfig(num_train=1, num_val=0, image_size=96)
    img, instances = render_image(cfg, np.random.default_rng([0, 0, 0]))
    out = generate(tmp_path / 'h', cfg)
    coco = json.loads((out / 'annotations/instances_train.json').read_text())
    assert len(coco['annotations']) == len(instances)
    for ann, (label, mask) in zip(coco['annotations'], instances,
                                  strict=True):
        assert ann['category_id'] == label + 1
        rle = dict(ann['segmentation'])
        rle['counts'] = rle['counts'].encode('ascii')
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    saved = cv2.imread(str(out / 'images/train/train_000000.png'))
    assert np.array_equal(saved, img)
