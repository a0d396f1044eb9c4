"""Safe files on busy and shared filesystems.

- Atomic writes: a reader never sees a half-written file, and a crash never replaces a good one. The new file
  and its directory are fsynced, so after a power loss or node crash the rename is on disk too.
- A full or failing disk (ENOSPC, EDQUOT, EIO) while writing leaves the previous file intact and becomes an
  :class:`~nnssl.errors.NnsslError` naming the file and the free space left.
- Files several jobs update (a dataset's ``splits_final.json`` and ``fewshot.json``, a model folder's
  ``plans.json``) are read with a bounded retry while another process is writing them, and updated under a lock
  file beside them (:func:`locked`), one process at a time.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nnssl.errors import NnsslError

DISK_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EIO: "input/output error"}
# A writer that is not ours (nnU-Net saves plans.json and splits_final.json with a plain open/write) needs
# milliseconds for these small files; a reader waits this long for it before calling the file damaged.
CONCURRENT_WRITE_WAIT_S = 3.0
LOCK_WAIT_S = 120.0  # how long an update waits for another process holding the file's lock
# Directory fsync is not supported everywhere (some network and FUSE filesystems); there the rename is as
# durable as the filesystem makes it.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP}

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``, and the
    directory is fsynced so the rename survives a crash. A disk error leaves ``path`` as it was."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
            fsync_directory(path.parent)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def fsync_directory(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable (a no-op where the filesystem cannot)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full or failing disk while writing ``path`` into an NnsslError naming it and the free space."""
    try:
        yield
    except Exception as raised:
        err = _disk_error_in(raised)
        if err is None:
            raise
        path = Path(path)
        raise NnsslError(f"Could not write {path}: {DISK_ERRORS[err.errno]} ({errno.errorcode[err.errno]}); "
                         f"{_free_space(path.parent)} free on its filesystem. The previous {path.name}, if there "
                         f"was one, is unchanged. Free some space (or fix the disk) and run the command again; a "
                         f"pretraining continues with --resume, an nnU-Net training with --c.") from None


def _disk_error_in(raised: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT/EIO behind ``raised``: itself, or one it was raised while handling (torch's zip writer
    answers a failed write with a RuntimeError of its own when it closes)."""
    seen: BaseException | None = raised
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRORS:
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def _free_space(folder: Path) -> str:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        size, unit = float(shutil.disk_usage(folder).free), "bytes"
    except OSError:
        return "unknown space"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


@contextmanager
def locked(path: str | os.PathLike, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for a read-modify-write: other processes using it wait their turn.

    The lock is a POSIX record lock (``fcntl.lockf``, honoured by NFS through its lock manager, unlike
    ``flock`` on some mounts) on the hidden file ``.<name>.lock`` beside ``path``. The kernel drops it when the
    process dies, and forked children do not inherit it. It orders processes, not threads of one process, and
    is not reentrant: do not nest two ``locked`` of one path. The empty lock file stays: removed on release, a
    process already waiting would get the lock of the removed file while a newcomer creates and locks a new one,
    two holders at once. Nothing reads it as data (nnU-Net and nnssl list ``*.json``, data folders, or folders).
    """
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    with disk_errors(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while not try_lock(fd, lock_path):
            if time.monotonic() > deadline:
                raise NnsslError(f"Another process has held the lock on {path} ({lock_path}) for more than "
                                 f"{wait_s:.0f} s. Wait for it to finish, or stop it, and run the command again.")
            time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def try_lock(fd: int, lock_path: Path) -> bool:
    """Take an exclusive ``lockf`` lock on ``fd`` without waiting; False when another process holds it.

    On a filesystem without locks (ENOLCK: e.g. NFS without its lock manager) it warns and returns True.
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if err.errno not in _LOCKS_UNSUPPORTED:
            raise
        log.warning("the filesystem of %s does not support locks (%s): going on without one", lock_path,
                    errno.errorcode[err.errno])
    return True


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk raises ``OSError(ENOSPC)`` (saving to a path
    name raises a bare ``RuntimeError`` from the zip writer instead)."""
    import torch  # here, not at the top: light tools (nnssl_benchmark --dry-run, nnssl_fewshot) start faster

    with open(path, "wb") as f:
        torch.save(obj, f)


def save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def save_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        write_torch(obj, tmp)


def load_json(path: str | os.PathLike, fix: str | None = None, wait_s: float = 0.0) -> Any:
    """``path`` parsed as JSON. With ``fix`` (what the user should do), a file that is not valid JSON is an
    :class:`~nnssl.errors.NnsslError` naming it, instead of a ``JSONDecodeError``.

    ``wait_s`` > 0 (e.g. :data:`CONCURRENT_WRITE_WAIT_S`) is for files another process may be writing right
    now without an atomic rename: a file that does not parse (empty, cut off) is read again until it does or
    ``wait_s`` seconds have passed.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError in a multi-byte character cut off
            if time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(2 * delay, 0.2)
                continue
            if fix is None:
                raise
            raise NnsslError(f"{path} is not valid JSON ({err}); {fix}") from None


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and paths appear in configs and metrics
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
