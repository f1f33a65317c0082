"""Evaluate a checkpoint: mmdet's ``tools/test.py`` with the plugin loaded.

Prints mmdet's COCO bbox/segm tables and writes the metrics as JSON in the
work dir (``metrics.json``).
"""
import argparse
import json
import os.path as osp
import sys

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import gplq_mmdet  # noqa: F401  (registers the plugin's modules)
from gplq_mmdet.cli import add_common_args, load_config, run_tool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} not found')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg
              else RUNNERS.build(cfg))
    metrics = runner.test()
    out = osp.join(cfg.work_dir, 'metrics.json')
    with open(out, 'w') as f:
        json.dump({k: float(v) for k, v in metrics.items()}, f, indent=1,
                  sort_keys=True)


if __name__ == '__main__':
    sys.exit(run_tool(main, 'test'))
