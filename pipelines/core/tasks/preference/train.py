"""Preference tuning with LoRA through TRL: DPOTrainer (loss `sigmoid` for dpo, `ipo` for ipo) or KTOTrainer (kto,
each pair split into a desirable and an undesirable answer). The reference is the starting model itself: the
trainers compute its log-probabilities with the adapter switched off, so no second copy of the model is loaded.
Also the SFT-on-chosen baseline: the same adapter trained with SFT on the chosen answers for as many steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core.digests import checkpoint_digest, frame_digest
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.tasks.instruction.chat import ensure_chat_template
from pipelines.core.tasks.instruction.train import load_causal_lm
from pipelines.core.tasks.preference import NAME, WEIGHT_FILES
from pipelines.core.tasks.preference.pairs import usable
from pipelines.core.training.arguments import build_lora_config, common_training_arguments
from pipelines.core.training.checkpoints import checkpoint_manifest
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.loop import best_epoch_callback, run_trainer, save_trained
from pipelines.core.training.model import dropout_note, peak_memory_mb, set_model_dropout, trainable_parameters
from pipelines.core.training.resume import Resumable

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo"}  # task.method -> DPOConfig.loss_type


def paired_dataset(frame: pd.DataFrame) -> Any:
    """Rendered pairs as TRL reads them: prompt, chosen and rejected as text (the chat template applied)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(frame["prompt_rendered"]), "chosen": list(frame["chosen_rendered"]),
                              "rejected": list(frame["rejected_rendered"])})


def unpaired_dataset(frame: pd.DataFrame, seed: int) -> Any:
    """Each pair as a desirable and an undesirable example (KTO), in a seeded random order (KTOTrainer reads them
    in order: its KL estimate pairs each example with its neighbour in the batch)."""
    from datasets import Dataset

    prompts = list(frame["prompt_rendered"])
    data = {"prompt": prompts + prompts,
            "completion": list(frame["chosen_rendered"]) + list(frame["rejected_rendered"]),
            "label": [True] * len(frame) + [False] * len(frame)}
    return Dataset.from_dict(data).shuffle(seed=seed)


def build_preference_config(spec: SpecView, output_dir: Path, compute: ComputeSettings, has_validation: bool) -> Any:
    """The one place DPOConfig / KTOConfig is built, from the training section and the task's method settings."""
    cfg, task = spec.training, spec.task
    common = common_training_arguments(cfg, output_dir, compute, has_validation, min(spec.evaluation.batch_size, 16))
    # Pairs are not grouped by length (the trainers keep no input_ids column to sort by); KTO reads them in order.
    common["train_sampling_strategy"] = "sequential" if task.method == "kto" else "random"
    shared = dict(beta=task.beta, max_length=cfg.max_length, gradient_checkpointing=False,
                  precompute_ref_log_probs=False, disable_dropout=cfg.model_dropout is None)
    if task.method == "kto":
        from trl import KTOConfig

        return KTOConfig(**common, **shared,
                         desirable_weight=task.desirable_weight, undesirable_weight=task.undesirable_weight)
    from trl import DPOConfig

    return DPOConfig(**common, **shared, loss_type=[LOSS_TYPES[task.method]])


