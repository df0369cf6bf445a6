"""Where tuneline writes: asset values (Parquet for tables, pickle for small records), checkpoints, reports."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.files import atomic_path, write_bytes_atomic


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


class PipelineIOManager(dg.ConfigurableIOManager):
    """Stores DataFrames as Parquet and other values as pickle under <data_dir>/assets/<asset key>."""

    data_dir: str

    def _path(self, key: dg.AssetKey, suffix: str) -> Path:
        return Path(self.data_dir, "assets", *key.path).with_suffix(suffix)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        key = context.asset_key
        if isinstance(obj, pd.DataFrame):
            path = self._path(key, ".parquet")
            with atomic_path(path) as tmp:
                obj.to_parquet(tmp, index=False)
            stale = self._path(key, ".pkl")
        else:
            path = self._path(key, ".pkl")
            write_bytes_atomic(path, pickle.dumps(obj))
            stale = self._path(key, ".parquet")
        if stale.exists():
            stale.unlink()
        context.add_output_metadata({"stored_at": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        parquet, pkl = self._path(key, ".parquet"), self._path(key, ".pkl")
        if parquet.exists():
            return pd.read_parquet(parquet)
        if pkl.exists():
            return pickle.loads(pkl.read_bytes())
        raise FileNotFoundError(f"asset {key.to_user_string()} has not been materialized yet "
                                f"(no {parquet.name} or {pkl.name} under {parquet.parent}); materialize it first")
