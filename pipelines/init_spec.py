"""`tuneline init DATA`: a first spec for a data file or folder, inferred from its columns.

The data is read exactly as the pipeline's raw_data asset will read it (pipelines.core.sources), the task is
inferred from the columns, the sections copy the default specs' recipes (pipelines/specs/trec_questions.yaml for
text classification, pipelines/specs/chatterbot_instruct.yaml for instruction tuning) with what depends on the
data adapted, and the file is written with a comment on every section, after the project's own loader has
validated it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipelines.core.cleaning import dedup_key, is_missing
from pipelines.core.errors import SourceError, SpecError, TunelineError
from pipelines.core.files import write_bytes_atomic
from pipelines.core.sections import LocalSourceConfig
from pipelines.core.sources import DATA_EXTENSIONS, PROVENANCE_COLUMNS, SPLIT_ALIASES, read_source
from pipelines.core.spec import PIPELINE_NAME, PipelineSpec, parse_spec
from pipelines.core.splitting import SPLITS, assign_splits
from pipelines.core.tasks import task_for
from pipelines.core.tasks.classification import ClassificationTask
from pipelines.core.tasks.instruction import InstructionTuningTask

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What `init` reads: the formats the source readers know, plus .tsv (read as CSV: the delimiter is detected).
INIT_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
NOT_DATA_COLUMNS = {*PROVENANCE_COLUMNS, "source_problem"}
TEXT_NAMES = ("text", "sentence", "question", "utterance", "review", "content", "body", "message", "comment",
              "query", "document", "title", "tweet", "description", "abstract", "input")
LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "sentiment", "topic", "tag", "y")
# Instruction/response column pairs, in order of preference (names compared in lower case).
PAIRS = (("instruction", "response"), ("instruction", "output"), ("instruction", "completion"),
         ("instruction", "answer"), ("prompt", "completion"), ("prompt", "response"), ("prompt", "answer"),
         ("question", "answer"), ("query", "response"), ("query", "answer"), ("input", "output"),
         ("input", "response"))
CATEGORY_NAMES = ("category", "topic", "domain", "task", "type", "source")
SPLIT_COLUMN_NAMES = ("split", "subset", "partition", "part", "fold")  # looked at first
EXPECTED = ("a text column and a label column with few distinct values (say which with --text-column and "
            "--label-column), instruction/response columns (or prompt/completion, question/answer, input/output), "
            "or a `messages` column (a list of {role, content})")
FEW_ROWS_PER_CLASS = 10  # a class with fewer rows is warned about (quality.min_rows_per_class blocks below 5)
INSTRUCTION_LENGTHS = (256, 512, 1024, 2048, 4096)  # training.max_length init may choose for instruction tuning
MAX_OVERLENGTH_FRACTION = 0.05  # the quality.max_overlength_fraction init writes
PROMPTING_MAX_LABELS = 20  # more labels make the prompting baseline's few-shot prompt long and slow


class InitError(TunelineError):
    """`tuneline init` cannot write a spec for the data it was given (names the file and what was expected)."""


# ------------------------------------------------------------------------------------------------ the data
@dataclass(frozen=True)
class SourcePlan:
    """How the spec will read the data: its source section, and what the choice means."""

    source: dict[str, Any]
    files: tuple[Path, ...]
    official: dict[str, str]  # split -> file name, when the data brings its own splits as files
    notes: tuple[str, ...] = ()
    own_splits: tuple[str, ...] = ()  # the splits the data brings (as files or in a split column)


def spec_path_of(data: Path, project_root: Path) -> str:
    """The data's path as the spec writes it: relative to the project root when inside it, else absolute (a
    relative source.path is taken from the project root, so the spec works from there whatever the cwd)."""
    absolute = Path(os.path.abspath(data))
    try:
        return absolute.relative_to(project_root.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def _split_of(path: Path) -> str | None:
    """The official split a file's name says it holds: train.csv, dev.jsonl, banking_test.csv, ..."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    last = re.split(r"[._\-\s]+", stem.lower())[-1]
    return SPLIT_ALIASES.get(last)


def plan_source(data: Path, project_root: Path) -> SourcePlan:
    """The source section for a data file or folder; official split files are kept as `split_files`."""
    if not data.exists():
        raise InitError(f"{data}: no such file or folder (expected a CSV, TSV, JSONL, JSON-lines or Parquet file, "
                        "or a folder of such files)")
    where = spec_path_of(data, project_root)
    if data.is_file():
        fmt = INIT_FORMATS.get(data.suffix.lower())
        if fmt is None:
            raise InitError(f"{data}: cannot tell the format from the extension {data.suffix!r}; expected one of "
                            f"{sorted(INIT_FORMATS)}")
        source: dict[str, Any] = {"kind": "local", "path": where}
        if DATA_EXTENSIONS.get(data.suffix.lower()) != fmt:  # .tsv: the CSV reader, which detects the tab
            source["format"] = fmt
        return SourcePlan(source, (data,), {})
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in INIT_FORMATS)
    if not files:
        raise InitError(f"{data}: the folder has no data files (expected {sorted(INIT_FORMATS)})")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        split = _split_of(path)
        if split is not None:
            by_split.setdefault(split, []).append(path)
    twice = {s: ps for s, ps in by_split.items() if len(ps) > 1}
    if twice:
        split, paths = min(twice.items())
        raise InitError(f"{data}: {len(paths)} files name the {split} split ({', '.join(p.name for p in paths)}); "
                        "keep one, or run init on one file")
    formats = {INIT_FORMATS[p.suffix.lower()] for p in files}
    tsv = any(p.suffix.lower() == ".tsv" for p in files)
    if tsv and formats != {"csv"}:
        raise InitError(f"{data}: mixes .tsv files with other formats ({', '.join(p.name for p in files)}); a "
                        "source has one format: keep the .tsv files with .csv ones only")
    notes: list[str] = []
    if "train" in by_split:
        official = {s: by_split[s][0].name for s in SPLITS if s in by_split}
        source = {"kind": "local", "path": where, **({"format": "csv"} if tsv else {}), "split_files": official}
        used = {by_split[s][0] for s in official}
        unused = [p.name for p in files if p not in used]
        if unused:
            notes.append(f"not read: {', '.join(unused)} (only the split files {', '.join(official.values())} are)")
        return SourcePlan(source, tuple(sorted(used)), official, tuple(notes), tuple(official))
    if by_split:
        notes.append(f"{', '.join(p.name for ps in by_split.values() for p in ps)} name(s) a split, but "
                     "source.split_files needs a train file: every file is read and split by hash instead")
    if tsv:  # without split_files the folder reader lists only .csv/.jsonl/.json/.parquet files
        raise InitError(f"{data}: a folder of .tsv files is read only with official split files (train.tsv, "
                        "test.tsv, ...); rename the files to .csv (the delimiter is detected), or run init on one file")
    return SourcePlan({"kind": "local", "path": where}, tuple(files), {}, tuple(notes))


