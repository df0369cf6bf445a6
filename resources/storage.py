"""Where tuneline writes: asset values (Parquet for tables, pickle for small records), checkpoints, reports."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import pandas as pd

from pipelines.core.files import atomic_path, ensure_writable, write_problem

RUNS_FOLDER = ".runs"  # each run's own asset values, beside the latest


class StorageResource(dg.ConfigurableResource):
    """The generated-data folder: one subfolder per kind of artifact, one per pipeline below it."""

    data_dir: str

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def run_folder(self, kind: str, pipeline: str, run_id: str) -> Path:
        """A fresh folder for an artifact made by one Dagster run, e.g. checkpoints/<pipeline>/<run id>."""
        return self.root / kind / pipeline / run_id

    def scratch_folder(self, pipeline: str) -> Path:
        """Where a pipeline's training keeps resumable checkpoints until its result is saved."""
        return self.root / "scratch" / pipeline

    def asset_folder(self, pipeline: str) -> Path:
        return self.root / "assets" / pipeline

    def sweep_storage(self) -> str:
        """Where sweeps keep their Optuna studies: the instance's PostgreSQL database when the instance is on
        PostgreSQL (TUNELINE_DAGSTER_POSTGRES_URL), else an SQLite file beside the data."""
        url = os.environ.get("TUNELINE_DAGSTER_POSTGRES_URL", "").strip()
        if url:  # psycopg2 named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed
            scheme, _, rest = url.partition("://")
            return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else url
        folder = self.root / "sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(folder / 'optuna.db').resolve()}"


class PipelineIOManager(dg.ConfigurableIOManager):
    """Stores DataFrames as Parquet and other values as pickle under <data_dir>/assets/<asset key>.

    That file is the latest value (what a later run, the UI and lineage read). Each run also keeps its own value
    under <data_dir>/assets/<pipeline>/.runs/<run id>/ (a hard link: no second copy), and a step reads its
    upstream value from the run that produced it: two runs of one pipeline at the same time never read each
    other's data. The values of the last KEPT_RUNS runs are kept.
    """

    data_dir: str
    KEPT_RUNS: ClassVar[int] = 20

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Every step stores its value here: a data folder that cannot be written fails the step before it starts,
        naming the folder and what to do (not a PermissionError deep in a library, with half a result written)."""
        ensure_writable(Path(self.data_dir))

    def _path(self, key: dg.AssetKey, suffix: str) -> Path:
        return Path(self.data_dir, "assets", *key.path).with_suffix(suffix)

    def _run_path(self, key: dg.AssetKey, run_id: str, suffix: str) -> Path:
        return Path(self.data_dir, "assets", *key.path[:-1], RUNS_FOLDER, run_id, key.path[-1]).with_suffix(suffix)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        try:
            self._store(context, obj)
        except OSError as exc:  # no permission, a read-only disk, no space: said once, never retried
            problem = write_problem(exc, Path(self.data_dir))
            if problem is None:
                raise
            raise dg.Failure(description=str(problem), allow_retries=False) from problem

    def _store(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        key = context.asset_key
        suffix, stale = (".parquet", ".pkl") if isinstance(obj, pd.DataFrame) else (".pkl", ".parquet")
        path, own = self._path(key, suffix), self._run_path(key, context.run_id, suffix)
        own.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            if isinstance(obj, pd.DataFrame):
                self._write_parquet(obj, tmp, key)
            else:
                tmp.write_bytes(pickle.dumps(obj))
            own.unlink(missing_ok=True)  # a retried step writes its value again
            os.link(tmp, own)  # this run's value, before another run can replace the latest
        self._path(key, stale).unlink(missing_ok=True)
        self._prune(own.parent.parent)
        context.add_output_metadata({"stored_at": dg.MetadataValue.path(str(path))})

    @staticmethod
    def _write_parquet(frame: pd.DataFrame, path: Path, key: dg.AssetKey) -> None:
        """A table that Parquet cannot hold is bad data, not an outage: it fails at once (never retried), naming
        the column."""
        import pyarrow as pa

        try:
            frame.to_parquet(path, index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            detail = str(exc.args[0]) if exc.args else str(exc)
            column = next((str(a) for a in exc.args[1:] if "column" in str(a)), "")
            raise dg.Failure(description=f"{key.to_user_string()} cannot be stored as Parquet: {detail}"
                                         f"{'; ' + column if column else ''}. Each column must hold one kind of "
                                         "value (text, numbers, or lists of one shape)",
                             allow_retries=False) from None

    def _prune(self, runs: Path) -> None:
        folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for folder in folders[:-self.KEPT_RUNS]:
            shutil.rmtree(folder, ignore_errors=True)

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        key = upstream.asset_key if upstream else context.asset_key
        try:
            run_id = upstream.run_id if upstream else None
        except dg.DagsterInvariantViolationError:  # loaded from an earlier materialization
            run_id = None
        candidates = [self._run_path(key, run_id, s) for s in (".parquet", ".pkl")] if run_id else []
        parquet, pkl = self._path(key, ".parquet"), self._path(key, ".pkl")
        for path in [*candidates, parquet, pkl]:
            if path.exists():
                return pd.read_parquet(path) if path.suffix == ".parquet" else pickle.loads(path.read_bytes())
        raise FileNotFoundError(f"asset {key.to_user_string()} has not been materialized yet "
                                f"(no {parquet.name} or {pkl.name} under {parquet.parent}); materialize it first")
