"""Choose the base model: pin every candidate (digest, licence, format, size), reject those that break a
constraint of the spec (licence, size, memory, training time, remote code, pickle weights, task support, LoRA
targets), and rank the rest with a short probe on the validation split. The winner is a pinned record that
carries the whole selection table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

import pandas as pd

from pipelines.core.digests import combined_digest, sha256_file
from pipelines.core.errors import ModelSourceError
from pipelines.core.records import BaseModelRecord
from pipelines.core.sections import BaseModelConfig, HubModelConfig, LocalModelConfig, PackageModelConfig
from pipelines.core.spec import PipelineSpec
from pipelines.core.tasks import CandidateRejected, task_for
from pipelines.core.training.compute import ComputeSettings, ProgressFn
from pipelines.core.training.cost import STEP_EFFICIENCY, matmul_rate, model_dimensions, training_step_flops

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
ModelLocation = PackageModelConfig | LocalModelConfig | HubModelConfig


class ModelAcquirer(Protocol):
    """Where a candidate's files come from (a package, a local folder, the Hub) and where a GGUF model is
    de-quantized to: a resource with side effects (resources/models.py), with a test double."""

    def locate(self, location: ModelLocation, allow_pickle: bool) -> tuple[Path, str | None]:
        """The model's local folder, and the revision it was taken at (when known)."""
        ...

    def dequantize(self, folder: Path, gguf_file: str, sha256: str, license_id: str, name: str) -> Path:
        """A safetensors folder holding the GGUF file's weights, made once and reused."""
        ...


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


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}  # GGUF value types; 8 is a string, 9 an array


def gguf_metadata(path: Path) -> tuple[dict[str, Any], int]:
    """The GGUF file's general.* metadata and its number of parameters, read from the header alone.

    GGUF (v2/v3) is: magic, version, tensor count, key-value count, the key-value pairs, then one record per tensor
    (name, dimensions, type, offset). Arrays that are not general.* (the tokenizer's 49k strings) are skipped over
    rather than decoded, which is what made a general-purpose reader take seconds."""
    import mmap
    import struct

    def fail(why: str) -> ModelSourceError:
        return ModelSourceError(f"{path}: not a readable GGUF file ({why})")

    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            raise fail(str(exc)) from None
    with data:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise fail(f"truncated at byte {pos}")
            value = struct.unpack_from(fmt, data, pos)[0]
            pos += size
            return value

        def text() -> str:
            nonlocal pos
            length = take("<Q")
            if pos + length > len(data):
                raise fail(f"truncated string at byte {pos}")
            value = bytes(data[pos:pos + length]).decode("utf-8", errors="replace")
            pos += length
            return value

        def value(kind: int, keep: bool) -> Any:
            nonlocal pos
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == 8:
                return text()
            if kind == 9:
                item, count = take("<I"), take("<Q")
                if not keep and item in _GGUF_SCALARS:  # fixed-size items: skip the whole array at once
                    pos += struct.calcsize(_GGUF_SCALARS[item]) * count
                    return None
                items = [value(item, keep) for _ in range(count)]
                return items if keep else None
            raise fail(f"unknown value type {kind} at byte {pos}")

        if bytes(data[:4]) != b"GGUF":
            raise fail("it does not start with the GGUF magic bytes")
        pos = 4
        version = take("<I")
        if version < 2:
            raise fail(f"version {version}; versions 2 and 3 are supported")
        tensors, fields = take("<Q"), take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(fields):
            key = text()
            keep = key.startswith("general.")
            found = value(take("<I"), keep)
            if keep:
                meta[key] = found
        parameters = 0
        for _ in range(tensors):
            text()
            count = 1
            for _ in range(take("<I")):
                count *= take("<Q")
            pos += 12  # the tensor's type (uint32) and offset (uint64)
            parameters += count
    return meta, parameters


def _check_license(license_id: str | None, cfg: BaseModelConfig, where: str, check: bool = True) -> str:
    if not check:
        return license_id or "unknown"
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


def _name(location: ModelLocation) -> str:
    return getattr(location, "name", None) or str(location.path)  # type: ignore[union-attr]