def read_data(plan: SourcePlan, project_root: Path, data: Path) -> pd.DataFrame:
    """The rows as the raw_data asset will read them."""
    try:
        frame, _ = read_source(LocalSourceConfig.model_validate(plan.source), project_root)
    except SourceError as exc:
        raise InitError(f"{data}: cannot be read as the pipeline would read it: {exc}") from None
    return frame


# ------------------------------------------------------------------------------------------ the columns
@dataclass(frozen=True)
class ColumnProfile:
    """What a column holds, as far as choosing the task's columns goes."""

    name: str
    values: int  # non-missing values
    distinct: int
    strings: bool  # every value is a string
    scalar: bool  # every value is a string, a whole number or a boolean (it could be a label)
    mean_chars: float
    wordy: float  # share of values with a letter in them
    messages: bool  # values are conversations: lists of {role, content}

    def label_like(self) -> bool:
        return self.scalar and self.distinct >= 2 and self.distinct * 3 <= self.values and self.mean_chars <= 100

    def text_like(self) -> bool:
        return self.strings and self.values > 0 and self.wordy >= 0.5

    def describe(self) -> str:
        kind = ("messages" if self.messages else "text" if self.strings else "values" if self.scalar else "other")
        return f"{self.name!r} ({kind}, {self.distinct:,} distinct of {self.values:,})"


def _is_messages(value: Any) -> bool:
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    if hasattr(value, "tolist"):
        value = value.tolist()
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def profile_columns(frame: pd.DataFrame) -> list[ColumnProfile]:
    """A profile of every data column (provenance columns left out), in the file's order."""
    profiles = []
    for name in frame.columns:
        if name in NOT_DATA_COLUMNS:
            continue
        values = [v for v in frame[name].tolist() if not _missing(v)]
        strings = bool(values) and all(isinstance(v, str) for v in values)
        scalar = bool(values) and all(isinstance(v, str | bool | int) or (isinstance(v, float) and v.is_integer())
                                      for v in values)
        shown = [_label_text(v) for v in values] if scalar else [str(v) for v in values]
        sample = values[:200]
        profiles.append(ColumnProfile(
            name=str(name), values=len(values), distinct=len(set(shown)), strings=strings, scalar=scalar,
            mean_chars=sum(map(len, shown)) / len(shown) if shown else 0.0,
            wordy=sum(1 for s in shown if re.search(r"[^\W\d_]", s)) / len(shown) if shown else 0.0,
            messages=bool(sample) and sum(map(_is_messages, sample)) >= 0.9 * len(sample)))
    return profiles


def _missing(value: Any) -> bool:
    return not isinstance(value, list | dict) and not hasattr(value, "tolist") and is_missing(value)


def _label_text(value: Any) -> str:
    """A label exactly as the classification task reads it (select_examples: the value as text, stripped), so that
    task.labels matches what labels_are_known will see."""
    return str(value).strip()


@dataclass(frozen=True)
class TaskChoice:
    """The task inferred from the columns, and the columns it reads."""

    kind: str  # "classification" or "instruction"
    columns: dict[str, str]  # the task section's column fields
    reason: str


def _by_name(profiles: Sequence[ColumnProfile]) -> dict[str, ColumnProfile]:
    return {p.name.lower(): p for p in profiles}


def _undecided(data: Path, profiles: Sequence[ColumnProfile], why: str) -> InitError:
    found = ", ".join(p.describe() for p in profiles) or "none"
    return InitError(f"{data}: cannot tell what to learn from its columns: {why}. Columns found: {found}. "
                     f"Expected {EXPECTED}")


def choose_task(profiles: Sequence[ColumnProfile], data: Path, text_column: str | None = None,
                label_column: str | None = None) -> TaskChoice:
    """Instruction tuning for a messages column or an instruction/response pair, else text classification from
    a text column and a label column; `text_column` / `label_column` say them outright."""
    names = {p.name: p for p in profiles}
    for given, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if given is not None and given not in names:
            raise InitError(f"{data}: has no column {given!r} (given by {option}); its columns are "
                            f"{[p.name for p in profiles]}")
    if text_column is None and label_column is None:
        choice = _instruction_columns(profiles)
        if choice is not None:
            return choice
    label = names[label_column] if label_column else _label_column(profiles, data, exclude=text_column)
    text = names[text_column] if text_column else _text_column(profiles, data, exclude=label.name)
    if text.name == label.name:
        raise InitError(f"{data}: the text column and the label column are both {text.name!r}; name two columns "
                        "with --text-column and --label-column")
    how = ("both given" if text_column and label_column else "text column given, label inferred" if text_column
           else "label column given, text inferred" if label_column else "inferred")
    return TaskChoice("classification", {"text_column": text.name, "label_column": label.name},
                      f"text column {text.name!r} and label column {label.name!r} ({label.distinct:,} distinct "
                      f"values in {label.values:,} rows), {how}")


