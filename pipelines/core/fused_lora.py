"""LoRA linear layers computed in one autograd node while training without autocast (fp32, as on a CPU without AMX).

peft computes a LoRA layer as base(x) + lora_B(lora_A(dropout(x))) * scaling: four modules and two elementwise
passes over the whole output (the scaling and the sum), and in the backward pass two more (the scaling's gradient
and the sum of the two input gradients). On a 2-core CPU those passes and the module calls made a MiniLM training step
(adapters on 4 blocks, batch 64) 13% slower and a SmolLM2 one 5 to 10%. Here the scaling multiplies the rank-r
activations (r columns, not the output's width), and the low-rank product is accumulated into the base product's
output (and, backward, into the input's gradient) in place. The terms are the same; only float rounding differs,
since the scaling is applied before the second low-rank product instead of after it (tests/core/test_fused_lora.py
bounds the difference).

Only layers whose forward is exactly that sum are switched: one active adapter, no dropout, no LoRA bias, no variant
(DoRA and the like), a frozen nn.Linear base. A call the fused path does not cover (autocast on, mixed dtypes,
adapters disabled or merged, extra arguments) goes to peft's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        low = torch.mm(flat, lora_a.t()).mul_(scaling)  # s (x A^T): rank-r columns
        out = torch.addmm(bias, flat, weight.t()) if bias is not None else torch.mm(flat, weight.t())
        out.addmm_(low, lora_b.t())
        ctx.save_for_backward(flat, low, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.in_shape = shape
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, low, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = torch.mm(g.t(), low) if ctx.needs_input_grad[4] else None
        grad_low = torch.mm(g, lora_b).mul_(ctx.scaling)  # d/d(x A^T), scaling included
        grad_a = torch.mm(grad_low.t(), flat) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(grad_low, lora_a).reshape(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(layer: Any) -> str | None:
    """The adapter name when `layer` is a plain peft LoRA Linear that the fused path computes exactly."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) is not LoraLinear or not isinstance(layer.get_base_layer(), nn.Linear):
        return None
    base = layer.get_base_layer()
    adapters = list(layer.active_adapters)
    if len(adapters) != 1 or getattr(layer, "fan_in_fan_out", False) or layer.merged or layer.disable_adapters:
        return None
    name = adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) \
            or not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None \
            or layer.lora_A[name].bias is not None or base.weight.requires_grad \
            or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


def _fused_forward(layer: Any, name: str, original: Any) -> Any:
    base, lora_a, lora_b, scaling = layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name], layer.scaling[name]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or layer.merged or layer.disable_adapters or list(layer.active_adapters) != [name] \
                or torch.is_autocast_enabled(x.device.type) \
                or not (x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
            return original(x, *args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation: the same sum without an autograd node
            low = F.linear(x, lora_a.weight).mul_(scaling)
            out = F.linear(x, base.weight, base.bias)
            return out.add_(F.linear(low, lora_b.weight))
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, float(scaling))

    return forward


@contextmanager
def fused_lora(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Compute `model`'s plain LoRA Linear layers with _LoraLinear inside the block (peft's forward restored
    afterwards); yields how many layers were switched."""
    switched = []
    if enabled:
        for module in model.modules():
            name = _fusable(module)
            if name is not None and "forward" not in module.__dict__:
                module.forward = _fused_forward(module, name, module.forward)
                switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)
