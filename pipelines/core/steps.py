"""The pipeline's steps that do not depend on the task, and the records of what each step logs.

Each function returns the step's value (or takes it) plus a StepLog: what the experiment tracker and the
asset's metadata should show. Assets call one of these, or a method of the pipeline's Task, and nothing else.
"""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import pandas as pd

from pipelines.core.autotune import ComputeChoice
from pipelines.core.doctor import DoctorReport
from pipelines.core.digests import frame_digest, value_digest
from pipelines.core.errors import ModelSourceError
from pipelines.core.evaluation import report_markdown
from pipelines.core.markdown import markdown_table
from pipelines.core.plots import png_markdown
from pipelines.core.sections import ModelLocation
from pipelines.core.records import (BaseModelRecord, CheckpointRecord, DatasetLog, EvaluationReport, FilePath,
                                    Markdown, ReportTable, StepLog, model_origin)
from pipelines.core.selection import ModelAcquirer, pin_candidate
from pipelines.core.sources import read_sources
from pipelines.core.spec import PipelineSpec
from pipelines.core.splitting import SPLITS, assign_splits
from pipelines.core.sweep.record import SweepRecord
from pipelines.core.tasks import task_for
from pipelines.core.training.checkpoints import LOSS_CURVE
from pipelines.core.training.compute import ComputeSettings, ProgressFn

PROVENANCE = ("source_file", "source_row")
SHARED_SPLIT = "shared"  # the split of rows every split reads (split_dataset)


def read_raw_data(spec: PipelineSpec, project_root: Path) -> tuple[pd.DataFrame, StepLog]:
    """Rows read from the spec's source, with the file and row each came from; the data version is the digest
    of the source's bytes, so re-reading an unchanged source is recognisably the same data. Files the task reads
    beside the source (an embedding corpus) are read with it, their rows tagged by `source_role`."""
    frame, record = read_sources(spec.source, task_for(spec).side_sources(spec), project_root)
    columns = [c for c in frame.columns if c not in PROVENANCE]
    sizes = record.sizes or (None,) * len(record.files)
    metadata = {
        "dagster/row_count": len(frame),
        "columns": columns,
        "source": record.location,
        "source_kind": record.kind,
        "sha256": record.sha256,
        "files": Markdown(markdown_table(["file", "sha256", "bytes"],
                                         [[f, s, "" if n is None else n]
                                          for (f, s), n in zip(record.files, sizes, strict=True)])),
        # What lineage queries read back: every raw file by content digest and size, as recorded now.
        "source_files": [{"file": f, "sha256": s, "size": n} for (f, s), n in zip(record.files, sizes, strict=True)],
        "preview": Markdown(markdown_table(columns, [[str(v)[:80] for v in row]
                                                     for row in frame[columns].head(5).itertuples(index=False)])),
    }
    if "source_split" in frame.columns:
        metadata["source_splits"] = {str(k): int(v) for k, v in frame["source_split"].value_counts().items()}
    return frame, StepLog(
        data_version=record.sha256[:32], message=f"read {len(frame)} rows from {record.location}", metadata=metadata,
        params={"source": record.location, "source_sha256": record.sha256}, metrics={"rows": len(frame)},
        datasets=(DatasetLog(frame, f"{spec.name}/raw_data", record.sha256, "raw", record.location),))


