"""Crash-safe outputs: everything is written beside the destination and moved into place when complete.

Nothing a run did not create is deleted or replaced, except what `force` asks it to replace, whatever
runs beside it or kills it:

- Entries beside ``dst`` are named ``.<dst name>.aockpt-tmp-<pid>-<random>`` (staging),
  ``.<dst name>.aockpt-old-<pid>-<inode>`` (a replaced destination moved aside, where the file system
  cannot swap two names) and ``.<dst name>.aockpt-lock`` (a flock serialising aockpt processes writing
  ``dst``; removed on release).
- Without force the complete staging entry is renamed onto ``dst`` by an operation that fails if ``dst``
  holds anything: rename(2) of a folder, which replaces only an empty folder, and
  ``renameat2(RENAME_NOREPLACE)`` (else a hard link) for a file. A folder that appears during the write
  is kept and the write refused.
- With force, ``renameat2(RENAME_EXCHANGE)`` swaps staging and ``dst`` in one step and the displaced old
  entry is removed; where the file system lacks it, ``dst`` is moved aside, the new entry renamed in, the
  aside entry removed.
- A writer killed outright (SIGKILL, power loss) cannot clean up, so the next write to ``dst`` does, under
  the lock, for entries of this user whose writer process is gone: staging entries are removed (the old
  ``dst``, or the new one if the swap happened, is whole); an aside entry is put back when ``dst`` is
  missing, removed when ``dst`` is the entry that replaced it (its inode is in the name), else kept.

``AOCKPT_FAULT=<point>:<signal>`` (a test hook) makes a writer send itself the signal at one point:
``staged`` (staging made), ``written`` (content complete, before the commit), ``aside`` (old ``dst``
moved aside, new not yet in) and ``placed`` (new in place, old not yet removed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError, UsageError
from .object_files import output_url, staged_upload
from .paths import file_homes

MARK = ".aockpt-"
TEMP_MARK, OLD_MARK, LOCK_MARK = f"{MARK}tmp-", f"{MARK}old-", f"{MARK}lock"
FAULT_ENV = "AOCKPT_FAULT"
_FULL_DISK = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_OCCUPIED = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR})
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})
_AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2


def _load_renameat2() -> ctypes._CFuncPtr | None:
    """The C library's renameat2, or None where it has none (not Linux, glibc before 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _load_renameat2()


def rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the OS or file system lacks it, OSError for any other failure."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _fault(point: str) -> None:
    """The test hook: AOCKPT_FAULT=<point>:<signal> sends this process the signal (default SIGKILL) here."""
    at, _, name = os.environ.get(FAULT_ENV, "").partition(":")
    if at == point:
        os.kill(os.getpid(), signal.Signals[name or "SIGKILL"])


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists (a link itself, never what it points at)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
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


def _left_by_dead_writer(entry: Path, pid: int) -> bool:
    """Whether `entry` is this user's and the process named in its name is gone."""
    return pid != os.getpid() and not _alive(pid) and entry.lstat().st_uid == os.getuid()


def _inode(path: Path) -> int | None:
    """The inode number of `path` itself (not a link's target), None when nothing is there."""
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


def remove_stale(dst: Path) -> list[Path]:
    """Undo or finish what writers of `dst` that died left beside it (see the module text); returns what was removed.

    Call it holding `dst`'s lock. Entries named ``…aockpt-tmp-<pid>-old`` were aside entries of earlier aockpt
    versions and are treated as aside entries whose replacement cannot be proven.
    """
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.aockpt-(tmp|old)-(\d+)-(\w+)$")
    removed = []
    for entry in sorted(dst.parent.iterdir()) if dst.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if not match or not _left_by_dead_writer(entry, int(match.group(2))):
            continue
        kind, tail = match.group(1), match.group(3)
        if kind == "tmp" and tail != "old" or tail.isdigit() and _inode(dst) == int(tail):
            _remove(entry)
            removed.append(entry)
        elif not os.path.lexists(dst):
            os.rename(entry, dst)  # a replacement killed between its two renames: the old one goes back
    return removed


@contextmanager
def _locked(dst: Path) -> Iterator[None]:
    """Hold the flock beside `dst` that serialises aockpt processes writing it; the file goes on release."""
    path = dst.with_name(f".{dst.name}{LOCK_MARK}")
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == _inode(path):
                break  # else the holder before us removed this file: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


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
    prefix = f".{dst.name}{TEMP_MARK}{os.getpid()}-"
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


def _is_output(e: OSError, dst: Path) -> bool:
    """Whether an OS error raised while staging concerns the output (not, say, a source file being read)."""
    ours = str(dst.parent / f".{dst.name}{MARK}")
    named = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return e.errno in _FULL_DISK or any(f == str(dst) or f.startswith(ours) for f in named)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those this call created, outermost first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another process made it: not ours to remove
        created.append(path)
    return created


