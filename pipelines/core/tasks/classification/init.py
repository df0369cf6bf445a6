"""How `tuneline init` proposes a text classification spec: a text column and a label column with few distinct
values, the default TREC recipe (pipelines/specs/trec_questions.yaml) adapted to the data's lengths and labels,
and the warnings that matter before training (tiny classes, imbalance, label variants)."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipelines.core.cleaning import NotText, dedup_key
from pipelines.core.columns import ColumnProfile, TaskChoice, Undecided, by_name, quantile, text_lengths
from pipelines.core.errors import InitError
from pipelines.core.markdown import wrap_words
from pipelines.core.tasks.classification.config import LABEL_CONTROL
from pipelines.core.tasks.classification.data import read_label

NAME = "text_classification"
TEXT_NAMES = ("text", "sentence", "question", "utterance", "review", "content", "body", "message", "comment",
              "query", "document", "title", "tweet", "description", "abstract", "input")
LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "sentiment", "topic", "tag", "y")
FEW_ROWS_PER_CLASS = 10  # a class with fewer rows is warned about (task.min_rows_per_class blocks below it)
PROMPTING_MAX_LABELS = 20  # more labels make the prompting baseline's few-shot prompt long and slow
CANDIDATES = [{"source": "catalog", "id": "all-MiniLM-L6-v2"}, {"source": "catalog", "id": "SmolLM2-135M-Instruct"}]


def natural(labels: Sequence[str]) -> list[str]:
    """Labels sorted as people read them: 2 before 10 when they are numbers."""
    return sorted(labels, key=lambda s: (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s))


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


class ClassificationStarter:
    """Text classification from a text column and a label column."""

    priority = 100  # the most permissive guess: asked last
    column_fields = ("text_column", "label_column")
    expects = "a text column and a label column with few distinct values (name them with --column " \
              "text_column=NAME and --column label_column=NAME)"

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        names = {p.name: p for p in profiles}
        text_column, label_column = given.get("text_column"), given.get("label_column")
        label = names[label_column] if label_column else self._label_column(profiles, exclude=text_column)
        text = names[text_column] if text_column else self._text_column(profiles, exclude=label.name)
        if text.name == label.name:
            raise InitError(f"the text column and the label column are both {text.name!r}; name two columns with "
                            "--column text_column=NAME and --column label_column=NAME")
        how = ("both given" if text_column and label_column else "text column given, label inferred" if text_column
               else "label column given, text inferred" if label_column else "inferred")
        return TaskChoice(NAME, {"text_column": text.name, "label_column": label.name},
                          f"text column {text.name!r} and label column {label.name!r} ({label.distinct:,} distinct "
                          f"values in {label.values:,} rows), {how}")

    @staticmethod
    def _label_column(profiles: Sequence[ColumnProfile], exclude: str | None) -> ColumnProfile:
        candidates = [p for p in profiles if p.label_like() and p.name != exclude]
        lower = by_name(candidates)
        for name in LABEL_NAMES:
            if name in lower:
                return lower[name]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            single = next((p for p in profiles if p.scalar and p.distinct == 1 and p.name != exclude
                           and p.name.strip().lower() in LABEL_NAMES), None)
            if single is not None:
                raise InitError(f"the column {single.name!r} has one value in all {single.values:,} rows: "
                                "classification needs at least 2 labels (add rows of the other classes)")
            raise Undecided("no column has few distinct values (a label column repeats a few values over many rows)")
        named = ", ".join(repr(p.name) for p in candidates)
        raise Undecided(f"several columns could be the label ({named}), none named like one (label, category, class, "
                        "intent, target, ...)")

    @staticmethod
    def _text_column(profiles: Sequence[ColumnProfile], exclude: str) -> ColumnProfile:
        candidates = [p for p in profiles if p.text_like() and p.name != exclude and not p.messages]
        named = [p for p in candidates if p.name.lower() in TEXT_NAMES]
        pool = named or [p for p in candidates if not p.label_like()]
        if not pool:
            raise Undecided(f"no column besides the label {exclude!r} holds text")
        return max(pool, key=lambda p: p.mean_chars)

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        text, label = choice.columns["text_column"], choice.columns["label_column"]
        found = set()
        for value in frame[label]:
            with contextlib.suppress(NotText):  # a cell that is not text: cleaning names its row
                found.add(read_label(value))
        broken = sorted(v for v in found - {None} if re.search(LABEL_CONTROL, v))
        if broken:
            notes.append(f"left out of task.labels: {', '.join(repr(v) for v in broken[:5])} (a line break, tab or "
                         "control character in a label: labels_are_plain_text blocks training until the source is "
                         "corrected)")
        labels = natural(sorted(found - {None} - set(broken)))
        if len(labels) < 2:
            raise InitError(f"{source['path']}: the label column {label!r} has "
                            f"{'only the label ' + repr(labels[0]) if labels else 'no labels'}: classification needs "
                            "at least 2 labels (add rows of the other classes, or name another column with "
                            "--column label_column=NAME)")
        lengths = text_lengths(frame, text)
        longest = quantile(lengths, 0.995)
        max_chars = 500 if longest <= 500 else _round_up(longest, 500)
        if max_chars > 500:
            notes.append(f"cleaning.max_chars is {max_chars} (99.5% of the texts are at most {longest:.0f} "
                         "characters)")
        typical = quantile(lengths, 0.95)
        max_length = 64 if typical <= 256 else 128 if typical <= 512 else 256
        if max_length > 64:
            notes.append(f"training.max_length is {max_length} tokens (95% of the texts have up to {typical:.0f} "
                         "characters); longer inputs are truncated")
        cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "collapse_whitespace": True,
                                    "drop_duplicates": True, "drop_conflicting": True,
                                    "min_chars": 3 if min((n for n in lengths if n), default=0) >= 3 else 1,
                                    "max_chars": max_chars}
        if "test" in own_splits:
            cleaning["keep_source_test"] = True
        baselines = ["majority_class", "linear_probe"]
        if len(labels) <= PROMPTING_MAX_LABELS:
            baselines.append("prompting")
        else:
            notes.append(f"no prompting baseline: with {len(labels)} labels its few-shot prompt would be long and "
                         "slow (add `prompting` to evaluation.baselines to try it)")
        evaluation: dict[str, Any] = {"baselines": baselines, "primary_metric": "macro_f1", "batch_size": 128}
        if "prompting" in baselines:
            evaluation["prompting"] = {"shots": [0, 1]}
        return {
            "description": f"Classify the texts of {data_name} (column {text}) into {len(labels)} labels "
                           f"(column {label}) by fine-tuning a small pre-trained model with LoRA "
                           "(written by tuneline init; say here what the model is for).",
            "task": {"type": NAME, "text_column": text, "label_column": label, "labels": labels,
                     "pooling": "auto", "head_learning_rate": 2.0e-4, "head_init": "linear_probe",
                     "min_rows_per_class": 5, "max_imbalance_ratio": 20.0, "max_text_chars": max(2000, max_chars),
                     "doctor": {"model": {"source": "catalog", "id": "all-MiniLM-L6-v2"},
                                "max_suspect_fraction": 0.1}},
            "cleaning": cleaning,
            "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": True},
            "quality": {"min_rows": 50},
            "base_model": {"candidates": CANDIDATES,
                           "allowed_licenses": ["apache-2.0", "mit", "bsd-3-clause"], "max_parameters": 1000000000,
                           "memory_budget_mb": 16000, "max_train_minutes": 60, "trust_remote_code": False,
                           "allow_pickle_weights": False,
                           "probe": {"sample_rows": 1024, "time_budget_seconds": 180, "timed_steps": 3}},
            "training": {"epochs": 4, "batch_size": 64, "learning_rate": 2.0e-3,
                         "weight_decay": 0.01, "warmup_fraction": 0.06, "max_length": max_length, "precision": "auto",
                         "group_by_length": True, "seed": 13,
                         "lora": {"r": 32, "alpha": 64, "dropout": 0.0, "top_layers": 4,
                                  "target_modules": ["query", "key", "value", "dense", "q_proj", "k_proj", "v_proj",
                                                     "o_proj", "gate_proj", "up_proj", "down_proj"]}},
            "evaluation": evaluation,
            "promotion": {"min_improvement": 0.005},
            "schedule": {"cron": "0 3 * * 1", "timezone": "UTC", "enabled": False},
            "retrain_on_new_data": False,
        }

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        return (f" `labels` lists the {len(sections['task']['labels'])} labels found (smallest class: "
                f"{min(counts.values(), default=0)} rows); a row with any other label blocks training "
                "(labels_are_known). Check the list is complete. Below the columns come the method's own settings: "
                "the classifier head (its learning rate, starting from a linear probe), the class-balance and "
                "text-length checks, and `doctor`, a warning check (it never blocks) that lists rows whose label is "
                "probably wrong, near-duplicate texts under different labels, and whether more data would help.")

    def judge(self, spec: Any, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        task = spec.task
        smallest = min(counts, key=lambda k: (counts[k], k))
        largest = max(counts.values())
        tiny = sorted((k for k, n in counts.items() if n < FEW_ROWS_PER_CLASS), key=lambda k: (counts[k], k))
        blocking = [k for k in tiny if counts[k] < task.min_rows_per_class]
        if blocking:
            warnings.append(f"{len(blocking)} class(es) have fewer than task.min_rows_per_class "
                            f"({task.min_rows_per_class}) rows and will block training (classes_are_balanced): "
                            + ", ".join(f"{k} ({counts[k]})" for k in blocking[:10]))
        elif tiny:
            warnings.append(f"{len(tiny)} class(es) have fewer than {FEW_ROWS_PER_CLASS} rows, too few to learn or "
                            "judge well: " + ", ".join(f"{k} ({counts[k]})" for k in tiny[:10]))
        if counts[smallest] and largest / counts[smallest] > task.max_imbalance_ratio:
            warnings.append(f"the labels are very imbalanced: the largest class has {largest / counts[smallest]:.0f}x "
                            f"the rows of the smallest ({smallest}, {counts[smallest]}); classes_are_balanced will "
                            "warn, and macro_f1 weighs every class equally")
        variants: dict[str, list[str]] = {}
        for label in counts:
            variants.setdefault(dedup_key(label), []).append(label)
        for group in (g for g in variants.values() if len(g) > 1):
            warnings.append(f"labels {', '.join(repr(v) for v in sorted(group))} differ only in case, spacing or "
                            "punctuation: labels_are_distinct will block training; merge them in the data")
        table = splits.class_table()
        missing_rows = [str(k) for k, row in table.iterrows() if row["train"] == 0 or row["test"] == 0]
        if missing_rows:
            warnings.append(f"{len(missing_rows)} class(es) have no row in train or in test "
                            f"(every_class_in_train_and_test will block training): {', '.join(missing_rows[:10])}")
        checklist.append(f"the label column is {task.label_column!r} ({len(counts)} labels) and the text column "
                         f"{task.text_column!r}; if not, run init again with --column text_column=NAME / "
                         "--column label_column=NAME")
        checklist.append(f"the smallest class, {smallest!r}, has {counts[smallest]} rows after cleaning; the largest "
                         f"{largest}")
        checklist.append("task.labels is the whole label set you expect (new labels in later data will block "
                         "training)")
        if "prompting" in spec.evaluation.baselines:
            checklist.append("task.label_names: words the prompted model can read for each label (e.g. "
                             f"{next(iter(counts))}: ...); labels not listed are shown as they are")

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [f"labels:     {len(ordered)} classes, most rows first:",
                *[f"  {line}" for line in wrap_words([f"{k} {n:,}," for k, n in ordered[:-1]]
                                                   + [f"{k} {n:,}" for k, n in ordered[-1:]], 110)]]