@contextmanager
def answer_positions_only(enabled: bool) -> Iterator[None]:
    """TRL's log-probability head scores every position of a batch (prompt and padding included) except on Triton
    devices, where it scores only the answer tokens; the answers are a minority of a pair's tokens, and on a CPU
    (nothing to recompile) scoring them alone gives the same log-probabilities for less work. Patches the one
    decision, restored afterwards. See benchmarks/preference.py for the step time with and without it."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if enabled:
        trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _without_reference_adapter(model: Any) -> None:
    """TRL copies a PeftModel's adapter as a frozen "ref" adapter to compute the reference with. A fresh LoRA
    adapter adds nothing (its B matrices start at zero), so the reference is the model with the adapter switched
    off: the copy is removed, and TRL then disables the adapter for the reference pass."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def train_preference(pairs: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
                     compute: ComputeSettings, progress: ProgressFn = print, sink: MetricsSink | None = None,
                     scratch: Path | None = None) -> CheckpointRecord:
    """LoRA on the train pairs with the task's method; keeps the epoch with the lowest validation loss; saves the
    adapter and tokenizer to `out_dir`. With `scratch`, an interrupted run resumes (training.checkpoint_every)."""
    from peft import get_peft_model
    from transformers import set_seed
    from trl import DPOTrainer, KTOTrainer

    cfg, task = spec.training, spec.task
    compute.apply()
    set_seed(cfg.seed)
    data_sha256 = frame_digest(pairs)
    pairs = usable(pairs)
    train, validation = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "validation"]
    model, tokenizer = load_causal_lm(base.local_path, base.trust_remote_code)
    ensure_chat_template(tokenizer)
    own_dropout = set_model_dropout(model, cfg.model_dropout)
    model = get_peft_model(model, build_lora_config(cfg.lora, base, "CAUSAL_LM", model))
    trainable, total = trainable_parameters(model)
    progress(f"{task.method.upper()} (beta {task.beta:g}) with LoRA r={cfg.lora.r}: {trainable:,} trainable of "
             f"{total:,} parameters; precision={compute.precision}; {len(train)} train and {len(validation)} "
             f"validation pairs; the reference is the starting model (adapter off)"
             + dropout_note(cfg.model_dropout, own_dropout))
    kto = task.method == "kto"
    train_ds = unpaired_dataset(train, cfg.seed) if kto else paired_dataset(train)
    val_ds = (unpaired_dataset(validation, cfg.seed) if kto else paired_dataset(validation)) if len(validation) \
        else None
    callback = best_epoch_callback(model, progress, sink, "loss", higher_is_better=False,
                                  patience=cfg.early_stopping_patience, average_last=cfg.average_last_epochs)

    def make_trainer(folder: Path) -> Any:
        trainer_class = KTOTrainer if kto else DPOTrainer
        trainer = trainer_class(model=model, args=build_preference_config(spec, folder, compute, val_ds is not None),
                                train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                                callbacks=[callback])
        _without_reference_adapter(trainer.model)
        return trainer

    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256, compute.world_size)
    with answer_positions_only(compute.device == "cpu"):
        outcome = run_trainer(make_trainer, callback, progress, "loss", resumable)
    model.eval()
    steps = max((int(h.get("step", 0)) for h in outcome.history), default=0)

    def write_files(folder: Path) -> None:
        model.save_pretrained(str(folder / "adapter"))
        tokenizer.save_pretrained(str(folder / "tokenizer"))

    task_data = {"method": task.method, "beta": task.beta, "steps": steps, "pairs": len(train),
                 "started_from": base.started_from}
    manifest = checkpoint_manifest(NAME, base, spec.spec_hash, data_sha256, WEIGHT_FILES, task_data)
    path = save_trained(out_dir, write_files, manifest, spec.to_yaml(), outcome, resumable)
    pairs_per_second = len(train) * cfg.epochs / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    tokens = float((train["prompt_tokens"] * 2 + train["chosen_tokens"] + train["rejected_tokens"]).sum()) * cfg.epochs
    progress(f"saved the adapter to {path} (trained in {outcome.train_seconds:.1f} s: {pairs_per_second:.2f} pairs/s, "
             f"{steps} steps, peak memory {peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHT_FILES), base_model=base,
        spec_hash=spec.spec_hash, data_sha256=data_sha256, train_rows=len(train), validation_rows=len(validation),
        best_epoch=outcome.best_epoch, trainable_parameters=trainable, train_seconds=outcome.train_seconds,
        tokens_per_second=tokens / outcome.train_seconds if outcome.train_seconds > 0 else 0.0,
        precision=compute.precision, peak_memory_mb=peak_memory_mb(), history=outcome.history,
        task_data={**task_data, "pairs_per_second": pairs_per_second})


def train_sft_on_chosen(pairs: pd.DataFrame, base: BaseModelRecord, spec: SpecView, steps: int,
                        compute: ComputeSettings, progress: ProgressFn = print) -> Any:
    """The baseline preference tuning must beat to be worth its pairs: the same LoRA adapter on the starting
    model, trained with SFT (loss on the chosen answer only) on the train pairs for `steps` optimizer steps at the
    same batch size and learning rate. Returns the PeftModel (kept in memory, never registered)."""
    import tempfile

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    cfg = spec.training
    compute.apply()
    set_seed(cfg.seed)
    train = usable(pairs)
    train = train[train["split"] == "train"]
    model, tokenizer = load_causal_lm(base.local_path, base.trust_remote_code)
    ensure_chat_template(tokenizer)
    set_model_dropout(model, cfg.model_dropout)
    model = get_peft_model(model, build_lora_config(cfg.lora, base, "CAUSAL_LM", model))
    data = Dataset.from_dict({"prompt": list(train["prompt_rendered"]), "completion": list(train["chosen_rendered"])})
    progress(f"SFT-on-chosen baseline: {steps} steps on {len(train)} chosen answers")
    with tempfile.TemporaryDirectory(prefix="tuneline-sft-baseline-") as folder:
        args = SFTConfig(**{**common_training_arguments(cfg, Path(folder), compute, False, 8), "eval_strategy": "no"},
                         max_steps=max(steps, 1), gradient_checkpointing=False, completion_only_loss=True,
                         max_length=cfg.max_length, packing=False)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    return model.eval()
