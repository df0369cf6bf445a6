"""How `tuneline init` proposes a preference spec: a chosen column beside a rejected one (and a prompt column, or
conversations that carry the prompt), from the SmolLM2 chat model with DPO."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipelines.core.columns import ColumnProfile, TaskChoice, by_name, quantile, text_lengths

NAME = "preference"
CHOSEN_NAMES = ("chosen", "preferred", "good", "accepted")
REJECTED_NAMES = ("rejected", "dispreferred", "bad")
PROMPT_NAMES = ("prompt", "instruction", "question", "query", "input")
LENGTHS = (256, 512, 1024, 2048)


class PreferenceStarter:
    """Preference tuning from chosen / rejected columns."""

    priority = 5  # before instruction tuning: a prompt column beside two answers is a pair, not one response
    column_fields = ("prompt_column", "chosen_column", "rejected_column", "system_column", "category_column")
    expects = "a chosen column beside a rejected one (and a prompt column, or conversations that carry the prompt)"

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        lower = by_name(profiles)
        if given:
            if {"chosen_column", "rejected_column"} <= set(given):
                return TaskChoice(NAME, dict(given), "columns given: " + ", ".join(f"{k} {v!r}"
                                                                                  for k, v in given.items()))
            return None
        chosen = next((lower[n] for n in CHOSEN_NAMES if n in lower), None)
        rejected = next((lower[n] for n in REJECTED_NAMES if n in lower), None)
        if chosen is None or rejected is None:
            return None
        columns = {"chosen_column": chosen.name, "rejected_column": rejected.name}
        prompt = next((lower[n] for n in PROMPT_NAMES if n in lower), None)
        if prompt is not None:
            columns["prompt_column"] = prompt.name
        return TaskChoice(NAME, columns, f"chosen column {chosen.name!r} and rejected column {rejected.name!r}")

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        columns = choice.columns
        prompt = text_lengths(frame, columns["prompt_column"]) if "prompt_column" in columns else []
        chosen = text_lengths(frame, columns["chosen_column"])
        rejected = text_lengths(frame, columns["rejected_column"])
        longest = [p + max(c, r) for p, c, r in zip(prompt or [0] * len(chosen), chosen, rejected, strict=False)]
        tokens = quantile(longest, 0.98) / 3.5 + 24  # about 3.5 characters a token, and the template's own
        max_length = next((n for n in LENGTHS if tokens <= n), LENGTHS[-1])
        answer = quantile(chosen, 0.9) / 3.5
        max_new_tokens = 48 if answer <= 48 else min(256, int(answer) + 16)
        cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "drop_duplicates": True, "min_chars": 1,
                                    "max_chars": max(2000, int(quantile(longest, 0.995)) + 1)}
        if "test" in own_splits:
            cleaning["keep_source_test"] = True
        return {
            "description": f"Teach a small chat model to prefer the chosen answers of {data_name} over the rejected "
                           "ones (DPO with LoRA; written by tuneline init: say here what the model is for).",
            "task": {"type": NAME, **columns, "method": "dpo", "beta": 0.1, "start_from": "base",
                     "rejected_from": "data", "max_overlength_fraction": 0.05, "max_new_tokens": max_new_tokens,
                     "answer_check": "exact", "sample_generations": 10},
            "cleaning": cleaning,
            "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": False},
            "quality": {"min_rows": 50, "split_tolerance": 0.08},
            "base_model": {"candidates": [{"source": "catalog", "id": "SmolLM2-135M-Instruct"}],
                           "allowed_licenses": ["apache-2.0", "mit"]},
            "training": {"epochs": 2, "batch_size": 8, "learning_rate": 5.0e-5, "weight_decay": 0.0,
                         "warmup_fraction": 0.1, "max_length": max_length, "precision": "auto", "seed": 13,
                         "logging_steps": 20,
                         "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]}},
            "evaluation": {"baselines": ["starting_model", "sft_on_chosen"], "primary_metric": "exact_match",
                           "batch_size": 16},
            "promotion": {"min_improvement": 0.005},
            "schedule": {"cron": "0 4 * * 1", "timezone": "UTC", "enabled": False},
            "retrain_on_new_data": False,
        }

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        return (" Each row is a prompt with a chosen and a rejected answer, rendered with the model's chat template. "
                "To start from an instruction pipeline's champion, replace start_from with {champion_of: <its "
                "name>} and remove base_model; rejected_from: starting_model lets that model answer where the "
                "data has no rejected answer.")

    def judge(self, spec: Any, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        columns = ", ".join(f"{k.removesuffix('_column')} = {v!r}" for k, v in choice.columns.items())
        checklist.append(f"the columns: {columns}")
        checklist.append("a few rows of preference_pairs in the Dagster UI read as the prompt, the better and the "
                         "worse answer")

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        return []
