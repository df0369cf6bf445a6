"""Model acquisition: the real store (packages, folders relative to the project) and its local-folder test double,
which serves any candidate name from a folder it is given and never reads site-packages or the network."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines.core.errors import ModelSourceError
from pipelines.core.sections import BaseModelConfig
from pipelines.core.selection import resolve_base_model, select_base_model
from pipelines.core.spec import PipelineSpec
from pipelines.core.training.compute import ComputeSettings
from resources.models import LocalFolderModelStore, ModelStoreResource
from tests.conftest import MINILM_PACKAGE, MINILM_PATH

HUB_MINILM = {"source": "hub", "name": "sentence-transformers/all-MiniLM-L6-v2", "revision": "main"}


def test_the_real_store_finds_packaged_and_project_relative_models(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStoreResource(project_root=str(tiny_model_dir.parent), cache_dir=str(tmp_path / "models"))
    packaged = resolve_base_model(BaseModelConfig.model_validate({"model": {
        "source": "package", "package": MINILM_PACKAGE, "path": MINILM_PATH, "name": "minilm"}}), store)
    assert packaged.revision and packaged.revision.startswith(f"{MINILM_PACKAGE}==")
    relative = resolve_base_model(BaseModelConfig.model_validate({"model": {
        "source": "local", "path": tiny_model_dir.name, "name": "tiny"}}), store)
    assert Path(relative.local_path) == tiny_model_dir and relative.license == "apache-2.0"


def test_the_double_serves_its_folders_by_name_and_refuses_anything_else(tmp_path: Path,
                                                                         tiny_model_dir: Path) -> None:
    store = LocalFolderModelStore(project_root=str(tmp_path), cache_dir=str(tmp_path / "models"),
                                  folders={HUB_MINILM["name"]: str(tiny_model_dir)})
    # A Hub candidate resolves to the local folder: no download is attempted.
    record = resolve_base_model(BaseModelConfig.model_validate({"model": HUB_MINILM}), store)
    assert record.local_path == str(tiny_model_dir) and record.name == HUB_MINILM["name"]
    assert record.source == "hub" and record.parameter_count > 0
    with pytest.raises(ModelSourceError, match=r"'some/other-model' is not one of this model store's folders"):
        resolve_base_model(BaseModelConfig.model_validate({"model": {"source": "hub", "name": "some/other-model"}}),
                           store)
    with pytest.raises(ModelSourceError, match="is not one of this model store's folders"):
        resolve_base_model(BaseModelConfig.model_validate({"model": {
            "source": "package", "package": MINILM_PACKAGE, "path": MINILM_PATH, "name": "minilm"}}), store)


def test_selection_ranks_candidates_the_double_serves(tmp_path: Path, tiny_model_dir: Path,
                                                      trec_slice_csv: Path) -> None:
    from pipelines.core.tasks.classification.cleaning import clean
    from pipelines.core.sources import read_file
    from pipelines.core.splitting import assign_splits
    from pipelines.core.tasks.classification.data import select_examples

    spec = PipelineSpec.model_validate({
        "name": "sel", "source": {"kind": "local", "path": "x.csv"},
        "task": {"text_column": "question", "label_column": "category"},
        "base_model": {"candidates": [HUB_MINILM, {"source": "hub", "name": "unknown/model"}]},
        "training": {"epochs": 1, "batch_size": 8, "max_length": 32, "lora": {"r": 2, "alpha": 4}}})
    raw, _ = read_file(trec_slice_csv, "csv")
    splits: pd.DataFrame = assign_splits(clean(select_examples(raw, spec.task), spec.cleaning).frame,
                                         spec.splits).frame
    store = LocalFolderModelStore(project_root=str(tmp_path), cache_dir=str(tmp_path / "models"),
                                  folders={HUB_MINILM["name"]: str(tiny_model_dir)})
    record = select_base_model(spec, splits, store, ComputeSettings(), progress=lambda _: None)
    verdicts = {row["name"]: (row["verdict"], row["reason"]) for row in record.selection}
    assert record.name == HUB_MINILM["name"] and verdicts[HUB_MINILM["name"]][0] == "selected"
    assert verdicts["unknown/model"][0] == "rejected"
    assert "is not one of this model store's folders" in verdicts["unknown/model"][1]
