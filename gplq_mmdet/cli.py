"""Shared pieces of the command-line tools (train, test, quantize).

The tools take the same arguments as mmdet's ``tools/train.py`` and
``tools/test.py``; this module builds their config the way mmdet does, so
the scripts stay thin.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch
from mmengine.config import Config, DictAction
from torch import distributed as dist

from .checkpoint import UnsafeCheckpointError

#: Errors a tool reports as one ``error:`` line (exit status 2) instead of
#: a traceback: each message already says what is wrong and what to do.
#: ValueError covers bad settings and CorruptCheckpointError; OSError covers
#: missing files, unwritable work dirs and a full disk.
USER_ERRORS = (ValueError, OSError, UnsafeCheckpointError)


def run_tool(main: Callable[[], int | None], name: str) -> int:
    """Run a tool's ``main``: SIGTERM unwinds like Ctrl-C (so temporary
    files are removed), and user errors print one line and exit 2."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return main() or 0
    except USER_ERRORS as err:
        if os.environ.get('GPLQ_TRACEBACK'):
            raise
        print(f'{name}: error: {err} (set GPLQ_TRACEBACK=1 for the '
              'traceback)', file=sys.stderr)
        return 2


def check_writable_dir(path: str) -> None:
    """Create ``path`` if needed and make sure files can be written there,
    before any long computation starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(err.errno, f'work dir {path!r} is not writable '
                      f'({err.strerror}); pass a writable --work-dir') from err


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments that mmdet's train and test tools share."""
    parser.add_argument('--work-dir', help='folder for logs and checkpoints')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (mmdet syntax)')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args: argparse.Namespace) -> Config:
    """Read the config and apply the command-line overrides as mmdet does."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config!r} not found')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    check_writable_dir(cfg.work_dir)
    if args.launcher == 'pytorch' and not torch.cuda.is_available():
        use_cpu_processes(cfg)
    return cfg


def use_cpu_processes(cfg: Config) -> None:
    """Let a torchrun launch (``--launcher pytorch``) run on a machine
    without CUDA: one CPU process per rank over gloo.

    mmengine's launcher selects a CUDA device per rank and wraps the model
    with ``device_ids=[LOCAL_RANK]``, both of which need a GPU. Here the
    process group is created first (mmengine then leaves it alone) and DDP
    gets no device ids, which is how DDP runs on CPU. GPU runs never get
    here."""
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or {}
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper


def data_root_options(data_root: str) -> list[str]:
    """``--cfg-options`` that point a shapes config at ``data_root``."""
    root = str(data_root).rstrip('/')
    ann = f'{root}/annotations/instances_val.json'
    return [
        f'train_dataloader.dataset.data_root={root}/',
        f'val_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.data_root={root}/',
        f'val_evaluator.ann_file={ann}',
        f'test_evaluator.ann_file={ann}',
    ]


#: make_shapes_coco.py options of the ``--quick`` runs (demo, benchmark):
#: the same tiny set, so the two share ``data/shapes-quick``.
QUICK_DATA_OPTIONS = ('--num-train', '16', '--num-val', '8', '--image-size',
                      '96')


def shapes_data_command(python: str, data_root: str | os.PathLike,
                        quick: bool) -> list[str]:
    """The tools/make_shapes_coco.py command of a demo or benchmark run."""
    return ([python, 'tools/make_shapes_coco.py', str(data_root)] +
            (list(QUICK_DATA_OPTIONS) if quick else []))


def run_step(cmd: list[str], log: str | os.PathLike, cwd: str | None = None,
             echo: Callable[[str], bool] | None = None) -> float:
    """Run one tool as a subprocess, its output to ``log``; lines for which
    ``echo`` is true are also printed. Returns the wall time in seconds and
    exits with a pointer to the log if the step fails."""
    return run_measured_step(cmd, log, cwd, echo)[0]


#: How ``run_measured_step`` measures memory, for reports.
MEMORY_METHOD = ('peak PSS of the process and its data-loader workers, '
                 'sampled every 0.5 s from /proc')


def _tree_pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` and its descendants, in MB (shared
    pages counted once, split among the processes sharing them)."""
    total, stack = 0, [pid]
    while stack:
        proc = stack.pop()
        try:
            with open(f'/proc/{proc}/smaps_rollup') as f:
                for line in f:
                    if line.startswith('Pss:'):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f'/proc/{proc}/task'):
                with open(f'/proc/{proc}/task/{task}/children') as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue  # the process ended while being read
    return total / 1024


class _PeakMemory(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, _tree_pss_mb(self.pid))


def run_measured_step(cmd: list[str], log: str | os.PathLike,
                      cwd: str | None = None,
                      echo: Callable[[str], bool] | None = None
                      ) -> tuple[float, float]:
    """:func:`run_step`, also returning the step's peak memory in MB
    (:data:`MEMORY_METHOD`; 0 where /proc is not available)."""
    print('$ ' + ' '.join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    with open(log, 'w') as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        sampler = _PeakMemory(proc.pid)
        sampler.start()
        for line in proc.stdout:
            f.write(line)
            if echo is not None and echo(line):
                print('  ' + line.rstrip()[:160], flush=True)
        proc.wait()
        sampler.done.set()
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f'step failed (exit {proc.returncode}); see {log}')
    return time.perf_counter() - start, sampler.peak


def default_echo(line: str) -> bool:
    return 'Epoch(' in line or line.startswith(('Traceback', 'error'))
