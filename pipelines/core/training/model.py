"""Model surgery: parameter counts, frozen weights in bf16, dropout rates, the transformer blocks that get adapters,
and the process's peak memory."""

from __future__ import annotations

import torch

from pipelines.core.errors import CheckpointError
from pipelines.core.sections import LoraSettingsConfig
from pipelines.core.training.compute import ComputeSettings


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory on CUDA, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def store_frozen_weights_for(model: torch.nn.Module, compute: ComputeSettings) -> int:
    """Under bf16 autocast every matmul casts its fp32 weight to bf16, every step; the frozen weights never change,
    so they are stored in bf16 once instead (the same values the matmuls saw; ~15% faster here). Trainable
    weights (adapters, head) stay fp32 for the optimizer. Returns the number of parameters converted."""
    if compute.precision != "bf16":
        return 0
    converted = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(torch.bfloat16)
            converted += parameter.numel()
    return converted


def set_model_dropout(model: torch.nn.Module, p: float | None) -> tuple[float, ...]:
    """Set the rate of every nn.Dropout in `model` and the `attention_dropout` rate that attention functions read
    (Llama-style models) to `p`; None leaves the model as it is. Returns the distinct rates found before."""
    if p is None:
        return ()
    found = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            found.add(float(module.p))
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            found.add(module.attention_dropout)
            module.attention_dropout = p
    return tuple(sorted(found))


def dropout_note(p: float | None, before: tuple[float, ...]) -> str:
    """'; model dropout 0 (its own: 0.1)' for the training's progress line, or '' when the model's own is kept."""
    if p is None:
        return ""
    return f"; model dropout {p:g}" + (f" (its own: {', '.join(f'{r:g}' for r in before)})" if before else "")


def transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks (the module list as long as its config's num_hidden_layers) and
    its name ('encoder.layer', 'layers')."""
    config = model.config
    count = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count > 0:
            return name, module
    raise CheckpointError(f"cannot find the {count} transformer blocks of {type(model).__name__} (training.lora."
                          "top_layers needs them); leave top_layers unset for this model")


def lora_layers(cfg: LoraSettingsConfig, num_layers: int) -> list[int] | None:
    """The transformer blocks that get adapters: the top `cfg.top_layers` of `num_layers` (None: all)."""
    if cfg.top_layers is None or cfg.top_layers >= num_layers:
        return None
    return list(range(num_layers - cfg.top_layers, num_layers))
