"""Time per training iteration and peak memory of a training config.

Runs ``--iters`` iterations of the config's own training (hooks included:
calibration, teacher, PCA fit) through the mmengine Runner, in this process
alone, and prints one JSON line:

* ``sec_per_iter``: mean wall time of the iterations after ``--warmup``,
  as mmengine's IterTimerHook measures it (data loading included);
* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU
  the process's peak resident set size (``ru_maxrss``), which also counts
  the Python runtime, the dataset and, for stage 1, the teacher copy.

Example::

    python tools/measure_train_cost.py CONFIG --iters 30 \
        --cfg-options load_from=work_dirs/demo/fp32/epoch_20.pth
"""
import argparse
import json
import resource

import torch
from mmengine.runner import Runner

import gplq_mmdet  # noqa: F401
from gplq_mmdet.cli import add_common_args, load_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--iters', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=5)
    add_common_args(parser)
    args = parser.parse_args()
    if args.iters <= args.warmup:
        parser.error('--iters must be larger than --warmup')
    return args


def main() -> None:
    args = parse_args()
    cfg = load_config(args)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=args.iters,
                         val_interval=args.iters + 1)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=args.iters + 1)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    runner = Runner.from_cfg(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runner.train()
    times = runner.message_hub.get_scalar('train/time').data[0]
    steady = times[args.warmup:]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        method = 'torch.cuda.max_memory_allocated'
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        method = 'ru_maxrss (process peak RSS)'
    print(json.dumps(dict(config=args.config, iters=len(steady),
                          sec_per_iter=float(steady.mean()),
                          peak_mem_mb=round(peak, 1), mem_method=method,
                          batch_size=cfg.train_dataloader.batch_size)))


if __name__ == '__main__':
    main()
