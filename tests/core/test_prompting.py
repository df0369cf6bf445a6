"""The prompting baseline's scorer: the shared cache of the instructions and examples, the rows' own turns and
each label's later tokens must give exactly the log-likelihood of scoring each whole conversation on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.core.attention import attend_with_logsumexp, combine_attention
from pipelines.core.tasks.classification.prompting import (conversation_prefix, few_shot_examples, render,
                                                           score_choices, shared_prefix_attention)
from pipelines.core.training.compute import ComputeSettings

FP32 = ComputeSettings("cpu", "fp32", num_threads=2)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_chat import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def brute_force(model: object, tokenizer: object, prefix: list[dict[str, str]], text: str, choice: str) -> float:
    """log p(answer | conversation), from one forward pass over the whole rendered conversation."""
    turn = render(tokenizer, [*prefix, {"role": "user", "content": text}], True)
    full = render(tokenizer, [*prefix, {"role": "user", "content": text}, {"role": "assistant", "content": choice}],
                  False)
    prompt_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(turn):].rstrip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return float(sum(logp[len(prompt_ids) + j - 1, t] for j, t in enumerate(answer_ids)))


@pytest.mark.parametrize(("shots", "attention"), [(0, "shared"), (1, "shared"), (1, "copied"), (2, "eager")])
def test_cached_scores_equal_scoring_each_conversation_alone(tiny_chat_dir: Path, shots: int, attention: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """shared: the rows attend to the prefix's one cache (shared_prefix_attention); copied: to a copy of it per row,
    as transformers does; eager: a model not on SDPA, which keeps its own attention and gets the copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipelines.core.tasks.classification.prompting as prompting

    calls: list[int] = []

    def counted(module: object, *args: object, **kwargs: object) -> object:
        calls.append(module.layer_idx)  # type: ignore[attr-defined]
        return shared_prefix_attention(module, *args, **kwargs)

    monkeypatch.setattr(prompting, "shared_prefix_attention", counted)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_dir), attn_implementation=(
        "eager" if attention == "eager" else "sdpa")).eval()
    with torch.no_grad():  # attention that moves the scores: at its initial scale it barely reaches the logits
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                weight.mul_(8.0)
    # Labels of 1 to several tokens, texts of different lengths (the batch is padded in the middle).
    choices = ["red", "green house", "The car is blue."]
    train = pd.DataFrame({"text": ["What colour is the car number 1?", "What colour is the hat number 2?",
                                   "What colour is the cup number 3?"], "label": choices})
    prefix = conversation_prefix(choices, few_shot_examples(train, shots, 0, choices))
    texts = ["What colour is the ball number 7?", "What is AI?", "Tell me a joke about the lamp number 11 please."]
    scores = score_choices(model, tokenizer, prefix, texts, choices, FP32, batch_size=2,
                           shared_prefix=attention == "shared")
    expected = np.array([[brute_force(model, tokenizer, prefix, t, c) for c in choices] for t in texts])
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert len({len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices}) > 1
    # Two batches through both layers when the prefix is shared; never otherwise. The model is SDPA's again after.
    assert calls == ([0, 1, 0, 1] if attention == "shared" else [])
    assert model.config._attn_implementation == ("eager" if attention == "eager" else "sdpa")


@pytest.mark.parametrize(("fused", "autocast"), [(True, False), (False, False), (False, True)])
def test_attention_over_key_blocks_computed_apart_equals_attention_over_all_keys(fused: bool, autocast: bool) -> None:
    """The two halves of shared_prefix_attention: each block's output and log-sum-exp, combined, give softmax
    attention over every key at once (here: a prefix block without a mask and a causal block). The plain products
    stay in float32 under a bf16 autocast (as on a GPU with bf16)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5 if name == "q" else 12, 8) for name in ("q", "k", "v"))
    causal = torch.zeros(5, 5).masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), float("-inf"))
    mask = torch.cat([torch.zeros(5, 7), causal], dim=-1).expand(2, 1, 5, 12)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first = attend_with_logsumexp(q, k[:, :, :7], v[:, :, :7], None, 0.3, fused)
        second = attend_with_logsumexp(q, k[:, :, 7:], v[:, :, 7:], causal.expand(2, 1, 5, 5).contiguous(), 0.3,
                                       fused)
    torch.testing.assert_close(combine_attention([first, second]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[1], torch.logsumexp(q @ k[:, :, :7].transpose(-1, -2) * 0.3, dim=-1))


def test_few_shot_examples_take_k_rows_of_every_label_interleaved() -> None:
    train = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": ["a", "b", "c"] * 4})
    examples = few_shot_examples(train, 2, 0, ["a", "b", "c"])
    assert [label for _, label in examples] == ["a", "b", "c", "a", "b", "c"]
    assert len({text for text, _ in examples}) == 6
    assert all(train.set_index("text").at[text, "label"] == label for text, label in examples)


def test_the_shared_prefix_takes_keys_and_values_in_another_dtype_than_the_queries() -> None:
    """A model that keeps its rotary embedding in float32 under bf16 hands over float32 queries and keys beside
    bf16 values: attended in the queries' dtype, as transformers' SDPA does, instead of failing."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    b, heads, kv_heads, length, prefix, dim = 2, 4, 2, 3, 5, 8
    query, key = torch.randn(b, heads, length, dim), torch.randn(b, kv_heads, length, dim)
    value = torch.randn(b, kv_heads, length, dim)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=torch.randn(1, kv_heads, prefix, dim),
                                                    values=torch.randn(1, kv_heads, prefix, dim))])
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool)).expand(b, 1, length, length)
    module = SimpleNamespace(layer_idx=0)
    same, _ = shared_prefix_attention(module, query, key, value.bfloat16().float(), mask, shared_prefix=cache)
    mixed, _ = shared_prefix_attention(module, query, key, value.bfloat16(), mask, shared_prefix=cache)
    assert mixed.dtype == torch.float32 and mixed.shape == (b, length, heads, dim)
    torch.testing.assert_close(mixed, same)
