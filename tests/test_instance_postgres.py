"""The Dagster instance on PostgreSQL, chosen by TUNELINE_DAGSTER_POSTGRES_URL: a real server (initdb into a
temporary folder, a free loopback port), a pipeline materialized through it, and its runs, events and asset checks
read back from the database itself."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.servers import PostgresServer

pytestmark = pytest.mark.server
VARIABLE = "TUNELINE_DAGSTER_POSTGRES_URL"


def tuneline(*args: str, home: Path, url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    env.update({"DAGSTER_HOME": str(home), **({VARIABLE: url} if url else {})})
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_pipeline_materializes_through_an_instance_on_postgres(
        tmp_path: Path, postgres: PostgresServer, trec_slice_csv: Path, tiny_model_dir: Path,
        write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url = postgres.create_database("dagster").replace("postgresql+psycopg2://", "postgresql://")  # as people write it
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    home = tmp_path / "home"
    out = tuneline("run", "--pipeline", "tiny", "--specs-dir", str(specs), "--data-dir", str(tmp_path / "data"),
                   home=home, url=url)
    assert out.returncode == 0, out.stderr[-3000:]

    config = (home / "dagster.yaml").read_text()
    assert "postgres_url:\n      env: TUNELINE_DAGSTER_POSTGRES_URL" in config and "127.0.0.1" not in config
    assert not list(home.rglob("*.db")), "nothing went to SQLite files"

    # Straight from the database: the run, its events, the blocking checks and the training pool.
    [(run_id, status)] = postgres.query("dagster", "SELECT run_id, status FROM runs")
    assert status == "SUCCESS"
    events = dict(postgres.query("dagster", "SELECT dagster_event_type, count(*) FROM event_logs "
                                            f"WHERE run_id = '{run_id}' GROUP BY dagster_event_type"))
    assert events["ASSET_MATERIALIZATION"] >= 6 and events["PIPELINE_SUCCESS"] == 1, events  # the run succeeded
    checks = postgres.query("dagster", "SELECT check_name, execution_status FROM asset_check_executions "
                                       f"WHERE run_id = '{run_id}'")
    assert len(checks) >= 2 and {status for _, status in checks} == {"SUCCEEDED"}, checks

    monkeypatch.setenv(VARIABLE, postgres.url("dagster"))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_run_by_id(run_id).is_success
        assert instance.get_latest_materialization_event(dg.AssetKey(["tiny", "evaluation_report"])).run_id == run_id
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

    # Unset, the same home goes back to its own SQLite files, which know nothing of that run.
    listed = tuneline("lineage", "--pipeline", "tiny", "--data-dir", str(tmp_path / "data"), "--specs-dir",
                      str(specs), home=home, url=None)
    assert "postgres" not in (home / "dagster.yaml").read_text()
    assert "Traceback" not in listed.stderr, listed.stderr[-3000:]


def test_a_wrong_or_unreachable_postgres_url_is_one_clear_error_without_the_password(
        tmp_path: Path, postgres: PostgresServer) -> None:
    wrong = tuneline("run", "--pipeline", "trec_questions", home=tmp_path / "a", url="mysql://u:s3cret@h/db")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "TUNELINE_DAGSTER_POSTGRES_URL must be a PostgreSQL URL" in wrong.stderr
    assert "s3cret" not in wrong.stderr + wrong.stdout

    ambiguous = tuneline("run", "--pipeline", "trec_questions", home=tmp_path / "c",
                         url="postgresql://u:pa#ss/w@rd9@127.0.0.1:1/nowhere")
    assert ambiguous.returncode == 2 and "percent-encode them" in ambiguous.stderr, ambiguous.stderr[-2000:]
    assert "rd9" not in ambiguous.stderr and "pa#ss" not in ambiguous.stderr

    closed = f"postgresql://u:s3cret@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/nowhere"
    down = tuneline("run", "--pipeline", "trec_questions", home=tmp_path / "b", url=closed)
    assert down.returncode == 2 and "Traceback" not in down.stderr, down.stderr[-3000:]
    assert "PostgreSQL database 'nowhere'" in down.stderr and "cannot be used" in down.stderr
    assert "s3cret" not in down.stderr + down.stdout