def _instruction_columns(profiles: Sequence[ColumnProfile]) -> TaskChoice | None:
    lower = _by_name(profiles)
    messages = next((p for p in profiles if p.messages), None)
    if messages is not None:
        return TaskChoice("instruction", {"messages_column": messages.name, **_category(profiles, {messages.name})},
                          f"column {messages.name!r} holds conversations (lists of {{role, content}})")
    for instruction_name, response_name in PAIRS:
        instruction, response = lower.get(instruction_name), lower.get(response_name)
        if instruction is None or response is None or not (instruction.strings and response.strings):
            continue
        if response.label_like():  # few distinct answers: a label, not a response to learn
            continue
        columns = {"instruction_column": instruction.name, "response_column": response.name}
        present = {p.name for p in profiles}
        extra = lower.get("input")
        if extra is not None and extra.name != instruction.name:
            columns["input_column"] = extra.name  # Alpaca style: appended to the instruction after a blank line
        elif "input" in present:
            # The default input_column, `input`, is the instruction itself here: name a column the data lacks, or
            # each instruction would be appended to itself.
            columns["input_column"] = next(n for n in ("extra_input", "input_extra", "more_input") if n not in present)
        system = lower.get("system")
        if system is not None:
            columns["system_column"] = system.name
        columns.update(_category(profiles, {instruction.name, response.name}))
        return TaskChoice("instruction", columns,
                          f"instruction column {instruction.name!r} and response column {response.name!r}")
    return None


def _category(profiles: Sequence[ColumnProfile], used: set[str]) -> dict[str, str]:
    lower = _by_name(profiles)
    for name in CATEGORY_NAMES:
        column = lower.get(name)
        if column is not None and column.name not in used and column.label_like():
            return {"category_column": column.name}
    return {}


def _label_column(profiles: Sequence[ColumnProfile], data: Path, exclude: str | None) -> ColumnProfile:
    candidates = [p for p in profiles if p.label_like() and p.name != exclude]
    lower = _by_name(candidates)
    for name in LABEL_NAMES:
        if name in lower:
            return lower[name]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        single = next((p for p in profiles if p.scalar and p.distinct == 1 and p.name != exclude
                       and p.name.strip().lower() in LABEL_NAMES), None)
        if single is not None:
            raise InitError(f"{data}: the column {single.name!r} has one value in all {single.values:,} rows: "
                            "classification needs at least 2 labels (add rows of the other classes)")
        raise _undecided(data, profiles, "no column has few distinct values (a label column repeats a few "
                                         "values over many rows)")
    named = ", ".join(repr(p.name) for p in candidates)
    raise _undecided(data, profiles, f"several columns could be the label ({named}), none named like one (label, "
                                     "category, class, intent, target, ...)")


def _text_column(profiles: Sequence[ColumnProfile], data: Path, exclude: str) -> ColumnProfile:
    candidates = [p for p in profiles if p.text_like() and p.name != exclude and not p.messages]
    named = [p for p in candidates if p.name.lower() in TEXT_NAMES]
    pool = named or [p for p in candidates if not p.label_like()]
    if not pool:
        raise _undecided(data, profiles, f"no column besides the label {exclude!r} holds text")
    return max(pool, key=lambda p: p.mean_chars)


# -------------------------------------------------------------------------------------------- the spec
CLASSIFICATION_CANDIDATES = [{"source": "catalog", "id": "all-MiniLM-L6-v2"},
                             {"source": "catalog", "id": "SmolLM2-135M-Instruct"}]
INSTRUCTION_CANDIDATES = [{"source": "catalog", "id": "SmolLM2-135M-Instruct"}]


def _quantile(lengths: Sequence[int], q: float) -> float:
    return float(pd.Series(lengths, dtype=float).quantile(q)) if len(lengths) else 0.0


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def _natural(labels: Sequence[str]) -> list[str]:
    """Labels sorted as people read them: 2 before 10 when they are numbers."""
    return sorted(labels, key=lambda s: (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s))


def _text_lengths(frame: pd.DataFrame, column: str) -> list[int]:
    return [len(" ".join(str(v).split())) for v in frame[column] if not _missing(v)]


