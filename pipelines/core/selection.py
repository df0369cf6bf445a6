"""Choose the base model: pin every candidate (digest, licence, format, size), reject those that break a
constraint of the spec (licence, size, memory, training time, remote code, pickle weights, task support, LoRA
targets), and rank the rest with a short probe on the validation split. The winner is a pinned record that
carries the whole selection table.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.errors import ModelSourceError
from pipelines.core.files import atomic_path
from pipelines.core.records import BaseModelRecord
from pipelines.core.sources import combined_digest, packaged_path, sha256_file
from pipelines.core.spec import BaseModelConfig, HubModelConfig, LocalModelConfig, PackageModelConfig

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
# Code files come along so that a trusted remote-code model can load; they run only with trust_remote_code.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "README.md", "1_Pooling/*"]


def locate_model(cfg: PackageModelConfig | LocalModelConfig | HubModelConfig,
                 project_root: Path, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """The model's local folder, and the revision it was taken at (when known)."""
    if isinstance(cfg, PackageModelConfig):
        try:
            folder, version = packaged_path(cfg.package, cfg.path, folder=True)
        except LookupError as exc:
            raise ModelSourceError(f"package / path: {exc}") from None
        return folder, f"{cfg.package}=={version}"
    if isinstance(cfg, LocalModelConfig):
        folder = Path(cfg.path)
        folder = folder if folder.is_absolute() else project_root / folder
        if not folder.is_dir():
            raise ModelSourceError(f"path: {cfg.path!r} is not a folder (looked at {folder})")
        return folder, None
    from huggingface_hub import snapshot_download

    patterns = [cfg.gguf_file, "README.md", "*.json"] if cfg.gguf_file else (
        HUB_FILES + ["pytorch_model*.bin"] if allow_pickle else HUB_FILES)
    try:
        folder = Path(snapshot_download(cfg.name, revision=cfg.revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelSourceError(
            f"cannot reach {cfg.name!r} at revision {cfg.revision!r} on the Hugging Face Hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}. The Hub must be reachable (or the model in the "
            "local Hugging Face cache); otherwise download it once and use `source: local` with its folder "
            "(or `source: package`)") from None
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
    with atomic_path(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            f"---\nlicense: {license_id}\nbase_model: {name}\n---\n\n# {name}\n\nDe-quantized by tuneline from "
            f"the GGUF file `{gguf_file}` (fp32 weights, safetensors).\n", encoding="utf-8")
    return target


def _check_license(license_id: str | None, cfg: BaseModelConfig, where: str) -> str:
    if license_id is None:
        if cfg.allow_unknown_license:
            return "unknown"
        raise ModelSourceError(f"licence unknown: neither a model card nor GGUF metadata in {where} states one "
                               "(set base_model.allow_unknown_license: true to accept it)")
    if license_id not in cfg.allowed_licenses:
        raise ModelSourceError(f"licence {license_id!r} is not in base_model.allowed_licenses "
                               f"{list(cfg.allowed_licenses)}")
    return license_id


def needs_remote_code(config: dict[str, Any]) -> str | None:
    """Why loading this config would run code from the model repository, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("auto_map"):
        return f"its config.json maps to custom code ({', '.join(sorted(config['auto_map']))} in auto_map)"
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        return f"its model_type {model_type!r} is not part of transformers"
    return None


def _name(location: PackageModelConfig | LocalModelConfig | HubModelConfig) -> str:
    return getattr(location, "name", None) or str(location.path)  # type: ignore[union-attr]


def pin_candidate(location: PackageModelConfig | LocalModelConfig | HubModelConfig, cfg: BaseModelConfig,
                  project_root: Path, cache_dir: Path) -> BaseModelRecord:
    """Resolve one candidate to local weights and pin it; raises ModelSourceError with the reason it is refused
    (unreachable, no weights, pickle weights, licence, remote code)."""
    folder, revision = locate_model(location, project_root, cfg.allow_pickle_weights)
    name = _name(location)
    if location.gguf_file:
        path = folder / location.gguf_file
        if not path.is_file():
            raise ModelSourceError(f"gguf_file: {folder} has no file {location.gguf_file!r}")
        meta, parameters = gguf_metadata(path)
        gguf_license = str(meta["general.license"]).lower() if meta.get("general.license") else None
        license_id = _check_license(model_card_license(folder) or gguf_license, cfg, str(folder))
        sha = sha256_file(path)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        converted = convert_gguf(folder, location.gguf_file, cache_dir / f"{slug}-{sha[:12]}", license_id, name)
        return _record(converted, name, location.source, revision, sha, license_id, parameters, "gguf", cfg,
                       gguf_file=str(path))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern))
    if not weights:
        raise ModelSourceError(f"{folder} has no weights (*.safetensors, *.gguf or pytorch_model*.bin)")
    safe = [p for p in weights if p.suffix == ".safetensors"]
    pickled = [p for p in weights if p.suffix in PICKLE_SUFFIXES]
    if not safe and not cfg.allow_pickle_weights:
        raise ModelSourceError(f"weights are pickle files only ({', '.join(p.name for p in pickled)}), which can run "
                               "code when loaded; provide safetensors or set base_model.allow_pickle_weights: true")
    used = safe or pickled
    license_id = _check_license(model_card_license(folder), cfg, str(folder))
    return _record(folder, name, location.source, revision,
                   combined_digest([(p.name, sha256_file(p)) for p in used]), license_id, _parameter_count(used),
                   "safetensors" if safe else "pickle", cfg)


def _record(folder: Path, name: str, source: str, revision: str | None, sha: str, license_id: str,
            parameters: int, weight_format: str, cfg: BaseModelConfig, gguf_file: str | None = None) -> BaseModelRecord:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    remote = needs_remote_code(config)
    if remote and not cfg.trust_remote_code:
        raise ModelSourceError(f"needs remote code: {remote}; set base_model.trust_remote_code: true only for "
                               "a repository you trust")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    decoder = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if cfg.pooling != "auto":
        pooling, declared_by = cfg.pooling, "spec (base_model.pooling)"
    elif (folder / "1_Pooling" / "config.json").is_file() or not decoder:
        pooling, declared_by = declared_pooling(folder)
    else:
        pooling, declared_by = "last", "default for decoders (the last token sees the whole text)"
    return BaseModelRecord(
        name=name, source=source, local_path=str(folder), revision=revision, weights_sha256=sha,
        license=license_id, parameter_count=parameters, architecture=str(architectures[0]), pooling=pooling,
        pooling_declared_by=declared_by, hidden_size=int(config.get("hidden_size") or config.get("d_model") or 0),
        max_position_embeddings=int(config.get("max_position_embeddings") or 512), gguf_file=gguf_file,
        weight_format=weight_format, model_type=str(config.get("model_type", "")),
        trust_remote_code=bool(remote) and cfg.trust_remote_code)


def resolve_base_model(cfg: BaseModelConfig, project_root: Path, cache_dir: Path | None = None) -> BaseModelRecord:
    """Pin the spec's first candidate (no probe); errors name the field and the reason.

    A GGUF model is de-quantized once into `cache_dir` (default: <project_root>/data/models).
    """
    try:
        return pin_candidate(cfg.model, cfg, project_root, cache_dir or project_root / "data" / "models")
    except ModelSourceError as exc:
        raise ModelSourceError(f"base_model.model: {exc}") from None


# ------------------------------------------------------------------------------------------- selection
class CandidateRejected(Exception):
    """A candidate breaks a constraint; the message is the reason shown in the selection table."""


def task_support(config: dict[str, Any], task: str) -> str | None:
    """Why the architecture cannot do the task (no AutoModelFor... class for it), or None when it can."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    model_type = config.get("model_type")
    architectures = [str(a) for a in config.get("architectures") or []]
    if task == "instruction_tuning":
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return (f"cannot do instruction_tuning: {architectures or model_type} is not a causal language model "
                    "(no AutoModelForCausalLM head in its weights)")
        return None
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return f"cannot do text_classification: transformers has no AutoModelForSequenceClassification for {model_type!r}"
    return None


def linear_layer_names(folder: Path, task: str, trust_remote_code: bool) -> set[str]:
    """The names (last component) of every linear layer of the model, from a skeleton on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if task == "instruction_tuning" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def estimate_training_memory_mb(config: dict[str, Any], parameters: int, batch_size: int, length: int,
                                task: str, precision: str) -> float:
    """Weights (fp32), activations kept for the backward pass (34·s·b·h + 5·a·s²·b bytes per layer at 16 bit,
    doubled for fp32) and, for language models, the logits with their gradient."""
    hidden = int(config.get("hidden_size") or config.get("d_model") or 0)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    vocab = int(config.get("vocab_size") or 0)
    scale = 1.0 if precision == "bf16" else 2.0
    activations = layers * (34 * length * batch_size * hidden + 5 * heads * length * length * batch_size) * scale
    logits = 3 * 4 * batch_size * length * vocab if task == "instruction_tuning" else 0
    return (4 * parameters + activations + logits) / 2**20


def _sample(frame: Any, split: str, rows: int, seed: int) -> Any:
    part = frame[frame["split"] == split]
    return part.sample(n=min(rows, len(part)), random_state=seed) if len(part) > rows else part


def _time_steps(record: BaseModelRecord, spec: Any, splits: Any, compute: Any, steps: int) -> float:
    """Seconds per training step of the real task model with LoRA, on a batch of real training rows."""
    import torch

    cfg = spec.training
    lora = cfg.lora.model_copy(update={"target_modules": record.lora_targets or cfg.lora.target_modules})
    batch_rows = _sample(splits, "train", cfg.batch_size, cfg.seed)
    if spec.task.type == "instruction_tuning":
        from peft import get_peft_model

        from pipelines.core.chat import render_conversations
        from pipelines.core.generation import build_causal_lora_config, load_causal_lm

        model, tokenizer = load_causal_lm(record.local_path)
        model = get_peft_model(model, build_causal_lora_config(lora))
        rendered = render_conversations(batch_rows, tokenizer, cfg.max_length, "truncate").frame
        if rendered.empty:
            raise CandidateRejected(f"no training example fits training.max_length ({cfg.max_length} tokens) "
                                    "with this model's chat template")
        width = max(len(ids) for ids in rendered["input_ids"])
        ids = torch.full((len(rendered), width), tokenizer.pad_token_id)
        for i, row in enumerate(rendered["input_ids"]):
            ids[i, :len(row)] = torch.tensor(list(row))
        inputs = {"input_ids": ids, "attention_mask": (ids != tokenizer.pad_token_id).long(), "labels": ids}
    else:
        from peft import get_peft_model

        from pipelines.core.training import PooledClassifier, build_lora_config, load_encoder, load_tokenizer

        tokenizer = load_tokenizer(record.local_path)
        encoder = load_encoder(record)
        model = PooledClassifier(encoder, record.pooling, max(2, splits["label"].nunique()), record.hidden_size)
        model.encoder = get_peft_model(encoder, build_lora_config(lora))
        inputs = dict(tokenizer(batch_rows["text"].tolist(), truncation=True, max_length=cfg.max_length,
                                padding=True, return_tensors="pt"))
        inputs["labels"] = torch.zeros(len(batch_rows), dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    timings = []
    for step in range(steps + 1):  # the first step warms up (allocations, kernels) and is not counted
        started = time.perf_counter()
        with compute.autocast():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


def _probe(record: BaseModelRecord, spec: Any, splits: Any, compute: Any) -> tuple[str, float, float]:
    """(metric, value, score) on a validation sample; a higher score is better."""
    probe = spec.base_model.probe
    seed = spec.training.seed
    validation = _sample(splits, "validation", probe.sample_rows, seed)
    if spec.task.type == "instruction_tuning":
        from pipelines.core.chat import render_conversations
        from pipelines.core.generation import completion_loss, load_causal_lm

        model, tokenizer = load_causal_lm(record.local_path)
        rendered = render_conversations(validation, tokenizer, spec.training.max_length, "truncate").frame
        loss, _ = completion_loss(model, rendered, 8, compute, tokenizer.pad_token_id)
        return "validation_loss", loss, -loss
    from pipelines.core.evaluation import classification_metrics
    from pipelines.core.training import embed_texts, fit_linear_probe, load_encoder, load_tokenizer

    train = _sample(splits, "train", 4 * probe.sample_rows, seed)
    labels = sorted(set(splits["label"]))
    index = {label: i for i, label in enumerate(labels)}
    encoder, tokenizer = load_encoder(record), load_tokenizer(record.local_path)

    def embed(frame: Any) -> Any:
        return embed_texts(encoder, tokenizer, frame["text"].tolist(), record.pooling, spec.training.max_length,
                           compute, 64)

    fitted = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(), None, None, seed)
    metric = spec.evaluation.primary_metric
    predicted = fitted.predict(embed(validation))
    value = classification_metrics(validation["label"].map(index).to_numpy(), predicted, len(labels))[metric]
    return f"linear_probe_{metric}", value, value


def select_base_model(spec: Any, splits: Any, project_root: Path, cache_dir: Path, compute: Any,
                      progress: Callable[[str], None] = print) -> BaseModelRecord:
    """Assess every candidate of spec.base_model, rank those that meet every constraint by the probe, and
    return the winner's pinned record with the whole selection table (raises when none is left)."""
    cfg = spec.base_model
    task = spec.task.type
    training = spec.training
    steps_per_epoch = -(-int((splits["split"] == "train").sum()) // training.batch_size)
    rows: list[dict[str, Any]] = []
    passed: list[tuple[dict[str, Any], BaseModelRecord]] = []
    started = time.monotonic()
    for location in cfg.resolved_candidates:
        row: dict[str, Any] = {"name": _name(location), "source": location.source, "verdict": "rejected",
                               "reason": "", "license": None, "architecture": None, "task_supported": None,
                               "lora_targets": [], "parameter_count": None, "weight_format": None,
                               "weights_sha256": None, "estimated_memory_mb": None,
                               "estimated_train_minutes": None, "seconds_per_step": None, "probe_metric": None, "probe_value": None,
                               "probe_score": None}
        rows.append(row)
        try:
            record = pin_candidate(location, cfg, project_root, cache_dir)
            row.update(license=record.license, architecture=record.architecture, weight_format=record.weight_format,
                       parameter_count=record.parameter_count, weights_sha256=record.weights_sha256)
            config = json.loads((Path(record.local_path) / "config.json").read_text(encoding="utf-8"))
            unsupported = task_support(config, task)
            row["task_supported"] = unsupported is None
            if unsupported:
                raise CandidateRejected(unsupported)
            found = linear_layer_names(Path(record.local_path), task, record.trust_remote_code)
            targets = tuple(t for t in training.lora.target_modules if t in found)
            row["lora_targets"] = list(targets)
            if not targets:
                raise CandidateRejected(f"none of training.lora.target_modules {list(training.lora.target_modules)} "
                                        f"is a linear layer of this model; it has {sorted(found)}")
            if cfg.max_parameters is not None and record.parameter_count > cfg.max_parameters:
                raise CandidateRejected(f"{record.parameter_count:,} parameters exceed base_model.max_parameters "
                                        f"({cfg.max_parameters:,})")
            memory = estimate_training_memory_mb(config, record.parameter_count, training.batch_size,
                                                 training.max_length, task, compute.precision)
            row["estimated_memory_mb"] = round(memory, 1)
            if cfg.memory_budget_mb is not None and memory > cfg.memory_budget_mb:
                raise CandidateRejected(f"estimated training memory {memory:,.0f} MB exceeds base_model."
                                        f"memory_budget_mb ({cfg.memory_budget_mb:,.0f} MB) at batch "
                                        f"{training.batch_size} x {training.max_length} tokens")
            record = dataclasses.replace(record, lora_targets=targets)
            progress(f"candidate {row['name']}: timing {cfg.probe.timed_steps} training steps")
            seconds = _time_steps(record, spec, splits, compute, cfg.probe.timed_steps)
            minutes = seconds * steps_per_epoch * training.epochs / 60
            row["estimated_train_minutes"] = float(f"{minutes:.3g}")
            row["seconds_per_step"] = float(f"{seconds:.3g}")
            if cfg.max_train_minutes is not None and minutes > cfg.max_train_minutes:
                raise CandidateRejected(f"estimated training time {minutes:.1f} min ({seconds:.2f} s/step x "
                                        f"{steps_per_epoch} steps x {training.epochs:g} epochs) exceeds "
                                        f"base_model.max_train_minutes ({cfg.max_train_minutes:g})")
            row["verdict"] = "passed"
            passed.append((row, record))
        except (ModelSourceError, CandidateRejected) as exc:
            row["reason"] = str(exc)
            progress(f"candidate {row['name']}: rejected: {exc}")
        except Exception as exc:  # a model that cannot be loaded or run is rejected with what went wrong
            row["reason"] = f"could not be loaded or run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            progress(f"candidate {row['name']}: rejected: {row['reason']}")
    if not passed:
        raise ModelSourceError("base_model: every candidate was rejected:\n" + "\n".join(
            f"  - {r['name']}: {r['reason']}" for r in rows))
    for row, record in passed:
        if time.monotonic() - started > cfg.probe.time_budget_seconds and row is not passed[0][0]:
            row.update(verdict="not probed", reason=f"base_model.probe.time_budget_seconds "
                                                    f"({cfg.probe.time_budget_seconds:g}) spent")
            continue
        metric, value, score = _probe(record, spec, splits, compute)
        row.update(probe_metric=metric, probe_value=round(float(value), 4), probe_score=round(float(score), 4))
        progress(f"candidate {row['name']}: {metric} {value:.4f}")
    probed = [(row, record) for row, record in passed if row["probe_score"] is not None]
    winner_row, winner = max(probed, key=lambda pair: pair[0]["probe_score"])
    ranked = sorted((r for r, _ in probed), key=lambda r: -r["probe_score"])
    for place, row in enumerate(ranked, start=1):
        row["rank"] = place
        if row is winner_row:
            runner_up = ranked[1] if len(ranked) > 1 else None
            row["verdict"] = "selected"
            row["reason"] = (f"best probe score, by {winner_row['probe_score'] - runner_up['probe_score']:+.4f} over "
                             f"{runner_up['name']}" if runner_up else "the only candidate that meets every constraint")
        else:
            row["verdict"] = "ranked"
            row["reason"] = f"probe score {row['probe_score']:.4f} is below the winner's {winner_row['probe_score']:.4f}"
    return dataclasses.replace(winner, selection=tuple(rows))
