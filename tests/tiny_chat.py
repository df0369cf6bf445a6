"""A tiny Llama-architecture chat model built from a config (no network): byte-level BPE tokenizer trained
on a few sentences, ChatML chat template, 2 layers of width 32, and a model card with a licence."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_chat_pairs(n: int = 120) -> list[dict[str, str]]:
    """Instruction/response pairs with a learnable pattern: the answer repeats the question's colour."""
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown"]
    things = ["car", "house", "ball", "hat", "door", "cup", "bird", "boat", "chair", "lamp", "kite", "shoe"]
    pairs = []
    for i in range(n):
        colour, thing = colours[i % len(colours)], things[(i // len(colours)) % len(things)]
        pairs.append({"instruction": f"What colour is the {thing} number {i}?",
                      "response": f"The {thing} is {colour}.", "category": "colours" if i % 2 else "things"})
    return pairs


def write_tiny_chat_model(folder: Path, *, chat_template: str | None = CHATML) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f"{p['instruction']} {p['response']}" for p in tiny_chat_pairs()] + [
        "system user assistant You are a tiny test assistant.", "What is AI? Tell me a joke."]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test chat model\n", encoding="utf-8")
    return folder


def write_pairs_jsonl(path: Path, pairs: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path
