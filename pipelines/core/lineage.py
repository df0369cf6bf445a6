"""Content digests that tie artifacts to the exact data that made them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of a table's columns and values (row order included): equal tables, equal digests."""
    digest = hashlib.sha256(json.dumps([str(c) for c in frame.columns]).encode())
    digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
