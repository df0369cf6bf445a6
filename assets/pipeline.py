"""The asset graph of one pipeline spec. Each asset calls one function in pipelines.core and adds metadata."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of asset functions.


import dataclasses
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.cleaning import DROP_REASONS, clean, select_examples
from pipelines.core.evaluation import evaluate_checkpoint, report_markdown
from pipelines.core.lineage import frame_digest, value_digest
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport
from pipelines.core.selection import select_base_model
from pipelines.core.sources import read_source
from pipelines.core.spec import PipelineSpec
from pipelines.core.splitting import SPLITS, assign_splits
from pipelines.core.training import record_from_folder, train_classifier
from resources.compute import ComputeResource
from resources.storage import StorageResource
from resources.tracking import AssetRun, TrackingResource


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _class_md(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return _md_table(["class", "rows", "share"], [[k, v, f"{v / total:.1%}"] for k, v in counts.items()])


def selection_md(rows: tuple[dict[str, Any], ...]) -> str:
    """Every candidate with its figures, verdict and reason, as the base_model asset shows it."""
    def fmt(value: Any, spec: str = "") -> str:
        return "—" if value is None else format(value, spec) if spec else str(value)

    return _md_table(
        ["candidate", "verdict", "probe", "licence", "architecture", "parameters", "weights", "LoRA targets",
         "est. memory MB", "est. train min", "reason"],
        [[r["name"], f"**{r['verdict']}**", fmt(r.get("probe_value")) + (f" ({r['probe_metric']})" if r.get("probe_metric") else ""),
          fmt(r.get("license")), fmt(r.get("architecture")), fmt(r.get("parameter_count"), ","),
          fmt(r.get("weight_format")), ", ".join(r.get("lora_targets") or []) or "—",
          fmt(r.get("estimated_memory_mb"), ",.0f"), fmt(r.get("estimated_train_minutes"), ".1f"),
          str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")] for r in rows])


def _tracked(run: AssetRun, data_version: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Tag the MLflow run with the data version and point the materialization at the run."""
    run.set_tags({"dagster.data_version": data_version})
    return {**metadata, "mlflow_run_id": run.run_id, "mlflow_run": dg.MetadataValue.url(run.url)}


