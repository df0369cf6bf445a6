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



def test_of_two_steps_that_claim_the_one_training_slot_at_once_only_one_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race behind two trainings at once on SQLite, made to happen every time: step B has found the free slot
    and is about to write its name into it when step A takes that slot. Dagster's SQLite event log writes B over A
    (SQLite ignores FOR UPDATE SKIP LOCKED), so both steps run; the event log named by the dagster.yaml tuneline
    writes blocks B, which takes the slot once A frees it."""
    import dagster as dg
    import sqlalchemy as sa
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._utils.concurrency import ConcurrencySlotStatus

    from pipelines.cli import ensure_dagster_home
    from pipelines.instance import AtomicClaimSqliteEventLogStorage

    step = "p__finetuned_checkpoint"

    def race(home: Path) -> tuple[type, list[str], list[str]]:
        """Steps A and B, each in its own instance (as in two processes), B's slot write preceded by A's claim."""
        with dg.DagsterInstance.from_config(str(home)) as a, dg.DagsterInstance.from_config(str(home)) as b:
            assert a.event_log_storage.initialize_concurrency_limit_to_default("training")
            for instance, run_id in ((a, "run-a"), (b, "run-b")):  # both were assigned: each saw a free slot
                instance.event_log_storage.add_pending_step("training", run_id, step, should_assign=True)
            status: dict[str, ConcurrencySlotStatus] = {}
            started: list[str] = []

            def a_first(conn, cursor, statement, *args) -> None:  # noqa: ANN001 - SQLAlchemy's event signature
                if statement.lstrip().upper().startswith("UPDATE CONCURRENCY_SLOTS") and not started:
                    started.append("run-a")  # once: A's own slot write passes through here too
                    status["run-a"] = a.event_log_storage.claim_concurrency_slot("training", "run-a", step).slot_status

            sa.event.listen(sa.engine.Engine, "before_cursor_execute", a_first)
            try:
                status["run-b"] = b.event_log_storage.claim_concurrency_slot("training", "run-b", step).slot_status
            finally:
                sa.event.remove(sa.engine.Engine, "before_cursor_execute", a_first)
            holders = [s.run_id for s in a.event_log_storage.get_concurrency_info("training").claimed_slots]
            claimed = sorted(r for r, s in status.items() if s == ConcurrencySlotStatus.CLAIMED)
            if claimed == ["run-a"]:  # A's training ends; B's claim goes through now
                a.event_log_storage.free_concurrency_slots_for_run("run-a")
                assert b.event_log_storage.claim_concurrency_slot("training", "run-b", step).slot_status \
                    == ConcurrencySlotStatus.CLAIMED
            return type(a.event_log_storage), claimed, holders

    monkeypatch.delenv("TUNELINE_DAGSTER_POSTGRES_URL", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert race(ensure_dagster_home()) == (AtomicClaimSqliteEventLogStorage, ["run-a"], ["run-a"])

    stock = tmp_path / "stock"  # Dagster's own SQLite event log: the reason tuneline names another one
    stock.mkdir()
    (stock / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")
    assert race(stock) == (SqliteEventLogStorage, ["run-a", "run-b"], ["run-b"]), \
        "Dagster's SQLite slot claims are atomic now: pipelines/instance.py may go"
