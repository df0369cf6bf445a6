"""LoRA fine-tuning of a pre-trained encoder for text classification, with transformers' Trainer.

The classifier pools token states the way the base model declares (mean for sentence-transformers models)
and puts one linear head on top. The head starts from a logistic regression on the frozen embeddings
(LP-FT) unless the spec says otherwise, so fine-tuning starts where the linear probe ends. Training never
sees mlflow or Dagster: it reports through a `progress` callable and a small metrics-sink protocol.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.core.errors import CheckpointError
from pipelines.core.files import atomic_path
from pipelines.core.lineage import frame_digest
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.sources import combined_digest, sha256_file
from pipelines.core.spec import LoraSettingsConfig, PipelineSpec, TrainingConfig

ProgressFn = Callable[[str], None]
WEIGHT_FILES = ("adapter/adapter_model.safetensors", "head.safetensors")


class MetricsSink(Protocol):
    """Where training metrics go (an experiment tracker, a list in a test)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


@dataclass(frozen=True)
class ComputeSettings:
    """Resolved device, precision and thread count for one piece of work."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # bf16 | fp32
    num_threads: int | None = None

    def apply(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return nullcontext()


# ------------------------------------------------------------------------------------------ the model
def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from token states: 'mean' over real tokens, 'cls' (first token), 'max', or 'last'
    (the last real token, which in a decoder has seen the whole text; works with left or right padding)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """Encoder -> pooling -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, pooling: str, num_labels: int, hidden_size: int,
                 dropout: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = (F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing if self.training else 0.0)
                if labels is not None else None)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_encoder(base: BaseModelRecord) -> nn.Module:
    """The base model's encoder, without the task-specific pooler that sentence encoders never trained."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base.local_path, trust_remote_code=base.trust_remote_code)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def lora_for(cfg: LoraSettingsConfig, base: BaseModelRecord) -> LoraSettingsConfig:
    """The spec's LoRA settings with the target modules this base model has (the selection found them)."""
    return cfg.model_copy(update={"target_modules": base.lora_targets}) if base.lora_targets else cfg


def build_lora_config(cfg: LoraSettingsConfig) -> Any:
    """The one place a peft.LoraConfig is built."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none")


def build_training_arguments(cfg: TrainingConfig, output_dir: Path, compute: ComputeSettings,
                             has_validation: bool, eval_batch_size: int) -> Any:
    """The one place transformers.TrainingArguments are built."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_fraction,  # a float below 1 is a fraction of all steps
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=compute.precision == "bf16",
        use_cpu=compute.device == "cpu",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        label_names=["labels"],
        seed=cfg.seed,
        data_seed=cfg.seed,
    )


# ------------------------------------------------------------------------------------ embeddings
def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def _forward_batches(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any,
                     texts: Sequence[str], max_length: int, batch_size: int, compute: ComputeSettings,
                     device: torch.device) -> np.ndarray:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    outputs: list[np.ndarray | None] = [None] * len(texts)
    for batch in _batches_by_length(lengths, batch_size):  # length-sorted batches: little padding
        features = [{k: encoded[k][i] for k in encoded.keys()} for i in batch]
        padded = tokenizer.pad(features, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in padded.items()}
        with compute.autocast():
            result = fn(inputs).float().cpu().numpy()
        for row, i in enumerate(batch):
            outputs[i] = result[row]
    return np.stack(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)  # type: ignore[arg-type]


def embed_texts(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str, max_length: int,
                compute: ComputeSettings, batch_size: int = 128) -> np.ndarray:
    """Frozen pooled embeddings of `texts` (float32, one row per text, in order)."""
    device = torch.device(compute.device)
    encoder.eval().to(device)

    def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], pooling)

    return _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None,
                     val_y: np.ndarray | None, seed: int) -> Any:
    """Logistic regression on frozen embeddings; C chosen on validation when there is one."""
    from sklearn.linear_model import LogisticRegression

    candidates = (0.1, 1.0, 10.0) if val_x is not None and len(val_x) else (1.0,)
    best, best_score = None, -1.0
    for c in candidates:
        probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(train_x, train_y)
        score = probe.score(val_x, val_y) if len(candidates) > 1 else 0.0
        if score > best_score:
            best, best_score = probe, score
    return best


def _head_from_probe(head: nn.Linear, probe: Any, num_labels: int) -> None:
    coef = torch.tensor(probe.coef_, dtype=head.weight.dtype)
    bias = torch.tensor(probe.intercept_, dtype=head.bias.dtype)
    with torch.no_grad():
        if num_labels == 2 and coef.shape[0] == 1:  # sklearn keeps one row for two classes
            head.weight.zero_()
            head.bias.zero_()
            head.weight[1] = coef[0]
            head.bias[1] = bias[0]
        else:
            head.weight.copy_(coef)
            head.bias.copy_(bias)


# ---------------------------------------------------------------------------------------- callbacks
def _classification_metrics(eval_pred: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0))}


