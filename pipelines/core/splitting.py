"""Assign every clean row to train, validation or test.

A row's split depends only on the seed and its normalised text: adding rows never moves an existing row
to another split, and two rows with the same normalised text always land together (no leakage). When the
source brings its own splits they are kept; a missing validation or test split is carved out of train.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.core.sections import SplitsConfig

SPLITS = ("train", "validation", "test")


def row_position(norm_text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the normalised text."""
    digest = hashlib.sha256(f"{seed}\x1f{norm_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitResult:
    """The rows with a `split` column, and where the split came from."""

    frame: pd.DataFrame
    origin: str  # "hash" or "source"
    moved_for_stratification: int
    overlapping_texts: int  # normalised texts found in more than one split (only possible with source splits)
    group_column: str = "label"  # the column whose groups are stratified and tabulated (label, or category)
    dropped_for_overlap: int = 0  # rows dropped from an earlier split because their text is in a later one

    def counts(self) -> dict[str, int]:
        return {s: int((self.frame["split"] == s).sum()) for s in SPLITS}

    def class_table(self) -> pd.DataFrame:
        """Rows per class (or category) and split."""
        table = pd.crosstab(self.frame[self.group_column], self.frame["split"])
        return table.reindex(columns=list(SPLITS), fill_value=0)


def _by_threshold(positions: np.ndarray, cuts: list[tuple[str, float]], default: str) -> np.ndarray:
    out = np.full(len(positions), default, dtype=object)
    low = 0.0
    for name, fraction in cuts:
        high = low + fraction
        out[(positions >= low) & (positions < high)] = name
        low = high
    return out


def _stratify(frame: pd.DataFrame, targets: list[str], column: str) -> int:
    """Give every class with >= 3 rows at least one row in each target split, taken from train.

    The rows moved are the train rows whose positions lie nearest the target region, so the choice is
    deterministic and rarely changes as data grows.
    """
    moved = 0
    for label, rows in frame.groupby(column):
        if len(rows) < 3:
            continue
        for target in targets:
            if (rows["split"] == target).any():
                continue
            train_rows = rows[rows["split"] == "train"]
            if len(train_rows) <= 1:
                continue
            pick = train_rows["position"].idxmin()
            # Every train row with the picked text moves, so that one text never ends up in two splits.
            together = (frame["norm_text"] == frame.loc[pick, "norm_text"]) & (frame["split"] == "train")
            frame.loc[together, "split"] = target
            frame.loc[together, "split_origin"] = "stratified"
            rows = frame[frame[column] == label]
            moved += int(together.sum())
    return moved


def assign_splits(clean: pd.DataFrame, cfg: SplitsConfig, group_column: str = "label") -> SplitResult:
    """Assign splits by hash, or keep the source's own.

    Returns the rows with `split`, `position` (the row's hash position) and `split_origin`: 'hash', 'source'
    (the source's own split), 'carved' (taken from the source's train split) or 'stratified' (moved so that
    a small class is present in every split).
    """
    frame = clean.reset_index(drop=True)  # unique labels: rows are moved by label below
    frame["position"] = [row_position(t, cfg.seed) for t in frame["norm_text"]]
    positions = frame["position"].to_numpy(dtype=float)
    if "source_split" in frame.columns:
        origin = "source"
        frame["split"] = frame["source_split"].to_numpy(dtype=object)
        present = set(frame["split"])
        train = frame["split"] == "train"
        # Carve what the source lacks out of its train split, in the spec's proportions.
        carve: list[tuple[str, float]] = []
        remaining = cfg.train + (cfg.validation if "validation" not in present else 0.0) + (
            cfg.test if "test" not in present else 0.0)
        for name in ("test", "validation"):
            if name not in present and getattr(cfg, name) > 0:
                carve.append((name, getattr(cfg, name) / remaining))
        frame["split_origin"] = "source"
        if carve:
            frame.loc[train, "split"] = _by_threshold(positions[train.to_numpy()], carve, "train")
            frame.loc[train & (frame["split"] != "train"), "split_origin"] = "carved"
        frame = frame.drop(columns=["source_split"])
    else:
        origin = "hash"
        cuts = [("test", cfg.test), ("validation", cfg.validation)]
        frame["split"] = _by_threshold(positions, cuts, "train")
        frame["split_origin"] = "hash"
    moved = 0
    if cfg.stratify:
        targets = ["test"] + (["validation"] if cfg.validation > 0 else [])
        if origin == "source":
            # Never move rows out of a split the source defined; only carved splits are ours to adjust.
            targets = [t for t in targets if t not in set(clean.get("source_split", pd.Series(dtype=str)))]
        moved = _stratify(frame, targets, group_column)
    splits_per_text = frame.groupby("norm_text")["split"].nunique()
    overlapping = int((splits_per_text > 1).sum())
    dropped = 0
    if overlapping and cfg.overlap == "drop_from_earlier_splits":
        # Test wins over validation, validation over train: an official test set stays whole.
        rank = frame["split"].map({name: i for i, name in enumerate(SPLITS)})
        latest = rank.groupby(frame["norm_text"]).transform("max")
        keep = rank == latest
        dropped = int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
    frame = frame.sort_values(["split", "position"], kind="stable").reset_index(drop=True)
    return SplitResult(frame, origin, moved, overlapping, group_column, dropped)


def sample_split(frame: pd.DataFrame, split: str, rows: int, seed: int) -> pd.DataFrame:
    """At most `rows` rows of one split, drawn with a fixed seed (all of them when there are fewer)."""
    part = frame[frame["split"] == split]
    return part.sample(n=min(rows, len(part)), random_state=seed) if len(part) > rows else part
