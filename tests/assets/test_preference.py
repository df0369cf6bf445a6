"""Preference tuning materialized in-process on a tiny Llama chat model: an instruction pipeline's champion is the
starting model of a DPO pipeline (a Dagster dependency across groups), rejected answers the data lacks are the
starting model's own (cached), and lineage walks from the preference model to the instruction data's raw bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport
from pipelines.definitions import build_definitions, resources_for
from tests.assets.test_instruct import chat_spec
from tests.tiny_chat import tiny_chat_pairs, write_pairs_jsonl, write_tiny_chat_model

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown"]


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def preference_rows(n: int = 120, with_rejected: int = 60) -> list[dict[str, str]]:
    """The chat pairs' prompts with the right answer chosen; the first `with_rejected` rows reject a wrong colour,
    the rest leave the rejected side to the starting model."""
    rows = []
    for i, pair in enumerate(tiny_chat_pairs(n)):
        thing = pair["response"].split()[1]
        wrong = COLOURS[(COLOURS.index(pair["response"].split()[-1].rstrip(".")) + 3) % len(COLOURS)]
        rows.append({"prompt": pair["instruction"], "chosen": pair["response"],
                     "rejected": f"The {thing} is {wrong}." if i < with_rejected else ""})
    return rows


def preference_spec(data: Path, **task: Any) -> dict[str, Any]:
    return {
        "source": {"kind": "local", "path": str(data)},
        "task": {"type": "preference", "start_from": {"champion_of": "chat"}, "max_new_tokens": 8,
                 "sample_generations": 3, **task},
        "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
        "quality": {"min_rows": 20, "split_tolerance": 0.1},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "max_length": 64, "precision": "fp32",
                     "logging_steps": 5, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
    }


def test_preference_pipeline_starts_from_a_champion(tmp_path: Path, tiny_chat_dir: Path,
                                                     write_spec: Callable[..., Path],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    chat_data = write_pairs_jsonl(tmp_path / "raw" / "pairs.jsonl", tiny_chat_pairs())
    prefs_data = write_pairs_jsonl(tmp_path / "raw" / "prefs.jsonl", preference_rows())
    write_spec("chat", {**chat_spec(chat_data, tiny_chat_dir), "evaluation": {"baselines": []}})  # promoted
    specs = write_spec("prefs", preference_spec(prefs_data))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    graph = defs.resolve_asset_graph()
    # A real dependency across groups: the preference pipeline's base model needs the chat pipeline's checkpoint.
    assert dg.AssetKey(["chat", "finetuned_checkpoint"]) in graph.get(dg.AssetKey(["prefs", "base_model"])).parent_keys
    instance = dg.DagsterInstance.ephemeral()

    early = defs.resolve_job_def("prefs_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not early.success  # no champion yet: the base model says what to materialize first
    failure = next(e for e in early.all_events if e.event_type_value == "STEP_FAILURE")
    assert "pipeline 'chat' has no champion" in str(failure.event_specific_data.error)

    assert defs.resolve_job_def("chat_job").execute_in_process(instance=instance).success
    result = defs.resolve_job_def("prefs_job").execute_in_process(instance=instance)
    assert result.success
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == {
        "raw_data", "cleaned_dataset", "splits", "base_model", "preference_pairs", "finetuned_checkpoint",
        "evaluation_report"}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {name: True for name in (
        "pairs_are_complete", "chosen_differs_from_rejected", "row_count_within_bounds", "cleaning_kept_most_rows",
        "splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty",
        "pairs_within_max_length", "pairs_have_two_answers")}

    base: BaseModelRecord = result.asset_value(dg.AssetKey(["prefs", "base_model"]))
    assert base.started_from is not None and base.started_from["pipeline"] == "chat"
    assert base.started_from["version"] == "1" and base.source == "pipeline"
    champion: CheckpointRecord = result.asset_value(dg.AssetKey(["prefs", "finetuned_checkpoint"]))
    assert champion.task == "preference" and champion.task_data["started_from"]["version"] == "1"
    assert champion.task_data["method"] == "dpo" and champion.task_data["steps"] > 0

    def meta(name: str) -> dict[str, Any]:
        event = instance.get_latest_materialization_event(dg.AssetKey(["prefs", name]))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    pairs = meta("preference_pairs")
    # 60 rows had no rejected answer: the starting model answered them (those equal to the chosen one left out)
    assert pairs["rejected_from_starting_model"] + pairs["rows_dropped_generated_equals_chosen"] == 60
    assert pairs["rejected_generated_now"] == 60
    cache = list((data_dir / "assets" / "prefs" / "cache").glob("on_policy_*.parquet"))
    assert len(cache) == 1

    report: EvaluationReport = result.asset_value(dg.AssetKey(["prefs", "evaluation_report"]))
    assert set(report.metrics) == {"preference_accuracy", "likelihood_accuracy", "reward_margin", "chosen_logp",
                                   "rejected_logp", "exact_match", "mean_generated_tokens"}
    assert set(report.baselines) == {"starting_model", "sft_on_chosen"}
    assert report.baselines["starting_model"]["preference_accuracy"] != \
        report.baselines["starting_model"]["preference_accuracy"]  # NaN: a model's reward against itself is zero
    assert 0 <= report.metrics["preference_accuracy"] <= 1 and report.metrics["reward_margin"] > 0
    assert report.details["started_from"]["pipeline"] == "chat"
    assert "| prompt | chosen | starting model | preference-tuned | SFT on chosen |" in str(
        meta("evaluation_report")["report"])

    # Materialized again with nothing changed: the starting model's answers come from the cache.
    again = defs.resolve_job_def("prefs_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["prefs", "preference_pairs"])])
    assert again.success and meta("preference_pairs")["rejected_generated_now"] == 0

    # Lineage: the preference model -> its base model, the chat champion -> the chat data's raw bytes.
    from pipelines.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    capsys.readouterr()
    monkeypatch.setattr("pipelines.cli.shared_instance", lambda: instance)
    assert main(["lineage", "--pipeline", "prefs", "--json", "--data-dir", str(data_dir), "--specs-dir",
                 str(specs)]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["started_from"]["pipeline"] == "chat" and item["started_from"]["version"] == "1"
    from pipelines.core.digests import sha256_file

    assert [f["sha256"] for f in item["started_from"]["raw_files"]] == [sha256_file(chat_data)]
    assert main(["lineage", "--data", str(chat_data), "--json", "--data-dir", str(data_dir), "--specs-dir",
                 str(specs)]) == 0
    went_into = {m["pipeline"] for m in json.loads(capsys.readouterr().out)["model_versions"]}
    assert went_into == {"chat", "prefs"}

    # predict and export as for instruction tuning: the registered version bundles its merged starting model.
    question = "What colour is the car number 3?"
    assert main(["predict", "--pipeline", "prefs", "--version", "1", "--json", "--max-new-tokens", "4",
                 "--data-dir", str(data_dir), question]) == 0
    answered = json.loads(capsys.readouterr().out)
    assert len(answered) == 1 and answered[0]["instruction"] == question
    out = tmp_path / "export"
    assert main(["export", "--pipeline", "prefs", "--version", "1", "--output", str(out),
                 "--data-dir", str(data_dir)]) == 0
    assert json.loads((out / "tuneline-export.json").read_text())["check"]["same_greedy_answers"]
