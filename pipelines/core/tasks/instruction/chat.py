"""Instruction data as chat conversations: read from columns or an OpenAI `messages` column, cleaned, and
rendered with the base model's own chat template into token ids whose prompt part carries no loss.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import CleaningResult, control_character, dedup_key, escape_controls, is_missing
from pipelines.core.sections import CleaningConfig

ROLES = ("system", "user", "assistant")
CHAT_DROP_REASONS = ("malformed_source_row", "malformed_message", "empty_instruction", "empty_response", "empty_turn",
                     "control_characters", "too_long", "exact_duplicate", "normalised_duplicate")
RENDER_DROP_REASONS = ("over_max_length", "prompt_over_max_length")
# Used only when a base model has no chat template of its own (reported as such in the asset's metadata).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def role_problem(messages: list[dict[str, Any]]) -> str | None:
    """Why a conversation's roles are not (system?) user, assistant, user, ..., assistant; None when they are."""
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        return f"unknown role {unknown[0]!r} (expected system, user or assistant)"
    turns = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in turns:
        return "a system message after the first message"
    if not turns:
        return "no user or assistant message"
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"message {i + (len(roles) - len(turns))} is {role!r} where {expected!r} was expected (roles must alternate)"
    if turns[-1] != "assistant":
        return "the last message is not the assistant's response"
    return None


def _normalise(text: str, cfg: CleaningConfig) -> str:
    # Message contents keep their line breaks (lists, code); only the unicode form and the ends are normalised.
    if cfg.unicode_normalization != "none":
        text = unicodedata.normalize(cfg.unicode_normalization, text)
    return text.strip() if cfg.collapse_whitespace else text


def clean_conversations(examples: pd.DataFrame, cfg: CleaningConfig) -> CleaningResult:
    """Normalise message texts; drop malformed, empty, over-long and duplicate conversations, counting each.

    Malformed: the source row (source_problem) or one of its messages (message_problem: a null role). Empty: no
    instruction, no response, or another user or assistant turn without content (null or blank). Conversations
    whose messages hold control characters (NUL, escape, C1: binary or mis-decoded data) are dropped too, never
    trained. The same instruction with different responses is kept (several references); splits keep them together.
    """
    rows_in = len(examples)
    frame = examples.copy()
    reason = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def mark(mask: Any, why: str) -> None:
        mask = pd.Series(np.asarray(mask, dtype=bool), index=frame.index)
        reason[mask & reason.isna()] = why

    for column, why in (("source_problem", "malformed_source_row"), ("message_problem", "malformed_message")):
        if column in frame.columns:
            mark(frame[column].map(lambda v: v is not None and not is_missing(v)), why)
    normalised: list[str | None] = []
    empty_turns, controls = [], []
    for value in frame["messages"]:
        if is_missing(value):
            normalised.append(None)
            empty_turns.append(False)
            controls.append(False)
            continue
        messages = json.loads(value)
        # Found before normalising: NFKC and stripping would hide some, and they are never trained.
        controls.append(any(control_character(m["content"] or "") is not None for m in messages))
        for message in messages:
            message["content"] = _normalise(message["content"] or "", cfg)
        # The last message is the response (empty_response); a blank turn before it would train on nothing.
        empty_turns.append(any(m["role"] in ("user", "assistant") and not m["content"] for m in messages[:-1]))
        normalised.append(json.dumps(messages, ensure_ascii=False))
    frame["messages"] = pd.Series(normalised, index=frame.index, dtype=object)
    # pandas 3 stores None in a text column as NaN: everything below goes through plain lists and is_missing.
    texts = ["" if is_missing(t) else _normalise(str(t), cfg) for t in frame["text"]]
    responses = ["" if is_missing(t) else _normalise(str(t), cfg) for t in frame["response"]]
    frame["text"] = pd.Series(texts, index=frame.index, dtype=object)
    frame["response"] = pd.Series(responses, index=frame.index, dtype=object)
    mark([not t for t in texts], "empty_instruction")
    mark([not t for t in responses], "empty_response")
    mark(empty_turns, "empty_turn")
    mark(controls, "control_characters")
    lengths = [0 if is_missing(v) else sum(len(m["content"]) for m in json.loads(v)) for v in frame["messages"]]
    mark([n > cfg.max_chars for n in lengths], "too_long")
    frame["norm_text"] = [dedup_key(t) for t in texts]
    frame["norm_response"] = [dedup_key(t) for t in responses]
    # The rest of a conversation (its system message, earlier answers): examples that differ there differ.
    frame["norm_context"] = ["" if is_missing(v) else "\x1f".join(
        f"{m['role']}:{dedup_key(m['content'])}" for m in json.loads(v)[:-1] if m["role"] != "user")
        for v in frame["messages"]]
    if cfg.drop_duplicates:
        within = ["source_split"] if "source_split" in frame.columns else []
        for subset, why in ((["messages", *within], "exact_duplicate"),
                            (["norm_text", "norm_response", "norm_context", *within], "normalised_duplicate")):
            alive = reason.isna()
            mark(alive & frame[alive].duplicated(subset=subset, keep="first").reindex(frame.index, fill_value=False),
                 why)
    dropped = {why: int((reason == why).sum()) for why in CHAT_DROP_REASONS}
    shown = [c for c in ("text", "response", "source_problem", "message_problem", "source_file", "source_row")
             if c in frame.columns]
    examples_by_reason = {
        why: frame.loc[reason == why, shown].head(5).astype(object).where(lambda f: f.notna(), None).to_dict("records")
        for why in CHAT_DROP_REASONS if dropped[why]}
    if dropped["control_characters"]:  # as read, the control characters as escapes: a NUL would not show at all
        read = examples.loc[reason == "control_characters", ["text", "response"]].head(5)
        for row, (text, response) in zip(examples_by_reason["control_characters"], read.itertuples(index=False),
                                         strict=True):
            row["text"] = escape_controls("" if is_missing(text) else str(text))
            row["response"] = escape_controls("" if is_missing(response) else str(response))
    kept = frame[reason.isna()].reset_index(drop=True)
    columns = ["messages", "text", "response", "category", "norm_text", "norm_response", "source_file", "source_row"]
    columns += ["source_split"] if "source_split" in kept.columns else []
    kept = kept[columns].astype({"messages": str, "text": str, "response": str, "category": str,
                                 "norm_text": str, "norm_response": str})
    return CleaningResult(kept, rows_in, dropped, examples_by_reason)


