"""`tuneline run`: materializes a pipeline in the Dagster instance at $DAGSTER_HOME and prints its summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.test_bad_inputs import SPECS


def tuneline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_json_prints_the_report_summary_and_records_the_run(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    for broken in SPECS.glob("*.yaml"):  # broken specs beside it take nothing down
        if broken.stem != "valid":
            shutil.copy(broken, specs / broken.name)
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
    # stderr is not a terminal here: plain lines, no escape codes, no raw dicts or library bars; a training's step
    # lines every quarter of the way; each check suite one line with its count (every check is in the Dagster log).
    assert "\x1b[" not in out.stderr and "\r" not in out.stderr and "{'loss'" not in out.stderr
    assert not re.search(r"\d+%\|", out.stderr)  # no tqdm bar
    steps = re.findall(r"finetuned_checkpoint: step (\d+)/(\d+)", out.stderr)
    assert 2 <= len(steps) <= 5 and steps[-1][0] == steps[-1][1], steps
    assert re.search(r"cleaned_dataset_quality: (\d+) of \1 checks on cleaned_dataset passed", out.stderr)
    assert ": passed (" not in out.stderr
    assert len(out.stderr.splitlines()) <= 40, out.stderr  # the whole run's progress: about one screen

    # The run lives in the instance the UI reads (DAGSTER_HOME), with every asset materialized.
    assert (home / "dagster.yaml").read_text().count("enabled: false") == 1
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(summary["run_id"])
        assert run is not None and run.is_success
        for name in ("raw_data", "evaluation_report"):
            event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", name]))
            assert event is not None and event.run_id == summary["run_id"]


def test_check_materializes_the_data_and_its_checks_only_and_says_whether_it_is_ready(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    labels = sorted(set(pd.read_csv(trec_slice_csv)["category"]))
    write_spec("good", tiny_spec(trec_slice_csv, tiny_model_dir))
    # A label declared in the spec that the data never uses: a blocking check fails, training would not start.
    specs = write_spec("typo", tiny_spec(trec_slice_csv, tiny_model_dir,
                                         task={"labels": [*labels, "LOCATOIN"]}))
    home, data = tmp_path / "home", tmp_path / "data"

    good = tuneline("check", "good", "--specs-dir", str(specs), "--data-dir", str(data), home=home)
    assert good.returncode == 0, good.stderr[-3000:]
    lines = good.stdout.strip().splitlines()
    assert lines[0].startswith("good: data check (Dagster run ")
    assert lines[1] == "  raw_data: 400 rows"
    assert re.fullmatch(r"  cleaned_dataset: \d+ rows kept, \d+ dropped", lines[2])
    assert "    check labels_are_known: passed" in lines and "    check splits_do_not_overlap: passed" in lines
    assert re.fullmatch(r"good: the data is ready: (\d+) of \1 checks passed; train it with `tuneline run "
                        r"--pipeline good`", lines[-1])
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the data assets only: nothing was trained
        done = {k.path[-1] for k in instance.get_asset_keys() if k.path[0] == "good"}
        assert done == {"raw_data", "cleaned_dataset", "splits"}
    assert not (data / "checkpoints").exists()

    bad = tuneline("check", "typo", "--json", "--specs-dir", str(specs), "--data-dir", str(data), home=home)
    assert bad.returncode == 1
    result = json.loads(bad.stdout)
    assert result["ready"] is False and "splits" not in result["assets"]
    [failed] = [c for c in result["checks"] if not c["passed"]]
    assert (failed["check"], failed["severity"]) == ("declared_labels_have_rows", "ERROR")
    assert "LOCATOIN" in failed["description"]
    assert "error: check typo/cleaned_dataset:declared_labels_have_rows failed" in bad.stderr
    assert "not run, because of the failures above: splits" in bad.stderr
    plain = tuneline("check", "typo", "--specs-dir", str(specs), "--data-dir", str(data), home=home)
    assert plain.returncode == 1  # the failed check is listed once, where its asset's checks are
    assert "error: check" not in plain.stderr, plain.stderr
    assert "    check declared_labels_have_rows: FAILED: " in plain.stdout and "LOCATOIN" in plain.stdout
    assert "not run, because of the failures above: splits" in plain.stderr

    unknown = tuneline("check", "nope", "--specs-dir", str(specs), home=home)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: no pipeline 'nope'; pipelines are: good, typo"


def test_on_a_terminal_training_is_one_live_bar_and_the_summary_follows(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    """stderr is a terminal (a pseudo-terminal): the steps of a training redraw one line (a bar with the step
    count, epoch, loss and ETA) instead of adding lines; its last figures stay; the summary comes after."""
    import pty

    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir, training={"logging_steps": 1}))
    leader, follower = pty.openpty()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "TERM": "xterm", "COLUMNS": "200"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "tiny", "--specs-dir",
                                str(specs), "--data-dir", str(tmp_path / "data")], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = process.communicate(timeout=600)
    os.close(leader)
    screen = b"".join(chunks).decode()
    assert process.returncode == 0, screen[-3000:]
    redraws = re.findall(r"\r\x1b\[2K[^\r\n]*finetuned_checkpoint: \[[#-]{20}\] (\d+)/(\d+) loss [\d.]+ eta \d+s "
                         r"epoch [\d.]+ lr \S+ elapsed \d+s", screen)
    assert len(redraws) >= 5, screen[-3000:]  # one per logged step, on the same line
    total = int(redraws[0][1])
    assert [int(d) for d, _ in redraws] == sorted(int(d) for d, _ in redraws) and int(redraws[-1][0]) < total
    # The screen as a terminal leaves it: each line is what follows its last carriage return. The bar was
    # overwritten by the last step's figures, and lines printed meanwhile went above it.
    lines = [line.split("\r")[-1].replace("\x1b[2K", "") for line in screen.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line]
    assert any(re.search(rf"finetuned_checkpoint: step {total}/{total} \(100%\)", line) for line in lines)
    assert not any(re.search(r"\[[#-]{20}\]", line) for line in lines), lines
    assert any("finetuned_checkpoint: epoch 1.00: validation loss" in line for line in lines)
    assert len(lines) <= 60, len(lines)
    assert "evaluation on" in stdout and "promotion:" in stdout  # the summary, on stdout, after the progress


def test_run_unknown_pipeline_lists_the_known_ones(tmp_path: Path) -> None:
    out = tuneline("run", "--pipeline", "nope", home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: no pipeline 'nope'; pipelines are: chatterbot_instruct, trec_questions"


def test_a_specs_dir_that_is_not_there_is_named(tmp_path: Path) -> None:
    out = tuneline("check", "good", "--specs-dir", str(tmp_path / "nodir"), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --specs-dir {tmp_path / 'nodir'}: no such folder (expected the folder of " \
                                 "spec files)"


def test_run_reports_a_failing_step(tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("question,category\nwhat?,A\n")
    spec = tiny_spec(bad, tiny_model_dir)
    spec["task"] = {**spec["task"], "text_column": "text", "label_column": "category"}
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
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:  # bad data is never retried
        [run] = instance.get_runs()
        assert not instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    # --debug adds where it came from: the step's Python traceback, under its error line.
    out = tuneline("--debug", "run", "--pipeline", "broken", "--specs-dir", str(specs), "--data-dir",
                   str(tmp_path / "d"), home=tmp_path / "home")
    assert out.returncode == 1 and "Traceback" not in lines
    assert "error: step cleaned_dataset failed:" in out.stderr and "select_examples" in out.stderr
    assert 'File "' in out.stderr and "SourceError" in out.stderr


def test_validate_reports_broken_spec(tmp_path: Path) -> None:
    spec = tmp_path / "oops.yaml"
    spec.write_text("source: {kind: local, path: x.csv}\nbase_model: {model: {source: hub, name: m}}\nepochs: 3\n")
    out = tuneline("validate", str(spec), home=tmp_path / "home")
    assert out.returncode == 2
    assert "line 3: epochs: unknown key" in out.stderr
    ok = tuneline("validate", home=tmp_path / "home")
    assert ok.returncode == 0 and ok.stdout.splitlines()[0].startswith("ok: chatterbot_instruct") and "ok: trec_questions" in ok.stdout


def test_a_broken_spec_never_takes_the_other_pipelines_down(tmp_path: Path) -> None:
    """The specs of tests/fixtures/bad_inputs/specs: broken files beside a valid one (their messages are
    asserted in tests/test_bad_inputs.py; here, that the rest still works)."""
    from pipelines.definitions import build_definitions
    from tests.test_bad_inputs import SPEC_ERRORS

    broken = {p.stem for p in SPECS.glob("*.yaml")} - {"valid"}
    assert broken == set(SPEC_ERRORS) and len(broken) >= 8
    # The Dagster code location still loads: the valid pipeline, and one asset per broken file that says why.
    defs = build_definitions(specs_dir=SPECS, data_dir=tmp_path / "data")
    assert [job.name for job in defs.jobs or []] == ["valid_job"]
    graph = defs.resolve_asset_graph()
    described = {k.path[-1]: graph.get(k).description for k in graph.get_all_asset_keys()
                 if k.path[0] == "broken_specs"}
    assert set(described) == broken
    assert "line 6" in described["learning_rate_fast"] and "training.learning_rate" in described["learning_rate_fast"]

    listed = tuneline("list", "--specs-dir", str(SPECS), home=tmp_path / "home")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    assert "valid" in listed.stdout and all(name in listed.stdout + listed.stderr for name in broken)


def test_the_instance_tuneline_creates_queues_runs_and_pools_training(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:

    from pipelines.cli import ensure_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = ensure_dagster_home()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        config = instance.get_concurrency_config()  # what the run queue daemon and the pools go by
        assert config.run_queue_config.max_concurrent_runs == max(1, min(4, (os.cpu_count() or 2) // 2))
        assert config.pool_config.default_pool_limit == 1


def test_tuneline_run_silences_plain_tqdm_bars_before_any_library_imports_tqdm(tmp_path: Path) -> None:
    """tqdm reads TQDM_DISABLE once, at its first import; the definitions import it (through the libraries), so
    `tuneline run` must be quiet before it loads them (transformers' GGUF conversion draws such a bar)."""
    script = ("import sys\nfrom pipelines import cli\n"
              f"code = cli.main(['run', '--pipeline', 'nope', '--specs-dir', {str(tmp_path)!r}])\n"
              "import tqdm\nprint(code, tqdm.tqdm(range(3)).disable)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**env, "DAGSTER_HOME": str(tmp_path / "home")}, timeout=300)
    assert done.stdout.split() == ["2", "True"], done.stderr[-3000:]


def test_tuneline_rewrites_only_a_dagster_yaml_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import PREVIOUS_DAGSTER_YAML, ensure_dagster_home

    monkeypatch.delenv("TUNELINE_DAGSTER_POSTGRES_URL", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (home / "dagster.yaml").write_text(PREVIOUS_DAGSTER_YAML.format(runs=3))  # the previous release's file
    monkeypatch.setenv("TUNELINE_DAGSTER_POSTGRES_URL", "postgresql://u:p@db:5432/dagster")
    ensure_dagster_home()
    assert "postgres_url:" in (home / "dagster.yaml").read_text()
    monkeypatch.delenv("TUNELINE_DAGSTER_POSTGRES_URL")
    ensure_dagster_home()
    assert "postgres" not in (home / "dagster.yaml").read_text()

    edited = (home / "dagster.yaml").read_text().replace("default_limit: 1", "default_limit: 2")
    (home / "dagster.yaml").write_text(edited)  # now it is the user's
    monkeypatch.setenv("TUNELINE_DAGSTER_POSTGRES_URL", "postgresql://u:p@db:5432/dagster")
    ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == edited
    assert "is not one tuneline wrote and has no postgres storage" in capsys.readouterr().err


@pytest.mark.parametrize("bars", ["1", "0"], ids=["quiet", "verbose"])
def test_quiet_libraries_also_silences_bars_that_no_library_switch_reaches(bars: str) -> None:
    """transformers' GGUF de-quantization draws a plain tqdm bar: quiet_libraries keeps it out of the run's output,
    and HF_HUB_DISABLE_PROGRESS_BARS=0 brings it back with the others."""
    script = ("from pipelines.terminal import quiet_libraries\nquiet_libraries()\n"
              "import transformers.modeling_gguf_pytorch_utils as gguf_utils\n"
              "for _ in gguf_utils.tqdm(range(3), desc='Converting and de-quantizing GGUF tensors'):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120, env={**env, "HF_HUB_DISABLE_PROGRESS_BARS": bars}, check=True)
    assert ("Converting and de-quantizing GGUF tensors" in done.stderr) == (bars == "0"), done.stderr[-500:]


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_predict_refuses_a_token_limit_below_one_before_loading_anything(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--pipeline", "nope", "--max-new-tokens", value, "hello"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "argument --max-new-tokens: expected" in error and "Traceback" not in error


def test_predict_without_a_champion_names_the_registered_versions(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines import cli
    from resources.tracking import TrackingResource

    tracking = TrackingResource(data_dir=str(tmp_path))
    assert cli.main(["predict", "--pipeline", "demo", "--data-dir", str(tmp_path), "hello"]) == 2
    assert "has no model for pipeline 'demo'; run `tuneline run --pipeline demo` first" in capsys.readouterr().err
    client = tracking.client()
    run = client.create_run(client.create_experiment("demo"))
    client.create_registered_model("demo")
    client.create_model_version("demo", source=str(tmp_path / "model"), run_id=run.info.run_id)
    assert cli.main(["predict", "--pipeline", "demo", "--data-dir", str(tmp_path), "hello"]) == 2
    error = capsys.readouterr().err
    assert "has 1 registered version(s) (1)" in error and "pass --version 1 to use the newest anyway" in error


@pytest.mark.parametrize(("name", "meant"), [("trec_question", "trec_questions"), ("TREC-Questions", "trec_questions"),
                                             ("chatterbot", "chatterbot_instruct")])
def test_a_misspelt_pipeline_name_gets_did_you_mean(tmp_path: Path, name: str, meant: str) -> None:
    out = tuneline("run", "--pipeline", name, home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: no pipeline {name!r} (did you mean {meant!r}?); pipelines are: "
                                  "chatterbot_instruct, trec_questions")


def test_a_data_folder_that_cannot_be_written_is_one_block_and_nothing_is_written(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    """A data folder the user may not write (as root, the command runs without the capability to override file
    permissions, as any other user would): one error line naming the folder and what to do; nothing written."""
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    command = [sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "tiny", "--specs-dir", str(specs),
               "--data-dir", str(data / "run")]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        out = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"error: the data folder {data / 'run'} cannot be written: permission denied at {data}; make it "
            f"writable (chmod u+rwx {data}) or pass --data-dir to a folder you can write. Nothing was written"]
        assert list(data.iterdir()) == []
    finally:
        data.chmod(0o755)
