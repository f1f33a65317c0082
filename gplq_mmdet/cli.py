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
import time
from collections.abc import Callable

from mmengine.config import Config, DictAction

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
    return cfg


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


def run_step(cmd: list[str], log: str | os.PathLike, cwd: str | None = None,
             echo: Callable[[str], bool] | None = None) -> float:
    """Run one tool as a subprocess, its output to ``log``; lines for which
    ``echo`` is true are also printed. Returns the wall time in seconds and
    exits with a pointer to the log if the step fails."""
    print('$ ' + ' '.join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    with open(log, 'w') as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if echo is not None and echo(line):
                print('  ' + line.rstrip()[:160], flush=True)
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f'step failed (exit {proc.returncode}); see {log}')
    return time.perf_counter() - start


def default_echo(line: str) -> bool:
    return 'Epoch(' in line or line.startswith(('Traceback', 'error'))