def pin_candidate(location: ModelLocation, cfg: BaseModelConfig, models: ModelAcquirer,
                  check_license: bool = True, pooling: str = "auto") -> BaseModelRecord:
    """Resolve one candidate to local weights and pin it; raises ModelSourceError with the reason it is refused
    (unreachable, no weights, pickle weights, licence, remote code). `check_license=False` for a model that is
    only read, never fine-tuned or shipped (the data doctor's encoder): its licence is recorded, not checked.
    `pooling` is the task's (Task.pooling): 'auto' records the pooling the model declares."""
    folder, revision = models.locate(location, cfg.allow_pickle_weights)
    name = _name(location)
    if location.gguf_file:
        path = folder / location.gguf_file
        if not path.is_file():
            raise ModelSourceError(f"gguf_file: {folder} has no file {location.gguf_file!r}")
        meta, parameters = gguf_metadata(path)
        gguf_license = str(meta["general.license"]).lower() if meta.get("general.license") else None
        license_id = _check_license(model_card_license(folder) or gguf_license, cfg, str(folder),
                                    check_license)
        sha = sha256_file(path)
        converted = models.dequantize(folder, location.gguf_file, sha, license_id, name)
        return _record(converted, name, location.source, revision, sha, license_id, parameters, "gguf", cfg,
                       pooling, gguf_file=str(path))
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
    license_id = _check_license(model_card_license(folder), cfg, str(folder), check_license)
    return _record(folder, name, location.source, revision,
                   combined_digest([(p.name, sha256_file(p)) for p in used]), license_id, _parameter_count(used),
                   "safetensors" if safe else "pickle", cfg, pooling)


def _record(folder: Path, name: str, source: str, revision: str | None, sha: str, license_id: str,
            parameters: int, weight_format: str, cfg: BaseModelConfig, pooling_setting: str,
            gguf_file: str | None = None) -> BaseModelRecord:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    remote = needs_remote_code(config)
    if remote and not cfg.trust_remote_code:
        raise ModelSourceError(f"needs remote code: {remote}; set base_model.trust_remote_code: true only for "
                               "a repository you trust")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    decoder = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if pooling_setting != "auto":
        pooling, declared_by = pooling_setting, "spec (task.pooling)"
    elif (folder / "1_Pooling" / "config.json").is_file() or not decoder:
        pooling, declared_by = declared_pooling(folder)
    else:
        pooling, declared_by = "last", "default for decoders (the last token sees the whole text)"
    return BaseModelRecord(
        name=name, source=source, local_path=str(folder), revision=revision, weights_sha256=sha,
        license=license_id, parameter_count=parameters, architecture=str(architectures[0]), pooling=pooling,
        pooling_declared_by=declared_by, hidden_size=model_dimensions(config)[0],
        max_position_embeddings=int(config.get("max_position_embeddings") or 512), gguf_file=gguf_file,
        weight_format=weight_format, model_type=str(config.get("model_type", "")),
        trust_remote_code=bool(remote) and cfg.trust_remote_code)


def resolve_base_model(cfg: BaseModelConfig, models: ModelAcquirer, pooling: str = "auto") -> BaseModelRecord:
    """Pin the spec's first candidate (no probe); errors name the field and the reason."""
    try:
        return pin_candidate(cfg.model, cfg, models, pooling=pooling)
    except ModelSourceError as exc:
        raise ModelSourceError(f"base_model.model: {exc}") from None


