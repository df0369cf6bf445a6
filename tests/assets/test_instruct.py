"""The instruction-tuning graph materialized in-process: a tiny Llama chat model built from a config, JSONL
instruction pairs, a real MLflow store and temporary storage; then `tuneline export` and plain transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import torch

from pipelines.core.records import CheckpointRecord, EvaluationReport
from pipelines.definitions import build_definitions, resources_for
from tests.tiny_chat import tiny_chat_pairs, write_pairs_jsonl, write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def chat_spec(data: Path, model_dir: Path) -> dict[str, Any]:
    return {
        "source": {"kind": "local", "path": str(data)},
        "task": {"type": "instruction_tuning", "max_new_tokens": 8, "sample_generations": 4},
        "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
        "quality": {"min_rows": 20, "split_tolerance": 0.1},
        "base_model": {"model": {"source": "local", "path": str(model_dir), "name": "tiny-chat"}},
        "training": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "max_length": 64, "precision": "fp32",
                     "logging_steps": 5, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj",
                                                                                          "o_proj", "up_proj"]}},
        "evaluation": {"baselines": ["base_model", "prompting"], "prompting": {"shots": [0, 2]}},
    }


def test_instruction_pipeline_end_to_end_then_export(tmp_path: Path, tiny_chat_dir: Path,
                                                     write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    data = write_pairs_jsonl(tmp_path / "raw" / "pairs.jsonl", tiny_chat_pairs())
    specs = write_spec("chat", chat_spec(data, tiny_chat_dir))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("chat_job").execute_in_process(instance=instance)
    assert result.success
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == {
        "raw_data", "cleaned_dataset", "splits", "base_model", "rendered_dataset", "finetuned_checkpoint",
        "evaluation_report"}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {name: True for name in (
        "roles_alternate", "examples_are_unique",
        "row_count_within_bounds", "cleaning_kept_most_rows", "splits_do_not_overlap", "split_proportions_match_spec",
        "validation_and_test_are_not_empty", "rendered_lengths_within_max_length", "prompt_tokens_carry_no_loss")}

    def meta(name: str) -> dict[str, Any]:
        event = instance.get_latest_materialization_event(dg.AssetKey(["chat", name]))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    rendered = meta("rendered_dataset")
    assert rendered["chat_template"] == "model" and rendered["rows_in"] == 120
    # The UI shows the first training examples exactly as rendered by the model's own template.
    assert "<|im_start|>user\nWhat colour is the" in str(rendered["rendered_examples"])
    assert "Response (loss):\n```\nThe " in str(rendered["rendered_examples"])
    checkpoint: CheckpointRecord = result.asset_value(dg.AssetKey(["chat", "finetuned_checkpoint"]))
    assert checkpoint.task == "instruction_tuning" and checkpoint.model_version == "1"
    assert checkpoint.data_sha256 == rendered["sha256"]
    files = {p.relative_to(checkpoint.path).as_posix() for p in Path(checkpoint.path).rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "manifest.json", "tokenizer/tokenizer.json"} <= files
    trained = meta("finetuned_checkpoint")  # fp32 and 2 threads asked for: nothing left to time
    assert trained["compute_chosen_by"] == "asked" and trained["precision"] == "fp32" and trained["threads"] == 2

    # precision 'auto' times real steps of the chat model on the rendered rows the checkpoint trained on
    from pipelines.core.autotune import precision_options, tune_training_compute
    from pipelines.core.spec import load_spec
    from pipelines.core.sweep.space import with_settings
    from pipelines.core.tasks import task_for
    from pipelines.core.training.compute import ComputeSettings

    auto = with_settings(load_spec(specs / "chat.yaml"), {"precision": "auto"})
    said: list[str] = []
    choice = tune_training_compute(task_for(auto), auto, result.asset_value(dg.AssetKey(["chat", "rendered_dataset"])),
                                   checkpoint.base_model, ComputeSettings("cpu", "fp32", None), progress=said.append,
                                   threads=[2, 1])
    assert choice.chosen_by == "timed" and len(said) == 2 * len(precision_options("cpu", "auto"))
    assert {(t["precision"], t["threads"]) for t in choice.timings} == {
        (p, n) for p in precision_options("cpu", "auto") for n in (2, 1)}

    report: EvaluationReport = result.asset_value(dg.AssetKey(["chat", "evaluation_report"]))
    base = report.baselines["base_model"]
    assert set(report.metrics) == set(base) == {"validation_loss", "validation_perplexity", "test_loss",
                                                "test_perplexity", "exact_match", "token_f1", "rouge_l"}
    assert report.metrics["test_perplexity"] < base["test_perplexity"]  # fine-tuning learnt the answers' form
    # Prompting: zero-shot is the base model's own generations; two-shot shows two train pairs first.
    generation = ("exact_match", "token_f1", "rouge_l")
    assert report.baselines["prompt_0_shot"] == {k: base[k] for k in generation}
    assert set(report.baselines["prompt_2_shot"]) == set(generation)
    assert report.verdict.startswith(("Fine-tuning paid off: rouge_l", "Fine-tuning did not pay off: rouge_l"))
    assert "trainable parameters" in report.verdict and report.verdict in Path(report.html_path).read_text()
    samples = report.details["samples"]
    assert report.details["test_prompts"] == report.test_rows > 0 and len(samples) == 4
    assert set(samples[0]) == {"instruction", "reference", "base_output", "finetuned_output"}
    lines = Path(report.files["generations"]).read_text().splitlines()
    assert len(lines) == report.details["test_prompts"] and "finetuned_scores" in json.loads(lines[0])
    evaluation = meta("evaluation_report")
    assert "| instruction | reference | base model | fine-tuned |" in str(evaluation["report"])
    assert evaluation["test_perplexity"] == round(report.metrics["test_perplexity"], 4)  # four decimals in the UI

    # Export the registered version: a plain transformers folder that answers a question.
    from pipelines.cli import main

    # The registered version is an MLflow Model: MLflow's own loader answers as `tuneline predict` does.
    import mlflow.pyfunc
    import pandas as pd
    from mlflow import MlflowClient

    from resources.tracking import TrackingResource

    question = "What colour is the car number 3?"
    capsys.readouterr()
    assert main(["predict", "--pipeline", "chat", "--version", "1", "--json", "--max-new-tokens", "8",
                 "--data-dir", str(data_dir), question]) == 0
    expected = [{k: v for k, v in row.items() if k != "model"} for row in json.loads(capsys.readouterr().out)]
    uri = TrackingResource(data_dir=str(data_dir)).tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    folder = client.download_artifacts(client.get_model_version("chat", "1").run_id, "model", str(tmp_path / "m"))
    served = mlflow.pyfunc.load_model(folder).predict(pd.DataFrame({"text": [question]}), params={"max_new_tokens": 8})
    assert served.to_dict("records") == expected

    out = tmp_path / "export"
    assert main(["export", "--pipeline", "chat", "--version", "1", "--output", str(out),
                 "--data-dir", str(data_dir)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and (out / "model.safetensors").is_file()
    assert not any(name.startswith("lora_") for name, _ in model.named_parameters())  # merged, not an adapter
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the car number 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(answer) >= 1 and isinstance(tokenizer.decode(answer), str)
    check = json.loads((out / "tuneline-export.json").read_text())["check"]  # checked before it appeared
    assert check["same_greedy_answers"] and len(check["prompts"]) == 5
    # The same merged model as one GGUF file for llama.cpp, loaded back and checked the same way.
    gguf_out = tmp_path / "gguf"
    assert main(["export", "--pipeline", "chat", "--version", "1", "--format", "gguf", "--output", str(gguf_out),
                 "--data-dir", str(data_dir)]) == 0
    assert json.loads((gguf_out / "tuneline-export.json").read_text())["format"] == "gguf"
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_out / "gguf"), gguf_file="model.gguf")
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_out / "gguf"), gguf_file="model.gguf")
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():  # the GGUF file holds the merged weights (fp32), the query / key permutation undone
        assert torch.equal(from_gguf(**inputs).logits, model(**inputs).logits)
    # A second export to the same folder is refused, and nothing is half-written.
    assert main(["export", "--pipeline", "chat", "--version", "1", "--output", str(out),
                 "--data-dir", str(data_dir)]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_bad_roles_block_training(tmp_path: Path, tiny_chat_dir: Path, write_spec: Callable[..., Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    rows = [{"messages": [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p["response"]}]}
            for p in tiny_chat_pairs()]
    rows[7]["messages"] = [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Hello."}]
    data = tmp_path / "raw" / "chat.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    specs = write_spec("chat", chat_spec(data, tiny_chat_dir))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    result = defs.resolve_job_def("chat_job").execute_in_process(instance=dg.DagsterInstance.ephemeral(),
                                                                 raise_on_error=False)
    assert not result.success
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert [e.check_name for e in failed] == ["roles_alternate"]
    metadata = failed[0].metadata
    assert "chat.jsonl" in metadata["offending_rows"].value and "| 8 |" in metadata["offending_rows"].value
    assert "roles must alternate" in metadata["offending_rows"].value
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "finetuned_checkpoint" not in materialized and not (data_dir / "checkpoints").exists()


def test_rendered_text_with_code_fences_stays_one_block() -> None:
    from pipelines.core.tasks.instruction.data import _fenced

    text = "Here:\n```\nprint(1)\n```<|im_end|>\n"
    block = _fenced(text)
    assert block.startswith("````\n") and block.endswith("\n````") and text in block
