"""A registered checkpoint as a self-contained bundle: its weights, a copy of the base model's files and the rows it
answers, so that a served model needs nothing from the machine that trained it (no virtualenv path, no Hub).

Pure Python: resources/mlflow_model.py wraps a bundle as an MLflow Model (python-function flavour); this module
knows only folders, records and tables.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core.digests import combined_digest, sha256_file
from pipelines.core.errors import CheckpointError, TunelineError
from pipelines.core.records import CheckpointRecord

CHECKPOINT, BASE_MODEL = "checkpoint", "base_model"  # the bundle's two folders (MLflow Model artifacts)
ARTIFACTS = "artifacts"  # where an MLflow Model folder keeps them
BASE_MANIFEST = "tuneline-base.json"  # the copied base model's files and their digest
INPUT_COLUMN = "text"  # what every served model reads
# What loading a base model needs: config, weights, tokenizer, sentence-transformers' pooling and modules; code
# files only for a model that was allowed to run remote code. Pickled weights only where the folder has no others.
BASE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*", "README.md")
# The inference stack a served model imports (with the versions that trained it); those not installed are left out.
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "safetensors", "tokenizers", "sentence-transformers",
                "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "scikit-learn")


def copy_base_model(record: CheckpointRecord, target: Path) -> Path:
    """The files of the checkpoint's base model that loading needs, copied to `target` with a manifest of their
    digests (checked again when the bundle is loaded)."""
    base = Path(record.base_model.local_path)
    if not base.is_dir():
        raise CheckpointError(f"checkpoint {record.path} needs its base model {record.base_model.name} at {base}, "
                              "which is not on this machine (materialize the pipeline's base_model asset first)")
    patterns = BASE_PATTERNS + (("*.py",) if record.base_model.trust_remote_code else ())
    files = sorted({p for pattern in patterns for p in base.glob(pattern) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in files):
        files += sorted(base.glob("*.bin"))
    for path in files:
        relative = path.relative_to(base)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)
    digests = [(str(p.relative_to(base)), sha256_file(p)) for p in files]
    (target / BASE_MANIFEST).write_text(json.dumps({"name": record.base_model.name, "files": dict(digests),
                                                    "sha256": combined_digest(digests)}, indent=2), encoding="utf-8")
    return target


def verified_base(folder: Path) -> Path:
    """A bundled base model folder, after checking its files against its manifest."""
    manifest = folder / BASE_MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is not a bundled base model (no {BASE_MANIFEST})")
    files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    changed = [name for name, sha in files.items()
               if not (folder / name).is_file() or sha256_file(folder / name) != sha]
    if changed:
        raise CheckpointError(f"the bundled base model in {folder} has files that are missing or changed after "
                              f"registration: {', '.join(changed[:5])}")
    return folder


def bundled_record(checkpoint: Path, base: Path, model_version: str | None = None) -> CheckpointRecord:
    """The record of a bundle's checkpoint, its base model read from the bundle's copy."""
    from pipelines.core.tasks import checkpoint_from_folder

    return checkpoint_from_folder(checkpoint, model_version=model_version, base_path=verified_base(base))


def registered_record(folder: Path, model_version: str | None = None) -> CheckpointRecord:
    """The record of a registered version as downloaded: an MLflow Model folder holding a bundle (its artifacts), or
    a plain checkpoint folder (versions registered before bundles, which need their base model on this machine)."""
    from pipelines.core.tasks import checkpoint_from_folder

    artifacts = folder / ARTIFACTS
    if (artifacts / CHECKPOINT).is_dir() and (artifacts / BASE_MODEL).is_dir():
        return bundled_record(artifacts / CHECKPOINT, artifacts / BASE_MODEL, model_version)
    return checkpoint_from_folder(folder, model_version=model_version)


def pinned_requirements() -> list[str]:
    """The inference stack as installed here, pinned (a local build tag such as +cpu dropped: pip cannot ask an
    index for it)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def input_texts(rows: Any) -> list[str]:
    """The texts of a request: a table with a `text` column (or one column), a list of strings or of {"text": ...}
    objects, or one string. ValueError names what is wrong."""
    if isinstance(rows, str):
        return [rows]
    if isinstance(rows, pd.Series):
        rows = rows.tolist()
    if isinstance(rows, pd.DataFrame):
        if INPUT_COLUMN in rows.columns:
            column = rows[INPUT_COLUMN]
        elif len(rows.columns) == 1:
            column = rows.iloc[:, 0]
        else:
            raise ValueError(f"expected a column {INPUT_COLUMN!r}, got columns {list(rows.columns)}")
        rows = column.tolist()
    if isinstance(rows, dict):
        rows = [rows]
    texts = []
    for n, row in enumerate(rows if isinstance(rows, Sequence) else list(rows)):
        value = row.get(INPUT_COLUMN) if isinstance(row, dict) else row
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"row {n}: expected a non-empty string in {INPUT_COLUMN!r}, got {value!r}")
        texts.append(value)
    return texts


def example_texts(data: pd.DataFrame, count: int = 2) -> list[str]:
    """A few test-split texts of the training data, as a served model's input example."""
    if INPUT_COLUMN not in data.columns:
        raise TunelineError(f"the training data has no {INPUT_COLUMN!r} column to take an input example from")
    rows = data[data["split"] == "test"] if "split" in data.columns else data
    texts = [t for t in rows[INPUT_COLUMN].tolist() if isinstance(t, str) and t.strip()]
    if not texts:
        texts = [t for t in data[INPUT_COLUMN].tolist() if isinstance(t, str) and t.strip()]
    return texts[:count]