def _remove_parents(created: list[Path]) -> None:
    """Remove the folders a refused or failed write created, innermost first, while they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def _refuse_occupied(dst: Path, folder: bool) -> None:
    """Refuse a destination that holds something; an empty folder holds nothing and may receive a folder."""
    if not os.path.lexists(dst):
        return
    a_folder = folder and dst.is_dir() and not dst.is_symlink()
    if a_folder:
        with os.scandir(dst) as entries:
            if next(entries, None) is None:
                return
    raise UsageError(f"{dst} already exists{' and is not empty' if a_folder else ''}; pass --force "
                     "(force=True) to replace it")


@contextmanager
def staged(dst: str | os.PathLike, *, force: bool = False, folder: bool = True,
           source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it becomes `dst`, on any error it vanishes.

    `dst` may be missing or an empty folder (for a folder); anything else needs `force`, checked at the
    start and again, atomically, when the result is moved into place.

    Raises:
        UsageError: `dst` holds something and not `force` (at the start, or it appeared during the
            write: it is kept as it is), or `dst` overlaps `source` (see check_no_overlap).
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
    created: list[Path] = []
    try:
        created = _make_parents(dst.parent)
        with _locked(dst):
            remove_stale(dst)  # first: it may put an interrupted replacement's old entry back at dst
            if not force:
                _refuse_occupied(dst, folder)
            tmp = _make_temp(dst, folder)
    except BaseException as e:
        _remove_parents(created)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(dst, e) from e
        raise
    try:
        _fault("staged")
        yield tmp
        fsync_path(tmp if folder else tmp.parent)
        _fault("written")
        with _locked(dst):
            _commit(tmp, dst, force)
    except BaseException as e:
        _remove(tmp)
        _remove_parents(created)
        if isinstance(e, OSError) and not isinstance(e, OutputError) and _is_output(e, dst):
            raise output_error(dst, e) from e
        raise


def move_no_replace(src: Path, dst: Path) -> None:
    """Rename a file or link `src` to `dst`, failing with EEXIST, atomically, if anything is at `dst`."""
    if not rename_flags(src, dst, RENAME_NOREPLACE):
        os.link(src, dst, follow_symlinks=False)  # the fallback: link(2) never replaces either
        os.unlink(src)


def _place(tmp: Path, dst: Path) -> None:
    """Rename `tmp` onto `dst` only if `dst` is missing or an empty folder (`tmp` being a folder)."""
    if tmp.is_dir() and not tmp.is_symlink():
        os.rename(tmp, dst)  # rename(2) replaces an empty folder only: ENOTEMPTY, EEXIST or ENOTDIR else
    else:
        move_no_replace(tmp, dst)


def _commit(tmp: Path, dst: Path, force: bool) -> None:
    """Move the complete `tmp` to `dst`; with `force` whatever is there is replaced, else the move is refused."""
    for _ in range(3):
        try:
            _place(tmp, dst)
            break
        except OSError as e:
            if e.errno not in _OCCUPIED:
                raise
            if not force:
                raise UsageError(f"{dst} appeared while this write ran and was left as it is; nothing was "
                                 "written: pass --force (force=True) to replace it") from e
        try:
            _replace(tmp, dst)
            break
        except FileNotFoundError:
            continue  # dst went away between the two attempts
    else:
        raise OutputError(f"could not write {dst}: other processes keep creating and removing it; nothing "
                          "was written")
    fsync_path(dst.parent)


def _replace(tmp: Path, dst: Path) -> None:
    """Swap `tmp` with the existing `dst` and remove the old entry; without RENAME_EXCHANGE, move it aside first."""
    if rename_flags(tmp, dst, RENAME_EXCHANGE):
        fsync_path(dst.parent)
        _fault("placed")
        _remove(tmp)  # now the old dst
        return
    aside = dst.with_name(f".{dst.name}{OLD_MARK}{os.getpid()}-{tmp.lstat().st_ino}")
    os.rename(dst, aside)
    try:
        _fault("aside")
        _place(tmp, dst)
    except BaseException:
        _put_back(aside, dst)
        raise
    fsync_path(dst.parent)
    _fault("placed")
    _remove(aside)


def _put_back(aside: Path, dst: Path) -> None:
    """Return a replaced entry to `dst` after a failed replacement; if something took its place, say where it is."""
    if not os.path.lexists(dst):
        try:
            os.rename(aside, dst)
            return
        except OSError:
            pass
    raise OutputError(f"{dst} was replaced by another process during this write; the entry it held is kept "
                          f"as {aside}; nothing was written")


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
