"""Classification metrics (scikit-learn): accuracy, macro and weighted precision / recall / F1, per class, and a
bootstrap of the test rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np



METRIC_NAMES = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
                "weighted_recall", "weighted_f1")


REPORT_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1")


# ---------------------------------------------------------------------------------------- training
def _classification_metrics(eval_pred: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0))}


# -------------------------------------------------------------------------------------------- evaluation
def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and precision / recall / F1 averaged over classes (macro) and over rows (weighted)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_labels)),
                                                     average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    return out


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_metric(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, metric: str, seed: int,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """`metric` (accuracy, macro_f1, weighted_f1, ...) on `resamples` bootstrap resamples of the rows, as
    classification_metrics computes it. The resamples depend only on the seed and the number of rows, so two
    models' predictions on the same rows are scored on the same resamples (a paired bootstrap)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n, k = len(y_true), num_labels
    if n == 0:
        return np.zeros(resamples)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    codes = (y_true[rows] * k + y_pred[rows]) + (np.arange(resamples) * k * k)[:, None]
    confusion = np.bincount(codes.ravel(), minlength=resamples * k * k).reshape(resamples, k, k).astype(float)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    if metric == "accuracy":
        return tp.sum(1) / n
    support, predicted = confusion.sum(2), confusion.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    kind, _, name = metric.partition("_")
    values = {"precision": precision, "recall": recall, "f1": f1}[name]
    if kind == "macro":
        return values.mean(1)
    return (values * support).sum(1) / n


def per_class_table(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(labels))),
                                                 zero_division=0)
    return [{"label": label, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, label in enumerate(labels)]
