"""The fused LoRA layers compute what peft's do: the same outputs, loss and gradients for a BERT-style model (biased
linear layers, 3D inputs) and a Llama-style one (no biases), and they leave every layer they do not cover, and every
call they do not cover, to peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from pipelines.core.fused_lora import fused_lora


def _bert(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=["query", "key", "value", "dense"]))
    _nonzero_b(model)
    return model


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    _nonzero_b(model)
    return model


def _nonzero_b(model: torch.nn.Module) -> None:
    """peft starts B at zero, where the low-rank path's contribution and A's gradient vanish: a test would not see
    them. Random B makes every term count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def _loss_and_grads(model: torch.nn.Module, forward, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                            torch.Tensor]:
    """The loss, the trainable parameters' gradients and the gradient reaching the input embeddings (the chain
    through every layer's input)."""
    model.zero_grad()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = forward(model, embeds)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, embeds.grad.clone()


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The same sums in another order differ by float32 rounding, not more."""
    return float((ours - theirs).norm() / theirs.norm())


def _bert_loss(out) -> torch.Tensor:  # every LoRA layer counts, the pooler's too
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()


@pytest.mark.parametrize("build,forward,ids", [
    (_bert, lambda m, e: _bert_loss(m(inputs_embeds=e, attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3,
                                                                                    [1] * 8]))),
     torch.arange(24).reshape(3, 8) % 100),
    (_llama, lambda m, e: m(inputs_embeds=e, labels=torch.arange(20).reshape(2, 10) * 7 % 100).loss,
     torch.arange(20).reshape(2, 10) * 3 % 100),
], ids=["bert", "llama"])
def test_fused_lora_gives_peft_outputs_and_gradients(build, forward, ids) -> None:
    model = build()
    loss, grads, input_grad = _loss_and_grads(model, forward, ids)
    lora_layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    with fused_lora(model) as switched:
        assert switched == lora_layers > 0
        fused_loss, fused_grads, fused_input_grad = _loss_and_grads(model, forward, ids)
        with torch.no_grad():
            fused_eval = forward(model, model.get_input_embeddings()(ids))
    assert torch.allclose(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused_eval, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert _relative_error(fused_grads[name], grad) < 1e-5, name
    assert _relative_error(fused_input_grad, input_grad) < 1e-5
    # Afterwards every layer is peft's again.
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_lora_leaves_other_layers_and_calls_to_peft() -> None:
    ids = torch.arange(16).reshape(2, 8)
    # Dropout draws random masks inside peft's forward: such layers are not switched.
    with fused_lora(_bert(dropout=0.1)) as switched:
        assert switched == 0
    model = _bert()
    model.eval()
    with torch.no_grad():
        with_adapters = model(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            base_only = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(with_adapters, base_only)
    with fused_lora(model), torch.no_grad():
        with model.disable_adapter():  # adapters disabled at call time: peft's forward, the base model's output
            assert torch.equal(model(input_ids=ids).last_hidden_state, base_only)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: peft's forward, exactly
            fused = model(input_ids=ids).last_hidden_state
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused, model(input_ids=ids).last_hidden_state)
    # Not switched twice when nested; the outer block restores.
    with fused_lora(model) as outer:
        with fused_lora(model) as inner:
            assert outer > 0 and inner == 0
        assert any("forward" in m.__dict__ for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
