"""Crash-safe outputs: everything is written beside the destination and renamed into place when complete.

Temporary entries are named ``.<dst name>.aockpt-tmp-<pid>-<random>``. A writer killed outright (SIGKILL,
power loss) cannot clean up, so the next write to the same destination removes the entries of writer
processes that no longer exist; entries of live writers are left alone.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError, UsageError
from .object_files import output_url, staged_upload
from .paths import file_homes

TEMP_MARK = ".aockpt-tmp-"
_FULL_DISK = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale(dst: Path) -> list[Path]:
    """Remove temporary entries beside `dst` left by writers that died; returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(dst.name)}{re.escape(TEMP_MARK)}(\d+)-")
    removed = []
    for entry in dst.parent.iterdir() if dst.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def check_no_overlap(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse a destination equal to, inside, or containing the source (or where a cached source's files live).

    Replacing `dst` deletes what it holds, so such a write would destroy the files being read, or files
    beside them (a folder's notes, ``.gitattributes``); ``force`` does not change that.
    """
    src, dst = Path(src), Path(dst)
    target = dst.resolve()
    read = {src.resolve()} | (file_homes(src) if src.is_dir() else set())
    for place in read:
        if target == place or place.is_relative_to(target) or target.is_relative_to(place):
            raise UsageError(
                f"destination {dst} overlaps the source {src} (same place, inside it, or containing it); writing "
                "it would delete the files being read, with or without --force: choose a destination elsewhere"
            )


def output_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """An OS error on an output in the user's words: what failed, where, and what to do."""
    if e.errno in _FULL_DISK:
        return OutputError(f"no space left on device writing {path} ({e.strerror}); nothing was written: free "
                           "space or choose another destination")
    return OutputError(f"could not write {path} ({e.strerror or e}); nothing was written: check that its folder "
                       "is writable and that nothing else is in the way")


def _make_temp(dst: Path, folder: bool) -> Path:
    """An empty temporary file or folder beside `dst`, named so a later run can tell whose it is."""
    remove_stale(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = _prefix(dst)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _prefix(dst: Path) -> str:
    """The name start of this process's temporary entries beside `dst`."""
    return f".{dst.name}{TEMP_MARK}{os.getpid()}-"


def _is_output(e: OSError, dst: Path) -> bool:
    """Whether an OS error raised while staging concerns the output (not, say, a source file being read)."""
    ours = str(dst.parent / f".{dst.name}{TEMP_MARK}")
    named = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return e.errno in _FULL_DISK or any(f == str(dst) or f.startswith(ours) for f in named)


@contextmanager
def staged(dst: str | os.PathLike, *, force: bool = False, folder: bool = True,
           source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it replaces `dst`, on any error it vanishes.

    Raises:
        UsageError: `dst` exists and not `force`, or `dst` overlaps `source` (see check_no_overlap).
        OutputError: the destination cannot be written (full disk, permissions, a file in the way);
            nothing was written.
    """
    bucket = output_url(dst)
    if bucket is not None:  # an object-store prefix: staged locally, uploaded with its commit marker last
        with staged_upload(bucket, force=force, folder=folder) as tmp:
            yield tmp
        return
    dst = Path(dst)
    if source is not None:
        check_no_overlap(source, dst)
    try:
        if dst.exists() and not force:
            raise UsageError(f"{dst} already exists; pass --force (force=True) to replace it")
        tmp = _make_temp(dst, folder)
    except OSError as e:
        raise output_error(dst, e) from e
    try:
        yield tmp
        fsync_path(tmp if folder else tmp.parent)
        _commit(tmp, dst, dst.with_name(f"{_prefix(dst)}old"))
    except OSError as e:
        _remove(tmp)
        if isinstance(e, OutputError) or not _is_output(e, dst):
            raise
        raise output_error(dst, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: Path, dst: Path, aside: Path) -> None:
    """Rename `tmp` onto `dst`; an existing folder is moved aside first and put back if the rename fails."""
    old = aside if dst.is_dir() and not dst.is_symlink() else None
    if old is not None:
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    fsync_path(dst.parent)
    if old is not None:
        _remove(old)


def _umask() -> int:
    """The process umask, so outputs get the permissions a plain open() would give them."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Make a file's data, or a directory's entries (after a rename), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