def _classification_sections(frame: pd.DataFrame, choice: TaskChoice, plan: SourcePlan,
                             notes: list[str]) -> dict[str, Any]:
    text, label = choice.columns["text_column"], choice.columns["label_column"]
    labels = _natural(sorted({_label_text(v) for v in frame[label] if not _missing(v)} - {""}))
    if len(labels) < 2:
        raise InitError(f"{plan.source['path']}: the label column {label!r} has "
                        f"{'only the label ' + repr(labels[0]) if labels else 'no labels'}: classification needs at "
                        "least 2 labels (add rows of the other classes, or name another column with --label-column)")
    lengths = _text_lengths(frame, text)
    longest = _quantile(lengths, 0.995)
    max_chars = 500 if longest <= 500 else _round_up(longest, 500)
    if max_chars > 500:
        notes.append(f"cleaning.max_chars is {max_chars} (99.5% of the texts are at most {longest:.0f} characters)")
    typical = _quantile(lengths, 0.95)
    max_length = 64 if typical <= 256 else 128 if typical <= 512 else 256
    if max_length > 64:
        notes.append(f"training.max_length is {max_length} tokens (95% of the texts have up to {typical:.0f} "
                     "characters); longer inputs are truncated")
    cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "collapse_whitespace": True, "drop_duplicates": True,
                                "drop_conflicting": True, "min_chars": 3 if min((n for n in lengths if n), default=0) >= 3 else 1,
                                "max_chars": max_chars}
    if "test" in plan.own_splits:
        cleaning["keep_source_test"] = True
    baselines = ["majority_class", "linear_probe"]
    if len(labels) <= PROMPTING_MAX_LABELS:
        baselines.append("prompting")
    else:
        notes.append(f"no prompting baseline: with {len(labels)} labels its few-shot prompt would be long and slow "
                     f"(add `prompting` to evaluation.baselines to try it)")
    evaluation: dict[str, Any] = {"baselines": baselines, "primary_metric": "macro_f1", "batch_size": 128}
    if "prompting" in baselines:
        evaluation["prompting"] = {"shots": [0, 1]}
    return {
        "description": f"Classify the texts of {_data_name(plan)} (column {text}) into {len(labels)} labels "
                       f"(column {label}) by fine-tuning a small pre-trained model with LoRA "
                       "(written by tuneline init; say here what the model is for).",
        "task": {"type": ClassificationTask.name, "text_column": text, "label_column": label, "labels": labels},
        "cleaning": cleaning,
        "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": True},
        "quality": {"min_rows": 50, "min_rows_per_class": 5, "max_text_chars": max(2000, max_chars),
                    "max_imbalance_ratio": 20.0},
        "base_model": {"candidates": CLASSIFICATION_CANDIDATES, "pooling": "auto",
                       "allowed_licenses": ["apache-2.0", "mit", "bsd-3-clause"], "max_parameters": 1000000000,
                       "memory_budget_mb": 16000, "max_train_minutes": 60, "trust_remote_code": False,
                       "allow_pickle_weights": False,
                       "probe": {"sample_rows": 256, "time_budget_seconds": 180, "timed_steps": 3}},
        "training": {"epochs": 4, "batch_size": 64, "learning_rate": 2.0e-3, "head_learning_rate": 2.0e-4,
                     "weight_decay": 0.01, "warmup_fraction": 0.06, "max_length": max_length, "precision": "auto",
                     "group_by_length": True, "head_init": "linear_probe", "seed": 13,
                     "lora": {"r": 32, "alpha": 64, "dropout": 0.0, "top_layers": 4,
                              "target_modules": ["query", "key", "value", "dense", "q_proj", "k_proj", "v_proj",
                                                 "o_proj", "gate_proj", "up_proj", "down_proj"]}},
        "evaluation": evaluation,
        "doctor": {"model": {"source": "catalog", "id": "all-MiniLM-L6-v2"}, "max_suspect_fraction": 0.1},
        "promotion": {"min_improvement": 0.005},
        "schedule": {"cron": "0 3 * * 1", "timezone": "UTC", "enabled": False},
        "retrain_on_new_data": False,
    }


def _instruction_sections(frame: pd.DataFrame, choice: TaskChoice, plan: SourcePlan,
                          notes: list[str]) -> dict[str, Any]:
    columns = choice.columns
    if "messages_column" in columns:
        pairs = [_conversation_chars(v) for v in frame[columns["messages_column"]] if not _missing(v)]
        prompt_chars, response_chars = [p for p, _ in pairs], [r for _, r in pairs]
    else:
        prompt_chars = _text_lengths(frame, columns["instruction_column"])
        response_chars = _text_lengths(frame, columns["response_column"])
    both = [p + r for p, r in zip(prompt_chars, response_chars, strict=False)]
    # About 3.5 characters a token for English, plus the chat template's own tokens. rendered_dataset blocks training
    # when more than quality.max_overlength_fraction (5%) of the examples are over max_length: the length is
    # chosen so that about 2% are, by this estimate.
    tokens = _quantile(both, 0.98) / 3.5 + 24
    max_length = next((n for n in INSTRUCTION_LENGTHS if tokens <= n), INSTRUCTION_LENGTHS[-1])
    over = sum(n / 3.5 + 24 > max_length for n in both) / max(len(both), 1)
    if over > MAX_OVERLENGTH_FRACTION:
        notes.append(f"about {over:.0%} of the examples need more than {max_length} tokens, the most init chooses: "
                     "they will be dropped, and rendered_lengths_within_max_length blocks training when more than "
                     f"quality.max_overlength_fraction ({MAX_OVERLENGTH_FRACTION:.0%}) are; shorten the long "
                     "conversations, or raise "
                     "training.max_length (up to the model's context) or that fraction")
    elif max_length > 256:
        notes.append(f"training.max_length is {max_length} tokens (98% of the examples need about "
                     f"{tokens:.0f}); longer ones are dropped (task.overlength)")
    answer = _quantile(response_chars, 0.9) / 3.5
    max_new_tokens = 48 if answer <= 48 else min(256, 2 ** math.ceil(math.log2(answer)))
    longest = _quantile([max(p, r) for p, r in zip(prompt_chars, response_chars, strict=False)], 0.995)
    max_chars = 2000 if longest <= 2000 else _round_up(longest, 1000)
    task: dict[str, Any] = {"type": InstructionTuningTask.name, **columns, "overlength": "drop"}
    cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "drop_duplicates": True, "min_chars": 1,
                                "max_chars": max_chars}
    if "test" in plan.own_splits:
        cleaning["keep_source_test"] = True
    return {
        "description": f"Teach a small chat model to answer like the responses of {_data_name(plan)}, with LoRA, "
                       "formatted by the chat template of the model (written by tuneline init; say here what the "
                       "model is for).",
        "task": task,
        "cleaning": cleaning,
        "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": True},
        "quality": {"min_rows": 50, "split_tolerance": 0.08, "max_overlength_fraction": MAX_OVERLENGTH_FRACTION},
        "base_model": {"candidates": INSTRUCTION_CANDIDATES, "allowed_licenses": ["apache-2.0", "mit"]},
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 1.0e-3, "weight_decay": 0.0,
                     "warmup_fraction": 0.05, "max_length": max_length, "precision": "auto", "group_by_length": True,
                     "seed": 13, "logging_steps": 20, "padding_free": True,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]}},
        "evaluation": {"baselines": ["base_model", "prompting"], "primary_metric": "rouge_l", "batch_size": 16,
                       "max_new_tokens": max_new_tokens, "sample_generations": 10, "prompting": {"shots": [0, 2]}},
        "promotion": {"min_improvement": 0.005},
        "schedule": {"cron": "0 4 * * 1", "timezone": "UTC", "enabled": False},
        "retrain_on_new_data": False,
    }


