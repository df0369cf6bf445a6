"""Prompting baselines: what an instruction-tuned model does with no training at all, so that a report can say
whether fine-tuning paid off.

Classification: the model reads the label names in a system message (and, few-shot, k examples per class from
the train split as earlier turns of the conversation) and each label is scored by its log-likelihood as the
assistant's whole answer (the label's tokens and the end-of-turn token), rendered with the model's own chat
template. The highest-scoring label is the prediction.

The instructions and the examples are the same for every row, so their key/value cache is computed once and
shared; each batch then runs only the rows' own turns and each label's tokens after the first (a label's first
token is read from the row's last position), attending to that one cache (shared_prefix_attention) rather than to
a copy of it for every row.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.core.attention import attend_with_logsumexp, combine_attention, switched_attention
from pipelines.core.training.compute import ComputeSettings, ProgressFn

SYSTEM_PROMPT = ("Classify the user's text into exactly one of these categories: {labels}. "
                 "Answer with the category name only.")


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def few_shot_examples(train: pd.DataFrame, shots: int, seed: int, labels: Sequence[str]) -> list[tuple[str, str]]:
    """`shots` (text, label) examples of every label from the train rows, interleaved by label (a, b, c, a, b,
    c, ...) so that no label is always the last one before the question."""
    rng = np.random.default_rng(seed)
    per_label = []
    for label in labels:
        rows = train.index[train["label"] == label].to_numpy()
        picked = rng.choice(rows, size=min(shots, len(rows)), replace=False) if len(rows) else []
        per_label.append([(str(train.at[i, "text"]), label) for i in picked])
    return [group[i] for i in range(shots) for group in per_label if i < len(group)]


def conversation_prefix(names: Sequence[str], examples: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The system message naming the labels, then the examples as user / assistant turns."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(labels=", ".join(names))}]
    for text, name in examples:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": name}]
    return messages


PREFIX_ATTENTION = "tuneline_shared_prefix"


class _PrefixNotSeen(RuntimeError):
    """The attention was called without a shared prefix it can use: a model whose forward does not pass its keyword
    arguments down to the attention, or whose attention needs what only transformers' kernels do."""


def shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            shared_prefix: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a batch of rows to one shared prefix (its key/value cache, computed once with batch 1) and to
    their own tokens (`attention_mask`: bool [B, 1, L, L], True where a token may look).

    transformers would need the prefix copied for every row of the batch (and concatenated with the rows' keys in
    every layer, and its key heads repeated for grouped queries), work that grows with the prefix: with 4 examples
    per class it was half of SmolLM2's prompting time on TREC. Here the rows' queries attend to the prefix as one long block (the batch
    folded into the query length: no mask, no copy), then to their own keys under the mask, and the two results are
    combined by their log-sum-exp, which is exactly softmax attention over prefix and own keys together."""
    layer = shared_prefix.layers[module.layer_idx] \
        if shared_prefix is not None and isinstance(getattr(module, "layer_idx", None), int) else None
    prefix_key, prefix_value = getattr(layer, "keys", None), getattr(layer, "values", None)
    b, heads, length, dim = query.shape
    if prefix_key is None or prefix_value is None or prefix_key.dim() != 4 or prefix_key.shape[0] != 1 \
            or attention_mask is None or attention_mask.dtype != torch.bool \
            or tuple(attention_mask.shape) != (b, 1, length, length) or dropout or heads % key.shape[1] \
            or any(kwargs.get(k) is not None for k in ("sliding_window", "position_bias", "s_aux", "softcap")):
        raise _PrefixNotSeen("this attention call is not one over a shared prefix and the batch's own tokens")
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    fused = query.device.type == "cpu"
    grouped = query.reshape(b, kv_heads, group * length, dim)  # query head j reads key/value head j // group
    folded = grouped.transpose(0, 1).reshape(1, kv_heads, b * group * length, dim)
    out_prefix, lse_prefix = attend_with_logsumexp(folded, prefix_key.to(query.dtype), prefix_value.to(query.dtype),
                                                   None, scale, fused)
    out_prefix = out_prefix.view(kv_heads, b, group * length, dim).transpose(0, 1)
    lse_prefix = lse_prefix.view(kv_heads, b, group * length).transpose(0, 1)
    own = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    own = own.masked_fill(~attention_mask, float("-inf")).unsqueeze(2).expand(b, 1, group, length, length)
    # q, k and v in one dtype: a model that keeps its rotary embedding in float32 under bf16 gives float32 q and k.
    out_own, lse_own = attend_with_logsumexp(grouped, key.to(query.dtype), value.to(query.dtype),
                                             own.reshape(b, 1, group * length, length), scale, fused)
    out = combine_attention([(out_prefix, lse_prefix), (out_own, lse_own)])
    return out.reshape(b, heads, length, dim).transpose(1, 2).contiguous(), None


@torch.no_grad()
def score_choices(model: Any, tokenizer: Any, prefix: list[dict[str, str]], texts: Sequence[str],
                  choices: Sequence[str], compute: ComputeSettings, batch_size: int = 16,
                  progress: ProgressFn | None = None, shared_prefix: bool = True) -> np.ndarray:
    """Log-likelihood of each choice as the assistant's whole answer to each text (rows x choices), after the
    conversation `prefix`. `shared_prefix`: the rows attend to the prefix's one key/value cache
    (shared_prefix_attention) where the model allows, instead of a copy of it for every row."""
    device = torch.device(compute.device)
    model.eval().to(device)
    prefix_text = render(tokenizer, prefix, False) if len(prefix) else ""
    prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"] if prefix_text else []

    def own_turn(text: str) -> str:
        full = render(tokenizer, [*prefix, {"role": "user", "content": text}], True)
        if not full.startswith(prefix_text):
            raise ValueError("the chat template does not render the conversation's start the same way each time")
        return full[len(prefix_text):]

    probe_turn = render(tokenizer, [*prefix, {"role": "user", "content": "x"}], True)
    answers = []
    for choice in choices:  # the tokens the template puts after the generation prompt for this answer
        full = render(tokenizer, [*prefix, {"role": "user", "content": "x"}, {"role": "assistant",
                                                                             "content": choice}], False)
        if not full.startswith(probe_turn):
            raise ValueError("the chat template does not render an answer after its generation prompt")
        ids = tokenizer(full[len(probe_turn):].rstrip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the label {choice!r} renders to no tokens")
        answers.append(ids)

    # The decoder alone where one position's vocabulary logits are needed (the output layer is 49k wide for
    # SmolLM2: computing it at every position of a batch was most of the work).
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cache = None
    if prefix_ids:
        with compute.autocast():
            cache = decoder(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True).cache
    scores = np.zeros((len(texts), len(choices)))
    turns = [tokenizer(own_turn(t), add_special_tokens=False)["input_ids"] for t in texts]
    order = np.argsort([len(t) for t in turns], kind="stable")  # batches of similar length: little padding
    done, shared = 0, shared_prefix
    for start in range(0, len(texts), batch_size):
        batch = order[start:start + batch_size]
        rows = [turns[i] for i in batch]
        b, p = len(rows), len(prefix_ids)
        # One pass per batch: each row's own turn, then every answer's tokens but its last, laid out as a tree.
        # A 4D mask lets an answer's tokens see the prefix, the row's turn and their own answer's earlier tokens,
        # never another answer's; positions restart after the row's turn for each answer.
        length = max(len(r) for r in rows) + sum(len(a) - 1 for a in answers)
        ids = torch.full((b, length), tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros((b, length), dtype=torch.long)
        # Which of the batch's own tokens each one sees; padding sees itself, so that no query sees nothing.
        own = torch.eye(length, dtype=torch.bool).repeat(b, 1, 1, 1)
        reads: list[list[tuple[int, int, int, int]]] = []  # per row: (position, choice, token index, token id)
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, :n] = torch.tensor(r)
            positions[i, :n] = p + torch.arange(n)
            own[i, 0, :n, :n] = torch.tril(torch.ones((n, n), dtype=torch.bool))
            row_reads = [(n - 1, c, 0, answer[0]) for c, answer in enumerate(answers)]
            at = n
            for c, answer in enumerate(answers):
                k = len(answer) - 1
                if not k:
                    continue
                ids[i, at:at + k] = torch.tensor(answer[:-1])
                positions[i, at:at + k] = p + n + torch.arange(k)
                own[i, 0, at:at + k, :n] = True
                own[i, 0, at:at + k, at:at + k] = torch.tril(torch.ones((k, k), dtype=torch.bool))
                row_reads += [(at + j - 1, c, j, answer[j]) for j in range(1, k + 1)]
                at += k
            positions[i, at:] = p + at + torch.arange(length - at)
            reads.append(row_reads)
        flat_rows = torch.tensor([i for i, row_reads in enumerate(reads) for _ in row_reads])
        flat_positions = torch.tensor([pos for row_reads in reads for pos, _, _, _ in row_reads])
        hidden = None
        if cache is not None and shared:
            try:
                with switched_attention(decoder, PREFIX_ATTENTION, shared_prefix_attention) as used, \
                        compute.autocast():
                    if not used:
                        raise _PrefixNotSeen("the model does not run on SDPA")
                    hidden = decoder(input_ids=ids.to(device), attention_mask=own.to(device),
                                     position_ids=positions.to(device), use_cache=False,
                                     shared_prefix=cache).last_hidden_state
            except _PrefixNotSeen:
                shared = False  # this model's attention is transformers' own: the prefix is copied for each row
        if hidden is None:
            batch_cache = None
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(b)
            # The prefix, copied for every row: every position sees it.
            allowed = torch.cat((torch.ones((b, 1, length, p), dtype=torch.bool), own), dim=-1)
            if getattr(decoder.config, "_attn_implementation", None) == "eager":
                # Eager attention adds the mask it is given to the scores: a boolean one would add 0 or 1.
                allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            with compute.autocast():
                hidden = decoder(input_ids=ids.to(device), attention_mask=allowed.to(device),
                                 position_ids=positions.to(device), cache=batch_cache,
                                 use_cache=False).last_hidden_state
        with compute.autocast():
            logits = head(hidden[flat_rows.to(device), flat_positions.to(device)])
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        at = 0
        for i, row_reads in enumerate(reads):
            for _, c, _, token in row_reads:
                scores[batch[i], c] += float(logp[at, token])
                at += 1
        done += b
        if progress is not None and (done == len(texts) or start // batch_size % 10 == 9):
            progress(f"prompting: {done}/{len(texts)} rows scored")
    return scores


def load_prompted_model(path: str, compute: ComputeSettings, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A causal LM that is only read: bf16 weights under bf16 (autocast would cast every weight for every batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the prompted model has no chat template (an instruction-tuned model is needed)")
    dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def classification_prompting(model_path: str, weights_sha256: str, train: pd.DataFrame, texts: Sequence[str],
                             labels: Sequence[str], names: dict[str, str], shots: Sequence[int], seed: int,
                             compute: ComputeSettings, batch_size: int = 32,
                             progress: ProgressFn = print) -> dict[int, np.ndarray]:
    """For each number of examples per class, the label index the prompted model prefers for each text. Kept
    in compute.cache_dir by everything the answer depends on, so a retraining on the same test split does not
    prompt again."""
    import hashlib
    import io

    from pipelines.core.files import write_bytes_atomic

    shown = [names.get(label, label) for label in labels]
    if len(set(shown)) != len(shown):
        raise ValueError(f"task.label_names give two labels the same name: {shown}")
    loaded: list[tuple[Any, Any]] = []
    results = {}
    for k in shots:
        examples = few_shot_examples(train, k, seed, labels)
        key = hashlib.sha256(json.dumps([weights_sha256, k, shown, examples, list(texts), compute.precision,
                                         torch.__version__]).encode()).hexdigest()[:32]
        path = Path(compute.cache_dir) / "prompting" / f"{key}.npy" if compute.cache_dir else None
        if path is not None and path.is_file():
            results[k] = np.load(path)
            progress(f"prompting {k}-shot: cached")
            continue
        if not loaded:
            loaded.append(load_prompted_model(model_path, compute))
        model, tokenizer = loaded[0]
        prefix = conversation_prefix(shown, [(text, names.get(label, label)) for text, label in examples])
        progress(f"prompting {k}-shot: {len(texts)} test rows x {len(labels)} labels")
        scores = score_choices(model, tokenizer, prefix, texts, shown, compute, batch_size, progress)
        results[k] = scores.argmax(1)
        if path is not None:
            buffer = io.BytesIO()
            np.save(buffer, results[k], allow_pickle=False)
            write_bytes_atomic(path, buffer.getvalue())
    return results
