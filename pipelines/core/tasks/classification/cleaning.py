"""Text classification's cleaning: raw (text, label) rows become a clean dataset, every dropped row counted by its
reason."""

from __future__ import annotations

import pandas as pd

from pipelines.core.cleaning import (CleaningResult, column_text, control_character, dedup_key,
                                     escape_controls, normalise_text)
from pipelines.core.sections import CleaningConfig

# The order in which rows are dropped; a row is counted under the first reason that applies.
DROP_REASONS = ("empty_text", "missing_label", "control_characters", "too_long", "conflicting_labels",
                "exact_duplicate", "normalised_duplicate")
CLEAN_COLUMNS = ("text", "label", "norm_text", "source_file", "source_row")


def clean(examples: pd.DataFrame, cfg: CleaningConfig) -> CleaningResult:
    """Normalise texts and drop empty, unlabelled, over-long, conflicting and duplicate rows, and texts holding
    control characters (NUL, escape, C1: binary or mis-decoded data, never trained).

    When the source brings its own splits, duplicates are only dropped within a split: a text in two
    splits is leakage, which the quality checks report instead of hiding it.
    """
    rows_in = len(examples)
    frame = examples.copy()
    # pandas 3 stores a missing string as NaN: cell_text reads it as None (and bytes as UTF-8, never as b'...').
    texts = column_text(frame["text"], frame["source_file"], frame["source_row"], "text", "a text")
    # Found before normalising: collapsing white space would turn separators (U+001F, U+0085) into spaces.
    controls = pd.Series([t is not None and control_character(t) is not None for t in texts], index=frame.index)
    frame["text"] = pd.Series([None if t is None else normalise_text(t, cfg) for t in texts], index=frame.index,
                              dtype=object)
    frame["label"] = pd.Series(column_text(frame["label"], frame["source_file"], frame["source_row"], "label",
                                           "a label"), index=frame.index, dtype=object)
    frame["norm_text"] = [None if t is None else dedup_key(t) for t in frame["text"]]
    reason = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def mark(mask: pd.Series, why: str) -> None:
        reason[mask & reason.isna()] = why

    lengths = frame["text"].map(lambda t: 0 if t is None else len(t))
    mark(lengths < cfg.min_chars, "empty_text")
    mark(frame["label"].map(lambda v: v is None).astype(bool), "missing_label")
    mark(controls, "control_characters")
    mark(lengths > cfg.max_chars, "too_long")

    alive = reason.isna()
    group = ["norm_text", "source_split"] if "source_split" in frame.columns else ["norm_text"]
    # An official test split kept whole (cleaning.keep_source_test) loses no row to duplicates or conflicts.
    kept_whole = (frame["source_split"] == "test") if cfg.keep_source_test and "source_split" in frame.columns \
        else pd.Series(False, index=frame.index)
    if cfg.drop_conflicting:  # within a split, like duplicates: across splits it is leakage, for the checks
        labels_per_text = frame[alive].groupby(group)["label"].transform("nunique")
        mark(alive & ~kept_whole & (labels_per_text.reindex(frame.index) > 1), "conflicting_labels")
    if cfg.drop_duplicates:
        exact = ["text", "label"] + group[1:]
        alive = reason.isna()
        mark(alive & ~kept_whole & frame[alive].duplicated(subset=exact, keep="first")
             .reindex(frame.index, fill_value=False), "exact_duplicate")
        alive = reason.isna()
        mark(alive & ~kept_whole & frame[alive].duplicated(subset=group, keep="first")
             .reindex(frame.index, fill_value=False), "normalised_duplicate")

    dropped = {why: int((reason == why).sum()) for why in DROP_REASONS}
    examples_by_reason = {
        why: frame.loc[reason == why, ["text", "label", "source_file", "source_row"]]
        .head(5).astype(object).where(lambda f: f.notna(), None).to_dict("records")
        for why in DROP_REASONS if dropped[why]
    }
    if dropped["control_characters"]:  # the text as read, its control characters as escapes: a NUL does not show
        read = pd.Series(texts, index=frame.index, dtype=object)[reason == "control_characters"].head(5)
        for row, text in zip(examples_by_reason["control_characters"], read, strict=True):
            row["text"] = escape_controls(text)
    kept = frame[reason.isna()].reset_index(drop=True)
    columns = list(CLEAN_COLUMNS) + (["source_split"] if "source_split" in kept.columns else [])
    kept = kept[columns].astype({"text": str, "label": str, "norm_text": str})
    return CleaningResult(kept, rows_in, dropped, examples_by_reason)
