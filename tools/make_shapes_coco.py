"""Write the offline COCO-format shapes dataset (images, masks, boxes).

Example::

    python tools/make_shapes_coco.py data/shapes --num-train 1000 \
        --num-val 200 --image-size 160 --seed 0
"""
import argparse
import sys

from gplq_mmdet.datagen import (
    DEFAULT_CLASSES,
    SHAPES,
    DataGenError,
    ShapesConfig,
    generate,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ShapesConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='output folder')
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument('--image-size', type=int,
                        default=defaults.image_size, help='square side, px')
    parser.add_argument('--classes', nargs='+', default=list(DEFAULT_CLASSES),
                        help=f'any of: {" ".join(SHAPES)}')
    parser.add_argument('--max-objects', type=int,
                        default=defaults.max_objects)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--backgrounds', default=None,
                        help='folder of photos to crop backgrounds from '
                        '(default: procedural backgrounds)')
    parser.add_argument('--no-clutter', action='store_true',
                        help='leave out unlabeled distractor lines and specks')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a dataset generated with other settings')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = ShapesConfig(num_train=args.num_train, num_val=args.num_val,
                           image_size=args.image_size,
                           classes=tuple(args.classes),
                           max_objects=args.max_objects, seed=args.seed,
                           background_dir=args.backgrounds,
                           clutter=not args.no_clutter)
        out = generate(args.out_dir, cfg, overwrite=args.overwrite)
    except DataGenError as err:
        print(f'make_shapes_coco: error: {err}', file=sys.stderr)
        return 2
    print(f'dataset ready: {out} ({cfg.num_train} train, {cfg.num_val} val '
          f'images of {cfg.image_size} px, classes {", ".join(cfg.classes)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
