"""A pipeline that starts from another pipeline's registered champion (`task.start_from: {champion_of: P}`): the
champion's base model with its adapter merged in becomes this pipeline's base model, pinned like any other (weights
digest, licence) and recording which registered version, checkpoint and data it came from, so lineage can walk
through it to the raw bytes P was trained on."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.core.digests import combined_digest, sha256_file
from pipelines.core.errors import ModelSourceError
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.sections import SpecView
from pipelines.core.selection import linear_layer_names, names_a_layer
from pipelines.core.tasks import task_for
from pipelines.core.training.compute import ProgressFn

MERGED_FORMAT = "merged"  # the export format that makes a checkpoint one transformers model folder


def started_folder(cache_dir: Path, pipeline: str, version: str, checkpoint_sha256: str) -> Path:
    """Where the merged champion is kept: one folder per pipeline, version and checkpoint digest."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", pipeline).strip("_")
    return cache_dir / "started" / f"{slug}-v{version}-{checkpoint_sha256[:12]}"


def start_from_champion(spec: SpecView, champion: CheckpointRecord | None, registered: Mapping[str, Any] | None,
                        cache_dir: Path, progress: ProgressFn = print) -> BaseModelRecord:
    """The base model of a spec that starts from pipeline P's champion: P's base model with the champion's adapter
    merged in (made once per checkpoint, checked to answer as the registered model does), pinned by its weights'
    digest. `registered`: the champion's registry entry (its run ids). Errors say what to do."""
    pipeline = spec.task.starts_from()
    if champion is None:
        raise ModelSourceError(f"task.start_from: pipeline {pipeline!r} has no champion in the model registry yet; "
                               f"materialize {pipeline}'s pipeline first (its evaluation_report registers the "
                               "champion)")
    upstream = task_for(champion)
    if MERGED_FORMAT not in upstream.export_formats:
        raise ModelSourceError(f"task.start_from: the champion of {pipeline!r} is a {champion.task} model, which "
                               "cannot be merged into one language model; start from a pipeline that tunes a chat "
                               "model (instruction tuning)")
    version = str(champion.model_version)
    folder = started_folder(cache_dir, pipeline, version, champion.sha256)
    if not (folder / "config.json").is_file():
        progress(f"merging the champion v{version} of {pipeline} into its base model {champion.base_model.name}")
        upstream.export(champion, folder, MERGED_FORMAT)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    task = task_for(spec)
    if (problem := task.model_support(config)) is not None:
        raise ModelSourceError(f"task.start_from: the champion of {pipeline!r} {problem}")
    found = linear_layer_names(folder, task.auto_model_class, champion.base_model.trust_remote_code)
    targets = tuple(t for t in spec.training.lora.target_modules if names_a_layer(t, found))
    if not targets:
        raise ModelSourceError(f"training.lora.target_modules {list(spec.training.lora.target_modules)}: none is a "
                               f"linear layer of the champion of {pipeline!r}")
    weights = sorted(folder.glob("*.safetensors"))
    base = champion.base_model
    started = {"pipeline": pipeline, "version": version, "checkpoint_sha256": champion.sha256,
               "data_sha256": champion.data_sha256, "base_model": base.name,
               "base_weights_sha256": base.weights_sha256,
               "mlflow_run_id": (registered or {}).get("mlflow_run_id"),
               "dagster_run_id": ((registered or {}).get("tags") or {}).get("dagster.run_id")}
    return dataclasses.replace(
        base, name=f"{pipeline} v{version} (champion, on {base.name})", source="pipeline", local_path=str(folder),
        revision=f"{pipeline}@v{version}", weights_sha256=combined_digest([(p.name, sha256_file(p)) for p in weights]),
        gguf_file=None, weight_format="safetensors", lora_targets=targets, started_from=started,
        selection=({"name": f"{pipeline} v{version}", "verdict": "selected", "license": base.license,
                    "architecture": base.architecture, "parameter_count": base.parameter_count,
                    "weight_format": "safetensors", "lora_targets": list(targets),
                    "reason": f"task.start_from: the champion of {pipeline} (its adapter merged into {base.name})"},))
