"""Instruction tuning of a causal language model with LoRA (TRL's SFTTrainer): the rendered ids with
`completion_only_loss=True`, so the tokens a person sees in rendered_dataset are the tokens the model is trained on;
packed examples attend one at a time on a CPU. Loading a checkpoint back, and exporting it merged."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from pipelines.core.attention import switched_attention
from pipelines.core.digests import checkpoint_digest, frame_digest
from pipelines.core.errors import CheckpointError
from pipelines.core.files import atomic_path
from pipelines.core.fused_lora import fused_lora
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.base import CandidateRejected
from pipelines.core.tasks.instruction import NAME, WEIGHT_FILES
from pipelines.core.tasks.instruction.chat import ensure_chat_template, render_conversations
from pipelines.core.training.arguments import build_lora_config, common_training_arguments
from pipelines.core.training.checkpoints import checkpoint_manifest, verified_folder
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.cost import model_flops_utilization
from pipelines.core.training.loop import (best_epoch_callback, run_trainer, save_trained, time_training_steps,
                                          with_global_batch_order)
from pipelines.core.training.model import (dropout_note, lora_layers, peak_memory_mb, set_model_dropout,
                                           store_frozen_weights_for, trainable_parameters)
from pipelines.core.training.resume import Resumable

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


# -------------------------------------------------------------------------------------------- model
def load_causal_lm(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a Hugging Face folder (a GGUF base is converted to one first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer


def _dataset(frame: pd.DataFrame) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(map(int, ids)) for ids in frame["input_ids"]],
                              "completion_mask": [list(map(int, m)) for m in frame["completion_mask"]]})


def load_finetuned_lm(record: CheckpointRecord) -> tuple[Any, Any]:
    """The base model with the checkpoint's adapter, after checking the adapter against the record's digest."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = verified_folder(record, WEIGHT_FILES)
    model, _ = load_causal_lm(record.base_model.local_path, record.base_model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PeftModel.from_pretrained(model, str(path / "adapter")).eval(), tokenizer


def build_sft_config(cfg: Any, output_dir: Path, compute: ComputeSettings, has_validation: bool,
                     eval_batch_size: int, padding_free: bool = True) -> Any:
    """The one place trl.SFTConfig is built, from the training section and the task's padding_free. SFTConfig
    turns gradient checkpointing and bf16 on by default, unlike TrainingArguments: both are set explicitly (bf16 by
    the common arguments)."""
    from trl import SFTConfig

    return SFTConfig(**common_training_arguments(cfg, output_dir, compute, has_validation, eval_batch_size),
                     gradient_checkpointing=False,  # a 135M model fits; checkpointing would cost ~30% speed
                     completion_only_loss=True,  # loss on the response tokens only (completion_mask)
                     # Padding-free batches: one row of concatenated examples with per-example position ids; the
                     # model keeps attention within each example (TRL turns the KV cache off for it, which would
                     # otherwise let packed examples see each other). Rendering already dropped or truncated
                     # examples over max_length, which TRL does not enforce in this mode.
                     padding_free=padding_free, max_length=None if padding_free else cfg.max_length,
                     packing=False)


def _sft_trainer_with_plain_loss() -> type:
    """SFTTrainer whose loss is the model's own cross-entropy on the labels (prompt tokens masked by TRL's data
    preparation), without TRL's chunked log-probability head and its per-token entropy and accuracy metrics.

    The chunked head saves GPU memory on the logits; on a CPU, with memory to spare, it and its metrics were a
    quarter of each step (profiled on SmolLM2-135M), so CPU training uses the plain loss.

    Vocabulary logits are computed only where a label is (the response tokens; transformers' `logits_to_keep`
    mask): the prompt's positions never reach the 49k-wide output layer and its softmax. The loss is the model's
    own (shifted cross-entropy in fp32, summed over `num_items_in_batch` when the Trainer gives it, else the mean),
    on exactly the positions it would have counted."""
    import torch.nn.functional as F
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            targets = labels[:, 1:]  # position i predicts token i + 1
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != -100
            # The KV cache stays off: with it, examples packed into one row would attend to each other.
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False,
                            logits_to_keep=keep)
            logits, wanted = outputs.logits.float(), targets[targets != -100]
            if logits.dim() == 3:  # a model that ignores logits_to_keep returned every position
                logits = logits[keep]
            if not len(wanted):  # nothing to learn in this batch (no response token): a zero loss, not NaN
                loss = logits.sum() * 0.0
            elif num_items_in_batch is not None:
                loss = F.cross_entropy(logits, wanted, reduction="sum") / num_items_in_batch
                args = getattr(self, "args", None)
                if args is not None and args.average_tokens_across_devices and args.world_size > 1:
                    # num_items_in_batch counts every process's tokens and DDP averages the gradients over the
                    # processes: scaled back, a step's gradient is the one-process gradient (as the Trainer does).
                    loss = loss * self.args.world_size
            else:
                loss = F.cross_entropy(logits, wanted)
            if getattr(outputs, "aux_loss", None) is not None:  # mixture-of-experts balancing, as the model adds it
                loss = loss + getattr(model.config, "router_aux_loss_coef", 0.0) * outputs.aux_loss
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer


