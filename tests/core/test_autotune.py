"""precision 'auto' and the thread count chosen by timing real training steps of the chosen model, kept per machine
and model (pipelines/core/autotune.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.core.autotune import (BF16_MIN_STEP_SPEEDUP, choose, precision_options, thread_options,
                                     tune_training_compute)
from pipelines.core.hardware import cpu_supports_bf16, usable_cores
from pipelines.core.selection import resolve_base_model
from pipelines.core.sweep.space import with_settings
from pipelines.core.tasks import task_for
from pipelines.core.training.compute import ComputeSettings
from tests.conftest import store
from tests.core.test_speed import _spec


def test_auto_precision_and_threads_are_chosen_by_timing_real_steps_and_kept_per_machine_and_model(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame) -> None:
    """Every precision this CPU has and all or half of its cores are timed on real training steps of the model;
    the fastest is chosen (bf16 only when clearly faster). The answer is kept: the next run reads it without
    timing, a setting that does not change a step (the learning rate) keeps it, one that does (the batch size)
    is timed again. Nothing is timed when nothing is left to choose."""
    spec = _spec(tiny_model_dir, batch_size=16, precision="auto")
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    task = task_for(spec)
    unresolved = ComputeSettings("cpu", "fp32", None, cache_dir=str(tmp_path / "cache"))
    said: list[str] = []
    first = tune_training_compute(task, spec, trec_splits, base, unresolved, progress=said.append)

    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    threads = sorted({usable_cores(), max(1, usable_cores() // 2)}, reverse=True)
    assert precision_options("cpu", "auto") == precisions and thread_options("cpu", None) == threads
    expected = set(itertools.product(precisions, threads))
    assert {(t["precision"], t["threads"]) for t in first.timings} == expected
    assert all(t["seconds_per_step"] > 0 for t in first.timings)
    assert first.chosen_by == "timed" and len(said) == len(expected), said
    best = choose(first.timings)
    assert (first.settings.precision, first.settings.num_threads) == (best["precision"], best["threads"])
    assert first.settings.cache_dir == unresolved.cache_dir and first.settings.device == "cpu"
    kept = list((tmp_path / "cache" / "compute").glob("*.json"))
    assert len(kept) == 1
    stored = json.loads(kept[0].read_text())
    assert stored["model"]["weights_sha256"] == base.weights_sha256 and stored["timings"] == list(first.timings)
    assert stored["machine"]["cores"] == usable_cores() and stored["machine"]["torch"]
    assert "| precision | threads | s/step |" in first.table() and first.settings.precision in first.summary()

    said.clear()
    again = tune_training_compute(task, with_settings(spec, {"learning_rate": 1e-4}), trec_splits, base, unresolved,
                                  progress=said.append)
    assert again.chosen_by == "cached" and not said and again.settings == first.settings
    assert again.cache_file == str(kept[0])

    bigger = tune_training_compute(task, with_settings(spec, {"batch_size": 32}), trec_splits, base, unresolved,
                                   progress=said.append)
    assert bigger.chosen_by == "timed" and len(said) == len(expected)
    assert len(list((tmp_path / "cache" / "compute").glob("*.json"))) == 2

    said.clear()
    asked = tune_training_compute(task, with_settings(spec, {"precision": "fp32"}), trec_splits, base,
                                  ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "asked")),
                                  progress=said.append)
    assert asked.chosen_by == "asked" and not said and not (tmp_path / "asked").exists()
    assert (asked.settings.precision, asked.settings.num_threads) == ("fp32", 2)


def test_a_step_that_cannot_be_timed_falls_back_to_the_estimate_and_says_why(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame) -> None:
    """Data the step cannot sample (no train rows) does not stop training: the matrix-product estimate decides and
    the note names the error. Without a fallback the error is raised."""
    spec = _spec(tiny_model_dir, precision="auto")
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    no_train = trec_splits[trec_splits["split"] != "train"]
    said: list[str] = []
    choice = tune_training_compute(task_for(spec), spec, no_train, base, ComputeSettings("cpu", "fp32", None),
                                   progress=said.append, fallback=lambda: ComputeSettings("cpu", "fp32", 2))
    assert choice.chosen_by == "estimate" and choice.settings.num_threads == 2
    assert "timing training steps failed (IndexError" in choice.note and choice.note in said
    with pytest.raises(IndexError):  # the tokenizer's, on an empty batch
        tune_training_compute(task_for(spec), spec, no_train, base, ComputeSettings("cpu", "fp32", None))


def test_bf16_is_taken_only_when_its_steps_are_clearly_faster() -> None:
    fast_fp32 = {"precision": "fp32", "threads": 2, "seconds_per_step": 1.0}
    slow_fp32 = {"precision": "fp32", "threads": 1, "seconds_per_step": 1.6}
    slightly = {"precision": "bf16", "threads": 2, "seconds_per_step": 1.0 / (BF16_MIN_STEP_SPEEDUP - 0.05)}
    clearly = {"precision": "bf16", "threads": 2, "seconds_per_step": 1.0 / (BF16_MIN_STEP_SPEEDUP + 0.05)}
    assert choose([fast_fp32, slow_fp32, slightly]) is fast_fp32
    assert choose([fast_fp32, slow_fp32, clearly]) is clearly
    assert choose([slow_fp32, fast_fp32]) is fast_fp32
    assert choose([slightly]) is slightly  # bf16 asked for: the only one timed
