"""`tuneline run`: materializes a pipeline in the Dagster instance at $DAGSTER_HOME and prints its summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec


def tuneline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_json_prints_the_report_summary_and_records_the_run(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    home = tmp_path / "dagster_home"
    out = tuneline("run", "--pipeline", "tiny", "--json", "--specs-dir", str(specs),
                   "--data-dir", str(tmp_path / "data"), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)  # stdout holds the JSON object and nothing else
    report = json.loads(Path(summary["report_json"]).read_text())
    for name, value in report["metrics"].items():
        assert summary[name] == round(value, 4)
    assert set(summary["baselines"]) == {"majority_class", "linear_probe"}
    assert summary["primary_metric"] == "macro_f1"
    # The base-model selection table comes along: one object per candidate.
    assert summary["base_model"] == "tiny-bert"
    [candidate] = summary["selection"]
    assert candidate["name"] == "tiny-bert" and candidate["verdict"] == "selected"
    assert candidate["reason"] == "the only candidate that meets every constraint"
    assert isinstance(candidate["probe_score"], float)
    assert "step " in out.stderr and "loss" in out.stderr  # progress went to stderr

    # The run lives in the instance the UI reads (DAGSTER_HOME), with every asset materialized.
    assert (home / "dagster.yaml").read_text().count("enabled: false") == 1
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(summary["run_id"])
        assert run is not None and run.is_success
        for name in ("raw_data", "evaluation_report"):
            event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", name]))
            assert event is not None and event.run_id == summary["run_id"]


def test_run_unknown_pipeline_lists_the_known_ones(tmp_path: Path) -> None:
    out = tuneline("run", "--pipeline", "nope", home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: no pipeline 'nope'; pipelines are: chatterbot_instruct, trec_questions"


def test_run_reports_a_failing_step(tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("question,category\nwhat?,A\n")
    spec = tiny_spec(bad, tiny_model_dir)
    spec["task"] = {"text_column": "text", "label_column": "category"}
    specs = write_spec("broken", spec)
    out = tuneline("run", "--pipeline", "broken", "--specs-dir", str(specs), "--data-dir", str(tmp_path / "d"),
                   home=tmp_path / "home")
    assert out.returncode == 1
    # The whole stderr: a progress line, then one short error block (no traceback, no Dagster event dump).
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4 and lines[0].endswith(f"raw_data: read 1 rows from {bad}"), out.stderr
    assert lines[1:3] == [
        f"error: step cleaned_dataset failed: {bad}, column 'text': has no column 'text' (named by "
        "task.text_column); its columns are ['question', 'category']",
        "not run, because of the failures above: splits, base_model, finetuned_checkpoint, evaluation_report"]
    assert lines[3].startswith("broken: Dagster run ") and lines[3].endswith(" failed; its events are in the "
                                                                              "Dagster UI (make ui)")
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_validate_reports_broken_spec(tmp_path: Path) -> None:
    spec = tmp_path / "oops.yaml"
    spec.write_text("source: {kind: local, path: x.csv}\nbase_model: {model: {source: hub, name: m}}\nepochs: 3\n")
    out = tuneline("validate", str(spec), home=tmp_path / "home")
    assert out.returncode == 2
    assert "line 3: epochs: unknown key" in out.stderr
    ok = tuneline("validate", home=tmp_path / "home")
    assert ok.returncode == 0 and ok.stdout.splitlines()[0].startswith("ok: chatterbot_instruct") and "ok: trec_questions" in ok.stdout


BROKEN_SPECS = {  # realistic mistakes, each in its own file beside a valid spec
    "sum_too_high": "splits: {train: 0.9, validation: 0.2, test: 0.1}\n",
    "negative_length": "training: {max_length: -5}\n",
    "fast": "training: {learning_rate: fast}\n",
    "misspelt": "trainig: {epochs: 2}\n",
    "twice": "training: {epochs: 2}\ntraining: {epochs: 3}\n",
}


def test_a_broken_spec_never_takes_the_other_pipelines_down(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    import yaml

    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    base = yaml.safe_dump({k: v for k, v in tiny_spec(trec_slice_csv, tiny_model_dir).items()
                           if k in ("source", "task", "base_model")})
    for name, extra in BROKEN_SPECS.items():
        (specs / f"{name}.yaml").write_text(base + extra, encoding="utf-8")
    (specs / "tabs.yaml").write_text(base + "training:\n\tepochs: 2\n", encoding="utf-8")
    home = tmp_path / "home"

    out = tuneline("validate", *sorted(str(p) for p in specs.glob("*.yaml")), home=home)
    assert out.returncode == 2 and out.stdout.strip() == f"ok: tiny (spec hash {out.stdout.split()[-1][:-1]})"
    assert "Traceback" not in out.stderr
    for name, needle in {"sum_too_high": "must sum to 1", "negative_length": "training.max_length",
                         "fast": "training.learning_rate", "misspelt": "trainig: unknown key",
                         "twice": "training: given twice (first at line", "tabs": "not valid YAML"}.items():
        block = out.stderr.split(f"error: {specs / name}.yaml")[1].split("error: ")[0]
        assert needle in block, (name, block)

    # The Dagster code location still loads: the valid pipeline, and one asset per broken file that says why.
    from pipelines.definitions import build_definitions

    defs = build_definitions(specs_dir=specs, data_dir=tmp_path / "data")
    assert [job.name for job in defs.jobs or []] == ["tiny_job"]
    graph = defs.resolve_asset_graph()
    broken = {k.path[-1]: graph.get(k).description for k in graph.get_all_asset_keys() if k.path[0] == "broken_specs"}
    assert set(broken) == {*BROKEN_SPECS, "tabs"}
    assert "line" in broken["fast"] and "training.learning_rate" in broken["fast"]

    listed = tuneline("list", home=home)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    refused = tuneline("run", "--pipeline", "fast", "--specs-dir", str(specs), home=home)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"error: {specs / 'fast'}.yaml: 1 problem in pipeline spec:")
    assert "training.learning_rate" in refused.stderr


BAD = PROJECT_ROOT / "tests" / "fixtures" / "bad_inputs"


@pytest.mark.parametrize(("data", "labels", "expected"), [
    ("label_case_variants.csv", None,
     "error: check gate/cleaned_dataset:labels_are_distinct failed (ERROR): labels_are_distinct failed: "
     "expect_column_values_to_be_between(column='count', max_value=1.0) observed 1 unexpected row(s) — e.g. "
     "count 2, variants 'LOC | loc'. To fix: spell each label one way"),
    ("ticket_ids.csv", None, "error: check gate/cleaned_dataset:texts_look_like_text failed (ERROR)"),
    ("half_empty.csv", None, "error: check gate/cleaned_dataset:cleaning_kept_most_rows failed (ERROR): "
                             "cleaning_kept_most_rows failed: expect_column_values_to_be_between(column='share_lost', "
                             "max_value=0.3)"),
    ("good.csv", ["DESC", "ENTY", "HUM", "LOC", "NUM"],
     "error: check gate/cleaned_dataset:declared_labels_have_rows failed (ERROR): declared_labels_have_rows failed: "
     "expect_column_values_to_be_between(column='rows', min_value=1.0) observed 1 unexpected row(s) — e.g. rows 0, "
     "label 'ENTY'. To fix: add rows of the listed labels"),
])
def test_data_that_would_train_silently_wrong_stops_with_one_short_block(
        tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path], data: str,
        labels: list[str] | None, expected: str) -> None:
    spec = tiny_spec(BAD / data, tiny_model_dir)
    spec["task"] = {"text_column": "text", "label_column": "label", **({"labels": labels} if labels else {})}
    specs = write_spec("gate", spec)
    out = tuneline("run", "--pipeline", "gate", "--specs-dir", str(specs), "--data-dir", str(tmp_path / "d"),
                   home=tmp_path / "home")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    progress = re.compile(r"^\d\d:\d\d:\d\d [a-z_]+: ")
    block = [line for line in out.stderr.strip().splitlines() if not progress.match(line)]
    assert 3 <= len(block) <= 15, out.stderr
    assert any(line.startswith(expected) for line in block), block
    assert block[-2] == "not run, because of the failures above: splits, base_model, finetuned_checkpoint, " \
                        "evaluation_report"
    assert block[-1].startswith("gate: Dagster run ") and all(
        line.startswith("error: check gate/cleaned_dataset:") for line in block[:-2])
    assert not (tmp_path / "d" / "checkpoints").exists()
