"""Content digests that tie artifacts to the exact data that made them: files, sets of files, tables, JSON values and
a checkpoint's weight files. Light on purpose (hashlib and json; numpy and pandas only when a table is hashed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def combined_digest(files: list[tuple[str, str]]) -> str:
    """One digest for several (name, sha256) pairs, independent of their order."""
    digest = hashlib.sha256()
    for name, sha in sorted(files):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of a table's columns and values (row order included): equal tables, equal digests."""
    import numpy as np
    import pandas as pd

    digest = hashlib.sha256(json.dumps([str(c) for c in frame.columns]).encode())
    # List cells (token ids) come back from Parquet as numpy arrays: hash both as the same plain list.
    plain = frame.copy()
    for column in plain.columns[plain.dtypes == object]:
        plain[column] = [str(v.tolist()) if isinstance(v, np.ndarray) else str(v) for v in plain[column]]
    digest.update(pd.util.hash_pandas_object(plain.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_digest(path: Path, weight_files: tuple[str, ...]) -> str:
    """Digest over the checkpoint's weight files (named in its manifest)."""
    return combined_digest([(name, sha256_file(path / name)) for name in weight_files])
