"""The text regression Task: frozen mean-pooled embeddings of the base model, a ridge regression fitted on the
train split (its penalty is the task's own setting), R² / RMSE / MAE on the test split against predicting the
train mean."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import CleaningResult, cleaning_log, dedup_key, is_missing, normalise_text
from pipelines.core.digests import checkpoint_digest, frame_digest
from pipelines.core.errors import CheckpointError, SourceError
from pipelines.core.evaluation import build_report, champion_metrics
from pipelines.core.markdown import markdown_table
from pipelines.core.quality import ERROR, QualityReport, QualitySuite, check_def, evaluate_checks, validate_splits, \
    with_row_id
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, Markdown, StepLog
from pipelines.core.sections import SpecView
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.base import PreparedData, Predictor, ProbeResult, ServingSchema, TaskBase
from pipelines.core.training.checkpoints import checkpoint_manifest, save_checkpoint, verified_folder
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from tests.tasks.regression import NAME
from tests.tasks.regression.config import RegressionTaskConfig

WEIGHTS = ("head.json",)
EXAMPLE_COLUMNS = ("text", "target", "split", "source_file", "source_row")
DESCRIPTIONS = {
    "targets_are_numbers": "Every row's target is a finite number.",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "splits_do_not_overlap": "No normalised text is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "every_class_in_train_and_test": "Every target bucket has rows in train and in test.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
}


def embed(record: BaseModelRecord, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Mean-pooled last hidden states of the base model (no gradient)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(record.local_path), AutoModel.from_pretrained(record.local_path)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(list(texts[start:start + 64]), truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, record.hidden_size), dtype=np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    mean_x, mean_y = x.mean(0), float(y.mean())
    centred = x - mean_x
    weights = np.linalg.solve(centred.T @ centred + penalty * np.eye(x.shape[1]), centred.T @ (y - mean_y))
    return weights, mean_y - float(mean_x @ weights)


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    errors = predicted - truth
    spread = float(((truth - truth.mean()) ** 2).sum()) or 1.0
    return {"r2": 1.0 - float((errors ** 2).sum()) / spread, "rmse": float(np.sqrt((errors ** 2).mean())),
            "mae": float(np.abs(errors).mean())}


class RegressionTask(TaskBase):
    """Text regression: one text column to one numeric column."""

    name = NAME
    config_class = RegressionTaskConfig
    evaluation_defaults = {"primary_metric": "r2", "baselines": ("mean_target",)}
    primary_metrics = ("r2",)
    baselines = ("mean_target",)
    split_group_column = "bucket"  # the target's tercile: every range of targets in every split
    prepared: PreparedData | None = None
    descriptions = {"cleaned_dataset": "Normalised (text, target) rows with a number as target, without duplicates.",
                    "finetuned_checkpoint": "A ridge regression on the base model's frozen embeddings.",
                    "evaluation_report": "R², RMSE and MAE on the test split against predicting the train mean."}
    weight_files = WEIGHTS
    legacy_metadata_file = ""
    report_kinds = frozenset({"numpy"})
    auto_model_class = "AutoModel"
    trainer_name = "ridge regression (numpy)"
    predicts_tokens = False
    example_columns = EXAMPLE_COLUMNS
    metric_names = ("r2", "rmse", "mae")
    serving = ServingSchema(outputs=(("text", "string"), ("value", "double")), prediction="value", score=None)
    export_formats = ()  # nothing to export: a ridge head on frozen embeddings
    sweep_metrics = {"r2": "maximize"}

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        task = spec.task
        for column in (task.text_column, task.target_column):
            if column not in raw.columns:
                raise SourceError(f"has no column {column!r}", column=column)
        targets = pd.to_numeric(raw[task.target_column], errors="coerce")
        frame = pd.DataFrame({"text": [None if is_missing(t) else normalise_text(str(t), spec.cleaning)
                                       for t in raw[task.text_column]],
                              "target": targets, "source_file": raw["source_file"].astype(str),
                              "source_row": raw["source_row"].astype("int64")})
        missing = frame["text"].isna() | frame["target"].isna()
        frame = frame[~missing].copy()
        frame["norm_text"] = [dedup_key(t) for t in frame["text"]]
        duplicate = frame.duplicated("norm_text")
        frame = frame[~duplicate].reset_index(drop=True)
        frame["bucket"] = pd.qcut(frame["target"].rank(method="first"), 3, labels=["low", "mid", "high"]).astype(str)
        result = CleaningResult(frame, len(raw), {"missing_text_or_target": int(missing.sum()),
                                                  "duplicate": int(duplicate.sum())})
        return frame, cleaning_log(spec.name, result, spec.cleaning, "rows", {
            "target_mean": float(frame["target"].mean()),
            "buckets": Markdown(markdown_table(["bucket", "rows"], list(result.counts("bucket").items())))})

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        import great_expectations.expectations as gxe

        def cleaned_suite(value: pd.DataFrame) -> QualityReport:
            q = spec.quality
            checks = [check_def("targets_are_numbers", DESCRIPTIONS["targets_are_numbers"], "fix the targets",
                                (gxe.ExpectColumnValuesToNotBeNull(column="target"), "rows", ERROR)),
                      check_def("row_count_within_bounds", DESCRIPTIONS["row_count_within_bounds"],
                                "provide more rows, or change quality.min_rows",
                                (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows),
                                 "rows", ERROR))]
            return evaluate_checks("cleaned_dataset", checks, {"rows": with_row_id(value)}, EXAMPLE_COLUMNS)

        def splits_suite(value: pd.DataFrame) -> QualityReport:
            return validate_splits(value, spec.splits, spec.quality, "bucket", every_group_in_train_and_test=True,
                                   example_columns=EXAMPLE_COLUMNS)

        return (QualitySuite("cleaned_dataset", ("targets_are_numbers", "row_count_within_bounds"), DESCRIPTIONS,
                             cleaned_suite),
                QualitySuite("splits", ("splits_do_not_overlap", "split_proportions_match_spec",
                                        "every_class_in_train_and_test", "validation_and_test_are_not_empty"),
                             DESCRIPTIONS, splits_suite))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        raise NotImplementedError("text regression trains on the splits directly")

    def model_support(self, config: dict[str, Any]) -> str | None:
        return None if config.get("hidden_size") else "no hidden_size in its config.json"

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        return float(spec.training.max_length)

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        rows = sample_split(splits, "train", spec.training.batch_size, spec.training.seed)
        started = time.perf_counter()
        embed(record, rows["text"].tolist(), spec.training.max_length)
        return time.perf_counter() - started

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        train = sample_split(splits, "train", 4 * spec.base_model.probe.sample_rows, spec.training.seed)
        validation = sample_split(splits, "validation", spec.base_model.probe.sample_rows, spec.training.seed)
        weights, bias = fit_ridge(embed(record, train["text"].tolist(), spec.training.max_length),
                                  train["target"].to_numpy(float), spec.task.ridge)
        predicted = embed(record, validation["text"].tolist(), spec.training.max_length) @ weights + bias
        value = regression_metrics(validation["target"].to_numpy(float), predicted)["r2"]
        return ProbeResult("ridge_r2", value, value)

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print, sink: MetricsSink | None = None,
              scratch: Path | None = None) -> CheckpointRecord:
        started = time.perf_counter()
        train, validation = data[data["split"] == "train"], data[data["split"] == "validation"]
        weights, bias = fit_ridge(embed(base, train["text"].tolist(), spec.training.max_length),
                                  train["target"].to_numpy(float), spec.task.ridge)
        scores = regression_metrics(validation["target"].to_numpy(float),
                                    embed(base, validation["text"].tolist(), spec.training.max_length) @ weights + bias)
        history = ({"epoch": 1.0, **{f"eval_{k}": v for k, v in scores.items()}},)
        if sink is not None:
            sink.log_metrics({f"eval_{k}": v for k, v in scores.items()}, step=1)
        progress(f"ridge regression: validation r2 {scores['r2']:.4f}")

        def write_files(folder: Path) -> None:
            (folder / "head.json").write_text(json.dumps({"weights": weights.tolist(), "bias": bias}))

        digest = frame_digest(data)
        manifest = checkpoint_manifest(NAME, base, spec.spec_hash, digest, WEIGHTS, {"ridge": spec.task.ridge})
        path = save_checkpoint(out_dir, write_files, manifest, spec.to_yaml(), history)
        return CheckpointRecord(path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHTS), base_model=base,
                                spec_hash=spec.spec_hash, data_sha256=digest, train_rows=len(train),
                                validation_rows=len(validation), best_epoch=1.0, trainable_parameters=weights.size + 1,
                                train_seconds=time.perf_counter() - started, tokens_per_second=0.0,
                                precision=compute.precision, history=history, task_data={"ridge": spec.task.ridge})

    def history_table(self, record: CheckpointRecord) -> str:
        return markdown_table(["epoch", "validation r2"], [[h["epoch"], h["eval_r2"]] for h in record.history])

    def _predict(self, record: CheckpointRecord, texts: Sequence[str], max_length: int) -> np.ndarray:
        head = json.loads((verified_folder(record, WEIGHTS) / "head.json").read_text())
        return embed(record.base_model, texts, max_length) @ np.array(head["weights"]) + head["bias"]

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        test, train = data[data["split"] == "test"], data[data["split"] == "train"]
        truth, length = test["target"].to_numpy(float), spec.training.max_length
        metrics = regression_metrics(truth, self._predict(checkpoint, test["text"].tolist(), length))
        baselines = {"mean_target": regression_metrics(truth, np.full(len(truth), train["target"].mean()))}
        scores = champion_metrics(champion, checkpoint, metrics,
                                  lambda c: regression_metrics(truth, self._predict(c, test["text"].tolist(), length)),
                                  progress)
        return build_report(pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=len(test),
                            headline=f"{len(test)} test rows", metric_names=self.metric_names, metrics=metrics,
                            baselines=baselines, champion=champion, champion_scores=scores,
                            primary=spec.evaluation.primary_metric,
                            min_improvement=spec.promotion.min_improvement, out_dir=out_dir)

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        def answer(texts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
            values = self._predict(record, texts, 128)
            return [{"text": t, "value": round(float(v), 4)} for t, v in zip(texts, values, strict=True)]

        return answer

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return f"{row['value']:.4f}\t{row['text']}"

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        raise CheckpointError(f"{NAME} checkpoints are a ridge head on frozen embeddings; nothing to merge")
