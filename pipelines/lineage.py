"""Lineage questions answered from what was recorded (the model registry and Dagster's event log), never from
the files as they are now: which bytes produced a model version, and which versions a data file went into."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from assets.pipeline import BASE_MODEL
from pipelines.core.records import model_origin

CHECKPOINT = "finetuned_checkpoint"
SCORED = "scored_data"


def data_chains(defs: dg.Definitions) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per pipeline, the chain of (asset, the data asset it was made from) from the checkpoint back to the raw
    data, read from the asset graph: at every step the one parent that is not the base model."""
    graph = defs.resolve_asset_graph()
    chains: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in graph.get_all_asset_keys():
        if key.path[-1] != CHECKPOINT:
            continue
        pipeline, chain, current = key.path[0], [], key
        while True:
            parents = [p for p in graph.get(current).parent_keys if p.path[-1] != BASE_MODEL]
            if not parents:
                break
            if len(parents) > 1:
                raise LineageError(f"{current.to_user_string()} has several data inputs "
                                   f"({', '.join(p.to_user_string() for p in parents)}): its lineage is not a chain")
            chain.append((current.path[-1], parents[0].path[-1]))
            current = parents[0]
        chains[pipeline] = tuple(chain)
    return chains


class LineageError(Exception):
    """The records needed to answer a lineage question are missing."""


def _materialization(instance: dg.DagsterInstance, key: dg.AssetKey, storage_id: int | None = None,
                     run_id: str | None = None) -> Any:
    """One recorded materialization of `key`: by event storage id, or the one made in `run_id`."""
    if storage_id is not None:
        found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, storage_ids=[storage_id]),
                                                limit=1).records
    else:
        found = [r for r in instance.fetch_materializations(key, limit=1000).records if r.run_id == run_id][:1]
    if not found:
        where = f"event {storage_id}" if storage_id is not None else f"Dagster run {run_id}"
        raise LineageError(f"no recorded materialization of {key.to_user_string()} for {where} in the Dagster "
                           f"instance at {instance.root_directory}")
    return found[0]


def _meta(record: Any) -> dict[str, Any]:
    return {k: v.value for k, v in (record.event_log_entry.asset_materialization.metadata or {}).items()}


def _step(record: Any, name: str) -> dict[str, Any]:
    meta = _meta(record)
    tags = dict(record.event_log_entry.asset_materialization.tags or {})
    return {"asset": name, "dagster_run_id": record.run_id, "event_storage_id": record.storage_id,
            "data_version": tags.get("dagster/data_version"), "code_version": tags.get("dagster/code_version"),
            "sha256": meta.get("sha256"), "rows": meta.get("dagster/row_count"),
            "mlflow_run_id": meta.get("mlflow_run_id")}


def _read_by(instance: dg.DagsterInstance, pipeline: str, record: Any, asset: str, upstream: str) -> Any:
    """The materialization of `upstream` that the `asset` materialization `record` read (Dagster's input event
    pointer)."""
    tags = dict(record.event_log_entry.asset_materialization.tags or {})
    pointer = tags.get(f"dagster/input_event_pointer/{pipeline}/{upstream}")
    if pointer is None:
        raise LineageError(f"the {asset} materialization of Dagster run {record.run_id} does not record which "
                           f"{upstream} it read")
    return _materialization(instance, dg.AssetKey([pipeline, upstream]), storage_id=int(pointer))


def _base_model(instance: dg.DagsterInstance, pipeline: str, checkpoint: Any, registered_sha: str | None
                ) -> dict[str, Any]:
    """The base model a checkpoint was fine-tuned from: the base_model materialization its training read (name,
    where it came from, revision or package version, weights sha256, licence), checked against the digest the
    registry version carries."""
    record = _read_by(instance, pipeline, checkpoint, CHECKPOINT, BASE_MODEL)
    meta = _meta(record)
    base = {"name": meta.get("model"), "source": meta.get("source"), "revision": meta.get("revision") or None,
            "weights_sha256": meta.get("weights_sha256"), "license": meta.get("license") or None,
            "weight_format": meta.get("weight_format"), "gguf_file": meta.get("gguf_file"),
            "parameter_count": meta.get("parameter_count"), "dagster_run_id": record.run_id,
            "event_storage_id": record.storage_id, "started_from": meta.get("started_from")}
    if registered_sha and base["weights_sha256"] != registered_sha:
        raise LineageError(f"the registry says the model was fine-tuned from weights {registered_sha}, but the "
                           f"{BASE_MODEL} its training read recorded {base['weights_sha256']}")
    return base


