"""How `tuneline init` proposes an instruction-tuning spec: a `messages` column of conversations, or an
instruction/response pair of columns, and the default chatterbot recipe (pipelines/specs/chatterbot_instruct.yaml)
with the lengths adapted to the data."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipelines.core.columns import ColumnProfile, TaskChoice, by_name, missing, quantile, text_lengths

NAME = "instruction_tuning"
# Instruction/response column pairs, in order of preference (names compared in lower case).
PAIRS = (("instruction", "response"), ("instruction", "output"), ("instruction", "completion"),
         ("instruction", "answer"), ("prompt", "completion"), ("prompt", "response"), ("prompt", "answer"),
         ("question", "answer"), ("query", "response"), ("query", "answer"), ("input", "output"),
         ("input", "response"))
CATEGORY_NAMES = ("category", "topic", "domain", "task", "type", "source")
LENGTHS = (256, 512, 1024, 2048, 4096)  # training.max_length init may choose
MAX_OVERLENGTH_FRACTION = 0.05  # the task.max_overlength_fraction init writes
CANDIDATES = [{"source": "catalog", "id": "SmolLM2-135M-Instruct"}]


def conversation_chars(value: Any) -> tuple[int, int]:
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


class InstructionStarter:
    """Instruction tuning from a conversations column or an instruction/response pair of columns."""

    priority = 10  # asked before classification: an instruction/response pair also has text columns
    column_fields = ("instruction_column", "response_column", "messages_column", "input_column", "system_column",
                     "category_column")
    expects = ("instruction/response columns (or prompt/completion, question/answer, input/output), or a `messages` "
               "column (a list of {role, content})")

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        lower = by_name(profiles)
        if given:
            names = {p.name: p for p in profiles}
            if "messages_column" in given or {"instruction_column", "response_column"} <= set(given):
                used = set(given.values())
                return TaskChoice(NAME, {**given, **({} if "category_column" in given else
                                                     self._category(profiles, used))},
                                  "columns given: " + ", ".join(f"{k} {v!r}" for k, v in given.items()
                                                                if v in names))
            return None
        messages = next((p for p in profiles if p.messages), None)
        if messages is not None:
            return TaskChoice(NAME, {"messages_column": messages.name, **self._category(profiles, {messages.name})},
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
                # The default input_column, `input`, is the instruction itself here: name a column the data lacks,
                # or each instruction would be appended to itself.
                columns["input_column"] = next(n for n in ("extra_input", "input_extra", "more_input")
                                               if n not in present)
            system = lower.get("system")
            if system is not None:
                columns["system_column"] = system.name
            columns.update(self._category(profiles, {instruction.name, response.name}))
            return TaskChoice(NAME, columns,
                              f"instruction column {instruction.name!r} and response column {response.name!r}")
        return None

    @staticmethod
    def _category(profiles: Sequence[ColumnProfile], used: set[str]) -> dict[str, str]:
        lower = by_name(profiles)
        for name in CATEGORY_NAMES:
            column = lower.get(name)
            if column is not None and column.name not in used and column.label_like():
                return {"category_column": column.name}
        return {}

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        columns = choice.columns
        if "messages_column" in columns:
            pairs = [conversation_chars(v) for v in frame[columns["messages_column"]] if not missing(v)]
            prompt_chars, response_chars = [p for p, _ in pairs], [r for _, r in pairs]
        else:
            prompt_chars = text_lengths(frame, columns["instruction_column"])
            response_chars = text_lengths(frame, columns["response_column"])
        both = [p + r for p, r in zip(prompt_chars, response_chars, strict=False)]
        # About 3.5 characters a token for English, plus the chat template's own tokens. rendered_dataset blocks
        # training when more than task.max_overlength_fraction (5%) of the examples are over max_length: the length
        # is chosen so that about 2% are, by this estimate.
        tokens = quantile(both, 0.98) / 3.5 + 24
        max_length = next((n for n in LENGTHS if tokens <= n), LENGTHS[-1])
        over = sum(n / 3.5 + 24 > max_length for n in both) / max(len(both), 1)
        if over > MAX_OVERLENGTH_FRACTION:
            notes.append(f"about {over:.0%} of the examples need more than {max_length} tokens, the most init "
                         "chooses: they will be dropped, and rendered_lengths_within_max_length blocks training when "
                         f"more than task.max_overlength_fraction ({MAX_OVERLENGTH_FRACTION:.0%}) are; shorten the "
                         "long conversations, or raise training.max_length (up to the model's context) or that "
                         "fraction")
        elif max_length > 256:
            notes.append(f"training.max_length is {max_length} tokens (98% of the examples need about "
                         f"{tokens:.0f}); longer ones are dropped (task.overlength)")
        answer = quantile(response_chars, 0.9) / 3.5
        max_new_tokens = 48 if answer <= 48 else min(256, 2 ** math.ceil(math.log2(answer)))
        longest = quantile([max(p, r) for p, r in zip(prompt_chars, response_chars, strict=False)], 0.995)
        max_chars = 2000 if longest <= 2000 else int(math.ceil(longest / 1000) * 1000)
        cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "drop_duplicates": True, "min_chars": 1,
                                    "max_chars": max_chars}
        if "test" in own_splits:
            cleaning["keep_source_test"] = True
        return {
            "description": f"Teach a small chat model to answer like the responses of {data_name}, with LoRA, "
                           "formatted by the chat template of the model (written by tuneline init; say here what "
                           "the model is for).",
            "task": {"type": NAME, **columns, "overlength": "drop", "padding_free": True,
                     "max_overlength_fraction": MAX_OVERLENGTH_FRACTION, "max_new_tokens": max_new_tokens,
                     "sample_generations": 10},
            "cleaning": cleaning,
            "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": True},
            "quality": {"min_rows": 50, "split_tolerance": 0.08},
            "base_model": {"candidates": CANDIDATES, "allowed_licenses": ["apache-2.0", "mit"]},
            "training": {"epochs": 2, "batch_size": 8, "learning_rate": 1.0e-3, "weight_decay": 0.0,
                         "warmup_fraction": 0.05, "max_length": max_length, "precision": "auto",
                         "group_by_length": True, "seed": 13, "logging_steps": 20,
                         "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]}},
            "evaluation": {"baselines": ["base_model", "prompting"], "primary_metric": "rouge_l", "batch_size": 16,
                           "prompting": {"shots": [0, 2]}},
            "promotion": {"min_improvement": 0.005},
            "schedule": {"cron": "0 4 * * 1", "timezone": "UTC", "enabled": False},
            "retrain_on_new_data": False,
        }

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        return (" Each row becomes a conversation rendered with the base model's chat template; only the response "
                "tokens carry the loss. Examples longer than training.max_length are handled by `overlength`, and "
                "max_new_tokens bounds the answers generated in the evaluation.")

    def judge(self, spec: Any, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        columns = ", ".join(f"{k.removesuffix('_column')} = {v!r}" for k, v in choice.columns.items())
        checklist.append(f"the columns: {columns}")
        checklist.append("a few rows of cleaned_dataset in the Dagster UI read as the prompt and answer you want")

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        if not counts or "category_column" not in choice.columns:
            return []
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [f"categories: {len(ordered)} (column {choice.columns['category_column']!r}): "
                + ", ".join(f"{k} {n:,}" for k, n in ordered[:12]) + (", ..." if len(ordered) > 12 else "")]
