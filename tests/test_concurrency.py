"""Two materializations of one pipeline started together, as two clicks would start them: real processes on one
Dagster instance and one MLflow store. Neither clobbers the other's files, each gets its own registry version, the
champion alias moves once (the second run compares itself with the champion the first one set), and the
`training` pool keeps the two trainings from running at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec

pytestmark = pytest.mark.fault


def test_two_runs_started_together_keep_their_own_files_and_versions_and_promote_once(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    import dagster as dg

    # Only the majority baseline: the first model is promoted, so the second one has a champion to compare with.
    spec = tiny_spec(trec_slice_csv, tiny_model_dir, training={"batch_size": 4, "checkpoint_every": 20},
                     evaluation={"baselines": ["majority_class"]})
    specs = write_spec("twice", spec)
    data_dir, home = tmp_path / "data", tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    env.pop("TUNELINE_TRACKING_URI", None)
    argv = [sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "twice", "--json", "--specs-dir", str(specs),
            "--data-dir", str(data_dir)]
    subprocess.run([sys.executable, "-m", "pipelines.cli", "list"], env=env, cwd=PROJECT_ROOT, check=True,
                   capture_output=True)  # creates the instance's dagster.yaml once, before the race
    first, second = (subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for _ in range(2))
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    for process, (_, stderr) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout) for stdout, _ in outputs]
    run_ids = {s["run_id"] for s in summaries}
    assert len(run_ids) == 2

    # Each run's checkpoint and report in its own folder, whole.
    for run_id in run_ids:
        assert (data_dir / "checkpoints" / "twice" / run_id / "manifest.json").is_file()
        assert (data_dir / "reports" / "twice" / run_id / "report.json").is_file()
    assert not list((data_dir / "scratch" / "twice").glob("*/resumable-*"))

    # Two registry versions, one per run; the alias moved once: the later evaluation did not beat the champion.
    from resources.tracking import TrackingResource

    client = TrackingResource(data_dir=str(data_dir)).client()
    versions = client.search_model_versions("name = 'twice'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.tags["dagster.run_id"] for v in versions} == run_ids
    promoted = [v for v in versions if "tuneline.promotion" in v.tags]
    assert len(promoted) == 1
    champion = client.get_model_version_by_alias("twice", "champion")
    assert str(champion.version) == str(promoted[0].version)
    reasons = sorted(s["promotion_reason"] for s in summaries)
    assert reasons[0].startswith("first model: macro_f1") and reasons[1].startswith("not promoted: macro_f1"), reasons
    assert f"vs champion v{champion.version}" in reasons[1]

    # The training pool: the two finetuned_checkpoint steps did not overlap in time.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        spans = []
        for run_id in run_ids:
            events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                        dg.DagsterEventType.STEP_SUCCESS})
            times = {e.dagster_event.event_type_value: e.timestamp for e in events
                     if e.dagster_event and e.dagster_event.step_key == "twice__finetuned_checkpoint"}
            spans.append((times["STEP_START"], times["STEP_SUCCESS"]))
    (start_a, end_a), (start_b, end_b) = sorted(spans)
    assert end_a <= start_b, spans