# ------------------------------------------------------------------------------------------ rendering
def ensure_chat_template(tokenizer: Any) -> str:
    """'model' when the tokenizer brings its own chat template; otherwise sets a ChatML one and says so."""
    if getattr(tokenizer, "chat_template", None):
        return "model"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return "tuneline ChatML fallback (the model has no chat template)"


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """The text the model sees before it answers: every message but the last, plus the assistant header."""
    return tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)


def render_example(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, str, list[int], list[int]]:
    """Prompt text, completion text, token ids and completion mask (1 = the token carries loss)."""
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as the start of the whole conversation, "
                         "so the response tokens cannot be told apart")
    completion = full[len(prompt):]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt, completion, prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


@dataclass(frozen=True)
class RenderResult:
    frame: pd.DataFrame
    template: str  # "model" or the fallback's description
    dropped: dict[str, dict[str, int]]  # reason -> split -> rows
    truncated: dict[str, int]  # split -> rows
    rows_in: int

    @property
    def dropped_total(self) -> int:
        return sum(sum(v.values()) for v in self.dropped.values())

    @property
    def truncated_total(self) -> int:
        return sum(self.truncated.values())


def render_conversations(splits: pd.DataFrame, tokenizer: Any, max_length: int, overlength: str) -> RenderResult:
    """Render every conversation with the chat template and apply the spec's over-length rule.

    overlength 'drop' drops examples longer than max_length tokens; 'truncate' cuts the response to fit
    (an example whose prompt alone does not fit is dropped). Every dropped or truncated row is counted by split.
    """
    template = ensure_chat_template(tokenizer)
    records = []
    dropped = {why: {} for why in RENDER_DROP_REASONS}  # type: dict[str, dict[str, int]]
    truncated: dict[str, int] = {}
    for row in splits.itertuples(index=False):
        messages = json.loads(row.messages)
        prompt, completion, ids, mask = render_example(tokenizer, messages)
        prompt_tokens = mask.count(0)
        was_truncated = False
        if len(ids) > max_length:
            if overlength == "drop":
                dropped["over_max_length"][row.split] = dropped["over_max_length"].get(row.split, 0) + 1
                continue
            if prompt_tokens >= max_length:
                dropped["prompt_over_max_length"][row.split] = dropped["prompt_over_max_length"].get(row.split, 0) + 1
                continue
            ids, mask, was_truncated = ids[:max_length], mask[:max_length], True
            truncated[row.split] = truncated.get(row.split, 0) + 1
        records.append({
            "split": row.split, "text": row.text, "response": row.response, "category": row.category,
            "norm_text": row.norm_text, "messages": row.messages, "prompt_rendered": prompt,
            "completion_rendered": completion, "input_ids": ids, "completion_mask": mask,
            "prompt_tokens": prompt_tokens, "completion_tokens": len(ids) - prompt_tokens,
            "total_tokens": len(ids), "truncated": was_truncated,
            "source_file": row.source_file, "source_row": int(row.source_row)})
    frame = pd.DataFrame.from_records(records, columns=[
        "split", "text", "response", "category", "norm_text", "messages", "prompt_rendered", "completion_rendered",
        "input_ids", "completion_mask", "prompt_tokens", "completion_tokens", "total_tokens", "truncated",
        "source_file", "source_row"])
    return RenderResult(frame, template, dropped, truncated, len(splits))


# ------------------------------------------------------------------------------------------- metrics
def _tokens(text: str) -> list[str]:
    return dedup_key(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal ignoring case, punctuation and spacing."""
    return float(dedup_key(prediction) == dedup_key(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words, SQuAD style)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    from collections import Counter

    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common token subsequence, as precision and recall, harmonic mean."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generation(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Each metric's best value over the references (an instruction may have several good answers)."""
    return {name: max(fn(prediction, ref) for ref in references)
            for name, fn in (("exact_match", exact_match), ("token_f1", token_f1), ("rouge_l", rouge_l))}