def _conversation_chars(value: Any) -> tuple[int, int]:
    """Characters of a conversation's prompt (every message but the last) and of its response (the last)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return 0, 0  # not a conversation: `tuneline check` names the row
    messages = value.tolist() if hasattr(value, "tolist") else list(value) if isinstance(value, list) else []

    def chars(content: Any) -> int:  # text parts ({"type": "text", "text": ...}) by their text
        if hasattr(content, "tolist"):  # read from Parquet
            content = content.tolist()
        if isinstance(content, list):
            return sum(len(str(p.get("text") or "")) if isinstance(p, dict) else len(str(p)) for p in content)
        return len(str(content or ""))

    lengths = [chars(m.get("content", m.get("value"))) for m in messages if isinstance(m, dict)]
    return (sum(lengths[:-1]), lengths[-1]) if lengths else (0, 0)


def _data_name(plan: SourcePlan) -> str:
    return Path(plan.source["path"]).name


# Why each section is there and what to check in it, written above it in the spec file.
COMMENTS: dict[str, str] = {
    "description": "Shown in the Dagster UI beside the pipeline's assets: say in one sentence what the model is for.",
    "source": "Where the data is. `kind: local` reads a file or a folder of files; a relative `path` is taken from "
              "the project root, so the spec works from there whatever the current folder. `split_files` keeps the "
              "data's own train / validation / test files as they are (a split it lacks is carved from train). "
              "Check: the path, and that every file you mean to train on is read.",
    "task": "What is learned, and from which columns (inferred by `tuneline init`). Check: these are the right "
            "columns.",
    "cleaning": "How raw rows become clean ones: Unicode normal form, white space, duplicates, texts that are too "
                "short or too long. Every dropped row is counted by reason in the cleaned_dataset asset. Check: "
                "max_chars keeps your longest genuine texts.",
    "splits": "Train / validation / test fractions. Rows are assigned by a hash of their normalised text and the "
              "seed: a row keeps its split when data is added, and equal texts always share a split. With "
              "`stratify`, every class (or category) with at least 3 rows gets a row in validation and test.",
    "quality": "Thresholds of the blocking data-quality checks on cleaned_dataset and splits: when one fails, "
               "training does not start and the Dagster UI names the failing rows. Check: min_rows is a floor your "
               "data should never fall below.",
    "base_model": "The pre-trained models that may be fine-tuned: candidates from tuneline's catalog of packaged, "
                  "offline models (pipelines/core/catalog.py), the constraints they must meet, and the probe that "
                  "ranks the ones that do. Check: allowed_licenses lists only licences you may ship a model under.",
    "training": "LoRA fine-tuning settings: the default pipeline's recipe for this task. More data needs fewer epochs; "
                "a sweep: section can search these (see README, \"Sweeps\").",
    "evaluation": "How the fine-tuned model is judged on the test split: against baselines that need no training, on "
                  "primary_metric (which also decides promotion).",
    "doctor": "The data doctor: a warning check (it never blocks) on the splits that lists rows whose label is "
              "probably wrong, near-duplicate texts under different labels, and whether more data would help.",
    "promotion": "A newly trained model replaces the registry's `champion` only when it beats it by at least "
                 "min_improvement on evaluation.primary_metric, on the same test split.",
    "schedule": "Retrain on a schedule (needs the Dagster daemon: `make ui` starts it). Off until you set "
                "`enabled: true`.",
    "retrain_on_new_data": "true: a sensor watches the source's files and starts the pipeline when their content "
                           "changes.",
}


def _section_comment(key: str, sections: dict[str, Any], choice: TaskChoice, counts: dict[str, int]) -> str:
    comment = COMMENTS[key]
    if key == "task" and choice.kind == "classification":
        comment += (f" `labels` lists the {len(sections['task']['labels'])} labels found (smallest class: "
                    f"{min(counts.values(), default=0)} rows); a row with any other label blocks training "
                    "(labels_are_known). Check the list is complete.")
    elif key == "task":
        comment += (" Each row becomes a conversation rendered with the base model's chat template; only the "
                    "response tokens carry the loss. Examples longer than training.max_length are handled by "
                    "`overlength`.")
    elif key == "splits" and {"split_files", "split_column"} & set(sections["source"]):
        comment += (" Here the source brings its own splits, so the fractions only size what is carved from train"
                    + (" and `overlap` keeps the official test set whole: a text also in it is dropped from train "
                       "and validation (counted in the splits asset)." if "overlap" in sections["splits"] else "."))
    elif key == "cleaning" and sections["cleaning"].get("keep_source_test"):
        comment += (" keep_source_test: every row of the official test split is kept (normalised, never dropped), "
                    "so metrics are on the official rows.")
    return comment


class _SpecDumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists of scalars and small mappings (`[a, b]`, `{source: ...}`),
    as the default specs write them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # A long list (77 labels) reads better one item a line.
    flow = all(not isinstance(v, list | dict) for v in data) and sum(len(str(v)) + 2 for v in data) <= 90
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = len(data) <= 3 and all(not isinstance(v, list | dict) and len(str(v)) <= 40 for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


class _Block(dict):  # type: ignore[type-arg]
    """A mapping always written in block style: the file's top level and each section."""