def _make_callback(model: nn.Module, progress: ProgressFn, sink: MetricsSink | None, select_by: str,
                   higher_is_better: bool = True) -> Any:
    from transformers import TrainerCallback

    class ProgressAndBestEpoch(TrainerCallback):
        """Progress lines and metrics for every log; keeps the trainable weights of the best epoch."""

        def __init__(self) -> None:
            self.best_score = -math.inf
            self.best_epoch: float | None = None
            self.best_state: dict[str, torch.Tensor] | None = None
            self.started = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            progress(f"training: {state.max_steps} steps, {args.num_train_epochs:g} epochs, "
                     f"batch {args.per_device_train_batch_size}, bf16={args.bf16}")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if sink is not None and logs:
                sink.log_metrics(logs, state.global_step)
            if "loss" in logs:
                elapsed = time.monotonic() - self.started
                done = state.global_step / max(state.max_steps, 1)
                eta = elapsed / done - elapsed if done > 0 else float("nan")
                progress(f"step {state.global_step}/{state.max_steps} ({done:.0%}) epoch {state.epoch:.2f} "
                         f"loss {logs['loss']:.4f} lr {logs.get('learning_rate', float('nan')):.2e} "
                         f"elapsed {elapsed:.0f}s eta {eta:.0f}s")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kwargs: Any) -> None:
            metrics = metrics or {}
            value = float(metrics.get(f"eval_{select_by}", math.nan))
            score = -math.inf if math.isnan(value) else value if higher_is_better else -value
            shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                              if k in ("eval_accuracy", "eval_macro_f1", "eval_loss") and isinstance(v, (int, float)))
            progress(f"epoch {state.epoch:.2f}: validation {shown}")
            if score > self.best_score:
                self.best_score, self.best_epoch = score, float(state.epoch)
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        @property
        def best_value(self) -> float:
            return self.best_score if higher_is_better else -self.best_score

        def restore_best(self) -> None:
            if self.best_state is None:
                return
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state.items():
                    params[name].copy_(value)

    return ProgressAndBestEpoch()