def version_lineage(instance: dg.DagsterInstance, pipeline: str, version: dict[str, Any],
                    chain: tuple[tuple[str, str], ...],
                    started_lineage: Callable[[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Registry version -> MLflow run -> Dagster run -> checkpoint -> (rendered ->) splits -> cleaned -> raw files;
    for a model that started from another pipeline's champion, `started_lineage(pipeline, version)` answers the same for
    that version (under `started_from`)."""
    run_id = version["tags"].get("dagster.run_id")
    if not run_id:
        raise LineageError(f"{pipeline} v{version['version']} has no dagster.run_id tag in the model registry")
    record = _materialization(instance, dg.AssetKey([pipeline, CHECKPOINT]), run_id=run_id)
    steps = [_step(record, CHECKPOINT)]
    base = _base_model(instance, pipeline, record, version["tags"].get("tuneline.base_model_sha256"))
    for asset, upstream in chain:
        record = _read_by(instance, pipeline, record, asset, upstream)
        steps.append(_step(record, upstream))
    raw = _meta(record)
    files = raw.get("source_files") or []
    started = base.get("started_from")
    if started and started_lineage is not None:
        started = started_lineage(str(started["pipeline"]), str(started["version"]))
    return {"started_from": started or None, "pipeline": pipeline, "version": version["version"],
            "aliases": version["aliases"],
            "mlflow_run_id": version["mlflow_run_id"], "mlflow_run_url": version["mlflow_run_url"],
            "dagster_run_id": run_id, "checkpoint_sha256": version["tags"].get("tuneline.checkpoint_sha256"),
            "data_sha256": version["tags"].get("tuneline.data_sha256"), "base_model": base, "chain": steps,
            "source": raw.get("source"), "raw_files": files}


def format_lineage(item: dict[str, Any]) -> str:
    """The chain as indented lines, from the registry version down to the raw bytes."""
    aliases = f" @{', @'.join(item['aliases'])}" if item["aliases"] else ""
    lines = [f"{item['pipeline']} v{item['version']}{aliases}",
             f"  MLflow run {item['mlflow_run_id']}  {item['mlflow_run_url']}",
             f"  Dagster run {item['dagster_run_id']}"]
    base = item.get("base_model")
    if base:  # the other half of the question: which model it was fine-tuned from
        where = model_origin(base["source"], base["revision"], None, base.get("gguf_file"))
        lines.append(f"  fine-tuned from base model {base['name']} ({where}): weights sha256 "
                     f"{base['weights_sha256']}, licence {base['license'] or 'unknown'} (Dagster run "
                     f"{base['dagster_run_id'][:8]})")
    started = item.get("started_from")
    if started and "chain" in started:  # the model it started from, down to that model's raw bytes
        lines.append("  started from the champion it was trained from:")
        lines += ["    " + line for line in format_lineage(started).splitlines()]
    elif started:
        lines.append(f"  started from {started.get('pipeline')} v{started.get('version')} (checkpoint "
                     f"{started.get('checkpoint_sha256')}; its lineage was not asked for)")
    for depth, step in enumerate(item["chain"], start=2):
        detail = f"sha256 {step['sha256']}" if step["sha256"] else f"data version {step['data_version']}"
        rows = f", {step['rows']} rows" if step["rows"] is not None else ""
        lines.append("  " * depth + f"{step['asset']}: {detail}{rows} (Dagster run {step['dagster_run_id'][:8]})")
    indent = "  " * (len(item["chain"]) + 2)
    lines.append(indent + f"raw files ({item['source']}):")
    for f in item["raw_files"]:
        lines.append(indent + f"  {f['file']}  sha256 {f['sha256']}  {f['size']} bytes")
    return "\n".join(lines)


def raw_files(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The raw files a version's lineage reaches: its own, and those of the models it started from."""
    started = item.get("started_from")
    return list(item["raw_files"]) + (raw_files(started) if started and "raw_files" in started else [])


def scorings(instance: dg.DagsterInstance, pipeline: str) -> list[dict[str, Any]]:
    """Every recorded scored_data materialization of the pipeline, newest first: the model version that scored, the
    Dagster run, and each file it scored (path, sha256, rows, output)."""
    records = instance.fetch_materializations(dg.AssetKey([pipeline, SCORED]), limit=1000).records
    found = []
    for record in records:
        meta = _meta(record)
        found.append({"pipeline": pipeline, "model_version": meta.get("model_version"), "dagster_run_id": record.run_id,
                      "event_storage_id": record.storage_id, "files": list(meta.get("scored_files") or [])})
    return found


def format_scorings(items: list[dict[str, Any]]) -> list[str]:
    """One line per scored file: which version scored it, in which run, and where the scored rows are."""
    return [f"  {f['file']} (sha256 {f['sha256'][:16]}..., {f['rows']} rows, {f['scored']} scored) -> {f['output']}  "
            f"(Dagster run {item['dagster_run_id'][:8]})" for item in items for f in item["files"]]