def _represent_block(dumper: yaml.SafeDumper, data: _Block) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=False)


_SpecDumper.add_representer(list, _represent_list)
_SpecDumper.add_representer(dict, _represent_dict)
_SpecDumper.add_representer(_Block, _represent_block)


def _dump(key: str, value: Any) -> str:
    """One top-level section as YAML."""
    section = _Block({key: _Block(value) if isinstance(value, dict) else value})
    return yaml.dump(section, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, width=116).rstrip("\n")


def render_spec(sections: dict[str, Any], choice: TaskChoice, counts: dict[str, int], data: Path, name: str) -> str:
    """The spec file's text: a header, then every section with a comment above it."""
    documented = "pipelines/core/sections.py and pipelines/core/tasks/"
    lines = [f"# A first spec written by `tuneline init {data}`, from the columns of the data.",
             f"# Read every comment, check what it asks, then run the data checks (`tuneline check {name}`) first.",
             f"# Every key is documented in {documented}; unknown keys are rejected.", ""]
    for key, value in sections.items():
        comment = _section_comment(key, sections, choice, counts)
        lines += [f"# {line}" for line in _wrap(comment, 116)]
        lines.append(_dump(key, value))
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int, items: Sequence[str] | None = None) -> list[str]:
    """Lines of at most `width` characters, breaking between words (or between `items`, joined by ', ')."""
    parts = [f"{item}," for item in items[:-1]] + list(items[-1:]) if items is not None else text.split()
    lines, current = [], ""
    for word in parts:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines


# ----------------------------------------------------------------------------------------------- init
def slug(name: str) -> str:
    """A pipeline name from a file or folder name: lower case, words joined by '_', starting with a letter."""
    text = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not text:
        return "pipeline"
    return text if text[0].isalpha() else f"data_{text}"


@dataclass
class InitResult:
    """What `tuneline init` inferred and wrote."""

    name: str
    path: Path
    spec: PipelineSpec
    data: Path
    choice: TaskChoice
    columns: list[str]
    rows_read: dict[str, int]  # file name -> rows
    rows_clean: int
    counts: dict[str, int]  # classification: rows per label after cleaning; instruction: per category
    split_rows: dict[str, int]
    split_origin: str  # in words: the data's own files, a split column, or hash fractions
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped by cleaning, by reason
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checklist: list[str] = field(default_factory=list)
    specs_dir_option: str = ""


def init_spec(data: Path, *, name: str | None = None, specs_dir: Path | None = None, force: bool = False,
              text_column: str | None = None, label_column: str | None = None,
              project_root: Path = PROJECT_ROOT) -> InitResult:
    """Infer a spec for `data`, validate it with the project's loader and write it to `specs_dir`/NAME.yaml."""
    folder = specs_dir if specs_dir is not None else project_root / "pipelines" / "specs"
    name = name if name is not None else slug(data.stem if data.is_file() else Path(os.path.abspath(data)).name)
    if not PIPELINE_NAME.match(name):
        raise InitError(f"--name {name!r}: a pipeline name is lower-case letters, digits and '_', starting with a "
                        "letter")
    target = folder / f"{name}.yaml"
    if target.exists() and not force:
        raise InitError(f"{target}: a spec named {name!r} exists already; pass --force to overwrite it, or choose "
                        "another --name")
    if (folder / f"{name}.yml").exists():
        raise InitError(f"{folder / (name + '.yml')}: defines pipeline {name!r} already; choose another --name")

    plan = plan_source(data, project_root)
    raw = read_data(plan, project_root, data)
    notes = list(plan.notes)
    if not plan.official:
        split_column = _split_column(raw)
        if split_column is not None:
            plan = SourcePlan({**plan.source, "split_column": split_column}, plan.files, {}, plan.notes)
            raw = read_data(plan, project_root, data)
            plan = SourcePlan(plan.source, plan.files, {}, plan.notes, tuple(s for s in SPLITS
                                                                             if s in set(raw["source_split"])))
            notes.append(f"column {split_column!r} names each row's split: kept (source.split_column)")
    profiles = profile_columns(raw)
    choice = choose_task(profiles, data, text_column, label_column)
    build = _classification_sections if choice.kind == "classification" else _instruction_sections
    built = build(raw, choice, plan, notes)
    sections = {"description": built.pop("description"), "source": plan.source, **built}

    spec = _validated(sections, choice, data, name, target)
    task = task_for(spec)
    cleaned, clean_log = task.clean(raw, spec)
    if cleaned.empty:
        raise InitError(f"{data}: no row is left after cleaning ({choice.reason}): every one is empty, too short, a "
                        "duplicate or under conflicting labels; name the right columns with --text-column and "
                        "--label-column")
    result = assign_splits(cleaned, spec.splits, group_column=task.split_group_column)
    if result.overlapping_texts:  # only the data's own splits can share a text (a hash never splits equal texts)
        # Leakage between the data's own splits: keep the later split (an official test set) whole.
        sections["splits"] = {**sections["splits"], "overlap": "drop_from_earlier_splits"}
        notes.append(f"{result.overlapping_texts} normalised text(s) are in two of the official splits: "
                     "splits.overlap drops them from the earlier split, so the official test set stays whole")
        spec = _validated(sections, choice, data, name, target)
        result = assign_splits(cleaned, spec.splits, group_column=task.split_group_column)
    group = task.split_group_column
    counts = ({str(k): int(v) for k, v in cleaned[group].value_counts().items()} if group in cleaned.columns else {})
    text = render_spec(sections, choice, counts, data, name)
    spec = _validated_text(text, data, name, target)  # what is written is what was validated
    write_bytes_atomic(target, text.encode("utf-8"))

    rows_read = {Path(str(f)).name: int(n) for f, n in raw["source_file"].value_counts(sort=False).items()}
    out = InitResult(name=name, path=target, spec=spec, data=data, choice=choice, columns=[p.name for p in profiles],
                     rows_read=rows_read, rows_clean=len(cleaned), counts=counts, split_rows=result.counts(),
                     dropped={k.removeprefix("dropped_"): v for k, v in clean_log.metadata.items()
                              if k.startswith("dropped_") and isinstance(v, int) and v},
                     split_origin=_split_origin(plan, spec), notes=notes,
                     specs_dir_option="" if specs_dir is None else f" --specs-dir {specs_dir}")
    _judge(out, result, plan)
    return out


