"""Checkpoint folders through the kernel: complete or absent, never overwritten, a manifest that names the task,
the base model and the digests, and files that changed after training are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.core.errors import CheckpointError
from pipelines.core.records import BaseModelRecord
from pipelines.core.tasks import checkpoint_from_folder
from pipelines.core.training.checkpoints import checkpoint_manifest, save_checkpoint, verified_folder


def base_record(folder: Path) -> BaseModelRecord:
    return BaseModelRecord(name="tiny", source="local", local_path=str(folder), revision=None, weights_sha256="b" * 64,
                           license="apache-2.0", parameter_count=10, architecture="BertModel", pooling="mean",
                           pooling_declared_by="default", hidden_size=4, max_position_embeddings=16)


def write_weights(folder: Path) -> None:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (folder / "head.safetensors").write_bytes(b"head weights")


WEIGHTS = ("adapter/adapter_model.safetensors", "head.safetensors")


def test_a_checkpoint_round_trips_through_its_manifest(tmp_path: Path) -> None:
    base = base_record(tmp_path)
    manifest = checkpoint_manifest("text_classification", base, "spec", "data", WEIGHTS, {"labels": ["A", "B"]},
                                   pooling="mean")
    path = save_checkpoint(tmp_path / "ckpt", write_weights, manifest, "spec: yaml\n", ({"loss": 1.0},))
    stored = json.loads((path / "manifest.json").read_text())
    assert stored["task"] == "text_classification" and stored["weight_files"] == list(WEIGHTS)
    assert stored["base_model"]["weights_sha256"] == "b" * 64 and stored["data_sha256"] == "data"
    record = checkpoint_from_folder(path, model_version="3")
    assert record.sha256 == stored["sha256"] and len(record.sha256) == 64
    assert (record.task, record.task_data, record.model_version, record.history) == (
        "text_classification", {"labels": ["A", "B"]}, "3", ({"loss": 1.0},))
    assert verified_folder(record, WEIGHTS) == path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left behind


def test_changed_weights_and_existing_folders_are_refused(tmp_path: Path) -> None:
    manifest = checkpoint_manifest("text_classification", base_record(tmp_path), "s", "d", WEIGHTS)
    path = save_checkpoint(tmp_path / "ckpt", write_weights, manifest, "", ())
    record = checkpoint_from_folder(path)
    with pytest.raises(CheckpointError, match="exists already"):
        save_checkpoint(path, write_weights, manifest, "", ())
    (path / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="the files changed after training"):
        verified_folder(record, WEIGHTS)
    with pytest.raises(CheckpointError, match="manifest.json says"):
        checkpoint_from_folder(path)


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path: Path) -> None:
    def crash(folder: Path) -> None:
        write_weights(folder)
        raise OSError("disk full")

    manifest = checkpoint_manifest("text_classification", base_record(tmp_path), "s", "d", WEIGHTS)
    with pytest.raises(CheckpointError, match=f"could not write the checkpoint to {tmp_path / 'ckpt'}: disk full"):
        save_checkpoint(tmp_path / "ckpt", crash, manifest, "", ())
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary sibling either


def test_a_checkpoint_from_before_manifests_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    write_weights(folder)
    (folder / "classifier.json").write_text(json.dumps({
        "labels": ["A", "B"], "pooling": "mean", "hidden_size": 4, "base_model": base_record(tmp_path).to_dict(),
        "spec_hash": "s", "data_sha256": "d"}))
    (folder / "history.json").write_text("[]")
    record = checkpoint_from_folder(folder)
    assert record.task == "text_classification" and record.task_data == {"labels": ["A", "B"]}
    assert verified_folder(record, WEIGHTS) == folder


def test_resumable_checkpoints_resume_only_their_own_key_and_never_a_partial_save(tmp_path: Path) -> None:
    from pipelines.core.sections import TrainingConfig
    from pipelines.core.training.resume import Resumable

    cfg = TrainingConfig(checkpoint_every=50)
    plan = Resumable.for_run(tmp_path, cfg, "spec", "data", "base")
    assert plan is not None and plan.every_steps == 50 and plan.every_seconds is None
    assert Resumable.for_run(tmp_path, TrainingConfig(checkpoint_every=0), "spec", "data", "base") is None
    assert Resumable.for_run(None, cfg, "spec", "data", "base") is None
    other = Resumable.for_run(tmp_path, cfg, "spec", "other data", "base")
    assert other is not None and other.key != plan.key

    said: list[str] = []
    (other.key_folder / "resumable-40").mkdir(parents=True)  # made for other data: can never be resumed
    assert plan.prepare(said.append) is None
    assert not other.key_folder.exists()
    assert said == [f"starting fresh: the checkpoint in {tmp_path} was made for another spec, data or base model "
                    "(removed)"]

    (plan.key_folder / "resumable-40").mkdir(parents=True)
    (plan.key_folder / "resumable-120").mkdir()
    (plan.key_folder / "checkpoint-160").mkdir()  # a save cut short by the crash: never renamed, so never used
    said.clear()
    assert plan.prepare(said.append) == plan.key_folder / "resumable-120" and said == []
    assert not (plan.key_folder / "checkpoint-160").exists()
    plan.discard()
    assert not plan.key_folder.exists()
    assert plan.prepare(said.append) is None
    assert said == ["starting fresh: no resumable checkpoint of an interrupted run"]
