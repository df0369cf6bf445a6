"""The data doctor: label suspects (out-of-fold probabilities ranked by cleanlab), cross-class near-duplicates
and the learning curve, on embeddings whose structure is known, then on real MiniLM embeddings of TREC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.core.tasks.classification.doctor import examine, out_of_fold_probabilities
from pipelines.core.tasks.classification.metrics import classification_metrics
from pipelines.core.tasks.classification.model import fit_linear_probe

LABELS = ["a", "b", "c"]


def clustered(rows_per_class: int = 120, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Three well-separated Gaussian clusters in 16 dimensions, one per label; 80/10/10 splits."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), rows_per_class)
    embeddings = (centres[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32)
    order = rng.permutation(len(labels))
    labels, embeddings = labels[order], embeddings[order]
    split = np.where(np.arange(len(labels)) % 10 == 0, "validation",
                     np.where(np.arange(len(labels)) % 10 == 1, "test", "train"))
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(len(labels))],
                          "label": [LABELS[i] for i in labels], "split": split,
                          "source_file": "data.csv", "source_row": np.arange(2, len(labels) + 2)})
    return frame, embeddings


def run(frame: pd.DataFrame, embeddings: np.ndarray, **kwargs: object) -> object:
    def score(truth: np.ndarray, predicted: np.ndarray) -> float:
        return classification_metrics(truth, predicted, len(LABELS))["macro_f1"]

    settings = {"folds": 5, "duplicate_similarity": 0.999, "shares": (0.25, 0.5, 1.0), "seed": 0, **kwargs}
    return examine(frame, embeddings, LABELS, "macro_f1", score, lambda x, y: fit_linear_probe(x, y, None, None),
                   "test-encoder", settings["folds"], settings["duplicate_similarity"], settings["shares"],
                   settings["seed"], progress=lambda _: None)


def test_flipped_labels_top_the_suspects_with_their_source_and_a_suggestion() -> None:
    frame, embeddings = clustered()
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(frame), size=18, replace=False)
    truth = frame["label"].copy()
    for row in flipped:
        frame.at[row, "label"] = LABELS[(LABELS.index(truth[row]) + 1) % 3]
    report = run(frame, embeddings)
    top = report.suspects.head(18)
    found = set(top["source_row"]) & set(frame.loc[flipped, "source_row"])
    assert len(found) >= 16, f"only {len(found)} of 18 flipped rows among the top 18 suspects"
    # A flipped row's suggestion is its true label, with the file and row it came from.
    first = top.iloc[0]
    row = int(first["source_row"]) - 2
    assert first["source_file"] == "data.csv" and first["given_label"] == frame.at[row, "label"]
    assert first["suggested_label"] == truth[row] and first["suggested_probability"] > 0.5
    assert list(report.suspects["rank"]) == list(range(1, len(report.suspects) + 1))
    assert report.suspects["given_label_probability"].is_monotonic_increasing  # most suspicious first


def test_clean_data_has_few_suspects_and_no_duplicates() -> None:
    frame, embeddings = clustered()
    report = run(frame, embeddings)
    assert report.suspect_fraction < 0.02 and report.duplicates.empty
    assert "0 near-duplicate pair(s)" in report.summary()


def test_a_text_copied_under_another_label_is_a_cross_class_duplicate() -> None:
    frame, embeddings = clustered()
    embeddings[5] = embeddings[7]  # the same text (embedding) twice ...
    frame.at[5, "text"] = frame.at[7, "text"] + "!"
    other = next(label for label in LABELS if label != frame.at[7, "label"])
    frame.at[5, "label"] = other  # ... under two labels
    report = run(frame, embeddings)
    pair = report.duplicates.iloc[0]
    assert {pair["text_a"], pair["text_b"]} == {frame.at[5, "text"], frame.at[7, "text"]}
    assert {pair["label_a"], pair["label_b"]} == {frame.at[5, "label"], frame.at[7, "label"]}
    assert pair["similarity"] >= 0.999 and len(report.duplicates) == 1


def test_learning_curve_uses_nested_shares_of_train_and_scores_validation() -> None:
    frame, embeddings = clustered()
    report = run(frame, embeddings)
    train_rows = int((frame["split"] == "train").sum())
    assert [c["share"] for c in report.curve] == [0.25, 0.5, 1.0]
    assert report.curve[-1]["train_rows"] == train_rows
    assert report.curve[0]["train_rows"] == pytest.approx(train_rows / 4, abs=3)
    assert all(0.9 <= c["macro_f1"] <= 1.0 for c in report.curve)  # separable clusters
    assert "flattening" in report.more_data_helps()


def test_no_row_is_predicted_by_a_model_that_saw_it() -> None:
    """A lone point of a class, far inside another class's cluster: a model fitted on it would recall it;
    out of fold, its own label gets (almost) no probability."""
    frame, embeddings = clustered()
    y = frame["label"].map({label: i for i, label in enumerate(LABELS)}).to_numpy().copy()
    y[0] = (y[0] + 1) % 3
    probabilities = out_of_fold_probabilities(embeddings, y, 3, folds=5, seed=0)
    assert probabilities.shape == (len(y), 3) and np.allclose(probabilities.sum(1), 1)
    assert probabilities[0, y[0]] < 0.05


def test_files_are_written_and_the_csv_holds_every_suspect(tmp_path: Path) -> None:
    frame, embeddings = clustered()
    frame.loc[:9, "label"] = [LABELS[(LABELS.index(v) + 1) % 3] for v in frame.loc[:9, "label"]]
    report = run(frame, embeddings)
    paths = report.write(tmp_path / "doctor", limit=3)
    written = pd.read_csv(paths["suspects_csv"])
    assert len(written) == len(report.suspects) > 3  # all of them, not the 3 shown
    assert list(written.columns)[:4] == ["rank", "split", "text", "given_label"]
    assert paths["curve_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "doctor").glob("*.tmp*"))  # written through temporary files, renamed


@pytest.mark.real_model
def test_minilm_doctor_finds_flipped_trec_labels(tmp_path: Path, trec_lines: list[str]) -> None:
    """The real encoder on 600 distinct TREC questions with 5% of the labels flipped: many flipped rows are
    among the top suspects (chance would put 1.5 of them in the top 30; 14 measured)."""
    from pipelines.core.spec import PipelineSpec
    from pipelines.core.steps import examine_data
    from pipelines.core.training.compute import ComputeSettings
    from tests.conftest import store

    seen: dict[str, str] = {}
    for line in trec_lines:
        label, _, text = line.partition(" ")
        seen.setdefault(text, label.split(":")[0])
        if len(seen) >= 600:
            break
    frame = pd.DataFrame({"text": list(seen), "label": list(seen.values()),
                          "split": ["train"] * 480 + ["validation"] * 60 + ["test"] * 60,
                          "source_file": "q.txt", "source_row": range(1, 601)})
    labels = sorted(set(frame["label"]))
    rng = np.random.default_rng(0)
    flipped = rng.choice(600, size=30, replace=False)
    for row in flipped:
        frame.at[row, "label"] = rng.choice([x for x in labels if x != frame.at[row, "label"]])
    spec = PipelineSpec.model_validate({"name": "doc", "source": {"kind": "local", "path": "x.csv"},
                                        "base_model": {"model": {"source": "catalog", "id": "all-MiniLM-L6-v2"}},
                                        "training": {"max_length": 64}})
    report, paths = examine_data(spec, frame, store(tmp_path), ComputeSettings("cpu", "fp32", 2,
                                 cache_dir=str(tmp_path / "cache")), tmp_path, progress=lambda _: None)
    found = len(set(report.suspects.head(30)["source_row"]) & set(frame.loc[flipped, "source_row"]))
    assert found >= 10, f"{found} of the 30 flipped rows among the top 30 suspects"  # 14 measured
    assert report.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert paths["json"].parent.parent == tmp_path / "doctor"
