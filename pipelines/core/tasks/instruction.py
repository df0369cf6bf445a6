"""Instruction tuning of a causal language model with LoRA (TRL's SFTTrainer), its evaluation and export.

Conversations come from instruction/response columns or an OpenAI `messages` column, are cleaned (see
pipelines.core.chat), and rendered with the base model's own chat template into token ids plus a
`completion_mask` that is 1 on the response tokens only: the prepared `rendered_dataset`. SFTTrainer is given
exactly these ids with `completion_only_loss=True`, so the tokens a person sees in that asset are the tokens
the model is trained on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from pipelines.core.attention import switched_attention
from pipelines.core.chat import (ROLES, RENDER_DROP_REASONS, clean_conversations, ensure_chat_template,
                                 render_conversations, render_prompt, role_problem, score_generation)
from pipelines.core.cleaning import cleaning_log, dedup_key, is_missing
from pipelines.core.errors import CheckpointError, SourceError
from pipelines.core.evaluation import build_report, champion_metrics, markdown_table
from pipelines.core.files import atomic_path, write_bytes_atomic
from pipelines.core.fused_lora import fused_lora
from pipelines.core.lineage import frame_digest
from pipelines.core.quality import ERROR, QualityReport, QualitySuite, check_def, evaluate_checks, \
    lost_examples_check, validate_splits, with_row_id
from pipelines.core.records import (BaseModelRecord, CheckpointRecord, DatasetLog, EvaluationReport, Markdown,
                                    ReportTable, StepLog)
from pipelines.core.sections import Frozen
from pipelines.core.splitting import SPLITS, sample_split
from pipelines.core.tasks.base import CandidateRejected, PreparedData, ProbeResult, TaskBase
from pipelines.core.trainer import (ComputeSettings, MetricsSink, ProgressFn, Resumable, best_epoch_callback,
                                    build_lora_config, checkpoint_digest, checkpoint_manifest, common_training_arguments,
                                    lora_layers, model_flops_utilization, peak_memory_mb, run_trainer, save_trained,
                                    dropout_note, set_model_dropout, store_frozen_weights_for, time_training_steps,
                                    trainable_parameters, verified_folder, with_global_batch_order)

if TYPE_CHECKING:
    from pipelines.core.spec import PipelineSpec

NAME = "instruction_tuning"
WEIGHT_FILES = ("adapter/adapter_model.safetensors",)
GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")
REPORT_METRICS = ("validation_loss", "validation_perplexity", "test_loss", "test_perplexity", "exact_match",
                  "token_f1", "rouge_l")
RENDERED_EXAMPLES_SHOWN = 3
CLEANED_CHECKS = ("roles_alternate", "examples_are_unique", "row_count_within_bounds", "cleaning_kept_most_rows")
SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty")
RENDERED_CHECKS = ("rendered_lengths_within_max_length", "prompt_tokens_carry_no_loss")
DESCRIPTIONS = {
    "roles_alternate": "Every conversation is (system), user, assistant, ... alternating and ends with the assistant.",
    "examples_are_unique": "No instruction occurs twice with the same response.",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "cleaning_kept_most_rows": "Cleaning dropped at most quality.max_lost_fraction of the source's distinct examples.",
    "splits_do_not_overlap": "No normalised instruction is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
    "rendered_lengths_within_max_length": "Rendered examples fit training.max_length; few were dropped or truncated.",
    "prompt_tokens_carry_no_loss": "The loss mask is 0 on every prompt token and 1 on every response token.",
}


# ------------------------------------------------------------------------------------------ spec section
class InstructionTuningTaskConfig(Frozen):
    """What is learned: a chat model's responses to instructions, in the model's own chat template.

    Rows come either as columns (instruction, optional input and system, response) or as one `messages`
    column in the OpenAI chat format (a list of {role, content}; the last message is the response).
    """

    type: Literal["instruction_tuning"]
    instruction_column: str = Field(default="instruction", description="Column holding the instruction.")
    input_column: str = Field(
        default="input", description="Optional column with extra input, appended to the instruction after a "
                                     "blank line (Alpaca style); used when the data has it.")
    system_column: str = Field(default="system", description="Optional column with a system message per row.")
    response_column: str = Field(default="response", description="Column holding the reference response.")
    messages_column: str = Field(
        default="messages", description="Column holding a whole conversation in the OpenAI chat format; when "
                                        "the data has it, the instruction/response columns are not used.")
    category_column: str = Field(
        default="category", description="Optional column kept for reporting and stratified splits.")
    system_prompt: str | None = Field(
        default=None, description="A system message for rows that have none. Without it the chat template "
                                  "decides (some templates add their own default system message).")
    overlength: Literal["drop", "truncate"] = Field(
        default="drop", description="Rendered examples longer than training.max_length tokens are dropped, or "
                                    "truncated (the response is cut; the prompt is kept whole).")


# -------------------------------------------------------------------------------- conversations, quality
def _text(value: Any) -> str | None:
    return None if is_missing(value) else str(value)


# Role names of other chat formats, read as ours (ShareGPT's human / gpt, Gemma's model, and common others).
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                "chatgpt": "assistant"}
TEXT_PART_TYPES = ("text", "input_text", "output_text")  # content parts of OpenAI-style messages that hold text


def _message_content(content: Any, index: int, file: str, row: int, column: str) -> str:
    """A message's content as text: a string as it is, a number as written, a list of content parts (OpenAI's
    [{"type": "text", "text": ...}, ...]) as its text parts joined by newlines. A part that is not text (an image)
    is an error: a text model cannot read it, and dropping it would train on half a message."""
    if is_missing(content) is True and not isinstance(content, (list, dict, np.ndarray)):
        return ""
    if isinstance(content, (str, int, float, bool, np.number)):
        return str(content)
    parts = content.tolist() if isinstance(content, np.ndarray) else content if isinstance(content, list) \
        else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = (part.get("type") or "text") if isinstance(part, dict) else type(part).__name__
        if not isinstance(part, dict) or kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise SourceError(f"message {index} has a content part of type {kind!r}; expected text (a string, or "
                              'parts like {"type": "text", "text": "..."}): a text model cannot read it',
                              file=file, row=row, column=column)
        texts.append(part["text"])
    return "\n".join(texts)


def _parse_messages(value: Any, file: str, row: int, column: str) -> list[dict[str, Any]]:
    """A conversation as a list of {role, content} dicts; structure errors name the file, row and column. Also
    reads ShareGPT's {"from", "value"} messages and role names (human, gpt), and content given as parts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SourceError(f"not a JSON list of messages ({exc.msg}); expected "
                              '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
                              file=file, row=row, column=column) from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise SourceError(f"expected a non-empty list of messages, got {type(value).__name__}",
                          file=file, row=row, column=column)
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and message.get("role") is None and message.get("from") is not None:
            message = {"role": message["from"], "content": message.get("value")}  # ShareGPT
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SourceError(f"message {i} is not an object with 'role' and 'content': {str(message)[:80]!r}",
                              file=file, row=row, column=column)
        role = str(message["role"]).strip().lower()
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise SourceError(f"message {i} has the role {str(message['role'])[:40]!r}; expected system, user or "
                              f"assistant (also read: {', '.join(sorted(ROLE_ALIASES))})",
                              file=file, row=row, column=column)
        messages.append({"role": role, "content": _message_content(message["content"], i, file, row, column)})
    return messages


