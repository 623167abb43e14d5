"""Crash-safe outputs: everything is written beside the destination and renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UsageError

TEMP_MARK = ".aockpt-tmp-"


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged(dst: str | os.PathLike, *, force: bool = False, folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it replaces `dst`, on any error it vanishes."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise UsageError(f"{dst} already exists; pass --force (force=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dst.name}{TEMP_MARK}"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
        yield tmp
        _fsync_dir(tmp if folder else tmp.parent)
        old = dst.with_name(f".{dst.name}{TEMP_MARK}old") if dst.exists() else None
        if old is not None:
            _remove(old)
            os.replace(dst, old)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    """The process umask, so outputs get the permissions a plain open() would give them."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename or new directory entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
