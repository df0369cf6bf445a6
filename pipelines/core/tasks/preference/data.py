"""Preference tuning's examples: pairs read from prompt / chosen / rejected columns (text, or conversations in the
chat format), cleaned, and the blocking checks on the cleaned pairs and on the rendered ones."""

from __future__ import annotations

import json
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import CleaningResult, cell_text_at, control_character, dedup_key, is_missing
from pipelines.core.errors import SourceError
from pipelines.core.quality import ERROR, QualityReport, check_def, evaluate_checks, lost_examples_check, with_row_id
from pipelines.core.tasks.instruction.data import _parse_messages
from pipelines.core.tasks.preference.config import PreferenceTaskConfig

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

# What the report holds, in the order the run summary prints them. preference_accuracy is the share of test pairs
# where the implicit reward (beta times the log-probability gain over the starting model) of the chosen answer is
# above the rejected one's; likelihood_accuracy is the share where the model's own log-probability ranks them so
# (the starting model has one too, so it compares every model).
REPORT_METRICS = ("preference_accuracy", "likelihood_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                  "exact_match", "mean_generated_tokens")
PRIMARY_METRICS = ("likelihood_accuracy", "preference_accuracy", "reward_margin", "exact_match")
DROP_REASONS = ("malformed_source_row", "control_characters", "too_long", "exact_duplicate")
PAIR_DROP_REASONS = ("generated_equals_chosen", "over_max_length")
EXAMPLE_COLUMNS = ("text", "chosen", "rejected", "problem", "total_tokens", "split", "source_file", "source_row")
CLEANED_CHECKS = ("pairs_are_complete", "chosen_differs_from_rejected", "row_count_within_bounds",
                  "cleaning_kept_most_rows")
SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty")
PAIRS_CHECKS = ("pairs_within_max_length", "pairs_have_two_answers")
DESCRIPTIONS = {
    "pairs_are_complete": "Every pair has a prompt and a chosen answer, and a rejected one unless the starting "
                          "model answers it (task.rejected_from).",
    "chosen_differs_from_rejected": "No pair's chosen answer is its rejected answer (nothing to prefer).",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "cleaning_kept_most_rows": "Cleaning dropped at most quality.max_lost_fraction of the source's distinct pairs.",
    "splits_do_not_overlap": "No prompt is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
    "pairs_within_max_length": "Rendered pairs fit training.max_length; few were dropped to get there.",
    "pairs_have_two_answers": "Every rendered pair has chosen and rejected tokens that differ, and train has pairs.",
}


def _answer(value: Any, file: str, row: int, column: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """A cell as (the conversation before the answer, the answer): a text cell has no conversation of its own; a
    chat-format cell's last message is the answer (it must be the assistant's)."""
    if isinstance(value, (list, np.ndarray)) or (isinstance(value, str) and value.lstrip().startswith("[{")):
        messages, problem = _parse_messages(value, file, row, column)
        if problem:
            raise SourceError(problem, file=file, row=row, column=column)
        if messages[-1]["role"] != "assistant":
            raise SourceError(f"the conversation ends with a {messages[-1]['role']} message; expected the "
                              "assistant's answer last", file=file, row=row, column=column)
        return messages[:-1], messages[-1]["content"]
    return None, cell_text_at(value, file, row, column, "an answer (text)")


def select_pairs(raw: pd.DataFrame, task: PreferenceTaskConfig) -> pd.DataFrame:
    """One pair per row: the prompt as chat messages (JSON), its user text, chosen and rejected answers (empty
    when missing), category and provenance. Structure errors name the file, row and column."""
    columns = set(raw.columns)
    files = raw["source_file"].astype(str).tolist()
    rows = raw["source_row"].astype("int64").tolist()
    if task.chosen_column not in columns:
        available = [c for c in raw.columns if not c.startswith("source_")]
        raise SourceError(f"has no column {task.chosen_column!r} (named by task.chosen_column); its columns are "
                          f"{available}", file=", ".join(sorted(set(files))) or None, column=task.chosen_column)
    prompts, texts, chosen, rejected, categories = [], [], [], [], []
    for n, (file, row) in enumerate(zip(files, rows, strict=True)):
        context, good = _answer(raw[task.chosen_column].iat[n], file, row, task.chosen_column)
        bad_context, bad = (_answer(raw[task.rejected_column].iat[n], file, row, task.rejected_column)
                            if task.rejected_column in columns and not _blank(raw[task.rejected_column].iat[n])
                            else (None, None))
        if task.prompt_column in columns and not _blank(raw[task.prompt_column].iat[n]):
            value = raw[task.prompt_column].iat[n]
            if isinstance(value, (list, np.ndarray)) or (isinstance(value, str) and value.lstrip().startswith("[{")):
                messages, problem = _parse_messages(value, file, row, task.prompt_column)
                if problem:
                    raise SourceError(problem, file=file, row=row, column=task.prompt_column)
            else:
                messages = [{"role": "user", "content": cell_text_at(value, file, row, task.prompt_column) or ""}]
        elif context is not None:
            messages = context
        elif task.prompt_column not in columns:
            raise SourceError(f"has no column {task.prompt_column!r} (named by task.prompt_column), and "
                              f"{task.chosen_column!r} holds text, not a conversation that carries its prompt",
                              file=file, row=row, column=task.prompt_column)
        else:
            messages = [{"role": "user", "content": ""}]
        if bad_context is not None and context is not None and bad_context != context:
            raise SourceError(f"the conversations in {task.chosen_column!r} and {task.rejected_column!r} differ "
                              "before their last message; a pair answers one prompt", file=file, row=row,
                              column=task.rejected_column)
        system = (cell_text_at(raw[task.system_column].iat[n], file, row, task.system_column)
                  if task.system_column in columns else None)
        if system and system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        prompts.append(json.dumps(messages, ensure_ascii=False))
        texts.append("\n".join(m["content"] for m in messages if m["role"] == "user"))
        chosen.append(good or "")
        rejected.append(bad or "")
        categories.append((cell_text_at(raw[task.category_column].iat[n], file, row, task.category_column,
                                        "a category") or "none") if task.category_column in columns else "all")
    frame = pd.DataFrame({"prompt_messages": pd.Series(prompts, dtype=object), "text": pd.Series(texts, dtype=object),
                          "chosen": pd.Series(chosen, dtype=object), "rejected": pd.Series(rejected, dtype=object),
                          "category": pd.Series(categories, dtype=object), "source_file": files, "source_row": rows})
    for extra in ("source_problem", "source_split"):
        if extra in columns:
            frame[extra] = pd.Series([None if is_missing(v) else str(v) for v in raw[extra]], dtype=object)
    return frame


def _blank(value: Any) -> bool:
    return not isinstance(value, (list, np.ndarray)) and (is_missing(value) or (isinstance(value, str)
                                                                               and not value.strip()))


def clean_pairs(pairs: pd.DataFrame, spec: SpecView) -> CleaningResult:
    """Normalise the texts; drop malformed source rows, texts with control characters, texts over
    cleaning.max_chars and exact duplicates, counting each. Empty sides and identical answers are kept for the
    checks to name (a pair that cannot teach anything is a data error, not noise)."""
    cfg = spec.cleaning
    frame = pairs.copy()
    reason = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def mark(mask: Any, why: str) -> None:
        mask = pd.Series(np.asarray(mask, dtype=bool), index=frame.index)
        reason[mask & reason.isna()] = why

    if "source_problem" in frame.columns:
        mark(frame["source_problem"].map(lambda v: v is not None and not is_missing(v)), "malformed_source_row")
    texts = {c: [str(v) for v in frame[c]] for c in ("text", "chosen", "rejected")}
    mark([any(control_character(texts[c][i]) for c in texts) for i in range(len(frame))], "control_characters")
    mark([max(len(texts[c][i]) for c in texts) > cfg.max_chars for i in range(len(frame))], "too_long")
    for column, values in texts.items():
        frame[column] = pd.Series([_normalise(v, cfg) for v in values], index=frame.index, dtype=object)
    messages = [json.loads(v) for v in frame["prompt_messages"]]
    for conversation in messages:
        for message in conversation:
            message["content"] = _normalise(message["content"] or "", cfg)
    frame["prompt_messages"] = pd.Series([json.dumps(m, ensure_ascii=False) for m in messages], index=frame.index,
                                         dtype=object)
    # The prompt key: splits keep a prompt in one split, and the splits check finds one that is in two.
    frame["norm_text"] = [prompt_key(p) for p in frame["prompt_messages"]]
    frame["norm_chosen"] = [dedup_key(t) for t in frame["chosen"]]
    frame["norm_rejected"] = [dedup_key(t) for t in frame["rejected"]]
    if cfg.drop_duplicates:
        key = ["prompt_messages", "chosen", "rejected"] + (["source_split"] if "source_split" in frame else [])
        alive = reason.isna()
        mark(alive & frame[alive].duplicated(subset=key).reindex(frame.index, fill_value=False), "exact_duplicate")
    dropped = {why: int((reason == why).sum()) for why in DROP_REASONS}
    shown = [c for c in ("text", "chosen", "rejected", "source_file", "source_row") if c in frame.columns]
    examples = {why: frame.loc[reason == why, shown].head(5).astype(object).to_dict("records")
                for why in DROP_REASONS if dropped[why]}
    columns = ["prompt_messages", "text", "chosen", "rejected", "category", "norm_text", "norm_chosen",
               "norm_rejected", "source_file", "source_row"] + (["source_split"] if "source_split" in frame else [])
    kept = frame.loc[reason.isna(), columns].reset_index(drop=True)
    return CleaningResult(kept, len(pairs), dropped, examples)


def _normalise(text: str, cfg: Any) -> str:
    """Texts keep their line breaks (a prompt's layout, an answer's steps): only the unicode form and the ends are
    normalised, as for instruction tuning's messages."""
    if cfg.unicode_normalization != "none":
        text = unicodedata.normalize(cfg.unicode_normalization, text)
    return text.strip() if cfg.collapse_whitespace else text


def prompt_key(prompt_messages: str) -> str:
    """The prompt as splits and duplicates judge it: every message's role and text, case and punctuation aside."""
    return "\x1f".join(f"{m['role']}:{dedup_key(m['content'] or '')}" for m in json.loads(prompt_messages))


def pair_keys(frame: pd.DataFrame) -> pd.Series:
    """One key per distinct pair (prompt, chosen, rejected), read or cleaned alike, for the share cleaning lost."""
    return pd.Series([f"{prompt_key(p)}\x1f{dedup_key(str(c))}\x1f{dedup_key(str(r))}" for p, c, r in
                      zip(frame["prompt_messages"], frame["chosen"], frame["rejected"], strict=True)], dtype=object)


def validate_cleaned_pairs(frame: pd.DataFrame, spec: SpecView, raw_data: pd.DataFrame | None = None
                           ) -> QualityReport:
    """The cleaned_dataset checks of a preference spec: complete pairs, different answers, size, losses."""
    import great_expectations.expectations as gxe

    q, task = spec.quality, spec.task
    rows = with_row_id(frame)
    generated = task.rejected_from == "starting_model"

    def missing(text: str, chosen: str, rejected: str) -> str | None:
        empty = [name for name, value in (("prompt", text), ("chosen", chosen)) if not value.strip()]
        if not generated and not rejected.strip():
            empty.append("rejected")
        return f"empty {' and '.join(empty)}" if empty else None

    rows["problem"] = pd.Series([missing(*v) for v in zip(rows["text"], rows["chosen"], rows["rejected"],
                                                           strict=True)], dtype=object)
    rows["same_answers"] = [bool(r) and c == r for c, r in zip(rows["norm_chosen"], rows["norm_rejected"],
                                                                  strict=True)]
    checks = [
        check_def("pairs_are_complete", DESCRIPTIONS["pairs_are_complete"],
                  "fill in or remove the listed rows (`problem` says which side is empty)" +
                  ("" if generated else ", or set task.rejected_from: starting_model to answer the missing "
                                        "rejected side with the starting model"),
                  (gxe.ExpectColumnValuesToBeNull(column="problem"), "rows", ERROR)),
        check_def("chosen_differs_from_rejected", DESCRIPTIONS["chosen_differs_from_rejected"],
                  "a pair whose two answers are the same text (case, spacing and punctuation aside) teaches "
                  "nothing: fix or remove the listed rows",
                  (gxe.ExpectColumnValuesToBeInSet(column="same_answers", value_set=[False]), "rows", ERROR)),
        check_def("row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
                  "provide more pairs, or change quality.min_rows / quality.max_rows",
                  (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)),
    ]
    tables = {"rows": rows}
    if raw_data is not None:
        selected = select_pairs(raw_data, task)
        lost, tables["lost"] = lost_examples_check(pair_keys(selected), pair_keys(frame), q.max_lost_fraction,
                                                   clean_pairs(selected, spec).dropped)
        checks.append(lost)
    return evaluate_checks("cleaned_dataset", checks, tables, EXAMPLE_COLUMNS)


def validate_pairs(frame: pd.DataFrame, spec: SpecView) -> QualityReport:
    """The preference_pairs checks: lengths within training.max_length with few pairs left out for it, and two
    different non-empty answers per usable pair (`left_out` names why a row is not used)."""
    import great_expectations.expectations as gxe

    max_length = spec.training.max_length
    rows_in, over_length = len(frame), int((frame["left_out"] == "over_max_length").sum())
    rows = with_row_id(frame[frame["left_out"].isna()])
    rows["same_answers"] = [c == r for c, r in zip(rows["chosen_rendered"], rows["rejected_rendered"], strict=True)]
    lost = pd.DataFrame([{"rows_in": rows_in, "over_max_length": over_length,
                          "share": over_length / max(rows_in, 1)}])
    train = pd.DataFrame({"train_pairs": [int((rows["split"] == "train").sum())]})
    checks = [
        check_def("pairs_within_max_length",
                  f"Every pair (prompt and its longer answer) has at most training.max_length ({max_length}) tokens, "
                  f"and at most task.max_overlength_fraction ({spec.task.max_overlength_fraction:g}) of the pairs "
                  "were dropped to get there.",
                  "raise training.max_length, shorten the long prompts or answers, or raise "
                  "task.max_overlength_fraction",
                  (gxe.ExpectColumnValuesToBeBetween(column="total_tokens", min_value=1, max_value=max_length),
                   "rows", ERROR),
                  (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=spec.task.max_overlength_fraction),
                   "lost", ERROR)),
        check_def("pairs_have_two_answers", DESCRIPTIONS["pairs_have_two_answers"],
                  "every pair needs a chosen and a different rejected answer after rendering; when the starting "
                  "model already gives the chosen answer everywhere there is nothing left to prefer",
                  (gxe.ExpectColumnValuesToBeBetween(column="chosen_tokens", min_value=1), "rows", ERROR),
                  (gxe.ExpectColumnValuesToBeBetween(column="rejected_tokens", min_value=1), "rows", ERROR),
                  (gxe.ExpectColumnValuesToBeInSet(column="same_answers", value_set=[False]), "rows", ERROR),
                  (gxe.ExpectColumnValuesToBeBetween(column="train_pairs", min_value=1), "train", ERROR)),
    ]
    return evaluate_checks("preference_pairs", checks, {"rows": rows, "lost": lost, "train": train},
                           EXAMPLE_COLUMNS)
