"""The definitions: expected asset keys, checks, jobs and schedules; one spec file = one asset group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from pipelines.definitions import SPECS_DIR, build_definitions, defs
from tests.conftest import PROJECT_ROOT

ASSETS = ["raw_data", "cleaned_dataset", "splits", "base_model", "finetuned_checkpoint", "evaluation_report"]
CHAT_ASSETS = [*ASSETS, "rendered_dataset"]


def asset_keys(definitions: dg.Definitions) -> set[str]:
    graph = definitions.resolve_asset_graph()
    return {key.to_user_string() for key in graph.get_all_asset_keys()}


def test_default_definitions_list_both_pipelines() -> None:
    assert asset_keys(defs) == ({f"trec_questions/{name}" for name in [*ASSETS, "incoming_data", "scored_data"]}
                                | {f"chatterbot_instruct/{name}" for name in CHAT_ASSETS})
    assert sorted(job.name for job in defs.jobs or []) == ["chatterbot_instruct_job", "trec_questions_job",
                                                           "trec_questions_scoring_job"]
    # Training never scores: the scoring assets have their own job, started by their sensor.
    training = defs.resolve_job_def("trec_questions_job").asset_layer.asset_graph.get_all_asset_keys()
    assert {k.path[-1] for k in training} == set(ASSETS)
    scoring = defs.resolve_job_def("trec_questions_scoring_job").asset_layer.asset_graph
    assert {k.path[-1] for k in scoring.executable_asset_keys} == {"incoming_data", "scored_data"}
    assert defs.resolve_sensor_def("trec_questions_scoring").default_status == dg.DefaultSensorStatus.RUNNING
    assert sorted(s.name for s in defs.schedules or []) == ["chatterbot_instruct_retraining",
                                                            "trec_questions_retraining"]
    schedule = defs.resolve_schedule_def("trec_questions_retraining")
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


CHECKS = {
    "cleaned_dataset": ["labels_look_like_classes", "labels_are_plain_text", "labels_are_known",
                        "declared_labels_have_rows", "labels_are_distinct", "texts_look_like_text",
                        "cleaning_kept_most_rows", "text_lengths_within_bounds", "texts_are_unique",
                        "row_count_within_bounds", "classes_are_balanced"],
    "splits": ["splits_do_not_overlap", "split_proportions_match_spec", "every_class_in_train_and_test",
               "validation_and_test_are_not_empty"],
}


CHAT_CHECKS = {
    "cleaned_dataset": ["roles_alternate",
                        "examples_are_unique", "row_count_within_bounds", "cleaning_kept_most_rows"],
    "splits": ["splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty"],
    "rendered_dataset": ["rendered_lengths_within_max_length", "prompt_tokens_carry_no_loss"],
}


def test_quality_checks_are_blocking_the_doctor_warns_and_all_are_part_of_the_job() -> None:
    graph = defs.resolve_asset_graph()
    expected = {f"trec_questions/{asset}:{name}" for asset, names in CHECKS.items() for name in names}
    chat = {f"chatterbot_instruct/{asset}:{name}" for asset, names in CHAT_CHECKS.items() for name in names}
    doctor = "trec_questions/splits:labels_look_right"  # the data doctor: classification only, never blocking
    scoring = {"trec_questions/incoming_data:incoming_files_have_the_column",
               "trec_questions/incoming_data:incoming_rows_are_scorable"}
    assert {k.to_user_string() for k in graph.asset_check_keys} == expected | chat | {doctor} | scoring
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        assert spec.description and spec.blocking == (key.to_user_string() != doctor), key
    job = defs.resolve_job_def("trec_questions_job")
    assert {k.to_user_string() for k in job.asset_layer.asset_graph.asset_check_keys} == expected | {doctor}


def test_asset_graph_edges_and_group() -> None:
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        node = graph.get(dg.AssetKey(["trec_questions", name]))
        return {k.path[-1] for k in node.parent_keys}

    assert parents("raw_data") == set()
    assert parents("cleaned_dataset") == {"raw_data"}
    assert parents("splits") == {"cleaned_dataset"}
    assert parents("base_model") == {"splits"}  # the probe ranks candidates on the validation split
    assert parents("finetuned_checkpoint") == {"splits", "base_model"}
    assert parents("evaluation_report") == {"splits", "finetuned_checkpoint"}
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {"trec_questions", "chatterbot_instruct"}
    for key in graph.get_all_asset_keys():  # descriptions come from the docstrings and show in the UI
        assert graph.get(key).description


def test_instruction_graph_renders_before_training() -> None:
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {k.path[-1] for k in graph.get(dg.AssetKey(["chatterbot_instruct", name])).parent_keys}

    assert parents("splits") == {"cleaned_dataset"}
    assert parents("rendered_dataset") == {"splits", "base_model"}
    assert parents("base_model") == {"splits"}
    assert parents("finetuned_checkpoint") == {"rendered_dataset", "base_model"}
    assert parents("evaluation_report") == {"rendered_dataset", "finetuned_checkpoint"}


def test_job_selects_the_whole_group() -> None:
    job = defs.resolve_job_def("trec_questions_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        f"trec_questions/{name}" for name in ASSETS}


def test_a_second_spec_file_adds_a_second_group_without_code(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copy(SPECS_DIR / "trec_questions.yaml", specs / "trec_questions.yaml")
    shutil.copy(SPECS_DIR / "trec_questions.yaml", specs / "trec_again.yaml")
    both = build_definitions(specs_dir=specs, data_dir=tmp_path / "data")
    scored = [*ASSETS, "incoming_data", "scored_data"]
    assert asset_keys(both) == {f"{p}/{name}" for p in ("trec_questions", "trec_again") for name in scored}
    assert sorted(job.name for job in both.jobs or []) == ["trec_again_job", "trec_again_scoring_job",
                                                           "trec_questions_job", "trec_questions_scoring_job"]
    graph = both.resolve_asset_graph()
    assert {graph.get(dg.AssetKey(["trec_again", n])).group_name for n in scored} == {"trec_again"}


def test_workspace_loads_the_definitions_module(tmp_path: Path) -> None:
    # What `dagster dev -w workspace.yaml` loads: the module named in workspace.yaml, in a fresh interpreter.
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_core_imports_neither_dagster_nor_mlflow() -> None:
    code = ("import sys, pkgutil, importlib, pipelines.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__): importlib.import_module('pipelines.core.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('dagster', 'mlflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_tracking_resource_imports_mlflow() -> None:
    importers = sorted(
        str(path.relative_to(PROJECT_ROOT))
        for folder in ("pipelines", "assets", "resources")
        for path in (PROJECT_ROOT / folder).rglob("*.py")
        if any(line.strip().startswith(("import mlflow", "from mlflow")) for line in path.read_text().splitlines()))
    assert importers == ["resources/mlflow_model.py", "resources/tracking.py"]


def test_every_installed_dagster_package_belongs_to_one_release() -> None:
    """Core, webserver and the integration libraries pin each other exactly (core 1.X.Y goes with libraries
    0.(X+16).Y); an unpinned library install silently picks an ancient release instead, so drift is caught here."""
    from importlib import metadata

    versions = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "dagster" or name.startswith("dagster-"):
            versions[name] = dist.version
    major, minor, patch = versions["dagster"].split(".")[:3]
    library = f"0.{int(minor) + 16}.{patch}"
    core = {"dagster", "dagster-graphql", "dagster-pipes", "dagster-shared", "dagster-webserver"}
    wrong = {n: v for n, v in versions.items() if v != (versions["dagster"] if n in core else library)}
    assert not wrong, f"dagster {versions['dagster']} needs its libraries at {library}: {wrong}"
    assert "dagster-postgres" in versions
