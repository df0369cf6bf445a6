"""Checkpoint folders: written whole or not at all, with one manifest file (which task made it, on which base model
and data, its weight files and their digest), read back and verified against that digest."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.core.digests import checkpoint_digest
from pipelines.core.errors import CheckpointError
from pipelines.core.files import atomic_path
from pipelines.core.plots import loss_curve_png
from pipelines.core.records import BaseModelRecord, CheckpointRecord

MANIFEST = "manifest.json"
LOSS_CURVE = "loss_curve.png"  # in every checkpoint whose history logged a loss


def save_checkpoint(out_dir: Path, write_files: Callable[[Path], None], manifest: dict[str, Any],
                    spec_yaml: str, history: tuple[dict[str, float], ...]) -> Path:
    """Write a checkpoint folder: the task's files (`write_files(folder)`), the manifest, the spec, the training
    history and its loss curve (loss_curve.png). Everything goes to a hidden sibling first, then is renamed: a crash
    never leaves half a checkpoint, and an existing folder is never overwritten."""
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; a checkpoint folder is never overwritten")
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            write_files(tmp)
            missing = [name for name in manifest["weight_files"] if not (tmp / name).is_file()]
            if missing:
                raise CheckpointError(f"the checkpoint's manifest names weight files that were not written: "
                                      f"{missing}")
            manifest = {**manifest, "sha256": checkpoint_digest(tmp, tuple(manifest["weight_files"]))}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            (tmp / "spec.yaml").write_text(spec_yaml, encoding="utf-8")
            (tmp / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
            curve = loss_curve_png(history)
            if curve is not None:
                (tmp / LOSS_CURVE).write_bytes(curve)
    except CheckpointError:
        raise
    except Exception as exc:  # disk full, a file size limit, no permission: nothing of it is left behind
        raise CheckpointError(f"could not write the checkpoint to {out_dir}: {write_failure(exc)}; nothing was "
                              "kept. Free space there or point --data-dir at another disk") from exc
    return out_dir


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in words: the OS error (disk full, file too large, read-only) where there is one."""
    while exc is not None and not isinstance(exc, OSError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def checkpoint_manifest(task: str, base: BaseModelRecord, spec_hash: str, data_sha256: str,
                        weight_files: tuple[str, ...], task_data: Mapping[str, Any] | None = None,
                        **extra: Any) -> dict[str, Any]:
    """The manifest of a checkpoint: which task made it, on which base model and data, its weight files
    (save_checkpoint adds their digest) and what the task needs beside the weights (`task_data`, JSON values)."""
    return {"task": task, "base_model": base.to_dict(), "spec_hash": spec_hash, "data_sha256": data_sha256,
            "weight_files": list(weight_files), "task_data": dict(task_data or {}), **extra}


def read_manifest(path: Path, legacy: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint folder. `legacy` maps the metadata file of a checkpoint written before
    manifests (by an earlier release) to its task and weight files, so registered models keep loading."""
    file = path / MANIFEST
    if file.is_file():
        return dict(json.loads(file.read_text(encoding="utf-8")))
    for name, (task, weights) in (legacy or {}).items():
        if (path / name).is_file():
            meta = json.loads((path / name).read_text(encoding="utf-8"))
            return {**meta, "task": task, "weight_files": list(weights)}
    raise CheckpointError(f"{path} is not a tuneline checkpoint (no {MANIFEST})")


def _task_data(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's task data; one of an earlier release kept a classifier's classes in `labels`."""
    if "task_data" in meta:
        return dict(meta["task_data"])
    return {"labels": list(meta["labels"])} if meta.get("labels") else {}


def record_from_folder(path: Path, model_version: str | None = None,
                       legacy: Mapping[str, tuple[str, tuple[str, ...]]] | None = None,
                       base_path: Path | None = None) -> CheckpointRecord:
    """The record of a checkpoint folder copied from elsewhere (e.g. downloaded from the model registry); with
    `base_path`, its base model is read from that folder (a registered bundle's copy) instead of where it was."""
    meta = read_manifest(path, legacy)
    base = BaseModelRecord.from_dict({**meta["base_model"],
                                      **({"local_path": str(base_path)} if base_path else {})})
    if not Path(base.local_path).is_dir():
        raise CheckpointError(f"checkpoint {path} needs its base model {base.name} at {base.local_path}, which is "
                              "not on this machine (materialize the pipeline's base_model asset first)")
    digest = checkpoint_digest(path, tuple(meta["weight_files"]))
    if meta.get("sha256", digest) != digest:  # checkpoints written before manifests carry no digest
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its {MANIFEST} says "
                              f"{meta['sha256']}: the files changed after training")
    history = json.loads((path / "history.json").read_text(encoding="utf-8"))
    return CheckpointRecord(path=str(path), task=meta["task"], sha256=digest, base_model=base,
                            spec_hash=meta["spec_hash"], data_sha256=meta.get("data_sha256", ""),
                            task_data=_task_data(meta), train_rows=0, validation_rows=0, best_epoch=None,
                            trainable_parameters=0, train_seconds=0.0, tokens_per_second=0.0, precision="",
                            history=tuple(history), model_version=model_version)


def verified_folder(record: CheckpointRecord, weight_files: tuple[str, ...]) -> Path:
    """The checkpoint's folder, after checking its weight files against the record's digest."""
    path = Path(record.path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} is missing")
    digest = checkpoint_digest(path, weight_files)
    if digest != record.sha256:
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its record says "
                              f"{record.sha256}: the files changed after training")
    return path