PACKED_ATTENTION = "tuneline_packed_sdpa"


def _packed_starts(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Where each example starts in a padding-free row (its position ids restart at 0), with the row's end; None
    unless the call is one row of at least two packed examples without a KV cache."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1 or query.shape[2] < 2 \
            or key.shape[2] != query.shape[2] or position_ids.shape[-1] != query.shape[2]:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return starts + [query.shape[2]]


def packed_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA that attends within each example of a padding-free row: one causal SDPA per example instead of one over
    the whole row under a block-diagonal mask. transformers builds that mask for SDPA, and with a mask the kernel
    computes every (query, key) pair of the row: for 8 packed examples about 8 times the pairs that count, and
    twice that since a masked kernel cannot skip the causal half. Anything else (padded batches, generation with a
    KV cache) is transformers' own SDPA with its mask, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = _packed_starts(kwargs.get("position_ids"), query, key)
    window = kwargs.get("sliding_window")
    if starts is not None and (any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "softcap"))
                               or (window and max(b - a for a, b in zip(starts, starts[1:])) > window)):
        starts = None  # a sliding window, biases or sinks live in transformers' mask and kernels: theirs, then
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "position_ids"}
    pieces = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                     dropout=dropout, scaling=scaling, is_causal=True, **rest)[0]
              for a, b in zip(starts, starts[1:])]
    return torch.cat(pieces, dim=1), None


@contextmanager
def packed_attention(model: Any, enabled: bool) -> Iterator[bool]:
    """Train `model` with packed_sdpa_attention where it uses SDPA (restored afterwards); yields whether it did."""
    with switched_attention(model, PACKED_ATTENTION, packed_sdpa_attention, enabled) as used:
        yield used


