"""A merged Llama-architecture chat model written as one GGUF file (fp32 tensors, the tokenizer and its chat template
inside), for llama.cpp and the tools built on it.

The layout follows llama.cpp's converter for Llama models: tensor names from gguf-py's name map, the query and key
projections permuted to its rotary layout, the byte-level BPE vocabulary with its merges and special-token ids. The
caller loads the file back (transformers' `gguf_file=`) and compares greedy answers before the export appears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.errors import CheckpointError

GGUF_FILE = "model.gguf"
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf token types


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's query / key rows to llama.cpp's rotary layout (its converter's `permute`; transformers reverses it)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(tokenizer: Any, size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to the model's vocabulary size), their types, and the BPE merges."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"GGUF export writes byte-level BPE vocabularies; this tokenizer is {model.get('type')}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    for token, i in tokenizer.get_vocab().items():
        if i < size:
            tokens[i] = token
            types[i] = CONTROL if i in special else USER_DEFINED if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(model: Any, tokenizer: Any, path: Path, name: str) -> Path:
    """The merged model (a transformers Llama model, adapters merged) as a GGUF file at `path`."""
    import gguf

    cfg = model.config
    if cfg.model_type != "llama":
        raise CheckpointError(f"GGUF export writes Llama-architecture models (SmolLM2, Llama, TinyLlama); this model "
                              f"is {cfg.model_type!r}: export --format merged and convert it with llama.cpp")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(theta or getattr(cfg, "rope_theta", 10000.0)))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = _vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise CheckpointError(f"GGUF export has no llama.cpp name for the tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