def select_conversations(raw: pd.DataFrame, task: InstructionTuningTaskConfig) -> pd.DataFrame:
    """One conversation per row (JSON `messages`), from a messages column or from instruction/response columns.

    Keeps `text` (the prompt's user turns, what splits and duplicates are judged by), `response` (the last
    message), `category` and provenance.
    """
    columns = set(raw.columns)
    files = raw["source_file"].astype(str).tolist()
    rows = raw["source_row"].astype("int64").tolist()
    conversations: list[list[dict[str, Any]] | None] = []
    pairs = task.instruction_column in columns and task.response_column in columns
    if task.messages_column in columns:
        for n, (value, file, row) in enumerate(zip(raw[task.messages_column], files, rows, strict=True)):
            if is_missing(value) is not True or isinstance(value, (list, np.ndarray)):
                conversations.append(_parse_messages(value, file, row, task.messages_column))
            elif pairs:  # a file that mixes both forms: this row is an instruction / response pair
                conversations.append(_pair_messages(raw, task, columns, n))
            else:
                conversations.append(None)
    else:
        for column, name in ((task.instruction_column, "task.instruction_column"),
                             (task.response_column, "task.response_column")):
            if column not in columns:
                available = [c for c in raw.columns if c not in ("source_file", "source_row", "source_split",
                                                                 "source_problem")]
                raise SourceError(f"has no column {column!r} (named by {name}) and no {task.messages_column!r} "
                                  f"column (task.messages_column); its columns are {available}",
                                  file=", ".join(sorted(set(files))) or None, column=column)
        conversations += [_pair_messages(raw, task, columns, n) for n in range(len(raw))]
    out_messages, texts, responses = [], [], []
    for messages in conversations:
        if messages is None:
            out_messages.append(None)
            texts.append(None)
            responses.append(None)
            continue
        if task.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": task.system_prompt}, *messages]
        users = [m["content"] for m in messages[:-1] if m["role"] == "user" and m["content"] is not None]
        out_messages.append(json.dumps(messages, ensure_ascii=False))
        texts.append("\n".join(users) if users else None)
        responses.append(messages[-1]["content"])
    frame = pd.DataFrame({
        "messages": pd.Series(out_messages, dtype=object),
        "text": pd.Series(texts, dtype=object),
        "response": pd.Series(responses, dtype=object),
        "category": (raw[task.category_column].map(lambda v: _text(v) or "none").astype(str).to_numpy()
                     if task.category_column in columns else "all"),
        "source_file": files,
        "source_row": rows,
    })
    if "source_problem" in columns:
        frame["source_problem"] = raw["source_problem"].map(_text).astype(object).to_numpy()
    if "source_split" in columns:
        frame["source_split"] = raw["source_split"].astype(str).to_numpy()
    return frame