def train_causal_lm(rendered: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
                    compute: ComputeSettings, progress: ProgressFn = print,
                    sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
    """LoRA on the train split's rendered examples, loss on responses only; keeps the epoch with the lowest
    validation loss; saves the adapter and tokenizer (with its chat template) to `out_dir`. With `scratch`,
    resumable checkpoints go there (training.checkpoint_every) and an interrupted run resumes."""
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    cfg = spec.training
    compute.apply()
    set_seed(cfg.seed)
    train = rendered[rendered["split"] == "train"]
    validation = rendered[rendered["split"] == "validation"]
    model, tokenizer = load_causal_lm(base.local_path, base.trust_remote_code)
    ensure_chat_template(tokenizer)
    own_dropout = set_model_dropout(model, cfg.model_dropout)
    model = get_peft_model(model, build_lora_config(cfg.lora, base, "CAUSAL_LM", model))
    store_frozen_weights_for(model, compute)
    trainable, total = trainable_parameters(model)
    progress(f"LoRA r={cfg.lora.r} on {list(base.lora_targets or cfg.lora.target_modules)}: {trainable:,} trainable "
             f"of {total:,} parameters ({trainable / total:.2%}); precision={compute.precision}; {len(train)} train "
             f"and {len(validation)} validation examples" + dropout_note(cfg.model_dropout, own_dropout))
    train_ds = _dataset(train)
    val_ds = _dataset(validation) if len(validation) else None
    callback = best_epoch_callback(model, progress, sink, "loss", higher_is_better=False,
                                  patience=cfg.early_stopping_patience,
                                  average_last=cfg.average_last_epochs)

    trainer_class = with_global_batch_order(SFTTrainer if compute.device == "cuda" else _sft_trainer_with_plain_loss())

    def make_trainer(scratch: Path) -> Any:
        args = build_sft_config(cfg, scratch, compute, val_ds is not None, spec.evaluation.batch_size,
                                spec.task.padding_free)
        return trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                             processing_class=tokenizer, callbacks=[callback])

    data_sha256 = frame_digest(rendered)
    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256,
                                   compute.world_size)
    # On a CPU, padding-free rows attend example by example (measured there; a GPU keeps transformers' SDPA).
    with packed_attention(model, spec.task.padding_free and compute.device == "cpu"), fused_lora(model):
        outcome = run_trainer(make_trainer, callback, progress, "loss", resumable)
    real_tokens = float(train["total_tokens"].sum()) * cfg.epochs
    model.eval()

    def write_files(folder: Path) -> None:
        model.save_pretrained(str(folder / "adapter"))
        tokenizer.save_pretrained(str(folder / "tokenizer"))

    manifest = checkpoint_manifest(NAME, base, spec.spec_hash, data_sha256, WEIGHT_FILES)
    path = save_trained(out_dir, write_files, manifest, spec.to_yaml(), outcome, resumable)
    speed = real_tokens / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    blocks = model.get_base_model().config.num_hidden_layers
    adapted = len(lora_layers(cfg.lora, blocks) or range(blocks)) / blocks  # backward stops below the adapters
    mfu = model_flops_utilization(model.get_base_model().config.to_dict(), base.parameter_count, real_tokens,
                                  int(len(train) * cfg.epochs), outcome.train_seconds, True, compute,
                                  share=(1 + adapted) / 2)
    progress(f"saved the adapter to {path} ({speed:.0f} tokens/s, MFU {mfu:.1%}, peak memory {peak_memory_mb():.0f} "
             "MB)")
    return CheckpointRecord(
        path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHT_FILES), base_model=base,
        spec_hash=spec.spec_hash, data_sha256=data_sha256, train_rows=len(train),
        validation_rows=len(validation), best_epoch=outcome.best_epoch, trainable_parameters=trainable,
        train_seconds=outcome.train_seconds, tokens_per_second=speed, precision=compute.precision,
        peak_memory_mb=peak_memory_mb(), history=outcome.history, mfu=mfu)


# --------------------------------------------------------------------------------------------- export
# The fixed prompts an export must answer as the registered model does (greedy, CHECK_TOKENS new tokens each).
CHECK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.", "hi",
                 "List three colours.", "Explain what a neural network is in simple words.")
CHECK_TOKENS = 16
TIE_MARGIN = 1e-3  # top-two logit gap under which float rounding may pick either token: a tie, not a difference


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str] = CHECK_PROMPTS,
                   tokens: int = CHECK_TOKENS) -> list[tuple[list[int], list[Any]]]:
    """Greedy token ids for each prompt (rendered with the chat template), with the logits of every step."""
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append((out.sequences[0, ids.shape[1]:].tolist(), [s[0].float() for s in out.scores]))
    return answers


def answers_differ(expected: list[tuple[list[int], list[Any]]],
                   got: list[tuple[list[int], list[Any]]]) -> str | None:
    """Where an export answers differently from the registered model, in words; None when every answer is the same
    token for token, or differs only after a step where the registered model's top two tokens tie."""
    for n, ((want, scores), (have, _)) in enumerate(zip(expected, got, strict=True)):
        for step, (a, b) in enumerate(zip(want, have, strict=False)):
            if a != b:
                top = torch.topk(scores[step], 2).values
                if float(top[0] - top[1]) < TIE_MARGIN:
                    break  # a tie: the rest of this answer may follow either token
                return (f"prompt {n + 1} ({CHECK_PROMPTS[n]!r}): token {step + 1} is {b} where the registered model "
                        f"answers {a}")
        else:
            if len(want) != len(have):
                return f"prompt {n + 1} ({CHECK_PROMPTS[n]!r}): {len(have)} tokens where the registered model has " \
                       f"{len(want)}"
    return None


