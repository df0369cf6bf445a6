"""The library objects training builds, each in exactly one function: peft's LoraConfig, and the arguments
transformers' TrainingArguments and TRL's SFTConfig share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.records import BaseModelRecord
from pipelines.core.sections import LoraSettingsConfig, TrainingConfig
from pipelines.core.training.compute import ComputeSettings
from pipelines.core.training.model import lora_layers, transformer_blocks

if TYPE_CHECKING:
    import torch


def build_lora_config(cfg: LoraSettingsConfig, base: BaseModelRecord, peft_task_type: str,
                      model: torch.nn.Module | None = None) -> Any:
    """The one place a peft.LoraConfig is built: the spec's settings on the target modules this base model has
    (selection found them), in the blocks of `model` that `lora.top_layers` names, for the task's peft TaskType
    ('FEATURE_EXTRACTION', 'CAUSAL_LM', ...)."""
    from peft import LoraConfig, TaskType

    targets = base.lora_targets or cfg.target_modules
    layers, pattern = None, None
    if cfg.top_layers is not None and model is not None:
        name, blocks = transformer_blocks(model)
        layers, pattern = lora_layers(cfg, len(blocks)), name.rsplit(".", 1)[-1]
    return LoraConfig(task_type=TaskType[peft_task_type], r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(targets), bias="none", layers_to_transform=layers,
                      layers_pattern=pattern if layers else None)


def common_training_arguments(cfg: TrainingConfig, output_dir: Path, compute: ComputeSettings,
                              has_validation: bool, eval_batch_size: int) -> dict[str, Any]:
    """The arguments TrainingArguments and SFTConfig share, from the spec's training section."""
    from transformers.utils import logging as hf_logging

    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size // compute.world_size,  # the spec checks that it divides
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
        # One switch for every progress bar: `tuneline run` turns them off (its progress lines say the same).
        disable_tqdm=not hf_logging.is_progress_bar_enabled(),
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Several processes (torchrun) on a CPU talk through gloo; on GPUs the Trainer's default (NCCL) is right.
        ddp_backend="gloo" if compute.world_size > 1 and compute.device == "cpu" else None,
        # Every trainable parameter (adapters, head) takes part in every step: DDP need not search the graph for
        # unused ones (the Trainer turns the search on for a model that is not a transformers PreTrainedModel).
        ddp_find_unused_parameters=False if compute.world_size > 1 else None,
    )