# ------------------------------------------------------------------------------------------- selection
def linear_layer_names(folder: Path, auto_class: str, trust_remote_code: bool) -> set[str]:
    """The full names of every linear layer of the model ('encoder.layer.0.attention.self.query'), from a
    skeleton on the meta device built by transformers' `auto_class` (AutoModel, AutoModelForCausalLM, ...)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config, trust_remote_code=trust_remote_code)
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def names_a_layer(target: str, layer_names: set[str]) -> bool:
    """Whether a LoRA target names one of the layers as peft matches it: the whole name or its last components
    ('query', 'attention.output.dense')."""
    return any(name == target or name.endswith("." + target) for name in layer_names)


def select_base_model(spec: PipelineSpec, splits: pd.DataFrame, models: ModelAcquirer, compute: ComputeSettings,
                      progress: ProgressFn = print) -> BaseModelRecord:
    """Assess every candidate of spec.base_model, rank those that meet every constraint by the probe, and
    return the winner's pinned record with the whole selection table (raises when none is left)."""
    cfg = spec.base_model
    task = task_for(spec)
    training = spec.training
    steps_per_epoch = -(-int((splits["split"] == "train").sum()) // training.batch_size)
    rows: list[dict[str, Any]] = []
    passed: list[tuple[dict[str, Any], BaseModelRecord]] = []
    started = time.monotonic()
    replicates: dict[int, Any] = {}
    # Candidates whose estimated training time straddles max_train_minutes (optimistic, pessimistic minutes): their
    # steps are timed only once the probe has ranked them where the time could change the choice.
    pending: dict[int, tuple[float, float]] = {}
    for location in cfg.resolved_candidates:
        row: dict[str, Any] = {"name": _name(location), "source": location.source, "verdict": "rejected",
                               "reason": "", "license": None, "architecture": None, "task_supported": None,
                               "lora_targets": [], "parameter_count": None, "weight_format": None,
                               "weights_sha256": None, "estimated_memory_mb": None,
                               "estimated_train_flops": None, "estimated_train_minutes": None,
                               "seconds_per_step": None, "train_minutes_from": None,
                               "probe_metric": None, "probe_value": None,
                               "probe_score": None, "best_better_on_resamples": None}
        rows.append(row)
        try:
            record = pin_candidate(location, cfg, models, pooling=task.pooling(spec))
            row.update(license=record.license, architecture=record.architecture, weight_format=record.weight_format,
                       parameter_count=record.parameter_count, weights_sha256=record.weights_sha256)
            config = json.loads((Path(record.local_path) / "config.json").read_text(encoding="utf-8"))
            unsupported = task.model_support(config)
            row["task_supported"] = unsupported is None
            if unsupported:
                raise CandidateRejected(unsupported)
            positions = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                              if isinstance(config.get(k), int)), None)
            if positions is not None and training.max_length > positions:
                raise CandidateRejected(f"training.max_length {training.max_length} is more than the {positions} "
                                        "token positions this model has (max_position_embeddings in its "
                                        f"config.json); set training.max_length to at most {positions}")
            found = linear_layer_names(Path(record.local_path), task.auto_model_class, record.trust_remote_code)
            targets = tuple(t for t in training.lora.target_modules if names_a_layer(t, found))
            row["lora_targets"] = list(targets)
            if not targets:
                raise CandidateRejected(f"none of training.lora.target_modules {list(training.lora.target_modules)} "
                                        f"is a linear layer of this model; it has "
                                        f"{sorted({n.rsplit('.', 1)[-1] for n in found})}")
            if cfg.max_parameters is not None and record.parameter_count > cfg.max_parameters:
                raise CandidateRejected(f"{record.parameter_count:,} parameters exceed base_model.max_parameters "
                                        f"({cfg.max_parameters:,})")
            memory = task.estimate_memory_mb(config, record.parameter_count, training.batch_size,
                                             training.max_length, compute.precision)
            row["estimated_memory_mb"] = round(memory, 1)
            if cfg.memory_budget_mb is not None and memory > cfg.memory_budget_mb:
                raise CandidateRejected(f"estimated training memory {memory:,.0f} MB exceeds base_model."
                                        f"memory_budget_mb ({cfg.memory_budget_mb:,.0f} MB) at batch "
                                        f"{training.batch_size} x {training.max_length} tokens")
            record = dataclasses.replace(record, lora_targets=targets)
            steps = steps_per_epoch * training.epochs
            tokens = task.mean_tokens(record, spec, splits)
            flops = training_step_flops(config, record.parameter_count, training.batch_size, tokens,
                                        task.predicts_tokens)
            rate = matmul_rate(compute)
            row["estimated_train_flops"] = float(f"{flops * steps:.3g}")
            fastest, slowest = (flops / (rate * share) for share in reversed(STEP_EFFICIENCY))
            limit = cfg.max_train_minutes
            if limit is not None and fastest * steps / 60 > limit:
                row.update(estimated_train_minutes=float(f"{fastest * steps / 60:.3g}"),
                           seconds_per_step=float(f"{fastest:.3g}"), train_minutes_from="estimate (at least)")
                raise CandidateRejected(
                    f"estimated training time of at least {fastest * steps / 60:.1f} min ({flops / 1e9:,.1f} GFLOP "
                    f"per step of {training.batch_size} x {tokens:.0f} tokens at {STEP_EFFICIENCY[1]:.0%} of this "
                    f"machine's {rate / 1e9:,.0f} GFLOP/s, x {steps:,.0f} steps) exceeds base_model.max_train_minutes "
                    f"({limit:g}); rejected from the estimate, without timing a step")
            if limit is None or slowest * steps / 60 <= limit:  # within the limit even at the pessimistic rate
                minutes = slowest * steps / 60
                row.update(estimated_train_minutes=float(f"{minutes:.3g}"), seconds_per_step=float(f"{slowest:.3g}"),
                           train_minutes_from="estimate (at most)")
            else:  # the estimate cannot decide: timed later, and only if the candidate could win (_time_candidate)
                row.update(estimated_train_minutes=float(f"{fastest * steps / 60:.3g}"),
                           seconds_per_step=float(f"{fastest:.3g}"),
                           train_minutes_from=f"estimate ({fastest * steps / 60:.3g} to {slowest * steps / 60:.3g} "
                                              "min; timed only if it could change the choice)")
                pending[id(row)] = (fastest * steps / 60, slowest * steps / 60)
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
        result = task.probe(record, spec, splits, compute)
        row.update(probe_metric=result.metric, probe_value=round(float(result.value), 4),
                   probe_score=round(float(result.score), 4))
        replicates[id(row)] = result.replicates
        progress(f"candidate {row['name']}: {result.metric} {result.value:.4f}")
    probed = [(row, record) for row, record in passed if row["probe_score"] is not None]
    while True:
        # Within the probe's noise of the best, the cheapest to train (fewest estimated FLOPs) wins; the time limit
        # only matters for the candidate that would win, so only its steps are timed, and only when its estimate
        # straddles the limit. Timed over the limit, it is rejected and the choice is made again.
        ranked, best, tied = _ranking(probed, replicates, cfg.probe.confidence)
        winner_row = min(tied, key=_training_cost)
        if id(winner_row) not in pending:
            break
        record = next(record for row, record in probed if row is winner_row)
        fastest, slowest = pending.pop(id(winner_row))
        try:
            _time_candidate(winner_row, record, task, spec, splits, compute, steps_per_epoch, fastest, slowest,
                            progress)
            break
        except Exception as exc:  # over the limit, or a model whose training step cannot run
            reason = (str(exc) if isinstance(exc, CandidateRejected) else
                      f"could not be loaded or run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            winner_row.update(verdict="rejected", reason=reason, best_better_on_resamples=None)
            progress(f"candidate {winner_row['name']}: rejected: {reason}")
            probed = [(r, m) for r, m in probed if r is not winner_row]
        if not probed:
            raise ModelSourceError("base_model: every candidate was rejected:\n" + "\n".join(
                f"  - {r['name']}: {r['reason']}" for r in rows))
    for row in rows:  # ranked below the winner, costlier than a tied one, or not probed: their time never mattered
        if id(row) in pending:
            fastest, slowest = pending[id(row)]
            row["train_minutes_from"] = (f"estimate ({fastest:.3g} to {slowest:.3g} min; not timed, since its time "
                                         "could not change the choice)")
    winner = next(record for row, record in probed if row is winner_row)
    ranked.remove(winner_row)
    ranked.insert(0, winner_row)
    runner_up = ranked[1] if len(ranked) > 1 else None
    for place, row in enumerate(ranked, start=1):
        row["rank"] = place
        row["verdict"] = "selected" if row is winner_row else "ranked"
        if row is not winner_row:
            row["reason"] = (f"probe score {row['probe_score']:.4f} is below the winner's "
                             f"{winner_row['probe_score']:.4f}" if row is not best else
                             f"the best probe score, but not clearly better than {winner_row['name']}, which is "
                             f"cheaper to train")
        elif runner_up is None:
            row["reason"] = "the only candidate that meets every constraint"
        elif row is best:
            share = runner_up["best_better_on_resamples"]
            row["reason"] = (f"best probe score, by {row['probe_score'] - runner_up['probe_score']:+.4f} over "
                             f"{runner_up['name']}" + ("" if share is None else
                                                       f" (higher on {share:.0%} of bootstrap resamples)"))
        else:
            share = row["best_better_on_resamples"]
            row["reason"] = (f"within the probe's noise of {best['name']} ({row['probe_score']:.4f} against "
                             f"{best['probe_score']:.4f}, which is higher on only {share:.0%} of bootstrap "
                             f"resamples, under base_model.probe.confidence {cfg.probe.confidence:g}) and cheaper "
                             f"to train ({_cost_text(row)} against {_cost_text(best)})")
    return dataclasses.replace(winner, selection=tuple(rows))


def _ranking(probed: list[tuple[dict[str, Any], BaseModelRecord]], replicates: dict[int, Any],
             confidence: float) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The probed rows by probe score, the best one, and those within the probe's noise of it (the best one too):
    a more expensive model has to beat a cheaper one on at least `confidence` of the paired bootstrap resamples."""
    ranked = sorted((r for r, _ in probed), key=lambda r: -r["probe_score"])
    best = ranked[0]
    tied = [best]
    for row in ranked[1:]:
        share = _share_better(replicates[id(best)], replicates[id(row)])
        row["best_better_on_resamples"] = None if share is None else round(share, 3)
        if share is not None and share < confidence:
            tied.append(row)
    return ranked, best, tied


def _time_candidate(row: dict[str, Any], record: BaseModelRecord, task: Any, spec: PipelineSpec,
                    splits: pd.DataFrame, compute: ComputeSettings, steps_per_epoch: int, fastest: float,
                    slowest: float, progress: ProgressFn) -> None:
    """Time a few training steps of a candidate whose estimate straddles max_train_minutes; raises
    CandidateRejected when the timed steps put the training over it."""
    cfg, training = spec.base_model, spec.training
    limit, steps = cfg.max_train_minutes, steps_per_epoch * training.epochs
    progress(f"candidate {row['name']}: timing {cfg.probe.timed_steps} training steps (estimated "
             f"{fastest:.1f}-{slowest:.1f} min, the limit is {limit:g})")
    seconds = task.time_train_step(record, spec, splits, compute, cfg.probe.timed_steps)
    minutes = seconds * steps / 60
    row.update(estimated_train_minutes=float(f"{minutes:.3g}"), seconds_per_step=float(f"{seconds:.3g}"),
               train_minutes_from="timed")
    if limit is not None and minutes > limit:
        raise CandidateRejected(f"estimated training time {minutes:.1f} min ({seconds:.2f} s/step x "
                                f"{steps_per_epoch} steps x {training.epochs:g} epochs, timed) exceeds "
                                f"base_model.max_train_minutes ({limit:g})")


def _share_better(best: Any, other: Any) -> float | None:
    """The share of paired bootstrap resamples on which `best` scores higher than `other` (ties count half)."""
    if best is None or other is None or len(best) != len(other) or not len(best):
        return None
    import numpy as np

    best, other = np.asarray(best, dtype=float), np.asarray(other, dtype=float)
    return float(np.mean(best > other) + 0.5 * np.mean(best == other))


def _training_cost(row: dict[str, Any]) -> tuple[float, float]:
    """The estimated FLOPs of the whole training (the same basis for every candidate, timed or not), then size."""
    flops = row.get("estimated_train_flops")
    return (float(flops) if flops is not None else float("inf"), float(row.get("parameter_count") or 0))


def _cost_text(row: dict[str, Any]) -> str:
    flops, minutes = row.get("estimated_train_flops"), row.get("estimated_train_minutes")
    if flops is None:
        return f"{row.get('parameter_count') or 0:,} parameters"
    return f"~{flops / 1e12:,.3g} TFLOP" + (f", {minutes:g} min timed" if row.get("train_minutes_from") == "timed"
                                             else "")
