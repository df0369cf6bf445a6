"""The Dagster resource for model acquisition (resources/model_store.py does the work), and a test double that serves
only local folders it is given (no site-packages lookups, never the network)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from pipelines.core.errors import ModelSourceError
from pipelines.core.selection import ModelLocation
from resources.model_store import ModelStore


class ModelStoreResource(dg.ConfigurableResource):
    """Where base models come from: packages, local folders (relative to project_root) and the Hub; GGUF
    conversions are kept in cache_dir."""

    project_root: str
    cache_dir: str

    def _store(self) -> ModelStore:
        return ModelStore(self.project_root, self.cache_dir)

    def locate(self, location: ModelLocation, allow_pickle: bool) -> tuple[Path, str | None]:
        """The model's local folder, and the revision it was taken at (when known)."""
        return self._store().locate(location, allow_pickle)

    def dequantize(self, folder: Path, gguf_file: str, sha256: str, license_id: str, name: str) -> Path:
        """The GGUF file's weights as a safetensors folder under cache_dir, keyed by the file's digest."""
        return self._store().dequantize(folder, gguf_file, sha256, license_id, name)


class LocalFolderModelStore(ModelStoreResource):
    """Test double: candidates resolve only to the local folders in `folders` (by model name or path); package
    and Hub candidates are refused as unavailable, so a test never reads site-packages or the network."""

    folders: dict[str, str] = {}

    def locate(self, location: ModelLocation, allow_pickle: bool) -> tuple[Path, str | None]:
        key = getattr(location, "name", None) or getattr(location, "path", "")
        folder = self.folders.get(key) or self.folders.get(getattr(location, "path", ""))
        if folder is None:
            raise ModelSourceError(f"{key!r} is not one of this model store's folders ({sorted(self.folders)})")
        if not Path(folder).is_dir():
            raise ModelSourceError(f"path: {folder!r} is not a folder")
        return Path(folder), None
