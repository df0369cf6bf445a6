"""Attention functions of our own, switched into a transformers model for one piece of work and back again.

transformers looks a model's attention up by name (`config._attn_implementation`) in its AttentionInterface on
every call; `switched_attention` registers a function under a name of ours and points the model's text-decoder
configs at it while the context is open. Used by instruction tuning (packed examples attend one at a time) and by
the prompting baselines (a shared prefix attended once per batch, never copied per row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def switched_attention(model: Any, name: str, function: Callable[..., Any], enabled: bool = True) -> Iterator[bool]:
    """Run `model` with `function` as its attention where it uses SDPA (restored afterwards); yields whether it
    did. A composite model (a vision tower beside the text decoder) or one on another implementation keeps its own."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    configs = list({id(c): c for c in (getattr(m, "config", None) for m in model.modules())
                    if hasattr(c, "_attn_implementation")}.values())
    if not enabled or not configs \
            or any(c._attn_implementation != "sdpa" or getattr(c, "sub_configs", None) for c in configs):
        yield False
        return
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)  # the usual masks, for the calls it passes on
    for c in configs:
        c._attn_implementation = name
    try:
        yield True
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"


def attend_with_logsumexp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and the log-sum-exp of each query's scores ([B, H, Lq, D], [B, H, Lq]), so
    that attention over several key blocks computed apart can be combined exactly (combine_attention).
    `mask` is additive (0 or -inf), in the query's dtype; every query must see at least one key. `fused` uses the
    CPU's flash-attention kernel (the scores are never held whole); otherwise the plain products in float32."""
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale)[:2]
        return out, lse.float()
    with torch.autocast(query.device.type, enabled=False):  # float32 products, also under a bf16 autocast
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask.float()
        lse = torch.logsumexp(scores, dim=-1)
        return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), value.float()).to(query.dtype), lse


def combine_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of key blocks from each block's (output, log-sum-exp): the outputs weighted by each
    block's share of the softmax mass."""
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.softmax(lses, dim=0).unsqueeze(-1)  # [blocks, B, H, Lq, 1]
    combined = sum(w * out.float() for w, (out, _) in zip(weights, parts, strict=True))
    return combined.to(parts[0][0].dtype)  # type: ignore[union-attr]
