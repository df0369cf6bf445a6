"""Resolve the spec's base model to local weights and pin it: digest, licence, size, declared pooling."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.errors import ModelSourceError
from pipelines.core.records import BaseModelRecord
from pipelines.core.sources import combined_digest, packaged_path, sha256_file
from pipelines.core.spec import BaseModelConfig, HubModelConfig, LocalModelConfig, PackageModelConfig

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md", "1_Pooling/*"]


def locate_model(cfg: PackageModelConfig | LocalModelConfig | HubModelConfig,
                 project_root: Path) -> tuple[Path, str | None]:
    """The model's local folder, and the revision it was taken at (when known)."""
    if isinstance(cfg, PackageModelConfig):
        try:
            folder, version = packaged_path(cfg.package, cfg.path, folder=True)
        except LookupError as exc:
            raise ModelSourceError(f"base_model.model.package / path: {exc}") from None
        return folder, f"{cfg.package}=={version}"
    if isinstance(cfg, LocalModelConfig):
        folder = Path(cfg.path)
        folder = folder if folder.is_absolute() else project_root / folder
        if not folder.is_dir():
            raise ModelSourceError(f"base_model.model.path: {cfg.path!r} is not a folder (looked at {folder})")
        return folder, None
    from huggingface_hub import snapshot_download

    patterns = [cfg.gguf_file, "README.md", "*.json"] if cfg.gguf_file else HUB_FILES
    try:
        folder = Path(snapshot_download(cfg.name, revision=cfg.revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelSourceError(
            f"base_model.model: could not download {cfg.name!r} at revision {cfg.revision!r} from the "
            f"Hugging Face Hub: {type(exc).__name__}: {str(exc).splitlines()[0]}. The Hub must be reachable "
            "(or the model in the local Hugging Face cache); otherwise use source: local or package") from None
    # The snapshot folder is named after the resolved commit, which pins a branch name like 'main'.
    return folder, folder.name


def model_card_license(folder: Path) -> str | None:
    """The `license:` of the model card's YAML front matter (README.md), lower-cased."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value).lower() if value else None


def declared_pooling(folder: Path) -> tuple[str, str]:
    """The pooling a sentence-transformers model declares, and the file that says so."""
    config = folder / "1_Pooling" / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                          ("pooling_mode_max_tokens", "max")):
            if data.get(key):
                return mode, "1_Pooling/config.json"
    return "mean", "default (the model declares no pooling)"


def _parameter_count(weights: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for path in weights:
        if path.suffix != ".safetensors":
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            total += sum(t.numel() for t in state.values())
            continue
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def gguf_metadata(path: Path) -> tuple[dict[str, Any], int]:
    """The GGUF file's general.* metadata and its number of parameters."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if key.startswith("general."):
            try:
                meta[key] = value.contents()
            except Exception:  # an unreadable field is not needed here
                continue
    return meta, int(sum(int(t.n_elements) for t in reader.tensors))


def convert_gguf(folder: Path, gguf_file: str, target: Path, license_id: str, name: str) -> Path:
    """De-quantize a GGUF model once into a safetensors folder with its tokenizer (and chat template).

    Loading the GGUF takes ~15 s and transformers marks the model as quantized, which Trainer, TRL and
    save_pretrained refuse; the weights are already de-quantized to fp32, so the marker is removed and the
    folder reloads in well under a second. Written to a temporary sibling, then renamed.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            f"---\nlicense: {license_id}\nbase_model: {name}\n---\n\n# {name}\n\nDe-quantized by tuneline from "
            f"the GGUF file `{gguf_file}` (fp32 weights, safetensors).\n", encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_gguf(cfg: BaseModelConfig, folder: Path, revision: str | None, cache_dir: Path) -> BaseModelRecord:
    gguf_file = cfg.model.gguf_file
    assert gguf_file is not None
    path = folder / gguf_file
    if not path.is_file():
        raise ModelSourceError(f"base_model.model.gguf_file: {folder} has no file {gguf_file!r}")
    meta, parameters = gguf_metadata(path)
    license_id = model_card_license(folder) or (str(meta["general.license"]).lower()
                                                if meta.get("general.license") else None)
    if license_id is None:
        raise ModelSourceError(f"base_model.model: neither a model card in {folder} nor the GGUF metadata "
                               "(general.license) states a licence; tuneline only fine-tunes models with a known licence")
    if license_id not in cfg.allowed_licenses:
        raise ModelSourceError(f"base_model.allowed_licenses: the model's licence {license_id!r} is not "
                               f"allowed (allowed: {list(cfg.allowed_licenses)})")
    sha = sha256_file(path)
    name = getattr(cfg.model, "name", None) or str(cfg.model.path)  # type: ignore[union-attr]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    converted = convert_gguf(folder, gguf_file, cache_dir / f"{slug}-{sha[:12]}", license_id, name)
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    return BaseModelRecord(
        name=name, source=cfg.model.source, local_path=str(converted), revision=revision, weights_sha256=sha,
        license=license_id, parameter_count=parameters,
        architecture=str((config.get("architectures") or [meta.get("general.architecture", "unknown")])[0]),
        pooling="none", pooling_declared_by="not used (causal language model)",
        hidden_size=int(config.get("hidden_size") or 0),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048), gguf_file=str(path))


def resolve_base_model(cfg: BaseModelConfig, project_root: Path, cache_dir: Path | None = None) -> BaseModelRecord:
    """Pin the spec's base model; refuses a model whose licence the spec does not allow.

    A GGUF model is de-quantized once into `cache_dir` (default: <project_root>/data/models).
    """
    folder, revision = locate_model(cfg.model, project_root)
    if cfg.model.gguf_file:
        return _resolve_gguf(cfg, folder, revision, cache_dir or project_root / "data" / "models")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"base_model.model: {folder} has no config.json (expected a Hugging Face "
                               "model folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern))
    if not weights:
        raise ModelSourceError(f"base_model.model: {folder} has no weights ({' or '.join(WEIGHT_PATTERNS)})")
    license_id = model_card_license(folder)
    if license_id is None:
        raise ModelSourceError(f"base_model.model: {folder} has no licence in its model card (README.md "
                               "front matter 'license:'); tuneline only fine-tunes models with a known licence")
    if license_id not in cfg.allowed_licenses:
        raise ModelSourceError(f"base_model.allowed_licenses: the model's licence {license_id!r} is not "
                               f"allowed (allowed: {list(cfg.allowed_licenses)})")
    if cfg.pooling == "auto":
        pooling, declared_by = declared_pooling(folder)
    else:
        pooling, declared_by = cfg.pooling, "spec (base_model.pooling)"
    name = getattr(cfg.model, "name", None) or str(cfg.model.path)  # type: ignore[union-attr]
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return BaseModelRecord(
        name=name,
        source=cfg.model.source,
        local_path=str(folder),
        revision=revision,
        weights_sha256=combined_digest([(p.name, sha256_file(p)) for p in weights]),
        license=license_id,
        parameter_count=_parameter_count(weights),
        architecture=str(architectures[0]),
        pooling=pooling,
        pooling_declared_by=declared_by,
        hidden_size=int(config.get("hidden_size") or config.get("d_model") or 0),
        max_position_embeddings=int(config.get("max_position_embeddings") or 512),
    )
