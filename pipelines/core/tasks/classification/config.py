"""The `task:` section of text classification: its columns and labels, and the settings of its own method (pooling,
the classifier head, the class-balance and text checks, the prompting baseline's label names, the data doctor)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.core.sections import (CatalogModelConfig, Frozen, HubModelConfig, LocalModelConfig, ModelLocation,
                                     PackageModelConfig, TaskSection)


# A label is one line of text: no control character, tab or line break (Unicode's line separators too).
LABEL_CONTROL = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"


class DoctorConfig(Frozen):
    """The data doctor: a non-blocking check (WARN) on the splits that lists rows whose label is probably wrong
    (out-of-fold probabilities of a logistic regression on frozen embeddings, ranked by cleanlab), texts that are
    near-duplicates under different labels, and a learning curve (would more data help?)."""

    enabled: bool = Field(default=True, description="Run the doctor.")
    model: ModelLocation = Field(
        default_factory=lambda: CatalogModelConfig(source="catalog", id="all-MiniLM-L6-v2"),
        description="The frozen encoder whose embeddings the doctor's cheap model reads (only read, never trained "
                    "or shipped, so base_model's licence list does not apply).")
    folds: int = Field(default=5, ge=2, le=20, description="Cross-validation folds for out-of-fold probabilities.")
    max_suspect_fraction: float = Field(
        default=0.1, ge=0, le=1,
        description="The check warns when more than this share of the rows are label suspects, or when any two "
                    "texts of different labels are near-duplicates. Suspects include the cheap model's own "
                    "confident mistakes, so clean data has some too.")
    duplicate_similarity: float = Field(
        default=0.98, gt=0, le=1, description="Cosine similarity of embeddings from which two texts count as "
                                              "near-duplicates.")
    shown_rows: int = Field(default=25, ge=1, le=500, description="Suspects listed in the UI and the report (the CSV "
                                                                  "holds all of them).")
    learning_curve: tuple[float, ...] = Field(
        default=(0.25, 0.5, 1.0), description="Shares of the train split the learning curve's linear probe is fitted "
                                              "on, each scored on the validation split.")

    @field_validator("learning_curve")
    @classmethod
    def _shares(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < share <= 1 for share in value):
            raise ValueError(f"every share must be in (0, 1], got {list(value)}")
        return tuple(sorted(set(value)))

    @property
    def resolved_model(self) -> PackageModelConfig | LocalModelConfig | HubModelConfig:
        return self.model.resolve() if isinstance(self.model, CatalogModelConfig) else self.model


class ClassificationTaskConfig(TaskSection):
    """What is learned: text classification from one text column to one label column."""

    type: Literal["text_classification"] = "text_classification"

    text_column: str = Field(default="text", description="Column holding the input text.")
    label_column: str = Field(default="label", description="Column holding the label.")
    label_pattern: str | None = Field(
        default=None,
        description="Regular expression applied to the raw label; its first group becomes the label "
                    "(e.g. '^([^:]+)' turns TREC's 'LOC:city' into 'LOC').")
    labels: tuple[str, ...] | None = Field(
        default=None, description="The declared label set; rows with any other label are an error.")

    # Settings of this task's method, read by its training, checks, selection and baselines only.
    pooling: Literal["auto", "mean", "cls", "max", "last"] = Field(
        default="auto", description="How token states become one vector. 'auto' uses what the model declares "
                                    "(1_Pooling/config.json), else 'last' for decoders, 'mean' for encoders.")
    head_learning_rate: float | None = Field(
        default=None, gt=0, lt=1, description="Learning rate of the classifier head; defaults to "
                                              "training.learning_rate.")
    head_dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the pooled embedding before the "
                                                                    "head.")
    head_init: Literal["linear_probe", "random"] = Field(
        default="linear_probe",
        description="'linear_probe' starts the head from a logistic regression on frozen embeddings (LP-FT).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    label_names: dict[str, str] = Field(
        default_factory=dict, description="The words the prompting baseline's model reads and answers for each "
                                          "label (e.g. LOC: location); a label not listed is shown as it is.")
    min_rows_per_class: int = Field(
        default=5, ge=1, description="Without task.labels: a label seen fewer times is an error (often a typo); "
                                     "with them, a class with fewer rows blocks training (classes_are_balanced).")
    max_imbalance_ratio: float = Field(
        default=20.0, ge=1, description="Largest class / smallest class above this is a warning (it does not block: "
                                        "imbalance is common in real data).")
    imbalance_error_factor: float | None = Field(
        default=None, ge=1, description="Set it to make imbalance block: above max_imbalance_ratio times this "
                                        "factor is an error. A class with fewer than min_rows_per_class rows "
                                        "always is.")
    max_id_like_fraction: float = Field(
        default=0.5, ge=0, le=1,
        description="Largest share of texts that look like ids or numbers (one token with a digit, or no letters "
                    "at all); more means task.text_column names the wrong column.")
    min_text_chars: int = Field(default=1, ge=0, description="Shortest text allowed, in characters.")
    max_text_chars: int = Field(default=2000, ge=1, description="Longest text allowed, in characters.")
    doctor: DoctorConfig = Field(default_factory=DoctorConfig)

    # Where these settings lived before they moved here (still read, with a warning, for one release).
    moved_from: ClassVar[Mapping[str, str]] = {
        "base_model.pooling": "pooling", "training.head_learning_rate": "head_learning_rate",
        "training.head_dropout": "head_dropout", "training.head_init": "head_init",
        "training.label_smoothing": "label_smoothing", "evaluation.prompting.label_names": "label_names",
        "quality.min_rows_per_class": "min_rows_per_class", "quality.max_imbalance_ratio": "max_imbalance_ratio",
        "quality.imbalance_error_factor": "imbalance_error_factor",
        "quality.max_id_like_fraction": "max_id_like_fraction", "quality.min_text_chars": "min_text_chars",
        "quality.max_text_chars": "max_text_chars", "doctor": "doctor"}
    unhashed: ClassVar[tuple[str, ...]] = ("doctor",)  # it only looks at the data: not part of the spec hash

    @field_validator("label_pattern")
    @classmethod
    def _pattern_has_a_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if compiled.groups < 1:
            raise ValueError("must contain one capturing group, e.g. '^([^:]+)'")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        """Whole numbers are labels as a CSV spells them (`0`, `1`); YAML's booleans and floats are mistakes."""
        if not isinstance(value, list | tuple):
            return value
        labels = []
        for item in value:
            if isinstance(item, bool):
                raise ValueError(f"YAML reads {str(item).lower()!r} (and yes/no/on/off) as true/false, not as a "
                                 "label: quote each label, e.g. labels: ['yes', 'no']")
            if isinstance(item, int):
                item = str(item)
            elif not isinstance(item, str):
                raise ValueError(f"{item!r} is not a label: write each label as the data spells it, in quotes "
                                 f"(e.g. '{item}')")
            if re.search(LABEL_CONTROL, item.strip()):
                raise ValueError(f"{item!r} holds a line break, a tab or a control character: a label is one line "
                                 "of text")
            if not item.strip():
                raise ValueError("an empty label: a row whose label is empty has no label (cleaning drops it as "
                                 "missing_label)")
            if item != item.strip():
                raise ValueError(f"{item!r} has white space around it, which the data's labels are read without: "
                                 f"write {item.strip()!r}")
            # One Unicode form (NFC) for the declared labels and the data's: 'Cafe\u0301' is 'Café'.
            labels.append(unicodedata.normalize("NFC", item))
        return labels

    @field_validator("label_names")
    @classmethod
    def _label_names_in_nfc(cls, value: dict[str, str]) -> dict[str, str]:
        """Keyed by labels in the form the data's are read in (NFC), so 'Cafe\\u0301' finds the name of 'Café'."""
        return {unicodedata.normalize("NFC", label): name for label, name in value.items()}

    @field_validator("label_column")
    @classmethod
    def _label_is_not_the_text(cls, value: str, info: Any) -> str:
        if value == info.data.get("text_column"):
            raise ValueError(f"{value!r} is also task.text_column: the label must come from a column of its own")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("a classification task needs at least 2 labels")
            dupes = sorted({v for v in value if value.count(v) > 1})
            if dupes:
                raise ValueError(f"labels are listed more than once: {dupes}")
        return value

    @model_validator(mode="after")
    def _text_bounds(self) -> ClassificationTaskConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(f"task.min_text_chars ({self.min_text_chars}) must not exceed "
                             f"task.max_text_chars ({self.max_text_chars})")
        return self
