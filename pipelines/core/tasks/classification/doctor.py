"""The data doctor of text classification: label suspects, cross-class near-duplicates and a learning curve from
frozen embeddings (one row per example) with cheap models, so it runs in seconds where fine-tuning takes minutes.

- Label suspects: out-of-fold class probabilities of a logistic regression (each row predicted by a model that
  did not see it), ranked by cleanlab's `find_label_issues` (confident learning: a row is a suspect when the
  model is confidently sure of another class, with per-class thresholds), lowest confidence in the given label
  first.
- Near-duplicates across classes: pairs of texts whose embeddings are almost the same (cosine) but whose labels
  differ; cleaning already drops exact and normalised duplicates.
- Learning curve: a linear probe fitted on growing shares of the train split, scored on the validation split.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.doctor import DUPLICATE_COLUMNS, MAX_DUPLICATE_PAIRS, SUSPECT_COLUMNS, DoctorReport
from pipelines.core.records import BaseModelRecord
from pipelines.core.training.compute import ComputeSettings, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, num_labels: int, folds: int, seed: int,
                              fit: Callable[[np.ndarray, np.ndarray], Any] | None = None) -> np.ndarray:
    """Class probabilities of every row from a model that did not see the row (stratified folds; a class with
    fewer rows than folds is spread over as many folds as it has rows). `fit(x, y)` returns the model (with
    `classes_` and `predict_proba`); by default a standardized logistic regression with C=0.1, fitted in torch."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    from pipelines.core.tasks.classification.linear_probe import fit_probe

    largest = int(np.bincount(y, minlength=num_labels).max()) if len(y) else 0
    if largest < 2:
        raise ValueError("the data doctor needs a class with at least 2 rows")
    probabilities = np.zeros((len(y), num_labels))
    splitter = StratifiedKFold(n_splits=min(folds, largest), shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer rows than folds is still predicted out of fold
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = list(splitter.split(x, y))
    for fit_rows, predict_rows in parts:
        model = fit(x[fit_rows], y[fit_rows]) if fit else fit_probe(x[fit_rows], y[fit_rows], 0.1)
        probabilities[np.ix_(predict_rows, model.classes_)] = model.predict_proba(x[predict_rows])
    return probabilities


def label_suspects(probabilities: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row numbers whose label is probably wrong, most suspicious first (cleanlab's confident learning)."""
    from cleanlab.filter import find_label_issues

    if len(y) == 0:
        return np.zeros(0, dtype=int)
    present = np.unique(y)  # cleanlab wants every class it is given to have rows: drop empty columns
    remap = np.full(probabilities.shape[1], -1)
    remap[present] = np.arange(len(present))
    sub = probabilities[:, present]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    # n_jobs=1: cleanlab forks a process pool by default, and forked children inherit the signal handlers of the
    # Dagster step (and of pytest-xdist workers), which turn the pool's shutdown into an interrupt of the run.
    return np.asarray(find_label_issues(remap[y], sub, return_indices_ranked_by="self_confidence", n_jobs=1),
                      dtype=int)


def cross_class_duplicates(embeddings: np.ndarray, y: np.ndarray, threshold: float,
                           block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with different labels and cosine >= threshold, most similar first."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = (embeddings / np.clip(norms, 1e-12, None)).astype(np.float32)
    found: list[tuple[int, int, float]] = []
    for start in range(0, len(unit), block):
        sims = unit[start:start + block] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        for i, j in zip(rows + start, cols, strict=True):
            if i < j and y[i] != y[j]:
                found.append((int(i), int(j), float(sims[i - start, j])))
    found.sort(key=lambda t: -t[2])
    return found[:MAX_DUPLICATE_PAIRS]


def learning_curve(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   shares: Sequence[float], score: Callable[[np.ndarray, np.ndarray], float], seed: int,
                   fit: Callable[[np.ndarray, np.ndarray], Any]) -> list[tuple[float, int, float]]:
    """(share, train rows, validation score) of `fit` on stratified shares of the train rows (nested: each share
    holds the smaller ones' rows)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(train_y == label)) for label in np.unique(train_y)])
    rank = np.empty(len(order), dtype=float)  # each row's position within its class, as a share of the class
    for label in np.unique(train_y):
        members = order[train_y[order] == label]
        rank[members] = (np.arange(len(members)) + 1) / len(members)
    points = []
    for share in shares:
        rows = np.flatnonzero(rank <= share + 1e-9)
        if len(np.unique(train_y[rows])) < 2 or len(val_y) == 0:
            continue
        model = fit(train_x[rows], train_y[rows])
        points.append((float(share), int(len(rows)), float(score(val_y, model.predict(val_x)))))
    return points


def examine(frame: pd.DataFrame, embeddings: np.ndarray, labels: Sequence[str], metric: str,
            score: Callable[[np.ndarray, np.ndarray], float], fit: Callable[[np.ndarray, np.ndarray], Any],
            model_name: str, folds: int, duplicate_similarity: float, shares: Sequence[float],
            seed: int, progress: Callable[[str], None] = print) -> DoctorReport:
    """The doctor's findings on `frame` (text, label, split, source_file, source_row; one embedding per row)."""
    started = time.perf_counter()
    index = {label: i for i, label in enumerate(labels)}
    y = frame["label"].map(index).to_numpy()
    probabilities = out_of_fold_probabilities(embeddings, y, len(labels), folds, seed, fit)
    ranked = label_suspects(probabilities, y)
    progress(f"{len(ranked):,} label suspect(s) among {len(frame):,} rows ({folds}-fold out-of-fold "
             "probabilities, cleanlab)")
    given_p = probabilities[np.arange(len(y)), y]
    other = probabilities.copy()
    other[np.arange(len(y)), y] = -1
    suggested = other.argmax(1)
    source_file = frame["source_file"] if "source_file" in frame else pd.Series([""] * len(frame), index=frame.index)
    source_row = frame["source_row"] if "source_row" in frame else pd.Series(range(1, len(frame) + 1),
                                                                                index=frame.index)
    suspects = pd.DataFrame({
        "rank": np.arange(1, len(ranked) + 1),
        "split": frame["split"].to_numpy()[ranked],
        "text": frame["text"].to_numpy()[ranked],
        "given_label": frame["label"].to_numpy()[ranked],
        "suggested_label": [labels[i] for i in suggested[ranked]],
        "suggested_probability": np.round(probabilities[ranked, suggested[ranked]], 4),
        "given_label_probability": np.round(given_p[ranked], 4),
        "source_file": source_file.astype(str).to_numpy()[ranked],
        "source_row": source_row.to_numpy()[ranked],
    }, columns=SUSPECT_COLUMNS)
    pairs = cross_class_duplicates(embeddings, y, duplicate_similarity)
    texts, names, part = frame["text"].to_numpy(), frame["label"].to_numpy(), frame["split"].to_numpy()
    duplicates = pd.DataFrame([[round(s, 4), texts[i], names[i], part[i], texts[j], names[j], part[j]]
                               for i, j, s in pairs], columns=DUPLICATE_COLUMNS)
    train, validation = (frame["split"] == "train").to_numpy(), (frame["split"] == "validation").to_numpy()
    curve = [{"share": share, "train_rows": rows, metric: round(value, 4)}
             for share, rows, value in learning_curve(embeddings[train], y[train], embeddings[validation],
                                                      y[validation], shares, score, seed, fit)]
    return DoctorReport(rows=len(frame), model=model_name, suspects=suspects, duplicates=duplicates, curve=curve,
                        metric=metric, seconds=time.perf_counter() - started,
                        settings={"folds": folds, "duplicate_similarity": duplicate_similarity,
                                  "learning_curve": list(shares), "seed": seed})


def run_doctor(splits: pd.DataFrame, encoder: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
               progress: ProgressFn = print) -> DoctorReport:
    """The doctor's findings on every row of the splits, from `encoder`'s frozen embeddings."""
    from torch import nn

    from pipelines.core.tasks.classification.metrics import classification_metrics
    from pipelines.core.tasks.classification.model import (fit_linear_probe, frozen_embeddings, load_encoder,
                                                           load_tokenizer)

    cfg, seed = spec.task.doctor, spec.training.seed
    frame = splits.reset_index(drop=True)
    labels = sorted(set(frame["label"]) | set(spec.task.labels or ()))
    started = time.perf_counter()

    @functools.cache
    def frozen() -> tuple[nn.Module, Any]:  # loaded once, and only if an embedding is not cached
        return load_encoder(encoder), load_tokenizer(encoder.local_path)

    # Split by split, as training's linear-probe head and evaluation's linear-probe baseline embed them (same
    # cache key): when the doctor's encoder is the chosen base model, they find these embeddings cached.
    embeddings = np.zeros((len(frame), encoder.hidden_size), dtype=np.float32)
    for split in ("train", "validation", "test"):
        rows = np.flatnonzero((frame["split"] == split).to_numpy())
        if len(rows):
            embeddings[rows] = frozen_embeddings(encoder, frame["text"].iloc[rows].tolist(),
                                                 spec.training.max_length, compute, load=frozen)
    progress(f"embedded {len(frame):,} rows with {encoder.name} in {time.perf_counter() - started:.1f} s "
             "(kept in the embedding cache, where training and evaluation find them)")
    metric = spec.evaluation.primary_metric

    def score(truth: np.ndarray, predicted: np.ndarray) -> float:
        return classification_metrics(truth, predicted, len(labels))[metric]

    return examine(frame, embeddings, labels, metric, score,
                   lambda x, y: fit_linear_probe(x, y, None, None, compute.device), encoder.name, cfg.folds,
                   cfg.duplicate_similarity, cfg.learning_curve, seed, progress)
