"""Preference tuning's parts on small frames and a tiny chat model: reading pairs (and the errors that name the
file, row and column), every blocking check, the spec's start_from rules, the on-policy cache, the answer check, and
each method (dpo, ipo, kto) training an adapter against the starting model with the adapter off."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipelines.core.errors import SourceError
from pipelines.core.spec import SpecError, load_spec, read_specs
from pipelines.core.tasks.preference.data import (clean_pairs, select_pairs, validate_cleaned_pairs,
                                                  validate_pairs)
from pipelines.core.tasks.preference.evaluate import answer_key, answers_match, preference_metrics
from pipelines.core.tasks.preference.pairs import cached_answers, generation_key
from tests.tiny_chat import write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def raw(rows: list[dict[str, Any]], file: str = "pairs.jsonl") -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["source_file"] = file
    frame["source_row"] = range(1, len(frame) + 1)
    return frame


def spec_dict(data: Path, model_dir: Path | None = None, **task: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"kind": "local", "path": str(data)},
        "task": {"type": "preference", "max_new_tokens": 6, **task},
        "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
        "quality": {"min_rows": 4, "split_tolerance": 0.3},
        "training": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "max_length": 64, "precision": "fp32",
                     "logging_steps": 2, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "evaluation": {"baselines": ["starting_model"]},
    }
    if model_dir is not None:
        spec["base_model"] = {"model": {"source": "local", "path": str(model_dir), "name": "tiny-chat"}}
    return spec


def colour_rows(n: int = 24) -> list[dict[str, str]]:
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    return [{"prompt": f"What colour is the car number {i}?", "chosen": f"The car is {colours[i % 6]}.",
             "rejected": f"The car is {colours[(i + 1) % 6]}."} for i in range(n)]


# ---------------------------------------------------------------------------------------------- reading
def test_pairs_are_read_from_text_columns_and_from_conversations() -> None:
    from pipelines.core.tasks.preference.config import PreferenceTaskConfig

    task = PreferenceTaskConfig(type="preference")
    text = select_pairs(raw([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}]), task)
    assert json.loads(text["prompt_messages"][0]) == [{"role": "user", "content": "Hi?"}]
    assert (text["chosen"][0], text["rejected"][0]) == ("Hello.", "Go away.")
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    chat = select_pairs(raw([{"chosen": conversation + [{"role": "assistant", "content": "Hello."}],
                              "rejected": conversation + [{"role": "assistant", "content": "No."}]}]), task)
    assert json.loads(chat["prompt_messages"][0]) == conversation and chat["text"][0] == "Hi?"
    assert (chat["chosen"][0], chat["rejected"][0]) == ("Hello.", "No.")


def test_bad_pairs_are_one_error_naming_the_file_row_and_column() -> None:
    from pipelines.core.tasks.preference.config import PreferenceTaskConfig

    task = PreferenceTaskConfig(type="preference")
    with pytest.raises(SourceError) as missing:
        select_pairs(raw([{"prompt": "Hi?", "answer": "Hello."}]), task)
    assert "no column 'chosen' (named by task.chosen_column)" in str(missing.value)
    assert "'answer'" in str(missing.value)
    user = [{"role": "user", "content": "Hi?"}]
    with pytest.raises(SourceError) as differ:
        select_pairs(raw([{"prompt": "x", "chosen": "ok", "rejected": "no"},
                          {"chosen": user + [{"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "b"}]}],
                         file="prefs.jsonl"), task)
    message = str(differ.value)
    assert "prefs.jsonl" in message and "row 2" in message and "rejected" in message and "differ" in message
    with pytest.raises(SourceError) as ends:
        select_pairs(raw([{"chosen": user, "rejected": "no"}]), task)
    assert "ends with a user message" in str(ends.value) and "row 1" in str(ends.value)


# ------------------------------------------------------------------------------------------------ checks
def failed(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks if not c.passed}


def test_cleaned_checks_block_empty_sides_and_identical_answers(tmp_path: Path,
                                                                 write_spec: Callable[..., Path]) -> None:
    rows = colour_rows(10)
    rows[2]["prompt"] = "   "
    rows[4]["chosen"] = ""
    rows[6]["rejected"] = ""
    rows[8]["rejected"] = rows[8]["chosen"].upper()  # the same answer, case aside
    spec = load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tmp_path, rejected_from="data")) / "p.yaml")
    frame = raw(rows)
    cleaned = clean_pairs(select_pairs(frame, spec.task), spec).frame
    problems = failed(validate_cleaned_pairs(cleaned, spec, frame))
    assert set(problems) == {"pairs_are_complete", "chosen_differs_from_rejected"}
    text = str([row.get("problem") for row in problems["pairs_are_complete"].examples])
    assert "empty prompt" in text and "empty chosen" in text and "empty rejected" in text
    # With the starting model answering missing rejected sides, an empty rejected answer is not a problem.
    generated = load_spec(write_spec("q", spec_dict(tmp_path / "d.jsonl", tmp_path)) / "q.yaml")
    cleaned = clean_pairs(select_pairs(frame, generated.task), generated).frame
    text = str([row.get("problem") for row in
                failed(validate_cleaned_pairs(cleaned, generated, frame))["pairs_are_complete"].examples])
    assert "empty rejected" not in text and "empty prompt" in text


def test_cleaning_keeps_line_breaks_and_loses_nothing_it_normalises(tmp_path: Path,
                                                                    write_spec: Callable[..., Path]) -> None:
    spec = load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tmp_path)) / "p.yaml")
    rows = [{"prompt": f"  Which colour?\nRequest:  car {i} ", "chosen": " red\n", "rejected": "blue"}
            for i in range(6)]
    frame = raw(rows)
    cleaned = clean_pairs(select_pairs(frame, spec.task), spec).frame
    assert cleaned["text"][0] == "Which colour?\nRequest:  car 0" and cleaned["chosen"][0] == "red"
    assert json.loads(cleaned["prompt_messages"][0])[0]["content"] == "Which colour?\nRequest:  car 0"
    assert not failed(validate_cleaned_pairs(cleaned, spec, frame))


def test_the_same_prompt_in_two_splits_blocks(tmp_path: Path, write_spec: Callable[..., Path]) -> None:
    from pipelines.core.quality import validate_splits

    spec = load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tmp_path)) / "p.yaml")
    cleaned = clean_pairs(select_pairs(raw(colour_rows(8)), spec.task), spec).frame
    cleaned["split"] = ["train"] * 4 + ["validation", "test", "test", "test"]
    cleaned.loc[5, "norm_text"] = cleaned.loc[0, "norm_text"]  # a train prompt again in test
    report = validate_splits(cleaned, spec.splits, spec.quality, "category", every_group_in_train_and_test=False)
    assert "splits_do_not_overlap" in failed(report)


def pairs_frame(n: int, over: int, equal: int = 0) -> pd.DataFrame:
    rows = [{"split": "train" if i % 3 else "test", "prompt_rendered": "p", "chosen_rendered": f"c{i}",
             "rejected_rendered": f"r{i}", "prompt_tokens": 10, "chosen_tokens": 3, "rejected_tokens": 4,
             "total_tokens": 14, "left_out": None, "text": "p", "chosen": "c", "rejected": "r",
             "source_file": "f", "source_row": i} for i in range(n)]
    for i in range(over):
        rows[i]["left_out"] = "over_max_length"
    for i in range(over, over + equal):
        rows[i]["left_out"] = "generated_equals_chosen"
    return pd.DataFrame(rows)


def test_pairs_over_the_length_limit_are_bounded(tmp_path: Path, write_spec: Callable[..., Path]) -> None:
    spec = load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tmp_path, max_overlength_fraction=0.1))
                     / "p.yaml")
    assert not failed(validate_pairs(pairs_frame(20, over=2, equal=5), spec))  # 10% lost to length: allowed
    assert set(failed(validate_pairs(pairs_frame(20, over=3), spec))) == {"pairs_within_max_length"}
    same = pairs_frame(20, over=0)
    same.loc[1, "rejected_rendered"] = same.loc[1, "chosen_rendered"]
    assert set(failed(validate_pairs(same, spec))) == {"pairs_have_two_answers"}


# ----------------------------------------------------------------------------------------------- the spec
def test_start_from_rules(tmp_path: Path, write_spec: Callable[..., Path]) -> None:
    champion = {"champion_of": "chat"}
    with pytest.raises(SpecError, match="remove the base_model section"):
        load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tmp_path, start_from=champion)) / "p.yaml")
    with pytest.raises(SpecError, match="base_model: required key is missing"):
        load_spec(write_spec("q", spec_dict(tmp_path / "d.jsonl")) / "q.yaml")
    folder = tmp_path / "circle"
    folder.mkdir()
    for name, start in (("a", "b"), ("b", "a"), ("c", "nowhere")):
        (folder / f"{name}.yaml").write_text(json.dumps(spec_dict(tmp_path / "d.jsonl", start_from={
            "champion_of": start})))
    found = read_specs(folder)
    assert found.specs == ()
    problems = "\n".join(str(e) for e in found.broken)
    assert "no valid pipeline named 'nowhere'" in problems and "c.yaml" in problems
    assert "in a circle (a -> b -> a)" in problems and "in a circle (b -> a -> b)" in problems


# --------------------------------------------------------------------------------------------- generation
def test_on_policy_answers_are_cached_by_model_and_prompt(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def generate(keys: list[str]) -> list[str]:
        calls.append(keys)
        return [f"answer {k[:6]}" for k in keys]

    keys = [generation_key("model-a", json.dumps([{"role": "user", "content": p}]), 8) for p in ("x", "y", "x")]
    cache = tmp_path / "cache" / "on_policy.parquet"
    first, made = cached_answers(cache, keys, generate, print)
    assert made == 2 and len(calls[0]) == 2 and first[keys[0]] == first[keys[2]]
    again, made = cached_answers(cache, keys, generate, print)
    assert made == 0 and again == first and len(calls) == 1
    other = generation_key("model-b", json.dumps([{"role": "user", "content": "x"}]), 8)  # another model: new
    _, made = cached_answers(cache, [other], generate, print)
    assert made == 1 and not list(cache.parent.glob(".*.tmp"))


def test_answer_checks_and_rewards() -> None:
    assert answers_match("Card arrival.", "card arrival", "exact") == 1.0
    assert answers_match("card_arrival", "card arrival", "exact") == 0.0
    assert answer_key("so 3 + 4 = 7, the answer is 1,250.0", "final_number") == "1250"
    assert answers_match("#### 72", "She sold 72 clips", "final_number") == 1.0
    assert answers_match("no number", "72", "final_number") == 0.0
    import numpy as np

    chosen, rejected = np.array([-1.0, -5.0]), np.array([-3.0, -4.0])
    start = preference_metrics(chosen, rejected, None, None, 0.1)
    assert start["likelihood_accuracy"] == 0.5 and start["preference_accuracy"] != start["preference_accuracy"]
    tuned = preference_metrics(chosen, rejected, np.array([-2.0, -6.0]), np.array([-2.0, -4.0]), 0.1)
    # gains over the reference: chosen +1, +1; rejected -1, 0 -> margins 0.2 and 0.1
    assert tuned["preference_accuracy"] == 1.0 and tuned["reward_margin"] == pytest.approx(0.15)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["dpo", "ipo", "kto"])
def test_each_method_trains_against_the_adapter_off_model(method: str, tmp_path: Path, tiny_chat_dir: Path,
                                                          write_spec: Callable[..., Path]) -> None:
    from pipelines.core.selection import resolve_base_model
    from pipelines.core.splitting import assign_splits
    from pipelines.core.tasks.preference.evaluate import pair_logps
    from pipelines.core.tasks.preference.pairs import build_pairs
    from pipelines.core.tasks.preference.train import train_preference
    from pipelines.core.training.compute import ComputeSettings
    from resources.model_store import ModelStore
    from tests.conftest import PROJECT_ROOT

    spec = load_spec(write_spec("p", spec_dict(tmp_path / "d.jsonl", tiny_chat_dir, method=method,
                                               rejected_from="data")) / "p.yaml")
    cleaned = clean_pairs(select_pairs(raw(colour_rows(40)), spec.task), spec).frame
    splits = assign_splits(cleaned, spec.splits, "category").frame
    base = resolve_base_model(spec.base_model, ModelStore(str(PROJECT_ROOT), str(tmp_path / "models")))
    compute = ComputeSettings("cpu", "fp32", 2)
    pairs = build_pairs(splits, base, spec, compute, None).frame
    record = train_preference(pairs, base, spec, tmp_path / "out", compute, progress=lambda _: None)
    assert record.task_data["method"] == method and record.task_data["steps"] >= 1
    saved = Path(record.path) / "adapter"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "ref").exists()  # one adapter kept
    from pipelines.core.tasks.instruction.train import load_causal_lm, load_finetuned_lm

    model, tokenizer = load_finetuned_lm(record)
    starting, _ = load_causal_lm(base.local_path)
    test = pairs[pairs["split"] == "test"]
    with model.disable_adapter():  # the reference: exactly the starting model
        off = pair_logps(model, tokenizer, test, 8, compute)
    plain = pair_logps(starting, tokenizer, test, 8, compute)
    on = pair_logps(model, tokenizer, test, 8, compute)
    assert all(abs(a - b).max() < 1e-4 for a, b in zip(off, plain, strict=True))
    assert abs(on[0] - off[0]).max() > 1e-4  # and training moved the tuned model away from it


def test_scoring_answer_positions_only_gives_trls_log_probabilities(tiny_chat_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from pipelines.core.tasks.preference.train import answer_positions_only

    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_dir)).eval()
    add_fused_lm_head(model)
    ids = torch.randint(3, 300, (3, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt carries no label
    labels[2, 10:] = -100  # padding
    every = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    with answer_positions_only(True):
        answers = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert every.shape == answers.shape and torch.allclose(every, answers, atol=1e-5)
    assert (answers[:, :6] == 0).all() and (answers[:, 7:9] != 0).all()