def build_pipeline_assets(spec: PipelineSpec, project_root: Path) -> list[dg.AssetsDefinition]:
    """The assets of `spec`, keyed `<spec name>/<asset>` and grouped under the spec's name: six for text
    classification; for instruction tuning also `rendered_dataset` (the chat template applied) before training."""
    prefix = [spec.name]

    def key(name: str) -> dg.AssetKey:
        return dg.AssetKey([spec.name, name])

    common: dict[str, Any] = {"key_prefix": prefix, "group_name": spec.name}
    instruction = spec.task.type == "instruction_tuning"
    group_column = "category" if instruction else "label"  # what splits are stratified by

    @dg.asset(**common, code_version=spec.section_hash("source"), kinds={"pandas"})
    def raw_data(context: dg.AssetExecutionContext, tracking: TrackingResource) -> dg.Output[pd.DataFrame]:
        """Rows read from the spec's data source, with the file and row each came from."""
        with tracking.asset_run(context, spec.name) as run:
            frame, record = read_source(spec.source, project_root)
            run.log_dataset(frame, f"{spec.name}/raw_data", record.sha256, "raw", record.location)
            run.log_metrics({"rows": len(frame)}, 0)
            run.log_params({"source": record.location, "source_sha256": record.sha256})
        columns = [c for c in frame.columns if c not in ("source_file", "source_row")]
        metadata: dict[str, Any] = {
            "dagster/row_count": len(frame),
            "columns": dg.MetadataValue.json(columns),
            "source": record.location,
            "source_kind": record.kind,
            "sha256": record.sha256,
            "files": dg.MetadataValue.md(_md_table(["file", "sha256", "bytes"], [
                [f, s, n] for (f, s), n in zip(record.files, record.sizes or [""] * len(record.files), strict=True)])),
            # What lineage queries read back: every raw file by content digest and size, as recorded now.
            "source_files": dg.MetadataValue.json([
                {"file": f, "sha256": s, "size": n}
                for (f, s), n in zip(record.files, record.sizes or [None] * len(record.files), strict=True)]),
            "preview": dg.MetadataValue.md(_md_table(
                columns, [[str(v)[:80].replace("|", "\\|") for v in row] for row in frame[columns].head(5).itertuples(index=False)])),
        }
        if "source_split" in frame.columns:
            metadata["source_splits"] = dg.MetadataValue.json(
                {k: int(v) for k, v in frame["source_split"].value_counts().items()})
        # The data version is the content digest: re-reading an unchanged source is recognisably the same data.
        version = record.sha256[:32]
        return dg.Output(frame, metadata=_tracked(run, version, metadata), data_version=dg.DataVersion(version))

    @dg.asset(**common, ins={"raw_data": dg.AssetIn(key("raw_data"))},
              code_version=spec.section_hash("task", "cleaning"), kinds={"pandas"})
    def cleaned_dataset(context: dg.AssetExecutionContext, tracking: TrackingResource,
                        raw_data: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Normalised (text, label) rows without empty, over-long, conflicting or duplicate rows."""
        with tracking.asset_run(context, spec.name) as run:
            result = clean(select_examples(raw_data, spec.task), spec.cleaning)
            digest = frame_digest(result.frame)
            run.log_dataset(result.frame, f"{spec.name}/cleaned_dataset", digest, "cleaned", "cleaning")
            run.log_metrics({"rows_in": result.rows_in, "rows_kept": result.rows_kept,
                             **{f"dropped_{why}": n for why, n in result.dropped.items()}}, 0)
            run.log_params({f"cleaning.{k}": v for k, v in spec.cleaning.model_dump().items()})
        dropped_rows = [[why, result.dropped[why]] for why in DROP_REASONS]
        examples = "\n\n".join(
            f"**{why}** (first {len(rows)}):\n\n" + _md_table(
                ["text", "label", "file", "row"],
                [[str(r["text"])[:80].replace("|", "\\|"), r["label"], r["source_file"], r["source_row"]]
                 for r in rows])
            for why, rows in result.dropped_examples.items())
        context.log.info(f"kept {result.rows_kept} of {result.rows_in} rows; dropped "
                         + ", ".join(f"{n} {why}" for why, n in result.dropped.items() if n))
        return dg.Output(result.frame, data_version=dg.DataVersion(digest[:32]), metadata=_tracked(run, digest[:32], {
            "dagster/row_count": result.rows_kept,
            "rows_in": result.rows_in,
            "rows_kept": result.rows_kept,
            "rows_dropped": result.rows_in - result.rows_kept,
            **{f"dropped_{why}": n for why, n in result.dropped.items()},
            "dropped_by_reason": dg.MetadataValue.md(_md_table(["reason", "rows"], dropped_rows)),
            "dropped_examples": dg.MetadataValue.md(examples or "nothing dropped"),
            "num_classes": len(result.class_counts()),
            "class_distribution": dg.MetadataValue.md(_class_md(result.class_counts())),
            "sha256": digest,
        }))

    @dg.asset(**common, ins={"cleaned_dataset": dg.AssetIn(key("cleaned_dataset"))},
              code_version=spec.section_hash("splits"), kinds={"pandas"})
    def splits(context: dg.AssetExecutionContext, tracking: TrackingResource,
               cleaned_dataset: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Every clean row assigned to train, validation or test by a hash of its normalised text."""
        with tracking.asset_run(context, spec.name) as run:
            result = assign_splits(cleaned_dataset, spec.splits, group_column=group_column)
            digest = frame_digest(result.frame)
            for name in SPLITS:
                part = result.frame[result.frame["split"] == name]
                run.log_dataset(part, f"{spec.name}/{name}", frame_digest(part), name, "splits")
            run.log_metrics({f"{name}_rows": n for name, n in result.counts().items()}, 0)
            run.log_params({f"splits.{k}": v for k, v in spec.splits.model_dump().items()})
        counts = result.counts()
        table = result.class_table()
        md = _md_table([group_column, *SPLITS], [[label, *(int(table.loc[label, s]) for s in SPLITS)]
                                                 for label in table.index])
        total = max(sum(counts.values()), 1)
        return dg.Output(result.frame, data_version=dg.DataVersion(digest[:32]), metadata=_tracked(run, digest[:32], {
            "dagster/row_count": len(result.frame),
            **{f"{s}_rows": n for s, n in counts.items()},
            "proportions": dg.MetadataValue.json({s: round(n / total, 4) for s, n in counts.items()}),
            "origin": "the source's own splits" if result.origin == "source" else f"hash (seed {spec.splits.seed})",
            "moved_for_stratification": result.moved_for_stratification,
            "texts_in_several_splits": result.overlapping_texts,
            f"rows_per_{group_column}_and_split": dg.MetadataValue.md(md),
            "sha256": digest,
        }))

    @dg.asset(**common, ins={"splits": dg.AssetIn(key("splits"))},
              code_version=spec.section_hash("base_model", "task", "training"), kinds={"huggingface"})
    def base_model(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                   tracking: TrackingResource, splits: pd.DataFrame) -> dg.Output[BaseModelRecord]:
        """The pre-trained model chosen among the spec's candidates (licence, size, memory, time, task and
        LoRA checks, then a probe on the validation split), pinned: path, weights sha256, licence, pooling."""
        settings = compute.settings(spec.training.precision)
        with tracking.asset_run(context, spec.name) as run:
            record = select_base_model(spec, splits, project_root, storage.root / "models", settings,
                                       progress=context.log.info)
            run.log_params({f"base_model.{k}": v for k, v in record.to_dict().items() if k != "selection"})
            run.log_text(json.dumps(list(record.selection), indent=2), "selection.json")
            for row in record.selection:
                if row.get("probe_score") is not None:
                    run.log_metrics({f"probe_{row['name'].replace('/', '_')}": row["probe_score"]}, 0)
        version = record.weights_sha256[:32]
        context.log.info(f"selected {record.name}: " + next(r["reason"] for r in record.selection
                                                            if r["verdict"] == "selected"))
        return dg.Output(record, data_version=dg.DataVersion(version), metadata=_tracked(run, version, {
            "model": record.name,
            "selection": dg.MetadataValue.md(selection_md(record.selection)),
            "candidates": len(record.selection),
            "source": record.source,
            "local_path": dg.MetadataValue.path(record.local_path),
            "revision": record.revision or "",
            "weights_sha256": record.weights_sha256,
            "weight_format": record.weight_format,
            "license": record.license or "",
            "parameter_count": record.parameter_count,
            "architecture": record.architecture,
            "lora_targets": dg.MetadataValue.json(list(record.lora_targets)),
            "pooling": f"{record.pooling} (from {record.pooling_declared_by})",
            **({"gguf_file": dg.MetadataValue.path(record.gguf_file)} if record.gguf_file else {}),
        }))

    if instruction:
        from assets.instruct import build_instruction_assets

        return [raw_data, splits, base_model, *build_instruction_assets(spec, project_root, common)]

    @dg.asset(**common, ins={"splits": dg.AssetIn(key("splits")), "base_model": dg.AssetIn(key("base_model"))},
              code_version=spec.section_hash("training"), kinds={"pytorch"})
    def finetuned_checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
                             compute: ComputeResource, tracking: TrackingResource, splits: pd.DataFrame,
                             base_model: BaseModelRecord) -> dg.Output[CheckpointRecord]:
        """LoRA adapter and classifier head trained on the train split, best epoch chosen on validation."""
        settings = compute.settings(spec.training.precision)
        out_dir = storage.run_folder("checkpoints", spec.name, context.run_id)
        with tracking.asset_run(context, spec.name) as run:
            run.log_params({**{f"training.{k}": v for k, v in spec.training.model_dump().items() if k != "lora"},
                            **{f"lora.{k}": v for k, v in spec.training.lora.model_dump().items()},
                            "precision": settings.precision, "device": settings.device,
                            "base_model": base_model.name, "base_model_sha256": base_model.weights_sha256,
                            "spec_hash": spec.spec_hash})
            run.log_text(spec.to_yaml(), "spec.yaml")
            record = train_classifier(splits, base_model, spec, out_dir, settings, progress=context.log.info,
                                      sink=run)
            run.log_metrics({"train_seconds": record.train_seconds, "tokens_per_second": record.tokens_per_second,
                             "peak_memory_mb": record.peak_memory_mb,
                             "trainable_parameters": record.trainable_parameters}, 0)
            run.log_artifact(record.path, "checkpoint")
            version = tracking.register(run, spec.name, "checkpoint", {
                "tuneline.data_sha256": record.data_sha256, "tuneline.spec_hash": record.spec_hash,
                "tuneline.checkpoint_sha256": record.sha256, "dagster.run_id": context.run_id,
                "tuneline.base_model_sha256": base_model.weights_sha256})
            record = dataclasses.replace(record, model_version=version)
            context.log.info(f"registered {spec.name} version {version} in the MLflow model registry")
        epochs = [h for h in record.history if "eval_accuracy" in h]
        history_md = _md_table(["epoch", "validation accuracy", "validation macro-F1", "validation loss"],
                               [[f"{h['epoch']:g}", f"{h['eval_accuracy']:.4f}", f"{h['eval_macro_f1']:.4f}",
                                 f"{h['eval_loss']:.4f}"] for h in epochs]) if epochs else "no validation split"
        return dg.Output(record, data_version=dg.DataVersion(record.sha256[:32]), metadata=_tracked(run, record.sha256[:32], {
            "path": dg.MetadataValue.path(record.path),
            "sha256": record.sha256,
            "base_model": record.base_model.name,
            "base_model_sha256": record.base_model.weights_sha256,
            "spec_hash": record.spec_hash,
            "data_sha256": record.data_sha256,
            "labels": dg.MetadataValue.json(list(record.labels)),
            "train_rows": record.train_rows,
            "validation_rows": record.validation_rows,
            "best_epoch": record.best_epoch if record.best_epoch is not None else -1,
            "trainable_parameters": record.trainable_parameters,
            "train_seconds": round(record.train_seconds, 1),
            "tokens_per_second": round(record.tokens_per_second, 1),
            "precision": record.precision,
            "validation_by_epoch": dg.MetadataValue.md(history_md),
            "peak_memory_mb": round(record.peak_memory_mb, 1),
            "model_version": f"{spec.name} v{record.model_version}",
        }))

    @dg.asset(**common, ins={"splits": dg.AssetIn(key("splits")),
                             "finetuned_checkpoint": dg.AssetIn(key("finetuned_checkpoint"))},
              code_version=spec.section_hash("evaluation"), kinds={"sklearn"})
    def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                          tracking: TrackingResource, splits: pd.DataFrame,
                          finetuned_checkpoint: CheckpointRecord) -> dg.Output[EvaluationReport]:
        """Test metrics of the checkpoint against two baselines and the champion; promotes it if it wins."""
        settings = compute.settings(spec.training.precision)
        out_dir = storage.run_folder("reports", spec.name, context.run_id)
        with tracking.asset_run(context, spec.name) as run:
            found = tracking.champion(spec.name)
            champion = record_from_folder(found[1], model_version=found[0]) if found else None
            report = evaluate_checkpoint(splits, finetuned_checkpoint, spec, out_dir, settings, champion=champion)
            run.log_metrics({**report.metrics, **{f"{b}_{k}": v for b, m in report.baselines.items()
                                                  for k, v in m.items()},
                             **({f"champion_{k}": v for k, v in report.champion_metrics.items()}
                                if report.champion_metrics else {})}, 0)
            run.log_text(json.dumps(list(report.per_class), indent=2), "per_class.json")
            for path in (report.json_path, report.html_path, report.confusion_matrix_png):
                run.log_artifact(path, "report")
            run.set_tags({"tuneline.promotion": report.promotion["reason"],
                          "tuneline.model_version": finetuned_checkpoint.model_version or ""})
            if report.promotion["promote"] and finetuned_checkpoint.model_version:
                tracking.promote(spec.name, finetuned_checkpoint.model_version, report.promotion["reason"])
            context.log.info(f"test accuracy {report.metrics['accuracy']:.4f}, macro-F1 "
                             f"{report.metrics['macro_f1']:.4f}; {report.promotion['reason']}")
        version = value_digest(report.to_dict())[:32]
        return dg.Output(report, data_version=dg.DataVersion(version), metadata=_tracked(run, version, {
            **{name: dg.MetadataValue.float(value) for name, value in report.metrics.items()},
            **{f"{b}_{k}": dg.MetadataValue.float(m[k]) for b, m in report.baselines.items()
               for k in ("accuracy", "macro_f1")},
            **{f"beats_{b}": won for b, won in report.beats_baselines.items()},
            "test_rows": report.test_rows,
            "report": dg.MetadataValue.md(report_markdown(report)),
            "report_html": dg.MetadataValue.path(report.html_path),
            "report_json": dg.MetadataValue.path(report.json_path),
            "confusion_matrix": dg.MetadataValue.path(report.confusion_matrix_png),
            "promoted": bool(report.promotion["promote"]),
            "promotion": report.promotion["reason"],
        }))

    return [raw_data, cleaned_dataset, splits, base_model, finetuned_checkpoint, evaluation_report]
