"""Splits: deterministic per seed, stable as data grows, no text in two splits, stratified, source splits kept."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.core.cleaning import dedup_key
from pipelines.core.splitting import assign_splits, row_position
from pipelines.core.spec import SplitsConfig


def clean_frame(n: int, labels: tuple[str, ...] = ("A", "B", "C"), offset: int = 0) -> pd.DataFrame:
    texts = [f"question number {i + offset}" for i in range(n)]
    return pd.DataFrame({"text": texts, "label": [labels[(i + offset) % len(labels)] for i in range(n)],
                         "norm_text": [dedup_key(t) for t in texts], "source_file": "f", "source_row": range(n)})


def assignment(result_frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(result_frame["text"], result_frame["split"], strict=True))


def test_row_position_is_uniform_and_seeded() -> None:
    values = [row_position(f"t{i}", 1) for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(values) / len(values) < 0.55
    assert row_position("t1", 1) != row_position("t1", 2)


def test_same_seed_same_split_other_seed_other_split() -> None:
    data = clean_frame(600)
    cfg = SplitsConfig(seed=7)
    first, again = assign_splits(data, cfg), assign_splits(data.sample(frac=1, random_state=1), cfg)
    assert assignment(first.frame) == assignment(again.frame)  # row order does not matter either
    other = assign_splits(data, SplitsConfig(seed=8))
    assert assignment(first.frame) != assignment(other.frame)


def test_rows_keep_their_split_when_data_grows() -> None:
    cfg = SplitsConfig(seed=3, stratify=False)
    small = assignment(assign_splits(clean_frame(500), cfg).frame)
    grown = assignment(assign_splits(pd.concat([clean_frame(500), clean_frame(1500, offset=500)]), cfg).frame)
    assert all(grown[text] == split for text, split in small.items())


def test_stratified_growth_moves_no_row_of_a_large_class() -> None:
    cfg = SplitsConfig(seed=3)
    small = assignment(assign_splits(clean_frame(900), cfg).frame)
    grown = assignment(assign_splits(clean_frame(1800), cfg).frame)
    moved = [t for t, s in small.items() if grown[t] != s]
    assert moved == []


def test_proportions_follow_the_spec_within_each_class() -> None:
    result = assign_splits(clean_frame(6000), SplitsConfig(train=0.7, validation=0.1, test=0.2, seed=1))
    counts = result.counts()
    assert counts["train"] / 6000 == pytest.approx(0.7, abs=0.02)
    assert counts["test"] / 6000 == pytest.approx(0.2, abs=0.02)
    table = result.class_table()
    for label in table.index:
        shares = table.loc[label] / table.loc[label].sum()
        assert shares["test"] == pytest.approx(0.2, abs=0.03)
        assert shares["validation"] == pytest.approx(0.1, abs=0.03)


def test_same_normalised_text_never_in_two_splits() -> None:
    texts = [f"Q {i}?" for i in range(300)] + [f"q {i}" for i in range(300)]
    data = pd.DataFrame({"text": texts, "label": "A", "norm_text": [dedup_key(t) for t in texts],
                         "source_file": "f", "source_row": range(600)})
    result = assign_splits(data, SplitsConfig(seed=5))
    assert result.frame.groupby("norm_text")["split"].nunique().max() == 1
    assert result.overlapping_texts == 0


def test_stratify_gives_a_rare_class_a_row_in_every_split() -> None:
    data = pd.concat([clean_frame(300, labels=("A",)), clean_frame(4, labels=("RARE",), offset=1000)])
    plain = assign_splits(data, SplitsConfig(seed=11, stratify=False)).class_table()
    result = assign_splits(data, SplitsConfig(seed=11, stratify=True))
    table = result.class_table()
    assert (table.loc["RARE"] >= 1).all(), table
    assert result.moved_for_stratification == int((plain.loc["RARE", ["validation", "test"]] == 0).sum())
    assert result.moved_for_stratification >= 1  # seed 11 leaves RARE out of a split without stratification


def test_source_splits_are_kept_and_validation_carved_from_train() -> None:
    data = clean_frame(1000)
    data["source_split"] = ["test" if i % 5 == 0 else "train" for i in range(1000)]
    result = assign_splits(data, SplitsConfig(train=0.8, validation=0.1, test=0.1, seed=2))
    assert result.origin == "source"
    by_text = assignment(result.frame)
    for text, source in zip(data["text"], data["source_split"], strict=True):
        if source == "test":
            assert by_text[text] == "test"
        else:
            assert by_text[text] in ("train", "validation")
    # validation is 0.1 / (0.8 + 0.1) of the source's train split
    assert result.counts()["validation"] / 800 == pytest.approx(0.1 / 0.9, abs=0.03)


def test_overlapping_source_splits_are_counted_not_hidden() -> None:
    data = clean_frame(10)
    data = pd.concat([data.assign(source_split="train"), data.head(3).assign(source_split="test")])
    result = assign_splits(data, SplitsConfig(seed=2))
    assert result.overlapping_texts == 3


def test_overlap_can_be_dropped_from_the_earlier_split_keeping_test_whole() -> None:
    data = clean_frame(30)
    test_rows = data.head(3).assign(source_split="test", text=lambda f: f["text"].str.upper())  # same normalised
    validation_rows = data.iloc[3:5].assign(source_split="validation")
    data = pd.concat([data.assign(source_split="train"), test_rows, validation_rows])
    result = assign_splits(data, SplitsConfig(seed=2, overlap="drop_from_earlier_splits"))
    assert result.overlapping_texts == 5 and result.dropped_for_overlap == 5  # 3 train rows (test), 2 (validation)
    assert result.frame.groupby("norm_text")["split"].nunique().max() == 1
    assert result.counts()["test"] == 3 and result.counts()["validation"] == 2  # the later splits stay whole
    assert set(result.frame.loc[result.frame["split"] == "test", "text"]) == set(test_rows["text"])
    kept = assign_splits(data, SplitsConfig(seed=2))  # the default keeps them, and the check blocks training
    assert kept.dropped_for_overlap == 0 and len(kept.frame) == len(data)
