"""Writing files and folders so that a reader never sees half of one: write a temporary sibling, then rename."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.core.errors import DataFolderError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write (a file or a folder) into: renamed onto `target` when the block
    succeeds, removed when it raises. A file replaces an existing file; a folder never replaces a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process that was killed or crashed does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: Path) -> str | None:
    """What `path` (after symbolic links) is when it exists but is neither a regular file nor a folder: "a named
    pipe (FIFO)", "a character device", ... (reading one may block forever or never end); None otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), None)


class TooLarge(Exception):
    """A file holds more bytes than its reader accepts: `size` is what its metadata said, `grew` whether it passed
    the limit only while being read (a file still being written, or one without an end)."""

    def __init__(self, limit: int, size: int, grew: bool) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit, self.size, self.grew = limit, size, grew


class NotRegular(Exception):
    """A path that was a regular file when checked became something else (a pipe, say) before it was opened."""


CHUNK_BYTES = 1 << 20


def read_chunks(path: Path, limit: int) -> Iterator[bytes]:
    """The bytes of a regular file in chunks of at most 1 MiB: TooLarge before reading when its size is over
    `limit`, and as soon as more than `limit` bytes have come in. Opened without waiting (a path that became a named
    pipe after its caller checked it raises NotRegular instead of blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(str(path))
        if info.st_size > limit:
            raise TooLarge(limit, info.st_size, grew=False)
        done = 0
        while chunk := os.read(fd, min(CHUNK_BYTES, limit + 1 - done)):
            done += len(chunk)
            if done > limit:
                raise TooLarge(limit, info.st_size, grew=True)
            yield chunk
    finally:
        os.close(fd)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see read_chunks)."""
    return b"".join(read_chunks(path, limit))


_WRITE_PROBLEMS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "it is on a read-only file system", errno.ENOSPC: "no space left on the device",
                   errno.EDQUOT: "the disk quota is used up", errno.ENOTDIR: "a file is in the way of the folder"}


def write_problem(exc: OSError, folder: Path) -> DataFolderError | None:
    """An OSError from writing under `folder` (the data folder) as one error that says what to do, or None when it
    is not about the folder being writable."""
    why = _WRITE_PROBLEMS.get(exc.errno or 0)
    if why is None:
        return None
    where = Path(exc.filename) if exc.filename else folder
    blocked = _nearest(where)
    fix = {errno.EROFS: "pass --data-dir (or set the data folder of the code location) to a writable folder",
           errno.ENOSPC: "free some space, or pass --data-dir to a folder on another disk",
           errno.EDQUOT: "free some space, or pass --data-dir to a folder on another disk",
           errno.ENOTDIR: f"move the file {blocked} away"}.get(
        exc.errno or 0, f"make it writable (chmod u+rwx {blocked}) or pass --data-dir to a folder you can write")
    return DataFolderError(f"the data folder {folder} cannot be written: {why} at {blocked}; {fix}. Nothing was "
                           "written")


def _nearest(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists and can be looked at (a folder without search permission
    hides what is inside it)."""
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        return candidate
    return path


def ensure_writable(folder: Path) -> None:
    """Raise DataFolderError when `folder` (or, while it does not exist yet, the folder it would be made in) cannot
    be written. Writes nothing."""
    nearest = _nearest(folder)
    if not nearest.is_dir():
        code = errno.ENOTDIR
    elif os.access(nearest, os.W_OK | os.X_OK):
        return
    else:
        code = errno.EROFS if os.statvfs(nearest).f_flag & os.ST_RDONLY else errno.EACCES
    raise write_problem(OSError(code, os.strerror(code), str(nearest)), folder) or DataFolderError(str(folder))
