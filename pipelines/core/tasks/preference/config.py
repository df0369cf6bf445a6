"""The `task:` section of preference tuning: the columns a pair is read from, the method and its settings, where
training starts, and how rejected answers are found when the data has none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from pipelines.core.sections import Frozen, Name, TaskSection


class ChampionStart(Frozen):
    """Start from the model another pipeline of this workspace registered as its champion."""

    champion_of: Name = Field(description="The pipeline (its spec's name) whose champion this one starts from: its "
                                          "base model with its adapter merged in is the starting model and the "
                                          "reference.")


class PreferenceTaskConfig(TaskSection):
    """What is learned: which of two answers to a prompt a chat model should prefer.

    Rows come as prompt / chosen / rejected columns (text), or with chosen and rejected as conversations in the
    OpenAI chat format (lists of {role, content}; the prompt is every message before the last, the answer the last
    one). A row with no rejected answer gets the starting model's own answer (task.rejected_from).
    """

    type: Literal["preference"]
    prompt_column: str = Field(default="prompt", description="Column holding the prompt (the user's message), or a "
                                                             "conversation in the chat format that ends before the "
                                                             "answer.")
    chosen_column: str = Field(default="chosen", description="Column holding the preferred answer (text, or a "
                                                             "conversation whose last message is the answer).")
    rejected_column: str = Field(default="rejected", description="Column holding the answer to prefer less (text or "
                                                                 "a conversation); optional, see rejected_from.")
    system_column: str = Field(default="system", description="Optional column with a system message per row.")
    category_column: str = Field(default="category", description="Optional column kept for reporting and splits.")
    method: Literal["dpo", "ipo", "kto"] = Field(
        default="dpo", description="dpo: the sigmoid loss of Direct Preference Optimization; ipo: the squared loss "
                                   "of IPO, which does not push the margin without bound (try it when DPO "
                                   "over-fits small data); kto: Kahneman-Tversky Optimization, which learns from "
                                   "each answer marked good or bad on its own (pairs are split into one of each).")
    beta: float = Field(default=0.1, gt=0, description="How far the tuned model may move from the starting model: "
                                                       "the implicit reward's scale for dpo and kto, IPO's "
                                                       "regularisation for ipo. Lower lets it move further.")
    desirable_weight: float = Field(default=1.0, gt=0, description="kto only: weight of the chosen answers' loss.")
    undesirable_weight: float = Field(default=1.0, gt=0, description="kto only: weight of the rejected answers' "
                                                                     "loss.")
    start_from: Literal["base"] | ChampionStart = Field(
        default="base", description="base: a model chosen among base_model's candidates; {champion_of: <pipeline>}: "
                                    "the champion of that pipeline (typically instruction tuning on the same "
                                    "prompts); the spec then has no base_model section.")
    rejected_from: Literal["data", "starting_model"] = Field(
        default="starting_model",
        description="Where a row without a rejected answer gets one: starting_model generates it (the starting "
                    "model's greedy answer, cached by model and prompt; a row whose answer equals the chosen one is "
                    "left out); data: every row must have one (the check blocks otherwise).")
    max_overlength_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="Largest share of pairs that may be dropped for being longer than training.max_length tokens "
                    "(prompt and the longer answer; more means max_length is too small for the data).")
    max_new_tokens: int = Field(default=64, ge=1, le=4096,
                                description="Most tokens generated per prompt, for rejected answers and evaluation.")
    max_generations: int | None = Field(
        default=None, ge=1, description="Generate for at most this many test prompts in the evaluation (all when "
                                        "unset); log-probabilities always use every test pair.")
    answer_check: Literal["exact", "final_number", "none"] = Field(
        default="exact", description="How a greedy answer is checked against the chosen one: exact (the same text, "
                                     "case, spaces and final punctuation ignored), final_number (the last number of "
                                     "each, for arithmetic answers), or none.")
    sample_generations: int = Field(default=10, ge=0, description="Rows of the report's samples table.")

    @classmethod
    def starts_from_another_pipeline(cls, section: Mapping[str, Any]) -> bool:
        return isinstance(section.get("start_from"), dict)

    def starts_from(self) -> str | None:
        return None if self.start_from == "base" else self.start_from.champion_of  # type: ignore[union-attr]
