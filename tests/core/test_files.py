"""Atomic writes: the target appears whole or not at all, and a failed write leaves no temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.core.files import atomic_path, write_bytes_atomic


def test_file_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_failed_folder_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.parquet"
    target.write_bytes(b"complete")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"par")
        raise OSError("interrupted")
    assert target.read_bytes() == b"complete" and list(tmp_path.iterdir()) == [target]


def test_a_folder_never_replaces_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "export"
    (target / "keep").mkdir(parents=True)
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["keep"] and [p.name for p in tmp_path.iterdir()] == ["export"]
