"""Fine-tuning a classifier with LoRA (transformers' Trainer through the shared kernel), and loading one back."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pipelines.core.digests import checkpoint_digest, frame_digest
from pipelines.core.fused_lora import fused_lora
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.classification import NAME, WEIGHT_FILES
from pipelines.core.tasks.classification.metrics import _classification_metrics
from pipelines.core.tasks.classification.model import (FROZEN_STATES_BUDGET_MB, FrozenLowerBlocks, PooledClassifier,
                                                       _forward_batches, _head_from_probe, fit_linear_probe,
                                                       frozen_embeddings, load_encoder, load_tokenizer)
from pipelines.core.training.arguments import build_lora_config, common_training_arguments
from pipelines.core.training.checkpoints import checkpoint_manifest, verified_folder
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.cost import model_flops_utilization
from pipelines.core.training.loop import (best_epoch_callback, run_trainer, save_trained, time_training_steps,
                                          with_global_batch_order)
from pipelines.core.training.model import (dropout_note, lora_layers, peak_memory_mb, set_model_dropout,
                                           store_frozen_weights_for, trainable_parameters, transformer_blocks)
from pipelines.core.training.resume import Resumable

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


def _tokenized(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int,
               rows: Sequence[int]) -> Any:
    from datasets import Dataset

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    columns = {k: encoded[k] for k in encoded.keys()}
    columns["labels"] = list(labels)
    columns["rows"] = list(rows)  # where the row's cached frozen-block states are (FrozenLowerBlocks)
    return Dataset.from_dict(columns)


def build_training_arguments(cfg: Any, output_dir: Path, compute: ComputeSettings, has_validation: bool,
                             eval_batch_size: int) -> Any:
    """The one place transformers.TrainingArguments are built (the common part comes from the kernel)."""
    from transformers import TrainingArguments

    return TrainingArguments(**common_training_arguments(cfg, output_dir, compute, has_validation, eval_batch_size),
                             label_names=["labels"])


def train_classifier(splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
                     compute: ComputeSettings, progress: ProgressFn = print,
                     sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
    """Fine-tune `base` with LoRA on the train split, pick the best epoch on validation, save to `out_dir`.
    With `scratch`, resumable checkpoints go there (training.checkpoint_every) and an interrupted run resumes."""
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
    own_dropout = set_model_dropout(encoder, cfg.model_dropout)
    model = PooledClassifier(encoder, base.pooling, len(labels), base.hidden_size, dropout=spec.task.head_dropout,
                             label_smoothing=spec.task.label_smoothing)

    num_layers = len(transformer_blocks(encoder)[1]) if cfg.lora.top_layers else None
    adapted = lora_layers(cfg.lora, num_layers) if num_layers else None
    # The blocks below the adapters never change: their outputs are computed once (with the linear probe's
    # embeddings, in the same pass), not at every step of every epoch.
    lower = FrozenLowerBlocks(encoder, adapted[0]) if adapted else None
    if lower is not None:
        tokens = sum(len(ids) for ids in tokenizer(train["text"].tolist() + validation["text"].tolist(),
                                                   truncation=True, max_length=cfg.max_length)["input_ids"])
        needed = tokens * base.hidden_size * (2 if compute.precision == "bf16" else 4) / 2**20
        if needed > FROZEN_STATES_BUDGET_MB:
            progress(f"frozen blocks 0-{lower.cut - 1}: not cached (their outputs would take {needed:,.0f} MB, over "
                     f"{FROZEN_STATES_BUDGET_MB:,} MB); each step runs them")
            lower = None
    started = time.monotonic()
    if spec.task.head_init == "linear_probe":
        progress(f"linear probe: embedding {len(train) + len(validation)} rows with the frozen base model")
        train_x = frozen_embeddings(base, train["text"].tolist(), cfg.max_length, compute,
                                    load=lambda: (encoder, tokenizer), lower=lower)
        val_x = (frozen_embeddings(base, validation["text"].tolist(), cfg.max_length, compute,
                                   load=lambda: (encoder, tokenizer), lower=lower) if len(validation) else None)
        probe = fit_linear_probe(train_x, train["label"].map(index).to_numpy(), val_x,
                                 validation["label"].map(index).to_numpy() if len(validation) else None,
                                 compute.device)
        _head_from_probe(model.head, probe, len(labels))
        if val_x is not None:
            progress(f"linear probe: validation accuracy {probe.score(val_x, validation['label'].map(index)):.4f}")
    elif lower is not None:
        lower.append(encoder, tokenizer, train["text"].tolist() + validation["text"].tolist(), cfg.max_length,
                     compute)
    if lower is not None:
        progress(f"frozen blocks 0-{lower.cut - 1}: computed once for {len(lower.states)} rows "
                 f"({lower.megabytes:.0f} MB; {time.monotonic() - started:.1f} s"
                 + (" with the linear probe" if spec.task.head_init == "linear_probe" else "")
                 + f"); each step runs blocks {lower.cut}-{num_layers - 1}")
    model.encoder = get_peft_model(encoder, build_lora_config(cfg.lora, base, "FEATURE_EXTRACTION", encoder))
    store_frozen_weights_for(model, compute)
    trainable, total = trainable_parameters(model)
    progress(f"LoRA r={cfg.lora.r}" + (f" on blocks {adapted[0]}-{adapted[-1]} of {num_layers}" if adapted else "")
             + f": {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%}); pooling={base.pooling}; "
             f"precision={compute.precision}" + dropout_note(cfg.model_dropout, own_dropout))

    model.frozen_lower = lower
    rows = list(range(len(train) + len(validation)))
    train_ds = _tokenized(tokenizer, train["text"].tolist(), train["label"].map(index).tolist(), cfg.max_length,
                          rows[:len(train)])
    val_ds = (_tokenized(tokenizer, validation["text"].tolist(), validation["label"].map(index).tolist(),
                         cfg.max_length, rows[len(train):]) if len(validation) else None)
    head_ids = {id(p) for p in model.head.parameters()}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW([
        {"params": adapter_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        {"params": list(model.head.parameters()), "lr": spec.task.head_learning_rate or cfg.learning_rate,
         "weight_decay": cfg.weight_decay},
    ])
    select_by = spec.evaluation.primary_metric  # the epoch kept is the best on validation by this metric
    callback = best_epoch_callback(model, progress, sink, select_by, patience=cfg.early_stopping_patience,
                                  average_last=cfg.average_last_epochs)

    def make_trainer(scratch: Path) -> Any:
        args = build_training_arguments(cfg, scratch, compute, val_ds is not None, spec.evaluation.batch_size)
        return with_global_batch_order(Trainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                                data_collator=DataCollatorWithPadding(tokenizer),
                                                compute_metrics=_classification_metrics,
                                                optimizers=(optimizer, None), callbacks=[callback])

    data_sha256 = frame_digest(splits)  # the same digest the splits asset reports: lineage joins on it
    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256,
                                   compute.world_size)
    with model.frozen_lower.attached() if model.frozen_lower else nullcontext(), fused_lora(model):
        outcome = run_trainer(make_trainer, callback, progress, select_by, resumable)
    model.frozen_lower = None  # the whole model again, for saving and inference
    real_tokens = float(sum(len(ids) for ids in train_ds["input_ids"])) * cfg.epochs
    model.eval()

    def write_files(folder: Path) -> None:
        from safetensors.torch import save_file

        model.encoder.save_pretrained(str(folder / "adapter"))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()},
                  str(folder / "head.safetensors"))
        tokenizer.save_pretrained(str(folder / "tokenizer"))

    manifest = checkpoint_manifest(NAME, base, spec.spec_hash, data_sha256, WEIGHT_FILES, {"labels": list(labels)},
                                   pooling=model.pooling, hidden_size=model.head.in_features)
    path = save_trained(out_dir, write_files, manifest, spec.to_yaml(), outcome, resumable)
    speed = real_tokens / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    mfu = model_flops_utilization(encoder.config.to_dict(), base.parameter_count, real_tokens,
                                  int(len(train) * cfg.epochs), outcome.train_seconds, False, compute,
                                  share=len(adapted) / num_layers if adapted and num_layers else 1.0)
    progress(f"saved adapter and head to {path} ({speed:.0f} tokens/s, MFU {mfu:.1%}, peak memory "
             f"{peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHT_FILES), base_model=base,
        spec_hash=spec.spec_hash, data_sha256=data_sha256, task_data={"labels": list(labels)}, train_rows=len(train),
        validation_rows=len(validation), best_epoch=outcome.best_epoch, trainable_parameters=trainable,
        train_seconds=outcome.train_seconds, tokens_per_second=speed, precision=compute.precision,
        peak_memory_mb=peak_memory_mb(), history=outcome.history, mfu=mfu)


def load_classifier(record: CheckpointRecord) -> tuple[PooledClassifier, Any]:
    """Load a checkpoint for inference, after checking its weights against the record's digest."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = verified_folder(record, WEIGHT_FILES)
    encoder = load_encoder(record.base_model)
    model = PooledClassifier(encoder, record.base_model.pooling, len(record.task_data["labels"]),
                             record.base_model.hidden_size)
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


def time_train_step(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame, compute: ComputeSettings,
                    steps: int) -> float:
    """Median seconds per LoRA training step of the real model on a batch of real train rows."""
    from peft import get_peft_model

    cfg = spec.training
    batch_rows = sample_split(splits, "train", cfg.batch_size, cfg.seed)
    tokenizer = load_tokenizer(record.local_path)
    encoder = load_encoder(record)
    set_model_dropout(encoder, cfg.model_dropout)
    model = PooledClassifier(encoder, record.pooling, max(2, splits["label"].nunique()), record.hidden_size,
                             dropout=spec.task.head_dropout)
    model.encoder = get_peft_model(encoder, build_lora_config(cfg.lora, record, "FEATURE_EXTRACTION"))
    inputs = dict(tokenizer(batch_rows["text"].tolist(), truncation=True, max_length=cfg.max_length,
                            padding=True, return_tensors="pt"))
    inputs["labels"] = torch.zeros(len(batch_rows), dtype=torch.long)
    return time_training_steps(model, inputs, compute, steps)