def _pair_messages(raw: pd.DataFrame, task: InstructionTuningTaskConfig, columns: set[str],
                   n: int) -> list[dict[str, Any]]:
    """Row `n`'s instruction (with its input and system message, where those columns are) and response as
    messages."""
    def cell(column: str) -> str | None:
        return _text(raw[column].iat[n]) if column in columns else None

    prompt, extra, system = cell(task.instruction_column), cell(task.input_column), cell(task.system_column)
    if prompt is not None and extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": cell(task.response_column)}]


def _conversation_keys(conversations: pd.DataFrame) -> pd.Series:
    """One key per distinct example: instruction and response normalised (an empty side makes it its own)."""
    return pd.Series([f"{dedup_key(i)}\x1f{dedup_key(r)}" if isinstance(i, str) and i.strip() and isinstance(r, str)
                      and r.strip() else f"#incomplete-row-{n}"
                      for n, (i, r) in enumerate(zip(conversations["text"], conversations["response"], strict=True))],
                     dtype=object)


def validate_cleaned_conversations(frame: pd.DataFrame, spec: PipelineSpec,
                                   raw_data: pd.DataFrame | None = None) -> QualityReport:
    """The cleaned_dataset checks of an instruction-tuning spec: columns, responses, roles, duplicates, size."""
    import great_expectations.expectations as gxe

    q = spec.quality
    rows = with_row_id(frame)
    checks: list[Any] = []

    def problem(value: str) -> str | None:
        try:
            return role_problem(json.loads(value))
        except (TypeError, ValueError) as exc:
            return f"messages are not valid JSON: {exc}"

    rows["roles_problem"] = pd.Series([problem(v) for v in rows["messages"]], dtype=object)
    checks.append(check_def(
        "roles_alternate", "Every conversation is an optional system message, then user and assistant turns "
                           "alternating, ending with the assistant's response.",
        "fix the roles of the listed conversations (roles_problem says what is wrong); roles are system, user "
        "and assistant",
        (gxe.ExpectColumnValuesToBeNull(column="roles_problem"), "rows", ERROR)))
    checks.append(check_def(
        "examples_are_unique", "No instruction occurs twice with the same response.",
        "enable cleaning.drop_duplicates, or remove the duplicated rows from the source",
        (gxe.ExpectCompoundColumnsToBeUnique(column_list=["norm_text", "norm_response"]), "rows", ERROR)))
    checks.append(check_def(
        "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
        "provide more conversations (or fewer are being dropped by cleaning: see the asset's metadata), or "
        "change quality.min_rows / quality.max_rows",
        (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
    tables = {"rows": rows}
    if raw_data is not None:
        selected = select_conversations(raw_data, spec.task)
        lost, tables["lost"] = lost_examples_check(_conversation_keys(selected), _conversation_keys(frame),
                                                   q.max_lost_fraction,
                                                   clean_conversations(selected, spec.cleaning).dropped)
        checks.append(lost)
    return evaluate_checks("cleaned_dataset", checks, tables=tables)


def validate_rendered_dataset(frame: pd.DataFrame, spec: PipelineSpec, rows_in: int) -> QualityReport:
    """The rendered_dataset checks: lengths within training.max_length, few examples lost to it, and the loss
    mask covering exactly the response tokens. `rows_in` is the number of rows of the splits asset."""
    import great_expectations.expectations as gxe

    max_length = spec.training.max_length
    rows = with_row_id(frame)
    dropped = max(rows_in - len(rows), 0)
    truncated = int(rows["truncated"].sum()) if "truncated" in rows.columns else 0
    lost = pd.DataFrame([{"rows_in": rows_in, "dropped": dropped, "truncated": truncated,
                          "share": (dropped + truncated) / max(rows_in, 1)}])

    def mask_ok(mask: Any, prompt_tokens: int, completion_tokens: int) -> bool:
        mask = list(mask)
        return completion_tokens >= 1 and mask == [0] * prompt_tokens + [1] * completion_tokens

    rows["loss_mask_matches_response"] = [
        mask_ok(m, int(p), int(c)) for m, p, c in zip(rows["completion_mask"], rows["prompt_tokens"],
                                                     rows["completion_tokens"], strict=True)]
    checks = [
        check_def(
            "rendered_lengths_within_max_length",
            f"Every rendered example has at most training.max_length ({max_length}) tokens, and at most "
            f"quality.max_overlength_fraction ({spec.quality.max_overlength_fraction:g}) of the examples were "
            "dropped or truncated to get there.",
            "raise training.max_length (the per-split table shows how many were lost), shorten the long "
            "conversations, or raise quality.max_overlength_fraction",
            (gxe.ExpectColumnValuesToBeBetween(column="total_tokens", min_value=1, max_value=max_length), "rows",
             ERROR),
            (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=spec.quality.max_overlength_fraction),
             "lost", ERROR)),
        check_def(
            "prompt_tokens_carry_no_loss",
            "Every example has response tokens, and the loss mask is 0 on every prompt token and 1 on every "
            "response token.",
            "an example whose response is empty after rendering cannot be learned from: fix the data or the "
            "chat template",
            (gxe.ExpectColumnValuesToBeBetween(column="completion_tokens", min_value=1), "rows", ERROR),
            (gxe.ExpectColumnValuesToBeInSet(column="loss_mask_matches_response", value_set=[True]), "rows", ERROR)),
    ]
    return evaluate_checks("rendered_dataset", checks, tables={"rows": rows, "lost": lost})


# ------------------------------------------------------------------------------------ rendered examples
def _fenced(text: str) -> str:
    """A Markdown code block that holds `text` verbatim, even when it contains ``` itself."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}"


def rendered_examples_md(frame: pd.DataFrame, count: int) -> str:
    """The first training examples exactly as the model sees them; the part that carries loss is marked."""
    parts = []
    for i, row in enumerate(frame[frame["split"] == "train"].head(count).itertuples(index=False), start=1):
        parts.append(f"**Example {i}** ({row.prompt_tokens} prompt tokens without loss, {row.completion_tokens} "
                     f"response tokens with loss{', truncated' if row.truncated else ''}; {row.source_file} row "
                     f"{row.source_row})\n\nPrompt (no loss):\n{_fenced(row.prompt_rendered)}\n\n"
                     f"Response (loss):\n{_fenced(row.completion_rendered)}")
    return "\n\n".join(parts) or "no training examples"


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
                     eval_batch_size: int) -> Any:
    """The one place trl.SFTConfig is built. SFTConfig turns gradient checkpointing and bf16 on by default,
    unlike TrainingArguments: both are set explicitly (bf16 by the common arguments)."""
    from trl import SFTConfig

    return SFTConfig(**common_training_arguments(cfg, output_dir, compute, has_validation, eval_batch_size),
                     gradient_checkpointing=False,  # a 135M model fits; checkpointing would cost ~30% speed
                     completion_only_loss=True,  # loss on the response tokens only (completion_mask)
                     # Padding-free batches: one row of concatenated examples with per-example position ids; the
                     # model keeps attention within each example (TRL turns the KV cache off for it, which would
                     # otherwise let packed examples see each other). Rendering already dropped or truncated
                     # examples over max_length, which TRL does not enforce in this mode.
                     padding_free=cfg.padding_free, max_length=None if cfg.padding_free else cfg.max_length,
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


def train_causal_lm(rendered: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec, out_dir: Path,
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
    callback = best_epoch_callback(model, progress, sink, "loss", higher_is_better=False)

    trainer_class = with_global_batch_order(SFTTrainer if compute.device == "cuda" else _sft_trainer_with_plain_loss())

    def make_trainer(scratch: Path) -> Any:
        args = build_sft_config(cfg, scratch, compute, val_ds is not None, spec.evaluation.batch_size)
        return trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                             processing_class=tokenizer, callbacks=[callback])

    data_sha256 = frame_digest(rendered)
    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256,
                                   compute.world_size)
    # On a CPU, padding-free rows attend example by example (measured there; a GPU keeps transformers' SDPA).
    with packed_attention(model, cfg.padding_free and compute.device == "cpu"), fused_lora(model):
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
        spec_hash=spec.spec_hash, data_sha256=data_sha256, labels=(), train_rows=len(train),
        validation_rows=len(validation), best_epoch=outcome.best_epoch, trainable_parameters=trainable,
        train_seconds=outcome.train_seconds, tokens_per_second=speed, precision=compute.precision,
        peak_memory_mb=peak_memory_mb(), history=outcome.history, mfu=mfu)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def completion_loss(model: Any, frame: pd.DataFrame, batch_size: int, compute: ComputeSettings,
                    pad_token_id: int) -> tuple[float, int]:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss), and the token count."""
    if len(frame) == 0:
        return math.nan, 0
    device = torch.device(compute.device)
    model.eval().to(device)
    ids = [list(map(int, x)) for x in frame["input_ids"]]
    masks = [list(map(int, m)) for m in frame["completion_mask"]]
    order = np.argsort([len(x) for x in ids], kind="stable")
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(ids[i])
            input_ids[row, :n] = torch.tensor(ids[i])
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.tensor(masks[i]) == 1, torch.tensor(ids[i]), torch.tensor(-100))
        with compute.autocast():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                 shifted.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shifted != -100).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             compute: ComputeSettings) -> list[str]:
    """Greedy answers to rendered prompts (left-padded batches of similar length), special tokens removed."""
    device = torch.device(compute.device)
    model.eval().to(device)
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = np.argsort([len(x) for x in encoded], kind="stable")
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        with compute.autocast():
            generated = model.generate(input_ids=padded["input_ids"].to(device),
                                       attention_mask=padded["attention_mask"].to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = generated[:, padded["input_ids"].shape[1]:]
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return outputs


def _score_model(model: Any, tokenizer: Any, rendered: pd.DataFrame, prompts: pd.DataFrame, spec: PipelineSpec,
                 compute: ComputeSettings,
                 batch_size: int) -> tuple[dict[str, float], list[str], list[dict[str, float]]]:
    validation = rendered[rendered["split"] == "validation"]
    test = rendered[rendered["split"] == "test"]
    metrics: dict[str, float] = {}
    for name, part in (("validation", validation), ("test", test)):
        loss, _ = completion_loss(model, part, batch_size, compute, tokenizer.pad_token_id)
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_perplexity"] = math.exp(loss) if not math.isnan(loss) else math.nan
    outputs = generate(model, tokenizer, prompts["prompt_rendered"].tolist(), spec.evaluation.max_new_tokens,
                       batch_size, compute)
    scores = [score_generation(out, refs) for out, refs in zip(outputs, prompts["references"], strict=True)]
    for name in GENERATION_METRICS:
        metrics[name] = float(np.mean([s[name] for s in scores])) if scores else math.nan
    return metrics, outputs, scores


def distinct_test_prompts(rendered: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """One row per distinct test prompt, with every reference response it has (in split order)."""
    test = rendered[rendered["split"] == "test"]
    extra = {"messages": ("messages", "first")} if "messages" in test.columns else {}
    grouped = test.groupby("prompt_rendered", sort=False).agg(
        text=("text", "first"), references=("response", list), category=("category", "first"),
        **extra).reset_index()
    return grouped.head(limit) if limit else grouped


def few_shot_prompts(tokenizer: Any, prompts: pd.DataFrame, train: pd.DataFrame, shots: int, seed: int) -> list[str]:
    """Each test prompt rendered after `shots` instruction / response pairs of the train split (the same pairs,
    drawn with the seed, for every prompt) as earlier turns of the conversation."""
    picked = train.sample(n=min(shots, len(train)), random_state=seed) if shots else train.head(0)
    examples: list[dict[str, Any]] = []
    for row in picked.itertuples(index=False):
        examples += [{"role": "user", "content": str(row.text)}, {"role": "assistant", "content": str(row.response)}]
    rendered = []
    for row in prompts.itertuples(index=False):
        found = getattr(row, "messages", None)
        messages = (json.loads(found) if isinstance(found, str) else list(found)) if found is not None else \
            [{"role": "user", "content": str(row.text)}]
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        rendered.append(render_prompt(tokenizer, [*system, *examples, *turns, {"role": "assistant", "content": ""}]))
    return rendered


def evaluate_generation(rendered: pd.DataFrame, checkpoint: CheckpointRecord, spec: PipelineSpec, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
    """Validation/test loss and perplexity, and greedy test generations scored against the references, for
    the base model and the fine-tuned one (and the current champion); decides promotion. The prompting baselines
    prompt the base model itself (`prompt_model` is not used)."""
    compute.apply()
    batch_size = min(spec.evaluation.batch_size, 16)
    prompts = distinct_test_prompts(rendered, spec.evaluation.max_generations)
    model, tokenizer = load_finetuned_lm(checkpoint)
    progress(f"evaluating the fine-tuned model: losses on {int((rendered['split'] != 'train').sum())} rows, "
             f"{len(prompts)} test generations")
    metrics, tuned_out, tuned_scores = _score_model(model, tokenizer, rendered, prompts, spec, compute, batch_size)
    baselines: dict[str, dict[str, float]] = {}
    base_out: list[str] = [""] * len(prompts)
    base_scores: list[dict[str, float]] = [{}] * len(prompts)
    if "base_model" in spec.evaluation.baselines:
        progress("evaluating the base model (the same weights with the adapter switched off)")
        with model.disable_adapter():
            baselines["base_model"], base_out, base_scores = _score_model(model, tokenizer, rendered, prompts, spec,
                                                                          compute, batch_size)

    if "prompting" in spec.evaluation.baselines:  # the base model again, with example pairs shown first
        train = rendered[rendered["split"] == "train"]
        for shots in spec.evaluation.prompting.shots:
            if shots == 0 and "base_model" in baselines:
                baselines["prompt_0_shot"] = {k: baselines["base_model"][k] for k in GENERATION_METRICS}
                continue
            progress(f"prompting the base model {shots}-shot: {len(prompts)} test generations")
            few_shot = few_shot_prompts(tokenizer, prompts, train, shots, spec.training.seed)
            with model.disable_adapter():
                outputs = generate(model, tokenizer, few_shot, spec.evaluation.max_new_tokens, batch_size, compute)
            scored = [score_generation(out, refs) for out, refs in zip(outputs, prompts["references"], strict=True)]
            baselines[f"prompt_{shots}_shot"] = {name: float(np.mean([x[name] for x in scored])) if scored
                                                 else math.nan for name in GENERATION_METRICS}

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        champion_model, champion_tokenizer = load_finetuned_lm(record)
        return _score_model(champion_model, champion_tokenizer, rendered, prompts, spec, compute, batch_size)[0]

    samples = [{"instruction": str(row.text), "reference": str(row.references[0]), "base_output": base_out[i],
                "finetuned_output": tuned_out[i]}
               for i, row in enumerate(prompts.head(spec.evaluation.sample_generations).itertuples(index=False))]
    out_dir.mkdir(parents=True, exist_ok=True)
    generations = out_dir / "generations.jsonl"
    lines = [json.dumps({"instruction": row.text, "category": row.category, "references": list(row.references),
                         "finetuned_output": tuned_out[i], "finetuned_scores": tuned_scores[i],
                         "base_output": base_out[i], "base_scores": base_scores[i]}, ensure_ascii=False)
             for i, row in enumerate(prompts.itertuples(index=False))]
    write_bytes_atomic(generations, ("\n".join(lines) + "\n").encode())
    test_rows = int((rendered["split"] == "test").sum())
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=test_rows,
        headline=f"{test_rows} test rows ({len(prompts)} distinct instructions, greedy decoding; scores take the "
                 "best of an instruction's reference answers)",
        metric_names=REPORT_METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(ReportTable("Sample generations", ("instruction", "reference", "base model", "fine-tuned"),
                            tuple(tuple(s.values()) for s in samples)),),
        details={"test_prompts": len(prompts), "samples": samples}, files={"generations": str(generations)})


def rendered_log(pipeline: str, rendered: Any, spec: PipelineSpec, overlength: str) -> StepLog:
    """What rendered_dataset records: how many examples were rendered, dropped and truncated per split, token
    counts, and the first training examples exactly as the model sees them."""
    frame = rendered.frame
    digest = frame_digest(frame)
    lengths = frame["total_tokens"]
    max_length = spec.training.max_length
    by_split = [[s, int((frame["split"] == s).sum()), sum(rendered.dropped[w].get(s, 0) for w in RENDER_DROP_REASONS),
                 rendered.truncated.get(s, 0), int(frame.loc[frame["split"] == s, "total_tokens"].sum())]
                for s in SPLITS]
    examples = rendered_examples_md(frame, RENDERED_EXAMPLES_SHOWN)
    return StepLog(
        data_version=digest[:32],
        message=f"rendered {len(frame)} of {rendered.rows_in} examples with the {rendered.template} chat template; "
                f"{rendered.dropped_total} dropped and {rendered.truncated_total} truncated at {max_length} tokens "
                f"({overlength})",
        metadata={
            "dagster/row_count": len(frame),
            "chat_template": rendered.template,
            "max_length": max_length,
            "overlength": overlength,
            "rows_in": rendered.rows_in,
            "rows_dropped_over_max_length": rendered.dropped_total,
            "rows_truncated": rendered.truncated_total,
            "per_split": Markdown(markdown_table(["split", "rows", "dropped", "truncated", "tokens"], by_split)),
            "tokens_per_example": {
                "min": int(lengths.min()) if len(lengths) else 0,
                "median": float(lengths.median()) if len(lengths) else 0,
                "p95": float(lengths.quantile(0.95)) if len(lengths) else 0,
                "max": int(lengths.max()) if len(lengths) else 0},
            "response_token_share": round(float(frame["completion_tokens"].sum() / max(lengths.sum(), 1)), 4),
            "rendered_examples": Markdown(examples),
            "sha256": digest,
        },
        metrics={"rows_in": rendered.rows_in, "rows_kept": len(frame), "rows_dropped": rendered.dropped_total,
                 "rows_truncated": rendered.truncated_total,
                 **{f"{s}_tokens": int(frame.loc[frame["split"] == s, "total_tokens"].sum()) for s in SPLITS}},
        datasets=(DatasetLog(frame.drop(columns=["input_ids", "completion_mask"]), f"{pipeline}/rendered_dataset",
                             digest, "rendered", "chat template"),),
        texts=((examples, "rendered_examples.md"),))


# --------------------------------------------------------------------------------------------- export
def export_merged(record: CheckpointRecord, out_dir: Path) -> Path:
    """Base model + adapter merged into one safetensors model, with the tokenizer and its chat template.

    The folder loads with plain transformers `AutoModelForCausalLM.from_pretrained`; written to a temporary
    sibling, then renamed, and never over an existing folder.
    """
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; choose a new folder for the export")
    model, tokenizer = load_finetuned_lm(record)
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
    return out_dir


# ------------------------------------------------------------------------------------------------ the task
class InstructionTuningTask(TaskBase):
    """Instruction tuning: a chat model's responses to instructions, in the model's own chat template."""

    name = NAME
    config_class = InstructionTuningTaskConfig
    evaluation_defaults = {"primary_metric": "rouge_l", "baselines": ("base_model",)}
    primary_metrics = GENERATION_METRICS
    baselines = ("base_model", "prompting")
    sweep_metrics = {"loss": "minimize", "mean_token_accuracy": "maximize"}  # generation is not scored per epoch
    split_group_column = "category"
    prepared = PreparedData(
        "rendered_dataset",
        "Every split's conversations rendered with the base model's chat template and tokenized; prompt tokens "
        "are masked from the loss; examples over training.max_length are dropped or truncated.",
        ("task", "training"))
    descriptions = {
        "cleaned_dataset": "Conversations (JSON messages) without malformed, empty, over-long or duplicate rows.",
        "finetuned_checkpoint": "LoRA adapter of the chat model trained on the rendered train split (loss on "
                                "responses only); the epoch with the lowest validation loss is kept.",
        "evaluation_report": "Loss and perplexity on validation and test, and scored greedy test generations "
                             "(exact match, token F1, ROUGE-L), for the base and the fine-tuned model; promotes "
                             "the checkpoint if it wins.",
    }
    trainer_name = "trl.SFTTrainer (completion_only_loss)"
    auto_model_class = "AutoModelForCausalLM"
    predicts_tokens = True  # training memory holds logits over the whole vocabulary
    report_kinds = frozenset({"pytorch", "transformers"})  # generation with the transformers model
    weight_files = WEIGHT_FILES  # the adapter; the base model's weights are pinned by their own digest
    legacy_metadata_file = "causal_lm.json"  # what checkpoints of earlier releases hold instead of a manifest

    def clean(self, raw: pd.DataFrame, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        result = clean_conversations(select_conversations(raw, spec.task), spec.cleaning)  # type: ignore[arg-type]
        frame = result.frame
        per_instruction = frame.groupby("norm_text").size()
        return frame, cleaning_log(spec.name, result, spec.cleaning, "conversations", {
            "distinct_instructions": int(len(per_instruction)),
            "instructions_with_several_responses": int((per_instruction > 1).sum()),
            "categories": Markdown(markdown_table(["category", "rows"], list(result.counts("category").items()))),
            "preview": Markdown(markdown_table(["instruction", "response", "category"],
                                               [[r.text, r.response, r.category] for r in frame.head(5).itertuples()],
                                               100)),
        })

    def quality_suites(self, spec: PipelineSpec) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            # categories are reported per split, not required in every split
            return validate_splits(value, spec.splits, spec.quality, "category", every_group_in_train_and_test=False)

        def rendered_suite(value: pd.DataFrame, splits: pd.DataFrame) -> QualityReport:
            return validate_rendered_dataset(value, spec, rows_in=len(splits))  # dropped rows are not in `value`

        return (QualitySuite("cleaned_dataset", CLEANED_CHECKS, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_conversations(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite),
                QualitySuite("rendered_dataset", RENDERED_CHECKS, DESCRIPTIONS, rendered_suite, inputs=("splits",)))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base.local_path)
        overlength = spec.task.overlength  # type: ignore[union-attr]
        result = render_conversations(splits, tokenizer, spec.training.max_length, overlength)
        return result.frame, rendered_log(spec.name, result, spec, overlength)

    def model_support(self, config: dict[str, Any]) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architectures = [str(a) for a in config.get("architectures") or []]
        if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return (f"cannot do {NAME}: {architectures or config.get('model_type')} is not a causal language model "
                    "(no AutoModelForCausalLM head in its weights)")
        return None

    def mean_tokens(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame) -> float:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(record.local_path, trust_remote_code=record.trust_remote_code)
        ensure_chat_template(tokenizer)
        sample = sample_split(splits, "train", 256, spec.training.seed)
        rendered = render_conversations(sample, tokenizer, spec.training.max_length, "truncate").frame
        return float(rendered["total_tokens"].mean()) if len(rendered) else float(spec.training.max_length)

    def time_train_step(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
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

    def probe(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """The base model's loss on the responses of a validation sample (lower is better). No resamples: token
        losses under different tokenizers are not paired, so candidates are ranked by the loss alone."""
        validation = sample_split(splits, "validation", spec.base_model.probe.sample_rows, spec.training.seed)
        model, tokenizer = load_causal_lm(record.local_path)
        rendered = render_conversations(validation, tokenizer, spec.training.max_length, "truncate").frame
        loss, _ = completion_loss(model, rendered, 8, compute, tokenizer.pad_token_id)
        return ProbeResult("validation_loss", loss, -loss)

    train = staticmethod(train_causal_lm)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_loss" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation loss", "validation token accuracy"],
                              [[f"{h['epoch']:g}", h["eval_loss"], h.get("eval_mean_token_accuracy", math.nan)]
                               for h in epochs])

    evaluate = staticmethod(evaluate_generation)

    def predict(self, record: CheckpointRecord, texts: list[str], compute: ComputeSettings,
                max_new_tokens: int) -> list[dict[str, Any]]:
        """Greedy answers, each instruction rendered with the model's chat template."""
        model, tokenizer = load_finetuned_lm(record)
        prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}, {"role": "assistant", "content": ""}])
                   for t in texts]
        answers = generate(model, tokenizer, prompts, max_new_tokens, 8, compute)
        return [{"instruction": t, "response": a} for t, a in zip(texts, answers, strict=True)]

    def export(self, record: CheckpointRecord, out_dir: Path) -> Path:
        return export_merged(record, out_dir)
