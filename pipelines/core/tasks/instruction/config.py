"""The `task:` section of instruction tuning: the columns a conversation is read from, and the settings of its own
method (padding-free batches, the over-length share, generation in the evaluation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field

from pipelines.core.sections import TaskSection


class InstructionTuningTaskConfig(TaskSection):
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
    padding_free: bool = Field(
        default=True, description="A batch's examples are concatenated into one row, each with its own position ids "
                                  "and attention kept within it (TRL's padding_free), so no step computes on "
                                  "padding.")
    max_overlength_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="Largest share of examples that may be dropped or truncated for being longer than "
                    "training.max_length (more means max_length is too small for the data).")
    max_new_tokens: int = Field(default=64, ge=1, le=4096,
                                description="Most tokens generated per test instruction.")
    max_generations: int | None = Field(
        default=None, ge=1, description="Generate for at most this many test instructions (all when unset); losses "
                                        "and perplexity always use the whole split.")
    sample_generations: int = Field(default=10, ge=0, description="Rows of the report's samples table.")

    moved_from: ClassVar[Mapping[str, str]] = {
        "training.padding_free": "padding_free", "quality.max_overlength_fraction": "max_overlength_fraction",
        "evaluation.max_new_tokens": "max_new_tokens", "evaluation.max_generations": "max_generations",
        "evaluation.sample_generations": "sample_generations"}
