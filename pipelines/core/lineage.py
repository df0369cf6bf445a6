"""Content digests that tie artifacts to the exact data that made them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of a table's columns and values (row order included): equal tables, equal digests."""
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


def model_origin(source: str, revision: str | None, local_path: str | None, gguf_file: str | None) -> str:
    """Where a base model came from, in words: the package version it is shipped in, its commit on the Hugging Face
    Hub, or its local folder; and the GGUF file it was de-quantized from."""
    if source == "package":
        where = f"package {revision}"
    elif source == "hub":
        where = f"Hugging Face Hub revision {revision}"
    else:
        where = f"{source} folder {local_path}" if local_path else source
    return where + (f", de-quantized from {gguf_file}" if gguf_file else "")
