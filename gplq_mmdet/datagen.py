"""Deterministic COCO-format instance-segmentation data made on the spot.

Nothing can be downloaded where this project runs, so tests and the demo train
on shapes drawn here. The objects vary in shape, scale, rotation, colour and
occlusion, over textured backgrounds with unlabeled clutter, so a detector has
to learn shape rather than colour or position. Every image is drawn from its
own seeded generator: the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

#: Shapes the generator can draw, as the class names configs use.
SHAPES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')
DEFAULT_CLASSES = ('circle', 'square', 'triangle', 'star')
META_FILE = 'dataset_meta.json'
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class DataGenError(ValueError):
    """Bad arguments for the dataset generator (the message says the fix)."""


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate; validated on construction."""

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 160
    classes: tuple[str, ...] = DEFAULT_CLASSES
    seed: int = 0
    max_objects: int = 4
    min_scale: float = 0.16
    max_scale: float = 0.42
    background_dir: str | None = None
    clutter: bool = True
    # The format version changes whenever drawing changes, so cached
    # datasets made by an older generator are not silently reused.
    version: int = field(default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, 'classes', tuple(self.classes))
        for name in ('num_train', 'num_val'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise DataGenError(
                    f'{name} must be a non-negative integer, got {value!r}')
        if self.num_train + self.num_val == 0:
            raise DataGenError(
                'num_train and num_val are both 0: ask for at least one image')
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise DataGenError(
                f'max_objects must be >= 1, got {self.max_objects!r}')
        if not 0 < self.min_scale <= self.max_scale <= 0.8:
            raise DataGenError(
                'need 0 < min_scale <= max_scale <= 0.8 (object size as a '
                f'fraction of the image side), got min_scale='
                f'{self.min_scale}, max_scale={self.max_scale}')
        min_object_px = 12
        if (not isinstance(self.image_size, int)
                or self.image_size * self.min_scale < min_object_px):
            need = int(np.ceil(min_object_px / self.min_scale))
            raise DataGenError(
                f'image_size={self.image_size!r} is too small: the smallest '
                f'object would be under {min_object_px} px. Use image_size '
                f'>= {need} or a larger min_scale')
        if not self.classes:
            raise DataGenError(
                f'classes is empty; choose from {", ".join(SHAPES)}')
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise DataGenError(
                f'unknown class name(s) {", ".join(map(repr, unknown))}; '
                f'the generator draws: {", ".join(SHAPES)}')
        if len(set(self.classes)) != len(self.classes):
            raise DataGenError(f'classes repeat a name: {self.classes}')
        if self.background_dir is not None:
            if not Path(self.background_dir).is_dir():
                raise DataGenError(
                    f'background_dir {self.background_dir!r} is not a '
                    'folder; pass a folder of photos or leave it out for '
                    'procedural backgrounds')


def _shape_polygon(kind: str, center: np.ndarray, radius: float,
                   angle: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of one object as an (N, 2) float polygon."""
    if kind == 'circle':
        # Mildly elliptic, so radius alone does not identify the class.
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        aspect = rng.uniform(0.8, 1.0)
        pts = np.stack([np.cos(t), aspect * np.sin(t)], 1)
    elif kind == 'square':
        aspect = rng.uniform(0.7, 1.0)
        pts = np.array([[-1, -aspect], [1, -aspect], [1, aspect],
                        [-1, aspect]], dtype=float) / np.sqrt(2) * 1.3
    elif kind == 'triangle':
        t = np.array([90, 210, 330]) * np.pi / 180
        t = t + rng.uniform(-0.15, 0.15, 3)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == 'star':
        t = np.arange(10) * np.pi / 5
        inner = rng.uniform(0.38, 0.5)
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif kind == 'hexagon':
        t = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == 'cross':
        w = rng.uniform(0.28, 0.38)
        pts = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
                        [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w],
                        [-w, -w]], dtype=float)
    else:  # ShapesConfig validates names; this guards direct callers.
        raise DataGenError(f'unknown shape {kind!r}')
    rot = np.array([[np.cos(angle), -np.sin(angle)],
                    [np.sin(angle), np.cos(angle)]])
    return center + radius * pts @ rot.T


def _procedural_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient plus low-frequency colour noise plus fine texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 225, (2, 3))
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy)[..., None]
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    img = c0 + (c1 - c0) * ramp
    coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
    coarse = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    img += coarse * rng.uniform(8, 25)
    img += rng.normal(0, rng.uniform(2, 8), (size, size, 3))
    return img


def _photo_background(photos: Sequence[Path], size: int,
                      rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a random photo, resized to ``size``."""
    path = photos[int(rng.integers(len(photos)))]
    photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if photo is None:
        raise DataGenError(f'cannot read background photo {path}')
    h, w = photo.shape[:2]
    side = int(rng.integers(max(1, min(h, w) // 2), min(h, w) + 1))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    return cv2.resize(crop, (size, size),
                      interpolation=cv2.INTER_AREA).astype(np.float32)


def _contrasting_colour(background: np.ndarray, mask: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    """A random colour that stands out from the background under the mask."""
    local = background[mask].mean(0) if mask.any() else np.full(3, 128.0)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - local).sum() > 150:
            return colour
    return 255.0 - local


def _draw_clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Unlabeled distractors: thin lines and small specks."""
    size = img.shape[0]
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = rng.integers(0, size, (2, 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), colour, 1,
                 cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 6))):
        p = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.circle(img, p, int(rng.integers(1, 3)), colour, -1, cv2.LINE_AA)


def render_image(cfg: ShapesConfig, rng: np.random.Generator,
                 photos: Sequence[Path] = ()) -> tuple[np.ndarray, list]:
    """Draw one image; return it (uint8 BGR) and its visible instances.

    Each instance is ``(class_index, mask)`` with the mask of the part left
    visible after later objects are painted over it.
    """
    size = cfg.image_size
    img = (_photo_background(photos, size, rng)
           if photos else _procedural_background(size, rng))
    if cfg.clutter:
        _draw_clutter(img, rng)
    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(n_obj):
        label = int(rng.integers(len(cfg.classes)))
        radius = rng.uniform(cfg.min_scale, cfg.max_scale) * size / 2
        center = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
        poly = _shape_polygon(cfg.classes[label], center, radius,
                              rng.uniform(0, 2 * np.pi), rng)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        mask = mask.astype(bool)
        if mask.sum() < 0.5 * (cfg.min_scale * size / 2) ** 2:
            continue  # mostly outside the image
        colour = _contrasting_colour(img, mask, rng)
        shade = rng.uniform(0.85, 1.15, 3)
        img[mask] = np.clip(colour * shade, 0, 255)
        for prev in masks:
            prev &= ~mask  # occlusion: the new object hides what is beneath
        masks.append(mask)
        labels.append(label)
    instances = []
    for label, mask in zip(labels, masks, strict=True):
        full = mask.sum()
        if full >= 0.4 * (cfg.min_scale * size / 2) ** 2:
            instances.append((label, mask))
    blur = float(rng.uniform(0, 0.8))
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (3, 3), blur)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), instances


def _list_photos(folder: str) -> list[Path]:
    photos = sorted(p for p in Path(folder).rglob('*')
                    if p.suffix.lower() in IMAGE_EXTS)
    if not photos:
        raise DataGenError(
            f'background_dir {folder!r} holds no images '
            f'({", ".join(IMAGE_EXTS)}); add photos or leave it out')
    return photos


def _coco_annotation(ann_id: int, image_id: int, label: int,
                     mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return dict(id=ann_id, image_id=image_id, category_id=label + 1,
                bbox=[x, y, w, h], area=float(mask.sum()), iscrowd=0,
                segmentation=dict(size=[int(s) for s in rle['size']],
                                  counts=rle['counts'].decode('ascii')))


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DataGenError(f'{probe} is a file, not a folder; choose another '
                           'output folder')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataGenError(f'output folder {probe} is not writable; choose '
                           'a folder you can write to')


def generate(out_dir: str | os.PathLike, cfg: ShapesConfig,
             overwrite: bool = False) -> Path:
    """Write ``images/{train,val}/*.png`` and ``annotations/*.json``.

    An existing folder made with the same settings is reused as it is. A
    folder with anything else in it is never overwritten unless
    ``overwrite`` is set, and then only when it holds a generated dataset.
    Returns the output folder.
    """
    out = Path(out_dir)
    settings = asdict(cfg)
    settings['classes'] = list(cfg.classes)
    meta_path = out / META_FILE
    if out.exists() and not out.is_dir():
        raise DataGenError(f'{out} is a file, not a folder; choose another '
                           'output folder')
    if out.is_dir() and any(out.iterdir()):
        old = None
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = None
        if old == settings:
            return out
        if old is None:
            raise DataGenError(
                f'{out} is not empty and was not made by this generator; '
                'choose an empty or new folder (nothing was changed)')
        if not overwrite:
            raise DataGenError(
                f'{out} holds a dataset generated with other settings; pass '
                'overwrite=True (--overwrite) to replace it, or choose '
                'another folder')
    _check_writable(out)
    photos = _list_photos(cfg.background_dir) if cfg.background_dir else []

    # Build in a sibling folder and swap it in, so an interrupted run never
    # leaves a half-written dataset behind the final name.
    tmp = out.parent / f'.{out.name}.tmp'
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        _write_dataset(tmp, cfg, settings, photos)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataGenError(
            f'cannot write the dataset to {out}: {err.strerror or err}; '
            'choose a writable folder with free space') from err
    return out


def _write_dataset(tmp: Path, cfg: ShapesConfig, settings: dict,
                   photos: Sequence[Path]) -> None:
    """Render both splits and their annotation files into ``tmp``."""
    categories = [dict(id=i + 1, name=n, supercategory='shape')
                  for i, n in enumerate(cfg.classes)]
    for split_id, (split, count) in enumerate(
            (('train', cfg.num_train), ('val', cfg.num_val))):
        img_dir = tmp / 'images' / split
        img_dir.mkdir(parents=True)
        images, annotations = [], []
        for idx in range(count):
            rng = np.random.default_rng([cfg.seed, split_id, idx])
            img, instances = render_image(cfg, rng, photos)
            name = f'{split}_{idx:06d}.png'
            if not cv2.imwrite(str(img_dir / name), img):
                raise OSError(f'could not write {img_dir / name}')
            image_id = idx + 1
            images.append(dict(id=image_id, file_name=name,
                               width=cfg.image_size,
                               height=cfg.image_size))
            for label, mask in instances:
                annotations.append(_coco_annotation(
                    len(annotations) + 1, image_id, label, mask))
        coco = dict(info=dict(description='gplq_mmdet generated shapes',
                              version=str(cfg.version)),
                    licenses=[], images=images, annotations=annotations,
                    categories=categories)
        ann_dir = tmp / 'annotations'
        ann_dir.mkdir(exist_ok=True)
        (ann_dir / f'instances_{split}.json').write_text(
            json.dumps(coco, sort_keys=True))
    (tmp / META_FILE).write_text(json.dumps(settings, sort_keys=True,
                                            indent=1))