def export_merged(record: CheckpointRecord, out_dir: Path, with_gguf: bool = False) -> Path:
    """Base model + adapter merged into one safetensors model, with the tokenizer and its chat template; with
    `with_gguf`, also as one GGUF file (gguf/model.gguf) for llama.cpp.

    The folder loads with plain transformers `AutoModelForCausalLM.from_pretrained`; written to a temporary
    sibling, loaded back from there (the GGUF file too, through transformers' `gguf_file=`) and checked to give the
    registered model's greedy answers to CHECK_PROMPTS, then renamed; never over an existing folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; choose a new folder for the export")
    model, tokenizer = load_finetuned_lm(record)
    expected = greedy_answers(model, tokenizer)
    merged = model.merge_and_unload()
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(tmp))
        base = record.base_model
        (tmp / "README.md").write_text(
            f"---\nlicense: {base.license}\nbase_model: {base.name}\nlibrary_name: transformers\n---\n\n"
            f"# Fine-tuned {base.name}\n\nMerged by tuneline from checkpoint `{record.sha256}` "
            f"(model version {record.model_version or 'unregistered'}). Base weights sha256 "
            f"`{base.weights_sha256}`; training data digest `{record.data_sha256}`.\n", encoding="utf-8")
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp)).eval()
        reloaded_tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        if reloaded_tokenizer.pad_token is None:
            reloaded_tokenizer.pad_token = reloaded_tokenizer.eos_token
        problem = answers_differ(expected, greedy_answers(reloaded, reloaded_tokenizer))
        if problem is not None:
            raise CheckpointError(f"the merged export of v{record.model_version} does not answer as the registered "
                                  f"model does: {problem}; nothing was written")
        if with_gguf:
            from pipelines.core.tasks.instruction.gguf_export import GGUF_FILE, write_gguf

            # In a folder of its own: beside the transformers files, loading with gguf_file= mixes the two.
            (tmp / "gguf").mkdir()
            write_gguf(merged, tokenizer, tmp / "gguf" / GGUF_FILE,
                       f"{base.name} (fine-tuned, v{record.model_version})")
            from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp / "gguf"), gguf_file=GGUF_FILE).eval()
            gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp / "gguf"), gguf_file=GGUF_FILE)
            if gguf_tokenizer.pad_token is None:
                gguf_tokenizer.pad_token = gguf_tokenizer.eos_token
            problem = answers_differ(expected, greedy_answers(from_gguf, gguf_tokenizer))
            if problem is not None:
                raise CheckpointError(f"the GGUF export of v{record.model_version}, loaded back, does not answer as "
                                      f"the registered model does: {problem}; nothing was written")
        (tmp / "tuneline-export.json").write_text(json.dumps({
            "format": "gguf" if with_gguf else "merged", "checkpoint_sha256": record.sha256,
            "model_version": record.model_version,
            "base_model": base.name, "license": base.license,
            "check": {"prompts": list(CHECK_PROMPTS), "new_tokens": CHECK_TOKENS, "same_greedy_answers": True}},
            indent=2), encoding="utf-8")
    return out_dir


def mean_tokens(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
    """Mean tokens per rendered training example with this model's chat template (a train sample)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(record.local_path, trust_remote_code=record.trust_remote_code)
    ensure_chat_template(tokenizer)
    sample = sample_split(splits, "train", 256, spec.training.seed)
    rendered = render_conversations(sample, tokenizer, spec.training.max_length, "truncate").frame
    return float(rendered["total_tokens"].mean()) if len(rendered) else float(spec.training.max_length)


def time_train_step(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame, compute: ComputeSettings,
                    steps: int) -> float:
    """Median seconds per LoRA training step of the real model on a batch of real train rows."""
    from peft import get_peft_model

    cfg = spec.training
    model, tokenizer = load_causal_lm(record.local_path)
    set_model_dropout(model, cfg.model_dropout)
    model = get_peft_model(model, build_lora_config(cfg.lora, record, "CAUSAL_LM"))
    batch_rows = sample_split(splits, "train", cfg.batch_size, cfg.seed)
    rendered = render_conversations(batch_rows, tokenizer, cfg.max_length, "truncate").frame
    if rendered.empty:
        raise CandidateRejected(f"no training example fits training.max_length ({cfg.max_length} tokens) "
                                "with this model's chat template")
    width = max(len(ids) for ids in rendered["input_ids"])
    ids = torch.full((len(rendered), width), tokenizer.pad_token_id)
    for i, row in enumerate(rendered["input_ids"]):
        ids[i, :len(row)] = torch.tensor(list(row))
    inputs = {"input_ids": ids, "attention_mask": (ids != tokenizer.pad_token_id).long(), "labels": ids}
    return time_training_steps(model, inputs, compute, steps)