def _split_origin(plan: SourcePlan, spec: PipelineSpec) -> str:
    """Where the splits come from, in words."""
    if plan.official:
        kept = ", ".join(f"{split} = {file}" for split, file in plan.official.items())
        carved = [s for s in SPLITS if s not in plan.official]
        return f"the data's own files kept ({kept})" + (f"; {' and '.join(carved)} carved from train" if carved else "")
    if "split_column" in plan.source:
        return f"the data's own, from column {plan.source['split_column']!r}"
    s = spec.splits
    return (f"{s.train:.0%}/{s.validation:.0%}/{s.test:.0%} by a hash of each text"
            + (", stratified" if s.stratify else "") + f", seed {s.seed}")


def _split_column(raw: pd.DataFrame) -> str | None:
    """A column that names each row's split (train and test, or dev, ...): the data's own splits."""
    named = sorted((c for c in raw.columns if c not in NOT_DATA_COLUMNS),
                   key=lambda c: str(c).lower() not in SPLIT_COLUMN_NAMES)
    for column in named:
        values = {str(v).strip().lower() for v in raw[column] if not _missing(v)}
        if values and values <= set(SPLIT_ALIASES):
            splits = {SPLIT_ALIASES[v] for v in values}
            if "train" in splits and len(splits) > 1:
                return str(column)
    return None


def _validated(sections: dict[str, Any], choice: TaskChoice, data: Path, name: str, target: Path) -> PipelineSpec:
    return _validated_text(render_spec(sections, choice, {}, data, name), data, name, target)


def _validated_text(text: str, data: Path, name: str, target: Path) -> PipelineSpec:
    try:
        return parse_spec(text, name=name, origin=str(target))
    except SpecError as exc:  # init wrote something its own loader refuses: a bug in init, not in the data
        raise InitError(f"the spec written for {data} does not validate, so nothing was written (a bug in tuneline "
                        f"init: please report it with this message):\n{exc}") from None


