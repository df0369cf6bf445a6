"""The IO manager: the latest value of each asset, and each run's own value, so that two runs of one pipeline at
the same time never read each other's data."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from resources.storage import PipelineIOManager


def load(manager: PipelineIOManager, key: dg.AssetKey, run_id: str | None) -> object:
    upstream = dg.build_output_context(asset_key=key, run_id=run_id) if run_id else None
    return manager.load_input(dg.build_input_context(asset_key=key, upstream_output=upstream))


def test_each_run_reads_the_value_it_produced_and_others_read_the_latest(tmp_path: Path) -> None:
    manager = PipelineIOManager(data_dir=str(tmp_path))
    splits, record = dg.AssetKey(["p", "splits"]), dg.AssetKey(["p", "base_model"])
    for run_id, rows in (("run-a", 3), ("run-b", 5)):  # run b finishes its write last: it is the latest
        manager.handle_output(dg.build_output_context(asset_key=splits, run_id=run_id), pd.DataFrame({"x": range(rows)}))
        manager.handle_output(dg.build_output_context(asset_key=record, run_id=run_id), {"rows": rows})
    assert len(load(manager, splits, "run-a")) == 3 and load(manager, record, "run-a") == {"rows": 3}  # type: ignore
    assert len(load(manager, splits, "run-b")) == 5 and load(manager, record, "run-b") == {"rows": 5}  # type: ignore
    assert len(load(manager, splits, None)) == 5  # type: ignore[arg-type]
    latest = tmp_path / "assets" / "p" / "splits.parquet"
    own = tmp_path / "assets" / "p" / ".runs" / "run-a" / "splits.parquet"
    assert latest.stat().st_ino != own.stat().st_ino and own.stat().st_nlink == 1  # a's value outlived b's write


def test_only_the_last_runs_values_are_kept(tmp_path: Path) -> None:
    manager = PipelineIOManager(data_dir=str(tmp_path))
    key = dg.AssetKey(["p", "splits"])
    for n in range(PipelineIOManager.KEPT_RUNS + 3):
        manager.handle_output(dg.build_output_context(asset_key=key, run_id=f"run-{n:02d}"), pd.DataFrame({"x": [n]}))
    kept = sorted(p.name for p in (tmp_path / "assets" / "p" / ".runs").iterdir())
    assert kept == [f"run-{n:02d}" for n in range(3, PipelineIOManager.KEPT_RUNS + 3)]


def test_a_table_parquet_cannot_hold_fails_at_once_naming_the_column_and_keeps_the_previous_value(
        tmp_path: Path) -> None:
    import pytest

    manager = PipelineIOManager(data_dir=str(tmp_path))
    key = dg.AssetKey(["p", "raw_data"])
    manager.handle_output(dg.build_output_context(asset_key=key, run_id="run-a"), pd.DataFrame({"x": ["ok"]}))
    mixed = pd.DataFrame({"x": pd.Series([["a", "b"], "c"], dtype=object)})
    with dg.build_output_context(asset_key=key, run_id="run-b") as context, pytest.raises(dg.Failure) as failure:
        manager.handle_output(context, mixed)
    assert failure.value.allow_retries is False  # bad data is not an outage: the retry policy does not rerun it
    assert "p/raw_data cannot be stored as Parquet" in str(failure.value.description)
    assert "column x" in str(failure.value.description)
    assert load(manager, key, None)["x"].tolist() == ["ok"]  # type: ignore[index]
    assert not [p for p in (tmp_path / "assets" / "p").rglob("*") if p.is_file() and "tmp" in p.name]


def test_a_data_folder_that_cannot_be_written_fails_the_step_before_it_starts_and_writes_nothing(
        tmp_path: Path) -> None:
    """A file where the data folder should be (the folder cannot be made): the io manager's setup refuses, naming
    the folder and the file in the way; a write that fails later is one Failure that is not retried."""
    import pytest

    from pipelines.core.errors import DataFolderError

    (tmp_path / "data").write_text("not a folder")
    manager = PipelineIOManager(data_dir=str(tmp_path / "data" / "run"))
    with pytest.raises(DataFolderError) as refused:
        manager.setup_for_execution(dg.build_init_resource_context())
    assert str(refused.value) == (f"the data folder {tmp_path / 'data' / 'run'} cannot be written: a file is in the "
                                  f"way of the folder at {tmp_path / 'data'}; move the file {tmp_path / 'data'} away. "
                                  "Nothing was written")
    key = dg.AssetKey(["p", "raw_data"])
    with dg.build_output_context(asset_key=key, run_id="run-a") as context, pytest.raises(dg.Failure) as failure:
        manager.handle_output(context, pd.DataFrame({"x": ["ok"]}))
    assert failure.value.allow_retries is False and failure.value.description == str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
