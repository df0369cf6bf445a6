"""The evaluation report of a classifier: test metrics against the majority class, the linear probe, the prompting
baseline and the champion, with the confusion matrix and sample errors."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from pipelines.core.errors import CheckpointError
from pipelines.core.evaluation import build_report, champion_metrics
from pipelines.core.files import write_bytes_atomic
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, ReportTable
from pipelines.core.tasks.classification import NAME
from pipelines.core.tasks.classification.metrics import REPORT_METRICS, classification_metrics, per_class_table
from pipelines.core.tasks.classification.model import (fit_linear_probe, frozen_embeddings, load_encoder,
                                                       load_tokenizer)
from pipelines.core.tasks.classification.prompting import classification_prompting
from pipelines.core.tasks.classification.train import load_classifier, predict_proba
from pipelines.core.training.compute import ComputeSettings, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


SAMPLE_ERRORS = 20  # test rows the model got wrong, shown in the report


def sample_errors(test: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> ReportTable:
    """The test rows the model got wrong (the first SAMPLE_ERRORS, in test order): text, true and predicted label,
    and the file and row each came from."""
    wrong = np.flatnonzero(np.asarray(y_pred) != np.asarray(y_true))
    shown = wrong[:SAMPLE_ERRORS]
    where = (test["source_file"].astype(str) + ":" + test["source_row"].astype(str)
             if {"source_file", "source_row"} <= set(test.columns) else pd.Series([""] * len(test)))
    rows = tuple((test["text"].iloc[i], labels[int(y_true[i])], labels[int(y_pred[i])], where.iloc[i]) for i in shown)
    return ReportTable(f"Sample errors: {len(wrong)} of {len(test)} test rows wrong"
                       + (f" (the first {len(shown)})" if len(wrong) > len(shown) else ""),
                       ("text", "true label", "predicted label", "source"), rows)


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """A confusion-matrix heat map with counts, rows = true class, columns = predicted class."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(labels) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _predicted_labels(record: CheckpointRecord, texts: list[str], max_length: int, compute: ComputeSettings,
                      batch_size: int) -> np.ndarray:
    model, tokenizer = load_classifier(record)
    return predict_proba(model, tokenizer, texts, max_length, compute, batch_size).argmax(-1)


def evaluate_classifier(splits: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
    """Metrics of the checkpoint, its baselines (majority class, linear probe, prompting `prompt_model`) and the
    current champion (if any) on the test split; decides promotion; writes JSON, HTML and the confusion matrix to
    `out_dir`."""
    from sklearn.metrics import confusion_matrix

    compute.apply()
    labels = tuple(checkpoint.task_data["labels"])
    index = {label: i for i, label in enumerate(labels)}
    train, validation, test = (splits[splits["split"] == s] for s in ("train", "validation", "test"))
    unknown = sorted(set(test["label"]) - set(labels))
    if unknown:
        raise CheckpointError(f"the test split has labels the checkpoint was not trained on: {unknown}")
    y_test = test["label"].map(index).to_numpy()
    max_length, batch = spec.training.max_length, spec.evaluation.batch_size
    y_pred = _predicted_labels(checkpoint, test["text"].tolist(), max_length, compute, batch)
    metrics = classification_metrics(y_test, y_pred, len(labels))
    matrix = confusion_matrix(y_test, y_pred, labels=list(range(len(labels))))

    baselines: dict[str, dict[str, float]] = {}
    if "majority_class" in spec.evaluation.baselines:
        majority = index[train["label"].value_counts().idxmax()]
        baselines["majority_class"] = classification_metrics(y_test, np.full(len(y_test), majority), len(labels))
    if "linear_probe" in spec.evaluation.baselines:
        base = checkpoint.base_model

        @functools.cache
        def frozen() -> tuple[nn.Module, Any]:  # loaded once, and only if an embedding is not cached
            return load_encoder(base), load_tokenizer(base.local_path)

        def embed(frame: pd.DataFrame) -> np.ndarray:  # train and validation as training embedded them: cached
            return frozen_embeddings(base, frame["text"].tolist(), max_length, compute, load=frozen)

        probe = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(),
                                 embed(validation) if len(validation) else None,
                                 validation["label"].map(index).to_numpy() if len(validation) else None,
                                 compute.device)
        baselines["linear_probe"] = classification_metrics(y_test, probe.predict(embed(test)), len(labels))

    if "prompting" in spec.evaluation.baselines:
        if prompt_model is None:
            raise CheckpointError("evaluation.baselines lists prompting, but no prompted model was pinned")
        prompting = spec.evaluation.prompting
        predicted_by = classification_prompting(
            prompt_model.local_path, prompt_model.weights_sha256, train, test["text"].tolist(), labels,
            spec.task.label_names, prompting.shots, spec.training.seed, compute, prompting.batch_size, progress)
        for shots, predicted in predicted_by.items():
            baselines[f"prompt_{shots}_shot"] = classification_metrics(y_test, predicted, len(labels))

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        missing = sorted(set(test["label"]) - set(record.task_data["labels"]))
        if missing:
            raise CheckpointError(f"the champion (v{record.model_version}) does not know the labels {missing} of "
                                  "this test split")
        labels_of = np.array(record.task_data["labels"])
        predicted = labels_of[_predicted_labels(record, test["text"].tolist(), max_length, compute, batch)]
        return classification_metrics(y_test, [index.get(label, -1) for label in predicted], len(labels))

    per_class = per_class_table(y_test, y_pred, labels)
    errors = sample_errors(test, y_test, y_pred, labels)
    png = out_dir / "confusion_matrix.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(matrix, labels, png, f"{spec.name}: test confusion matrix")
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=len(test), headline=f"{len(test)} test rows",
        metric_names=REPORT_METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(ReportTable("Per class", ("class", "precision", "recall", "F1", "support"),
                            tuple((r["label"], r["precision"], r["recall"], r["f1"], r["support"])
                                  for r in per_class)), errors),
        images=(("Confusion matrix", png.name),),
        details={"labels": list(labels), "per_class": per_class,
                 "confusion_matrix": [[int(v) for v in row] for row in matrix]},
        files={"confusion_matrix": str(png)})