# ------------------------------------------------------------------------------------------ training
def _tokenized(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Any:
    from datasets import Dataset

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    columns = {k: encoded[k] for k in encoded.keys()}
    columns["labels"] = list(labels)
    return Dataset.from_dict(columns)


def train_classifier(splits: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec, out_dir: Path,
                     compute: ComputeSettings, progress: ProgressFn = print,
                     sink: MetricsSink | None = None) -> CheckpointRecord:
    """Fine-tune `base` with LoRA on the train split, pick the best epoch on validation, save to `out_dir`."""
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    cfg = spec.training
    compute.apply()
    train = splits[splits["split"] == "train"]
    validation = splits[splits["split"] == "validation"]
    labels = tuple(sorted(set(splits["label"])))
    index = {label: i for i, label in enumerate(labels)}
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(base.local_path)
    encoder = load_encoder(base)
    model = PooledClassifier(encoder, base.pooling, len(labels), base.hidden_size,
                             label_smoothing=cfg.label_smoothing)

    if cfg.head_init == "linear_probe":
        progress(f"linear probe: embedding {len(train) + len(validation)} rows with the frozen base model")
        train_x = embed_texts(encoder, tokenizer, train["text"].tolist(), base.pooling, cfg.max_length, compute)
        val_x = (embed_texts(encoder, tokenizer, validation["text"].tolist(), base.pooling, cfg.max_length,
                             compute) if len(validation) else None)
        probe = fit_linear_probe(train_x, train["label"].map(index).to_numpy(), val_x,
                                 validation["label"].map(index).to_numpy() if len(validation) else None, cfg.seed)
        _head_from_probe(model.head, probe, len(labels))
        if val_x is not None:
            progress(f"linear probe: validation accuracy {probe.score(val_x, validation['label'].map(index)):.4f}")

    model.encoder = get_peft_model(encoder, build_lora_config(lora_for(cfg.lora, base)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    progress(f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters "
             f"({trainable / total:.2%}); pooling={base.pooling}; precision={compute.precision}")

    train_ds = _tokenized(tokenizer, train["text"].tolist(), train["label"].map(index).tolist(), cfg.max_length)
    val_ds = (_tokenized(tokenizer, validation["text"].tolist(), validation["label"].map(index).tolist(),
                         cfg.max_length) if len(validation) else None)

    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW([
        {"params": adapter_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        {"params": head_params, "lr": cfg.head_learning_rate or cfg.learning_rate, "weight_decay": cfg.weight_decay},
    ])
    # The epoch kept is the best on validation by the spec's primary metric.
    callback = _make_callback(model, progress, sink, spec.evaluation.primary_metric)
    with tempfile.TemporaryDirectory(prefix="tuneline-trainer-") as scratch:
        args = build_training_arguments(cfg, Path(scratch), compute, val_ds is not None, spec.evaluation.batch_size)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_classification_metrics,
                          optimizers=(optimizer, None), callbacks=[callback])
        result = trainer.train()
    callback.restore_best()
    if callback.best_epoch is not None:
        progress(f"kept the weights of epoch {callback.best_epoch:g} (best validation "
                 f"{spec.evaluation.primary_metric} {callback.best_score:.4f})")

    train_seconds = float(result.metrics.get("train_runtime", 0.0))
    real_tokens = float(sum(len(ids) for ids in train_ds["input_ids"])) * cfg.epochs
    history = tuple({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                    for entry in trainer.state.log_history)
    model.eval()
    data_sha256 = frame_digest(splits)  # the same digest the splits asset reports: lineage joins on it
    path = _save_checkpoint(model, tokenizer, labels, spec, base, history, out_dir, data_sha256)
    progress(f"saved adapter and head to {path} ({real_tokens / train_seconds if train_seconds else 0:.0f} "
             f"tokens/s, peak memory {peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path),
        sha256=checkpoint_digest(path),
        base_model=base,
        spec_hash=spec.spec_hash,
        data_sha256=data_sha256,
        labels=labels,
        train_rows=len(train),
        validation_rows=len(validation),
        best_epoch=callback.best_epoch,
        trainable_parameters=trainable,
        train_seconds=train_seconds,
        tokens_per_second=real_tokens / train_seconds if train_seconds > 0 else 0.0,
        precision=compute.precision,
        peak_memory_mb=peak_memory_mb(),
        history=history,
    )


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory on CUDA, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------- save / load
def checkpoint_digest(path: Path, task: str = "text_classification") -> str:
    """Digest over the checkpoint's weight files (adapter, and the head of a classifier)."""
    names = WEIGHT_FILES if task == "text_classification" else WEIGHT_FILES[:1]
    return combined_digest([(name, sha256_file(path / name)) for name in names])


def _save_checkpoint(model: PooledClassifier, tokenizer: Any, labels: tuple[str, ...], spec: PipelineSpec,
                     base: BaseModelRecord, history: tuple[dict[str, float], ...], out_dir: Path,
                     data_sha256: str) -> Path:
    from safetensors.torch import save_file

    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; a checkpoint folder is never overwritten")
    # Everything goes to a hidden sibling folder, then is renamed: a crash never leaves half a checkpoint.
    with atomic_path(out_dir) as tmp:
        model.encoder.save_pretrained(str(tmp / "adapter"))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        classifier = {"labels": list(labels), "pooling": model.pooling, "hidden_size": model.head.in_features,
                      "base_model": base.to_dict(), "spec_hash": spec.spec_hash, "data_sha256": data_sha256}
        (tmp / "classifier.json").write_text(json.dumps(classifier, indent=2), encoding="utf-8")
        (tmp / "spec.yaml").write_text(spec.to_yaml(), encoding="utf-8")
        (tmp / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
    return out_dir


def record_from_folder(path: Path, model_version: str | None = None) -> CheckpointRecord:
    """The record of a checkpoint folder copied from elsewhere (e.g. downloaded from the model registry)."""
    from pipelines.core.records import BaseModelRecord

    meta_file = path / "classifier.json"
    if not meta_file.is_file():
        if (path / "causal_lm.json").is_file():
            from pipelines.core.generation import lm_record_from_folder

            return lm_record_from_folder(path, model_version)
        raise CheckpointError(f"{path} is not a tuneline checkpoint (no classifier.json or causal_lm.json)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    base = BaseModelRecord(**meta["base_model"])
    if not Path(base.local_path).is_dir():
        raise CheckpointError(f"checkpoint {path} needs its base model {base.name} at {base.local_path}, "
                              "which is not on this machine")
    history = json.loads((path / "history.json").read_text(encoding="utf-8"))
    return CheckpointRecord(path=str(path), sha256=checkpoint_digest(path), base_model=base,
                            spec_hash=meta["spec_hash"], data_sha256=meta.get("data_sha256", ""),
                            labels=tuple(meta["labels"]), train_rows=0, validation_rows=0, best_epoch=None,
                            trainable_parameters=0, train_seconds=0.0, tokens_per_second=0.0, precision="",
                            history=tuple(history), model_version=model_version)


def load_classifier(record: CheckpointRecord) -> tuple[PooledClassifier, Any]:
    """Load a checkpoint for inference, after checking its weights against the record's digest."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(record.path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} is missing")
    digest = checkpoint_digest(path)
    if digest != record.sha256:
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its record says "
                              f"{record.sha256}: the files changed after training")
    encoder = load_encoder(record.base_model)
    model = PooledClassifier(encoder, record.base_model.pooling, len(record.labels), record.base_model.hidden_size)
    model.encoder = PeftModel.from_pretrained(encoder, str(path / "adapter"))
    model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    model.eval()
    return model, load_tokenizer(path / "tokenizer")


def predict_proba(model: PooledClassifier, tokenizer: Any, texts: Sequence[str], max_length: int,
                  compute: ComputeSettings, batch_size: int = 128) -> np.ndarray:
    """Class probabilities for `texts`, one row per text, in order."""
    device = torch.device(compute.device)
    model.eval().to(device)

    def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(model(**inputs).logits.float(), dim=-1)

    return _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)
