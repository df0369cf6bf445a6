"""Writing files and folders so that a reader never sees half of one: write a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
