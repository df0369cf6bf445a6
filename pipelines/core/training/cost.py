"""The cost model: a model's dimensions, the memory and FLOPs of a training step, this machine's matmul peak and
the model FLOPs utilization of a run. No torch at import time (the task registry imports the memory estimate)."""

from __future__ import annotations

import math
import time
from typing import Any

from pipelines.core.training.compute import ComputeSettings


def model_dimensions(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden size, layers, attention heads, vocabulary) of a config.json, under the names architectures use."""
    return (int(config.get("hidden_size") or config.get("d_model") or 0),
            int(config.get("num_hidden_layers") or config.get("n_layer") or 0),
            int(config.get("num_attention_heads") or config.get("n_head") or 1),
            int(config.get("vocab_size") or 0))


def estimate_training_memory_mb(config: dict[str, Any], parameters: int, batch_size: int, length: int,
                                precision: str, vocabulary_logits: bool) -> float:
    """Weights (fp32), activations kept for the backward pass (34·s·b·h + 5·a·s²·b bytes per layer at 16 bit,
    doubled for fp32) and, for models that predict tokens (`vocabulary_logits`), the logits with their gradient."""
    hidden, layers, heads, vocab = model_dimensions(config)
    scale = 1.0 if precision == "bf16" else 2.0
    activations = layers * (34 * length * batch_size * hidden + 5 * heads * length * length * batch_size) * scale
    logits = 3 * 4 * batch_size * length * vocab if vocabulary_logits else 0
    return (4 * parameters + activations + logits) / 2**20


# The share of this machine's matmul peak (matmul_rate) a LoRA training step reaches: at least the first (small
# models on short texts spend most of a step on per-operation overhead; the lowest measured here was 7.6%, for
# SmolLM2-135M on TREC questions), at most the second. Between the two bounds a few steps are timed.
STEP_EFFICIENCY = (0.05, 0.6)
_MATMUL_RATE: dict[tuple[str, str], float] = {}


def matmul_rate(compute: ComputeSettings) -> float:
    """This machine's matmul peak in FLOP/s: the best of a few n^3 products in the compute's precision (bf16 or
    fp32 tensors, no autocast casts), measured once per process; n = 2048 on a CPU, 8192 on a GPU (smaller products
    leave a GPU's units idle), each timed between device synchronizations."""
    key = (compute.device, compute.precision)
    if key not in _MATMUL_RATE:
        import torch

        compute.apply()
        gpu = compute.device == "cuda"
        n, repeats = (8192, 10) if gpu else (2048, 4)
        dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
        a = torch.randn(n, n, device=compute.device, dtype=dtype)
        b = torch.randn(n, n, device=compute.device, dtype=dtype)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        (a @ b).sum().item()  # warm-up: the first product pays for kernel selection
        best = math.inf
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - started)
        _MATMUL_RATE[key] = 2 * n**3 / best
        del a, b
    return _MATMUL_RATE[key]


def training_step_flops(config: dict[str, Any], parameters: int, batch_size: int, tokens: float,
                        vocabulary_logits: bool, body_share: float = 1.0) -> float:
    """FLOPs of one LoRA training step: forward and the backward pass for activations (frozen weights need no
    weight gradients) through the non-embedding weights (`body_share` of them, when only some blocks run),
    attention scores, and the vocabulary logits of a model that predicts tokens."""
    hidden, layers, _, vocab = model_dimensions(config)
    body = max(parameters - vocab * hidden, parameters // 2) * body_share
    per_token = (4 * body + 8 * layers * body_share * tokens * hidden
                 + (4 * vocab * hidden if vocabulary_logits else 0))
    return per_token * tokens * batch_size


def model_flops_utilization(config: dict[str, Any], parameters: int, tokens: float, examples: int, seconds: float,
                            vocabulary_logits: bool, compute: ComputeSettings, share: float = 1.0) -> float:
    """MFU of a training run: the FLOPs its `tokens` (in `examples` examples) needed (training_step_flops, with
    `share` of the transformer body run per step) per second, over this machine's matmul peak (matmul_rate)."""
    if seconds <= 0 or examples <= 0 or tokens <= 0:
        return 0.0
    per_example = training_step_flops(config, parameters, 1, tokens / examples, vocabulary_logits, share)
    # With several processes the work is shared: the peak is that of all of them (each measured its own share).
    return per_example * examples / seconds / (matmul_rate(compute) * compute.world_size)
