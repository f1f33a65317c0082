"""Safe checkpoint loading for mmengine under torch >= 2.6.

torch.load defaults to ``weights_only=True``, which refuses mmengine Runner
checkpoints because they carry numpy scalars/arrays and mmengine's
``HistoryBuffer``. Rather than switching that safety off, this module
allow-lists exactly those types for the duration of our own loads and
replaces mmengine's local-file loader with :func:`safe_load`, so a
checkpoint that carries pickled code (``os.system``, ``eval``...) is still
refused, with a message that says why.
"""
from __future__ import annotations

import errno
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a Python object that is not on the allow-list."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is empty, truncated or not a PyTorch file."""


#: Unpickler messages that mean broken bytes rather than a refused object.
_CORRUPT_PICKLE_SIGNS = ('truncated', 'invalid load key',
                         'Unsupported operand', 'stack underflow',
                         'could not find MARK')
#: First byte of a pickle (protocol >= 2): torch's legacy, non-zip format.
_PICKLE_MAGIC = b'\x80'


def _history_statistic(owner: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling.

    A pickled ``HistoryBuffer`` refers to its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. A general ``getattr`` would let a
    crafted file reach methods such as ``ndarray.tofile``, so only those
    lookups are resolved.
    """
    from mmengine.logging import HistoryBuffer

    if owner is HistoryBuffer and name in _HISTORY_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refused getattr({owner!r}, {name!r}): only mmengine '
        'HistoryBuffer statistics may be looked up from a checkpoint')


_HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')


def _allowed_globals() -> list:
    """Types a Runner checkpoint legitimately holds, and nothing callable
    beyond the HistoryBuffer statistics lookup."""
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, '_core') \
        else np.core.multiarray
    allowed: list = [
        HistoryBuffer, np.ndarray, np.dtype, multiarray.scalar,
        multiarray._reconstruct, bytes,
        (_history_statistic, 'builtins.getattr')
    ]
    # numpy >= 1.25 pickles dtypes through their per-type classes.
    allowed += [
        getattr(np.dtypes, name) for name in dir(np.dtypes)
        if name.endswith('DType')
    ]
    return allowed


URL_PREFIXES = ('http://', 'https://')


def download_checkpoint(url: str) -> str:
    """The local copy of a checkpoint URL (e.g. the mmdet model zoo), in
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``) as mmengine keeps
    it, downloaded first if needed: by local rank 0 while the other ranks
    wait. A file name ending in ``-<hex>.pth`` (the model zoo's) is checked
    against that SHA-256 prefix."""
    from mmengine.dist import barrier, get_dist_info

    name = osp.basename(url.split('?')[0])
    folder = osp.join(torch.hub.get_dir(), 'checkpoints')
    path = osp.join(folder, name)
    rank, world_size = get_dist_info()
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if local_rank == 0 and not osp.isfile(path):
        os.makedirs(folder, exist_ok=True)
        found = torch.hub.HASH_REGEX.search(name)
        try:
            torch.hub.download_url_to_file(
                url, path, hash_prefix=found.group(1) if found else None,
                progress=False)
        except (OSError, RuntimeError) as err:
            raise OSError(
                errno.EIO, f'could not download {url} ({err}); download it '
                'yourself and point the config at the local file') from err
    if world_size > 1:
        barrier()
    return path


def safe_load(path: str | os.PathLike, map_location: Any = 'cpu') -> Any:
    """``torch.load`` with ``weights_only=True`` and the minimal allow-list.
    An ``http(s)://`` path is downloaded first (:func:`download_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file is empty, truncated or not written
            by ``torch.save``.
        UnsafeCheckpointError: the file asks for an object outside the
            allow-list (possibly code); it is not loaded.
    """
    path = os.fspath(path)
    if path.startswith(URL_PREFIXES):
        path = download_checkpoint(path)
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} not found')
    size = osp.getsize(path)
    fix = ('copy it again or rerun the step that wrote it (our tools write '
           'checkpoints atomically, so a partial file comes from elsewhere, '
           'e.g. an interrupted copy)')
    if size == 0:
        raise CorruptCheckpointError(f'checkpoint {path!r} is empty: {fix}')
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            legacy = f.read(1) == _PICKLE_MAGIC
        if not legacy:
            raise CorruptCheckpointError(
                f'{path!r} ({size} bytes) is not a PyTorch checkpoint, or it '
                f'is truncated: {fix}')
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location,
                              weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(
            f'checkpoint {path!r} ({size} bytes) cannot be read, it is '
            f'probably truncated or corrupted: {fix}. Details: '
            f'{str(err).splitlines()[0]}') from err
    except pickle.UnpicklingError as err:
        if any(sign in str(err) for sign in _CORRUPT_PICKLE_SIGNS):
            raise CorruptCheckpointError(
                f'checkpoint {path!r} ({size} bytes) is corrupted: {fix}. '
                f'Details: {str(err).splitlines()[-1]}') from err
        raise UnsafeCheckpointError(
            f'refused to load {path!r}: it needs Python objects outside the '
            'allow-list of safe types (weights, numpy arrays, mmengine '
            'history), which could run code when unpickled. Load only '
            'checkpoints you trust; if you do trust this one, re-save its '
            f'tensors with torch.save(state_dict). Details: {err}') from err


_TMP_SUFFIX = '.partial'


def _atomic_write(write: Callable[[str], None],
                  path: str | os.PathLike) -> None:
    """``write(tmp)`` into a temporary file in the same folder, then rename:
    ``path`` is either the complete new file or untouched. The temporary
    file is removed on any error (a full disk included) and on SIGTERM
    when the tool turned it into SystemExit; a file left by a killed
    process (SIGKILL) is removed by the next write of the same ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f'.{path.name}.'
    for stale in path.parent.glob(f'{prefix}*{_TMP_SUFFIX}'):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix,
                               suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        os.unlink(tmp)
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f'disk full while writing {path}; nothing was '
                f'written. Free space in {path.parent} (or choose another '
                '--work-dir) and rerun') from err
        raise
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    _atomic_write(lambda tmp: torch.save(obj, tmp), path)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text (JSON, markdown) result file atomically."""
    _atomic_write(lambda tmp: Path(tmp).write_text(text), path)


def state_dict_mismatch(own: dict, state: dict,
                        optional: frozenset[str] = frozenset()) -> str | None:
    """How ``state`` fails to fit a model whose state dict is ``own``: keys
    it lacks (other than ``optional`` ones), keys the model lacks, tensors
    of another shape. ``None`` when it fits."""
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state
                    and own[k].shape != state[k].shape)
    if not (missing or unexpected or shapes):
        return None
    return (f'missing {missing[:5]}, unexpected {unexpected[:5]}, wrong '
            f'shape {shapes[:5]} (first 5 of each)')


def _mmengine_local_loader(filename: str, map_location: Any) -> Any:
    """Safe load; a packed W4 checkpoint (tools/quantize.py) comes back as
    a plain one with dequantized weights, so every mmdet tool can use it."""
    from .stage2 import PACKED_KEY, unpack_state

    ckpt = safe_load(filename, map_location)
    if isinstance(ckpt, dict) and PACKED_KEY in ckpt:
        ckpt = dict(ckpt, state_dict=unpack_state(ckpt))
        del ckpt[PACKED_KEY]
    return ckpt


def register_safe_loader() -> None:
    """Route mmengine's loading of local files and http(s) URLs (load_from,
    resume, ``init_cfg`` of type Pretrained) through :func:`safe_load`."""
    from mmengine.runner.checkpoint import CheckpointLoader

    for prefixes in ('', URL_PREFIXES):
        CheckpointLoader.register_scheme(prefixes=prefixes,
                                         loader=_mmengine_local_loader,
                                         force=True)
