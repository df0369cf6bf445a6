"""The data doctor: which labels are probably wrong, which texts are near-duplicates under different labels, and
whether more data would help. It works on frozen embeddings (one row per example) with cheap models, so it runs
in seconds where fine-tuning takes minutes, and it never changes the data: it lists, a person decides.

- Label suspects: out-of-fold class probabilities of a logistic regression (each row predicted by a model that
  did not see it), ranked by cleanlab's `find_label_issues` (confident learning: a row is a suspect when the
  model is confidently sure of another class, with per-class thresholds), lowest confidence in the given label
  first.
- Near-duplicates across classes: pairs of texts whose embeddings are almost the same (cosine) but whose labels
  differ; cleaning already drops exact and normalised duplicates.
- Learning curve: a linear probe fitted on growing shares of the train split, scored on the validation split.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.files import write_bytes_atomic
from pipelines.core.evaluation import markdown_table

SUSPECT_COLUMNS = ["rank", "split", "text", "given_label", "suggested_label", "suggested_probability",
                   "given_label_probability", "source_file", "source_row"]
DUPLICATE_COLUMNS = ["similarity", "text_a", "label_a", "split_a", "text_b", "label_b", "split_b"]
MAX_DUPLICATE_PAIRS = 1000  # the most cross-class pairs kept (most similar first)


@dataclass(frozen=True)
class DoctorReport:
    """What the doctor found on one version of the data."""

    rows: int
    model: str  # the encoder whose embeddings were read
    suspects: pd.DataFrame  # every label suspect, most suspicious first (SUSPECT_COLUMNS)
    duplicates: pd.DataFrame  # cross-class near-duplicate pairs, most similar first (DUPLICATE_COLUMNS)
    curve: list[dict[str, Any]]  # [{share, train_rows, <metric>}] on the validation split
    metric: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def suspect_fraction(self) -> float:
        return len(self.suspects) / self.rows if self.rows else 0.0

    def summary(self) -> str:
        curve = ""
        if len(self.curve) >= 2:
            first, last = self.curve[0], self.curve[-1]
            curve = (f"; validation {self.metric} {first[self.metric]:.4f} on {first['share']:.0%} of train -> "
                     f"{last[self.metric]:.4f} on {last['share']:.0%}")
        return (f"{len(self.suspects):,} of {self.rows:,} rows ({self.suspect_fraction:.1%}) have a label that looks "
                f"wrong; {len(self.duplicates):,} near-duplicate pair(s) under different labels{curve}")

    def more_data_helps(self) -> str:
        """One sentence on the learning curve's last step."""
        if len(self.curve) < 2:
            return "no learning curve (it needs a validation split and at least two train shares)"
        a, b = self.curve[-2], self.curve[-1]
        gain = b[self.metric] - a[self.metric]
        rows = b["train_rows"] - a["train_rows"]
        verdict = ("more labelled data would probably still help" if gain > 0.01 else
                   "the curve is flattening: more data of the same kind would help little")
        return (f"going from {a['train_rows']:,} to {b['train_rows']:,} train rows (+{rows:,}) changed validation "
                f"{self.metric} by {gain:+.4f}: {verdict}")

    def suspects_markdown(self, limit: int) -> str:
        shown = self.suspects.head(limit)
        return markdown_table(
            ["#", "split", "text", "given", "suggested", "confidence", "source"],
            [[int(r["rank"]), r["split"], _short(r["text"]), r["given_label"], r["suggested_label"],
              f"{r['suggested_probability']:.2f}", f"{r['source_file']}:{r['source_row']}"]
             for _, r in shown.iterrows()], limit=100_000) if len(shown) else "no label suspects"

    def duplicates_markdown(self, limit: int) -> str:
        shown = self.duplicates.head(limit)
        return markdown_table(
            ["similarity", "text", "label", "text", "label"],
            [[f"{r['similarity']:.3f}", _short(r["text_a"]), r["label_a"], _short(r["text_b"]), r["label_b"]]
             for _, r in shown.iterrows()], limit=100_000) if len(shown) else "no near-duplicates across classes"

    def curve_markdown(self) -> str:
        return markdown_table(["share of train", "train rows", f"validation {self.metric}"],
                              [[f"{c['share']:.0%}", f"{c['train_rows']:,}", f"{c[self.metric]:.4f}"]
                               for c in self.curve], limit=100_000) if self.curve else "no learning curve"

    def to_json(self, limit: int) -> dict[str, Any]:
        return {"rows": self.rows, "model": self.model, "metric": self.metric, "seconds": round(self.seconds, 2),
                "suspect_count": len(self.suspects), "suspect_fraction": round(self.suspect_fraction, 4),
                "duplicate_pairs": len(self.duplicates), "summary": self.summary(),
                "more_data": self.more_data_helps(), "curve": self.curve, "settings": self.settings,
                "top_suspects": json.loads(self.suspects.head(limit).to_json(orient="records")),
                "top_duplicates": json.loads(self.duplicates.head(limit).to_json(orient="records"))}

    def write(self, folder: Path, limit: int) -> dict[str, Path]:
        """doctor.json, label_suspects.csv (every suspect), near_duplicates.csv and learning_curve.png, each
        written to a temporary file and renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "doctor.json", "suspects_csv": folder / "label_suspects.csv",
                 "duplicates_csv": folder / "near_duplicates.csv"}
        write_bytes_atomic(paths["json"], json.dumps(self.to_json(limit), indent=2).encode())
        write_bytes_atomic(paths["suspects_csv"], self.suspects.to_csv(index=False).encode())
        write_bytes_atomic(paths["duplicates_csv"], self.duplicates.to_csv(index=False).encode())
        if self.curve:
            paths["curve_png"] = folder / "learning_curve.png"
            write_bytes_atomic(paths["curve_png"], self._curve_png())
        return paths

    def _curve_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.plot([c["train_rows"] for c in self.curve], [c[self.metric] for c in self.curve], marker="o")
        ax.set_xlabel("train rows")
        ax.set_ylabel(f"validation {self.metric}")
        ax.set_title("Learning curve (linear probe on frozen embeddings)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return buffer.getvalue()


def _short(text: Any, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, num_labels: int, folds: int, seed: int,
                              fit: Callable[[np.ndarray, np.ndarray], Any] | None = None) -> np.ndarray:
    """Class probabilities of every row from a model that did not see the row (stratified folds; a class with
    fewer rows than folds is spread over as many folds as it has rows). `fit(x, y)` returns the model (with
    `classes_` and `predict_proba`); by default a standardized logistic regression with C=0.1, fitted in torch."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    from pipelines.core.linear_probe import fit_probe

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