def split_dataset(cleaned: pd.DataFrame, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
    """Every clean row assigned to train, validation or test by a hash of its normalised text (or the source's
    own splits), stratified by the task's group column. Rows a task marks `shared` (an embedding corpus's documents
    no query names) are not examples: every split reads them, so they keep the split 'shared' outside the counts."""
    group = task_for(spec).split_group_column
    shared = cleaned["shared"].to_numpy(dtype=bool) if "shared" in cleaned.columns else None
    result = assign_splits(cleaned[~shared] if shared is not None else cleaned, spec.splits, group_column=group)
    counts = result.counts()
    table = result.class_table()
    total = max(sum(counts.values()), 1)
    parts = [(name, result.frame[result.frame["split"] == name]) for name in SPLITS]
    frame = result.frame
    if shared is not None:
        frame = pd.concat([frame, cleaned[shared].drop(columns=["source_split"], errors="ignore")
                           .assign(split=SHARED_SPLIT, split_origin="shared")], ignore_index=True)
    digest = frame_digest(frame)
    return frame, StepLog(
        data_version=digest[:32],
        message=", ".join(f"{n} {s}" for s, n in counts.items()) + f" rows ({result.origin} split)"
                + (f"; dropped {result.dropped_for_overlap} rows whose text is in a later split (splits.overlap)"
                   if result.dropped_for_overlap else ""),
        metadata={
            "dagster/row_count": len(frame),
            **{f"{s}_rows": n for s, n in counts.items()},
            **({"shared_rows": int(shared.sum())} if shared is not None else {}),
            "proportions": {s: round(n / total, 4) for s, n in counts.items()},
            "origin": "the source's own splits" if result.origin == "source" else f"hash (seed {spec.splits.seed})",
            "moved_for_stratification": result.moved_for_stratification,
            "texts_in_several_splits": result.overlapping_texts,
            "dropped_for_overlap": result.dropped_for_overlap,
            f"rows_per_{group}_and_split": Markdown(markdown_table(
                [group, *SPLITS], [[label, *(int(table.loc[label, s]) for s in SPLITS)] for label in table.index])),
            "sha256": digest,
        },
        params={f"splits.{k}": v for k, v in spec.splits.model_dump().items()},
        metrics={**{f"{name}_rows": n for name, n in counts.items()},
                 "dropped_for_overlap": result.dropped_for_overlap},
        datasets=tuple(DatasetLog(part, f"{spec.name}/{name}", frame_digest(part), name, "splits")
                       for name, part in parts))


def selection_markdown(rows: tuple[dict[str, object], ...]) -> str:
    """Every candidate with its figures, verdict and reason, as the base_model asset shows it."""
    def fmt(value: object, spec: str = "") -> str:
        return "—" if value is None else format(value, spec) if spec else str(value)

    return markdown_table(
        ["candidate", "verdict", "probe", "licence", "architecture", "parameters", "weights", "LoRA targets",
         "est. memory MB", "est. train min", "reason"],
        [[r["name"], f"**{r['verdict']}**",
          fmt(r.get("probe_value")) + (f" ({r['probe_metric']})" if r.get("probe_metric") else ""),
          fmt(r.get("license")), fmt(r.get("architecture")), fmt(r.get("parameter_count"), ","),
          fmt(r.get("weight_format")), ", ".join(r.get("lora_targets") or []) or "—",  # type: ignore[arg-type]
          fmt(r.get("estimated_memory_mb"), ",.0f"), fmt(r.get("estimated_train_minutes"), ".1f"),
          str(r.get("reason", ""))] for r in rows], limit=2000)


def base_model_log(record: BaseModelRecord) -> StepLog:
    """What the base_model asset records: the winner pinned, and every candidate's verdict."""
    selected = next((r["reason"] for r in record.selection if r["verdict"] == "selected"), "")
    return StepLog(
        data_version=record.weights_sha256[:32], message=f"selected {record.name}: {selected}",
        metadata={
            "model": record.name,
            "selection": Markdown(selection_markdown(record.selection)),
            "candidates": len(record.selection),
            "source": record.source,
            "local_path": FilePath(record.local_path),
            "revision": record.revision or "",
            "weights_sha256": record.weights_sha256,
            "weight_format": record.weight_format,
            "license": record.license or "",
            "parameter_count": record.parameter_count,
            "architecture": record.architecture,
            "lora_targets": list(record.lora_targets),
            "pooling": f"{record.pooling} (from {record.pooling_declared_by})",
            **({"gguf_file": FilePath(record.gguf_file)} if record.gguf_file else {}),
            **({"started_from": dict(record.started_from)} if record.started_from else {}),
        },
        params={f"base_model.{k}": v for k, v in record.to_dict().items() if k not in ("selection", "started_from")},
        metrics={f"probe_{row['name'].replace('/', '_')}": row["probe_score"] for row in record.selection
                 if row.get("probe_score") is not None},
        texts=((json.dumps(list(record.selection), indent=2), "selection.json"),))


def training_params(spec: PipelineSpec, base: BaseModelRecord, compute: ComputeSettings,
                    choice: ComputeChoice | None = None) -> StepLog:
    """What is known before training starts: the hyperparameters, the base model, the resolved spec and how the
    precision and thread count were chosen."""
    chosen = {} if choice is None else {"threads": compute.num_threads or "all", "compute_chosen_by": choice.chosen_by}
    return StepLog(
        data_version="", message=f"training {base.name} ({spec.task.type})",
        params={**{f"training.{k}": v for k, v in spec.training.model_dump().items() if k != "lora"},
                **{f"lora.{k}": v for k, v in spec.training.lora.model_dump().items()},
                "precision": compute.precision, "device": compute.device, "trainer": task_for(spec).trainer_name,
                "launcher": spec.compute.launcher, "processes": spec.compute.processes,
                "base_model": base.name, "base_model_sha256": base.weights_sha256, "spec_hash": spec.spec_hash,
                **chosen},
        texts=((spec.to_yaml(), "spec.yaml"),))


def checkpoint_log(spec: PipelineSpec, record: CheckpointRecord, choice: ComputeChoice | None = None) -> StepLog:
    """What the finetuned_checkpoint asset records: the weights' digest, what made them, and how training went
    (with `choice`: the precision and thread count and the timed steps that chose them)."""
    task = task_for(spec)
    curve = Path(record.path) / LOSS_CURVE
    return StepLog(
        data_version=record.sha256[:32],
        message=f"registered {spec.name} version {record.model_version} in the model registry",
        metadata={
            "path": FilePath(record.path),
            "sha256": record.sha256,
            "trainer": task.trainer_name,
            "base_model": record.base_model.name,
            "base_model_sha256": record.base_model.weights_sha256,
            "spec_hash": record.spec_hash,
            "data_sha256": record.data_sha256,
            **record.task_data,  # what the task keeps beside the weights (a classifier's labels)
            "train_rows": record.train_rows,
            "validation_rows": record.validation_rows,
            "best_epoch": record.best_epoch if record.best_epoch is not None else -1,
            "trainable_parameters": record.trainable_parameters,
            "train_seconds": round(record.train_seconds, 1),
            "tokens_per_second": round(record.tokens_per_second, 1),
            "mfu": round(record.mfu, 4),  # model FLOPs/s over the machine's measured matmul peak
            "precision": record.precision,
            **({} if choice is None else {
                "threads": choice.settings.num_threads or "all",
                "compute_chosen_by": choice.chosen_by,
                "compute_timed_steps": Markdown(choice.table() + (f"\n\n{choice.note}" if choice.note else ""))}),
            "validation_by_epoch": Markdown(task.history_table(record)),
            **({"loss_curve": Markdown(_png_markdown(curve, "training and validation loss"))} if curve.is_file()
               else {}),
            "peak_memory_mb": round(record.peak_memory_mb, 1),
            "model_version": f"{spec.name} v{record.model_version}",
        },
        metrics={"train_seconds": record.train_seconds, "tokens_per_second": record.tokens_per_second,
                 "mfu": record.mfu,
                 "peak_memory_mb": record.peak_memory_mb, "trainable_parameters": record.trainable_parameters})


def registry_tags(record: CheckpointRecord, dagster_run_id: str) -> dict[str, str]:
    """The tags a registered model version carries: what it was trained on and by which run."""
    return {"tuneline.data_sha256": record.data_sha256, "tuneline.spec_hash": record.spec_hash,
            "tuneline.checkpoint_sha256": record.sha256, "dagster.run_id": dagster_run_id,
            "tuneline.base_model_sha256": record.base_model.weights_sha256, "tuneline.task": record.task}


def report_log(report: EvaluationReport, checkpoint: CheckpointRecord) -> StepLog:
    """What the evaluation_report asset records: every metric, the baselines, the champion and the decision."""
    baseline_metrics = {f"{b}_{k}": v for b, m in report.baselines.items() for k, v in m.items()}
    scalars = {k: v for k, v in report.details.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    versus = "; ".join(f"{k} {report.metrics[k]:.4f}" for k in report.metric_names if k in report.metrics)
    return StepLog(
        data_version=value_digest(report.to_dict())[:32],
        message=f"{versus}; {report.promotion.reason}",
        metadata={
            **{name: float(value) for name, value in report.metrics.items()},
            **{k: float(v) for k, v in baseline_metrics.items()},
            **{f"beats_{b}": won for b, won in report.beats_baselines.items()},
            "test_rows": report.test_rows,
            **scalars,
            "report": Markdown(report_markdown(report)),
            **report_images(report),
            **{name: FilePath(path) for name, path in report.files.items()},
            "promoted": report.promotion.promote,
            "promotion": report.promotion.reason,
        },
        metrics={**report.metrics, **baseline_metrics,
                 **{f"champion_{k}": v for k, v in (report.champion_metrics or {}).items()}},
        texts=((json.dumps({k: v for k, v in report.details.items() if k not in scalars}, indent=2, default=str,
                           ensure_ascii=False), "details.json"),),
        artifacts=tuple((path, "report") for path in report.files.values()),
        tags={"tuneline.promotion": report.promotion.reason, "tuneline.model_version": checkpoint.model_version or ""})



DOCTOR_SHOWN_DUPLICATES = 10  # cross-class near-duplicate pairs shown in the UI (the CSV holds all of them)


def doctor_folder(root: Path, splits: pd.DataFrame) -> Path:
    """Where the data doctor's files for this version of the splits are kept (by the splits' digest), so that the
    evaluation report of a model trained on them can show them."""
    return root / "doctor" / frame_digest(splits)[:16]


def examine_data(spec: PipelineSpec, splits: pd.DataFrame, models: ModelAcquirer, compute: ComputeSettings,
                 root: Path, progress: ProgressFn = print) -> tuple[DoctorReport, dict[str, Path]]:
    """The data doctor on the splits (its encoder pinned like a base model, its licence recorded, not checked:
    it is only read), its files written under doctor_folder(root, splits)."""
    cfg = task_for(spec).doctor_settings(spec)
    encoder = pin_read_only(cfg.resolved_model, spec, models, "task.doctor.model")
    report = task_for(spec).doctor(splits, encoder, spec, compute, progress)
    return report, report.write(doctor_folder(root, splits), cfg.shown_rows)


def doctor_metadata(report: DoctorReport, paths: dict[str, Path], shown: int) -> dict[str, object]:
    """The data doctor's findings as asset-check metadata (Dagster MetadataValue-free: plain values, Markdown
    and FilePath records that the caller converts)."""
    metadata: dict[str, object] = {
        "rows": report.rows, "label_suspects": len(report.suspects),
        "label_suspect_fraction": round(report.suspect_fraction, 4),
        "cross_class_near_duplicates": len(report.duplicates), "encoder": report.model,
        "seconds": round(report.seconds, 1),
        "top_label_suspects": Markdown(report.suspects_markdown(shown)),
        "near_duplicates": Markdown(report.duplicates_markdown(DOCTOR_SHOWN_DUPLICATES)),
        "learning_curve": Markdown(report.curve_markdown() + "\n\n" + report.more_data_helps()),
        "label_suspects_csv": FilePath(str(paths["suspects_csv"])),
        "near_duplicates_csv": FilePath(str(paths["duplicates_csv"])),
    }
    if "curve_png" in paths:
        metadata["learning_curve_plot"] = FilePath(str(paths["curve_png"]))
        metadata["learning_curve_image"] = Markdown(_png_markdown(paths["curve_png"], "learning curve"))
    return metadata


def report_images(report: EvaluationReport) -> dict[str, Markdown]:
    """The report's pictures (confusion matrix, loss curve, learning curve) as Markdown metadata with the image
    inline, keyed by their file names: the asset's page shows them."""
    out_dir = Path(report.html_path).parent
    return {f"{Path(name).stem}_image": Markdown(_png_markdown(out_dir / name, title))
            for title, name in report.images if (out_dir / name).is_file()}


def with_training_context(report: EvaluationReport, checkpoint: CheckpointRecord, mlflow_run_url: str,
                          dagster_run_id: str) -> EvaluationReport:
    """The report with what made the model it judges: the loss curve of its training (copied beside the report)
    and its lineage (data digest, base model with revision and weights digest, spec hash, registry version, the
    MLflow and Dagster runs). The caller writes it (write_report)."""
    import dataclasses
    import shutil

    out_dir = Path(report.html_path).parent
    images, files = list(report.images), dict(report.files)
    curve = Path(checkpoint.path) / LOSS_CURVE
    if curve.is_file():
        shutil.copyfile(curve, out_dir / LOSS_CURVE)
        images.insert(0, ("Training and validation loss", LOSS_CURVE))
        files["loss_curve"] = str(out_dir / LOSS_CURVE)
    base = checkpoint.base_model
    lineage = {
        "data (sha256 of the table trained on)": checkpoint.data_sha256,
        "base model": f"{base.name} ({model_origin(base.source, base.revision, base.local_path, base.gguf_file)})",
        "base model weights sha256": base.weights_sha256,
        "base model licence": base.license,
        "spec hash": checkpoint.spec_hash,
        "checkpoint sha256": checkpoint.sha256,
        "registered model version": f"{report.pipeline} v{checkpoint.model_version}" if checkpoint.model_version
        else "not registered",
        "MLflow run": mlflow_run_url,
        "Dagster run": dagster_run_id,
    }
    return dataclasses.replace(report, images=tuple(images), files=files, lineage=lineage)


def with_doctor(report: EvaluationReport, folder: Path, shown: int) -> EvaluationReport:
    """The report with the data doctor's findings on the same splits (from `folder`, when the doctor ran on
    them): its summary, the top label suspects and the learning curve. The caller writes it (write_report)."""
    import dataclasses
    import shutil

    found = folder / "doctor.json"
    if not found.is_file():
        return report
    doctor = json.loads(found.read_text(encoding="utf-8"))
    out_dir = Path(report.html_path).parent
    suspects = ReportTable(
        f"Data doctor: {doctor['summary']} (the {min(shown, doctor['suspect_count'])} most suspicious; all in "
        "label_suspects.csv)",
        ("#", "split", "text", "given label", "suggested label", "confidence", "source"),
        tuple((s["rank"], s["split"], s["text"], s["given_label"], s["suggested_label"], s["suggested_probability"],
               f"{s['source_file']}:{s['source_row']}") for s in doctor["top_suspects"][:shown]))
    curve = ReportTable(f"Learning curve: {doctor['more_data']}",
                        ("share of train", "train rows", f"validation {doctor['metric']}"),
                        tuple((f"{c['share']:.0%}", c["train_rows"], c[doctor["metric"]]) for c in doctor["curve"]))
    images = list(report.images)
    files = dict(report.files)
    for name in ("label_suspects.csv", "near_duplicates.csv", "learning_curve.png"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)
            files[f"doctor_{name.rsplit('.', 1)[0]}"] = str(out_dir / name)
    if (folder / "learning_curve.png").is_file():
        images.append(("Learning curve (data doctor)", "learning_curve.png"))
    return dataclasses.replace(
        report, tables=(*report.tables, suspects, curve), images=tuple(images), files=files,
        details={**report.details, "doctor": {k: doctor[k] for k in ("summary", "more_data", "suspect_count",
                                                                     "suspect_fraction", "duplicate_pairs",
                                                                     "curve", "model")}})


def pin_prompted_model(spec: PipelineSpec, models: ModelAcquirer) -> BaseModelRecord | None:
    """The model the prompting baseline prompts, pinned (its licence recorded, not checked: it is only read), when
    the spec lists the baseline and its task prompts a model of its own."""
    if "prompting" not in spec.evaluation.baselines or not task_for(spec).prompts_another_model:
        return None
    return pin_read_only(spec.evaluation.prompting.resolved_model, spec, models, "evaluation.prompting.model")


def pin_read_only(location: ModelLocation, spec: PipelineSpec, models: ModelAcquirer, field: str) -> BaseModelRecord:
    """A model that is only read, never fine-tuned or shipped (the data doctor's encoder, the prompted model),
    pinned like a base model with the spec's gates, its licence recorded but not checked; an error names `field`."""
    try:
        return pin_candidate(location, spec.base_model, models, check_license=False)
    except ModelSourceError as exc:
        raise ModelSourceError(f"{field}: {exc}") from None


def doctor_verdict(report: DoctorReport, cfg: Any) -> tuple[bool, str]:
    """Whether the data doctor's check passes, and what it says: the findings, the learning curve, and what to do
    about each problem found."""
    passed = report.suspect_fraction <= cfg.max_suspect_fraction and report.duplicates.empty
    text = f"{report.summary()}. {report.more_data_helps()[0].upper()}{report.more_data_helps()[1:]}."
    if report.suspect_fraction > cfg.max_suspect_fraction:
        text += (f" More than task.doctor.max_suspect_fraction ({cfg.max_suspect_fraction:.1%}) of the rows are "
                 "suspects: "
                 "look at label_suspects.csv (most suspicious first), fix the labels that are wrong at the source, "
                 "or raise the fraction if the classes genuinely overlap.")
    if not report.duplicates.empty:
        text += (" Texts that say the same thing under different labels confuse training: see near_duplicates.csv "
                 "and keep one label per meaning (or raise task.doctor.duplicate_similarity).")
    return passed, text


def sweep_log(record: SweepRecord) -> StepLog:
    """What the sweep asset records: the trial table, the best settings, the plot, importances."""
    counts = {state: sum(t["state"] == state for t in record.trials) for state in ("complete", "pruned", "fail")}
    return StepLog(
        data_version=value_digest({"best": record.best_params, "trials": record.trials})[:32],
        message=(f"best of {len(record.trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
                 f"{counts['fail']} failed): trial {record.best_trial}, validation {record.metric} "
                 f"{record.best_value:.4f} with {record.best_params}"),
        metadata={
            "best_value": round(record.best_value, 4), "best_trial": record.best_trial,
            "best_params": dict(record.best_params), "metric": f"validation {record.metric} ({record.direction})",
            "trials": Markdown(record.table_markdown()),
            "trials_complete": counts["complete"], "trials_pruned": counts["pruned"], "trials_failed": counts["fail"],
            "importances": dict(record.importances), "seconds": round(record.seconds, 1),
            "study": record.study, "study_storage": record.storage,
            **({"plot": FilePath(record.plot), "plot_image": Markdown(_png_markdown(Path(record.plot), "sweep"))}
               if record.plot else {}),
        },
        params={f"best.{k}": v for k, v in record.best_params.items()},
        metrics={f"best_validation_{record.metric}": record.best_value},
        artifacts=((record.plot, "sweep"),) if record.plot else ())


def _png_markdown(path: Path, title: str) -> str:
    return png_markdown(path.read_bytes(), title)
