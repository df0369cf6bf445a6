"""Instruction tuning's examples: conversations read from instruction/response columns or an OpenAI `messages`
column, and the blocking checks on the cleaned conversations and on the rendered, tokenized examples."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import cell_text_at, column_text, dedup_key, is_missing
from pipelines.core.digests import frame_digest
from pipelines.core.errors import SourceError
from pipelines.core.markdown import markdown_table
from pipelines.core.quality import ERROR, QualityReport, check_def, evaluate_checks, lost_examples_check, with_row_id
from pipelines.core.records import DatasetLog, Markdown, StepLog
from pipelines.core.splitting import SPLITS
from pipelines.core.tasks.instruction.chat import RENDER_DROP_REASONS, ROLES, clean_conversations, role_problem
from pipelines.core.tasks.instruction.config import InstructionTuningTaskConfig

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")


REPORT_METRICS = ("validation_loss", "validation_perplexity", "test_loss", "test_perplexity", "exact_match",
                  "token_f1", "rouge_l")


RENDERED_EXAMPLES_SHOWN = 3


# Columns a failed check's example rows show (where the checked table has them), in this order.
EXAMPLE_COLUMNS = ("text", "category", "response", "roles_problem", "total_tokens", "split", "source_file",
                   "source_row")
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


# -------------------------------------------------------------------------------- conversations, quality
# Role names of other chat formats, read as ours (ShareGPT's human / gpt, Gemma's model, and common others).
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                "chatgpt": "assistant"}


TEXT_PART_TYPES = ("text", "input_text", "output_text")  # content parts of OpenAI-style messages that hold text


def _message_content(content: Any, index: int, file: str, row: int, column: str) -> str:
    """A message's content as text: a string as it is, bytes decoded as UTF-8, a number or boolean as JSON writes
    it, null as empty (cleaning drops an empty turn), a list of content parts (OpenAI's [{"type": "text", "text":
    ...}, ...]) as its text parts joined by newlines. A part that is not text (an image) is an error: a text model
    cannot read it, and dropping it would train on half a message."""
    if not isinstance(content, (list, tuple, dict, np.ndarray)):  # null is an empty turn, which cleaning drops
        return cell_text_at(content, file, row, column, f"text as message {index}'s content") or ""
    parts = content.tolist() if isinstance(content, np.ndarray) else list(content) \
        if isinstance(content, (list, tuple)) else [content]
    texts = []
    for part in parts:
        if isinstance(part, (str, bytes)):
            texts.append(cell_text_at(part, file, row, column, f"text in message {index}'s content") or "")
            continue
        kind = (part.get("type") or "text") if isinstance(part, dict) else type(part).__name__
        if not isinstance(part, dict) or kind not in TEXT_PART_TYPES:
            raise SourceError(f"message {index} has a content part of type {kind!r}; expected text (a string, or "
                              'parts like {"type": "text", "text": "..."}): a text model cannot read it',
                              file=file, row=row, column=column)
        if not isinstance(part.get("text"), (str, bytes)):
            raise SourceError(f"message {index} has a content part without a 'text' string "
                              f"({str(part)[:60]}); expected parts like {{\"type\": \"text\", \"text\": \"...\"}}",
                              file=file, row=row, column=column)
        texts.append(cell_text_at(part["text"], file, row, column, f"text in message {index}'s content") or "")
    return "\n".join(texts)


def _parse_messages(value: Any, file: str, row: int, column: str) -> tuple[list[dict[str, Any]], str | None]:
    """A conversation as a list of {role, content} dicts, and what is wrong with one of its messages (a null role:
    cleaning drops the row as malformed_message); structure errors name the file, row and column. Also reads
    ShareGPT's {"from", "value"} messages and role names (human, gpt), and content given as parts. An empty system
    message is left out, as an empty system column is."""
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
    messages: list[dict[str, Any]] = []
    problem = None
    for i, message in enumerate(value):
        if isinstance(message, dict) and is_missing(message.get("role")) and not is_missing(message.get("from")):
            message = {"role": message["from"], "content": message.get("value")}  # ShareGPT
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SourceError(f"message {i} is not an object with 'role' and 'content': {str(message)[:80]!r}",
                              file=file, row=row, column=column)
        content = _message_content(message["content"], i, file, row, column)
        raw_role = message["role"]
        if isinstance(raw_role, (bytes, np.bytes_)):
            raw_role = cell_text_at(raw_role, file, row, column, f"text as message {i}'s role")
        if not isinstance(raw_role, str):  # null or a number: this row's defect, not the file's role names
            problem = problem or (f"message {i} has no role (null)" if is_missing(raw_role) else
                                  f"message {i} has the role {str(raw_role)[:40]} ({type(raw_role).__name__}), "
                                  "not a role name")
            messages.append({"role": None, "content": content})
            continue
        role = raw_role.strip().lower()
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise SourceError(f"message {i} has the role {raw_role[:40]!r}; expected system, user or "
                              f"assistant (also read: {', '.join(sorted(ROLE_ALIASES))})",
                              file=file, row=row, column=column)
        messages.append({"role": role, "content": content})
    said = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    return said or messages, problem


def select_conversations(raw: pd.DataFrame, task: InstructionTuningTaskConfig) -> pd.DataFrame:
    """One conversation per row (JSON `messages`), from a messages column or from instruction/response columns.

    Keeps `text` (the prompt's user turns, what splits and duplicates are judged by), `response` (the last
    message), `category` and provenance.
    """
    columns = set(raw.columns)
    files = raw["source_file"].astype(str).tolist()
    rows = raw["source_row"].astype("int64").tolist()
    conversations: list[list[dict[str, Any]] | None] = []
    problems: list[str | None] = [None] * len(raw)
    pairs = task.instruction_column in columns and task.response_column in columns
    if task.messages_column in columns:
        for n, (value, file, row) in enumerate(zip(raw[task.messages_column], files, rows, strict=True)):
            if is_missing(value) is not True or isinstance(value, (list, np.ndarray)):
                messages, problems[n] = _parse_messages(value, file, row, task.messages_column)
                conversations.append(messages)
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
        "category": ([c or "none" for c in column_text(raw[task.category_column], files, rows,
                                                          task.category_column, "a category")]
                     if task.category_column in columns else "all"),
        "message_problem": pd.Series(problems, dtype=object),
        "source_file": files,
        "source_row": rows,
    })
    if "source_problem" in columns:
        frame["source_problem"] = pd.Series(column_text(raw["source_problem"], files, rows, "source_problem"),
                                            dtype=object)
    if "source_split" in columns:
        frame["source_split"] = raw["source_split"].astype(str).to_numpy()
    return frame


def _pair_messages(raw: pd.DataFrame, task: InstructionTuningTaskConfig, columns: set[str],
                   n: int) -> list[dict[str, Any]]:
    """Row `n`'s instruction (with its input and system message, where those columns are) and response as
    messages."""
    file, row = str(raw["source_file"].iat[n]), int(raw["source_row"].iat[n])

    def cell(column: str) -> str | None:
        return cell_text_at(raw[column].iat[n], file, row, column, "text") if column in columns else None

    prompt, extra, system = cell(task.instruction_column), cell(task.input_column), cell(task.system_column)
    if prompt is not None and extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": cell(task.response_column)}]


def _conversation_keys(conversations: pd.DataFrame) -> pd.Series:
    """One key per distinct example: instruction and response normalised (an empty side makes it its own)."""
    return pd.Series([f"{dedup_key(i)}\x1f{dedup_key(r)}" if isinstance(i, str) and i.strip() and isinstance(r, str)
                      and r.strip() else f"#incomplete-row-{n}"
                      for n, (i, r) in enumerate(zip(conversations["text"], conversations["response"], strict=True))],
                     dtype=object)


def validate_cleaned_conversations(frame: pd.DataFrame, spec: SpecView,
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
    return evaluate_checks("cleaned_dataset", checks, tables, EXAMPLE_COLUMNS)


def validate_rendered_dataset(frame: pd.DataFrame, spec: SpecView, rows_in: int) -> QualityReport:
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
            f"task.max_overlength_fraction ({spec.task.max_overlength_fraction:g}) of the examples were "
            "dropped or truncated to get there.",
            "raise training.max_length (the per-split table shows how many were lost), shorten the long "
            "conversations, or raise task.max_overlength_fraction",
            (gxe.ExpectColumnValuesToBeBetween(column="total_tokens", min_value=1, max_value=max_length), "rows",
             ERROR),
            (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=spec.task.max_overlength_fraction),
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
    return evaluate_checks("rendered_dataset", checks, {"rows": rows, "lost": lost}, EXAMPLE_COLUMNS)


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


def rendered_log(pipeline: str, rendered: Any, spec: SpecView, overlength: str) -> StepLog:
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