def _judge(out: InitResult, splits: Any, plan: SourcePlan) -> None:
    """Warnings about the data, and the list of what to check before running."""
    spec, warn, check = out.spec, out.warnings, out.checklist
    quality = spec.quality
    rows_in = out.rows_clean + sum(out.dropped.values())
    if rows_in and sum(out.dropped.values()) > 0.1 * rows_in:
        warn.append(f"cleaning drops {sum(out.dropped.values()):,} of {rows_in:,} rows "
                    f"({sum(out.dropped.values()) / rows_in:.0%}): "
                    + ", ".join(f"{n:,} {why}" for why, n in out.dropped.items())
                    + "; the cleaned_dataset asset lists examples of each reason")
    if out.rows_clean < quality.min_rows:
        warn.append(f"only {out.rows_clean} rows are left after cleaning: quality.min_rows ({quality.min_rows}) will "
                    "block training (row_count_within_bounds); add data, or lower it if that is really enough")
    if out.choice.kind == "classification":
        counts = out.counts
        smallest = min(counts, key=lambda k: (counts[k], k))
        largest = max(counts.values())
        tiny = sorted((k for k, n in counts.items() if n < FEW_ROWS_PER_CLASS), key=lambda k: (counts[k], k))
        blocking = [k for k in tiny if counts[k] < quality.min_rows_per_class]
        if blocking:
            warn.append(f"{len(blocking)} class(es) have fewer than quality.min_rows_per_class "
                        f"({quality.min_rows_per_class}) rows and will block training (classes_are_balanced): "
                        + ", ".join(f"{k} ({counts[k]})" for k in blocking[:10]))
        elif tiny:
            warn.append(f"{len(tiny)} class(es) have fewer than {FEW_ROWS_PER_CLASS} rows, too few to learn or "
                        "judge well: " + ", ".join(f"{k} ({counts[k]})" for k in tiny[:10]))
        if counts[smallest] and largest / counts[smallest] > quality.max_imbalance_ratio:
            warn.append(f"the labels are very imbalanced: the largest class has {largest / counts[smallest]:.0f}x "
                        f"the rows of the smallest ({smallest}, {counts[smallest]}); classes_are_balanced will warn, "
                        "and macro_f1 weighs every class equally")
        variants: dict[str, list[str]] = {}
        for label in counts:
            variants.setdefault(dedup_key(label), []).append(label)
        for group in (g for g in variants.values() if len(g) > 1):
            warn.append(f"labels {', '.join(repr(v) for v in sorted(group))} differ only in case, spacing or "
                        "punctuation: labels_are_distinct will block training; merge them in the data")
        table = splits.class_table()
        missing = [str(k) for k, row in table.iterrows() if row["train"] == 0 or row["test"] == 0]
        if missing:
            warn.append(f"{len(missing)} class(es) have no row in train or in test (every_class_in_train_and_test "
                        f"will block training): {', '.join(missing[:10])}")
        task = spec.task
        check.append(f"the label column is {task.label_column!r} ({len(counts)} labels) and the text column "
                     f"{task.text_column!r}; if not, run init again with --text-column / --label-column")
        check.append(f"the smallest class, {smallest!r}, has {counts[smallest]} rows after cleaning; the largest "
                     f"{largest}")
        check.append("task.labels is the whole label set you expect (new labels in later data will block training)")
        if "prompting" in spec.evaluation.baselines:
            check.append("evaluation.prompting.label_names: words the prompted model can read for each label (e.g. "
                         f"{next(iter(counts))}: ...); labels not listed are shown as they are")
    else:
        columns = ", ".join(f"{k.removesuffix('_column')} = {v!r}" for k, v in out.choice.columns.items())
        check.append(f"the columns: {columns}")
        check.append("a few rows of cleaned_dataset in the Dagster UI read as the prompt and answer you want")
    if not plan.own_splits:
        total = sum(out.split_rows.values()) or 1
        off = [f"{split} {rows / total:.0%} (spec {getattr(spec.splits, split):.0%})"
               for split, rows in out.split_rows.items()
               if abs(rows / total - getattr(spec.splits, split)) > quality.split_tolerance]
        if off:
            warn.append(f"with {total} rows the hash splits come out uneven: {', '.join(off)}; "
                        f"split_proportions_match_spec (quality.split_tolerance {quality.split_tolerance}) will block "
                        "training: add data, or raise the tolerance")
        check.append(f"the splits: {out.split_origin}; the data brings none of its own (no train/test files or split "
                     "column found)")
    stated = _data_licence(out.data)
    check.append(f"base_model.allowed_licenses ({', '.join(spec.base_model.allowed_licenses)}): only licences you may "
                 "ship a model under; and that the data's own licence allows training on it"
                 + (f" ({stated[0]} says: {stated[1]})" if stated else ""))
    check.append("training.epochs: the default pipeline's recipe; a much larger dataset needs fewer")


def _data_licence(data: Path) -> tuple[str, str] | None:
    """The licence line of a README beside the data (its file, the line), if there is one."""
    folder = data if data.is_dir() else data.parent
    for readme in sorted(folder.glob("README*")):
        try:
            text = readme.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = re.search(r"^[\s*#>-]*licen[cs]e\W*\s*:?\**\s*(.+)$", text, re.IGNORECASE | re.MULTILINE)
        if match:
            return readme.name, match.group(1).strip().strip("*").strip().split(". ")[0][:160]
    return None


def report_lines(out: InitResult) -> list[str]:
    """What `tuneline init` prints: what it inferred, what to check, and how to run the pipeline."""
    spec = out.spec
    read = ", ".join(f"{name} ({rows:,})" for name, rows in out.rows_read.items())
    lines = [f"{out.name}: {spec.task.type} from {out.data}",
             f"  read:       {sum(out.rows_read.values()):,} rows from {read}",
             f"  columns:    {', '.join(out.columns)}",
             f"  task:       {spec.task.type}: {out.choice.reason}",
             f"  cleaned:    {out.rows_clean:,} rows kept"
             + (f"; dropped {', '.join(f'{n:,} {why}' for why, n in out.dropped.items())}" if out.dropped else
                ", none dropped")]
    if out.choice.kind == "classification":
        ordered = sorted(out.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"  labels:     {len(ordered)} classes, most rows first:")
        lines += [f"    {line}" for line in _wrap("", 110, [f"{k} {n:,}" for k, n in ordered])]
    elif out.counts and "category_column" in out.choice.columns:
        ordered = sorted(out.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"  categories: {len(ordered)} (column {out.choice.columns['category_column']!r}): "
                     + ", ".join(f"{k} {n:,}" for k, n in ordered[:12]) + (", ..." if len(ordered) > 12 else ""))
    shares = ", ".join(f"{split} {rows:,}" for split, rows in out.split_rows.items())
    lines.append(f"  splits:     {out.split_origin}: {shares}")
    models = [getattr(c, "id", None) or getattr(c, "name", None) or getattr(c, "path", "")
              for c in spec.base_model.candidates]
    lines.append(f"  candidates: {', '.join(models)} (licences allowed: {', '.join(spec.base_model.allowed_licenses)})")
    lines.append(f"  baselines:  {', '.join(spec.evaluation.baselines)}; primary metric "
                 f"{spec.evaluation.primary_metric}")
    lines += [f"  note: {n}" for n in out.notes]
    lines += [f"  warning: {w}" for w in out.warnings]
    lines.append(f"wrote {out.path}")
    lines.append("")
    lines.append("check before running:")
    lines += [f"  - {c}" for c in out.checklist]
    lines.append("")
    lines.append("then:")
    lines.append(f"  .venv/bin/tuneline check {out.name}{out.specs_dir_option}")
    lines.append("      materializes the data assets (raw_data, cleaned_dataset, splits) and runs their checks only")
    lines.append(f"  .venv/bin/tuneline run --pipeline {out.name}{out.specs_dir_option}")
    lines.append("      the whole pipeline: choose the base model, fine-tune, evaluate")
    return lines
