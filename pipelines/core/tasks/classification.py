"""Text classification: a pre-trained encoder (or decoder) pools its token states the way the model declares,
a linear head on top, LoRA adapters on its linear layers. The head starts from a logistic regression on the
frozen embeddings (LP-FT) unless the spec says otherwise, so fine-tuning starts where the linear probe ends.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from pipelines.core.cleaning import clean, cleaning_log, dedup_key, is_missing
from pipelines.core.doctor import DoctorReport, examine
from pipelines.core.errors import CheckpointError, SourceError
from pipelines.core.evaluation import build_report, champion_metrics, markdown_table
from pipelines.core.files import write_bytes_atomic
from pipelines.core.fused_lora import fused_lora
from pipelines.core.prompting import classification_prompting
from pipelines.core.lineage import frame_digest
from pipelines.core.linear_probe import LinearProbe, fit_probe
from pipelines.core.quality import ERROR, WARN, QualityReport, QualitySuite, check_def, evaluate_checks, \
    lost_examples_check, validate_splits, with_row_id
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, Markdown, ReportTable, StepLog
from pipelines.core.sections import Frozen
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.base import PreparedData, ProbeResult, TaskBase
from pipelines.core.trainer import (ComputeSettings, MetricsSink, ProgressFn, Resumable, best_epoch_callback,
                                    build_lora_config, checkpoint_digest, lora_layers, model_flops_utilization,
                                    transformer_blocks, checkpoint_manifest, common_training_arguments,
                                    peak_memory_mb, run_trainer, save_trained, dropout_note, set_model_dropout,
                                    store_frozen_weights_for, time_training_steps, trainable_parameters,
                                    verified_folder, with_global_batch_order)

if TYPE_CHECKING:
    from pipelines.core.spec import PipelineSpec

NAME = "text_classification"
WEIGHT_FILES = ("adapter/adapter_model.safetensors", "head.safetensors")
METRIC_NAMES = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
                "weighted_recall", "weighted_f1")
REPORT_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1")
CLEANED_CHECKS = ("labels_are_known",
                  "declared_labels_have_rows", "labels_are_distinct", "texts_look_like_text", "cleaning_kept_most_rows",
                  "text_lengths_within_bounds", "texts_are_unique", "row_count_within_bounds", "classes_are_balanced")
SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "every_class_in_train_and_test",
                 "validation_and_test_are_not_empty")
DESCRIPTIONS = {
    "labels_are_known": "Every label is declared in task.labels (or, without them, frequent enough not to be a typo).",
    "text_lengths_within_bounds": "Every text length is within quality.min_text_chars and quality.max_text_chars.",
    "texts_are_unique": "No normalised text occurs twice (within a split, when the source brings splits).",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "classes_are_balanced": "Every class has enough rows to learn from (error); none is much smaller than the largest "
                            "(warning).",
    "declared_labels_have_rows": "Every label declared in task.labels has rows.",
    "labels_are_distinct": "No two labels differ only in case, spacing or punctuation.",
    "texts_look_like_text": "The text column holds text, not mostly ids or numbers.",
    "cleaning_kept_most_rows": "Cleaning dropped at most quality.max_lost_fraction of the source's distinct examples.",
    "splits_do_not_overlap": "No normalised text is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "every_class_in_train_and_test": "Every class has rows in train and in test.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
}


# ------------------------------------------------------------------------------------------ spec section
class ClassificationTaskConfig(Frozen):
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
            labels.append(item)
        return labels

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


# -------------------------------------------------------------------------------------- examples, quality
def _require_column(raw: pd.DataFrame, column: str, field_name: str) -> None:
    if column not in raw.columns:
        files = sorted(set(raw["source_file"].astype(str))) if "source_file" in raw.columns else []
        available = [c for c in raw.columns if c not in ("source_file", "source_row", "source_split")]
        raise SourceError(f"has no column {column!r} (named by {field_name}); its columns are {available}",
                          file=", ".join(files) or None, column=column)


def select_examples(raw: pd.DataFrame, task: ClassificationTaskConfig) -> pd.DataFrame:
    """Pick the spec's text and label columns and derive the label; keep provenance and source splits."""
    _require_column(raw, task.text_column, "task.text_column")
    _require_column(raw, task.label_column, "task.label_column")
    frame = pd.DataFrame({
        "text": raw[task.text_column].astype(object),
        "label": raw[task.label_column].astype(object),
        "source_file": raw["source_file"].astype(str),
        "source_row": raw["source_row"].astype("int64"),
    })
    if "source_split" in raw.columns:
        frame["source_split"] = raw["source_split"].astype(str)
    for column, field_name in ((task.text_column, "task.text_column"), (task.label_column, "task.label_column")):
        nested = next(((file, row, v) for v, file, row in zip(raw[column], frame["source_file"], frame["source_row"],
                                                               strict=True)
                       if isinstance(v, (dict, list, tuple, np.ndarray))), None)
        if nested is not None:
            raise SourceError(f"holds a JSON {'object' if isinstance(nested[2], dict) else 'list'} "
                              f"({str(nested[2])[:60]}), not a {'text' if column == task.text_column else 'label'} "
                              f"(named by {field_name}); tuneline reads the top-level fields of each record: "
                              "flatten the nested one into a column of its own (e.g. pandas.json_normalize)",
                              file=nested[0], row=int(nested[1]), column=column)
    frame["text"] = [None if is_missing(v) else str(v) for v in frame["text"]]
    # A label column of whole numbers with a gap reads as floats (1.0): the label is the number as written, 1.
    frame["label"] = [None if is_missing(v) else (str(int(v)) if isinstance(v, float) and v.is_integer() else
                                                  str(v)).strip() or None for v in frame["label"]]
    if task.label_pattern is not None:
        pattern = re.compile(task.label_pattern)
        derived = []
        for label, file, row in zip(frame["label"], frame["source_file"], frame["source_row"], strict=True):
            if label is None:
                derived.append(None)
                continue
            match = pattern.search(label)
            if match is None or match.group(1) is None:
                raise SourceError(f"label {label!r} does not match task.label_pattern {task.label_pattern!r}",
                                  file=file, row=int(row), column=task.label_column)
            derived.append(match.group(1))
        frame["label"] = derived
    return frame


ID_LIKE = r"^(?:[\W\d_]*|[\x21-\x7e]*\d[\x21-\x7e]*)$"  # no letters, or one ASCII token with a digit: 42, TCK-00123


def _example_keys(examples: pd.DataFrame) -> pd.Series:
    """One key per distinct example: its normalised text (an empty text is its own example)."""
    return pd.Series([dedup_key(t) if isinstance(t, str) and t.strip() else f"#empty-row-{i}"
                      for i, t in enumerate(examples["text"])], dtype=object)


def validate_cleaned_examples(frame: pd.DataFrame, spec: PipelineSpec,
                              raw_data: pd.DataFrame | None = None) -> QualityReport:
    """Run the cleaned_dataset checks of `spec` on the asset's value (and, given the raw rows, how much cleaning
    lost)."""
    import great_expectations.expectations as gxe

    q = spec.quality
    rows = with_row_id(frame)
    present = set(rows.columns)
    label_counts = rows["label"].value_counts() if "label" in present else pd.Series(dtype=int)
    if spec.task.labels is not None:  # an undeclared label is a typo for labels_are_known, not a tiny class
        label_counts = label_counts[label_counts.index.isin(spec.task.labels)]
    classes = pd.DataFrame({"label": label_counts.index.astype(str), "rows": label_counts.to_numpy()})
    tables = {"rows": rows, "classes": classes}
    largest = int(label_counts.max()) if len(label_counts) else 0

    checks: list[Any] = []
    if spec.task.labels is not None:
        checks.append(check_def(
            "labels_are_known", f"Every label is one of task.labels {list(spec.task.labels)}.",
            "correct the misspelt labels in the source, or add the label to task.labels",
            (gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(spec.task.labels)), "rows", ERROR)))
        tables["declared"] = pd.DataFrame({"label": list(spec.task.labels),
                                           "rows": [int(label_counts.get(x, 0)) for x in spec.task.labels]})
        checks.append(check_def(
            "declared_labels_have_rows", "Every label declared in task.labels has rows in the clean data.",
            "add rows of the listed labels, or remove them from task.labels (a model cannot learn a class it "
            "never sees)",
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=1), "declared", ERROR)))
    else:
        checks.append(check_def(
            "labels_are_known", f"Every label occurs at least quality.min_rows_per_class "
                                f"({q.min_rows_per_class}) times.",
            "correct the labels that occur only a few times (often typos), declare task.labels, or lower "
            "quality.min_rows_per_class",
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=q.min_rows_per_class), "classes", ERROR)))
    variants = classes.assign(key=[dedup_key(x) for x in classes["label"]]).groupby("key")["label"]
    tables["label_variants"] = pd.DataFrame({"variants": variants.agg(lambda s: " | ".join(sorted(s))),
                                             "count": variants.nunique()}).reset_index(drop=True)
    checks.append(check_def(
        "labels_are_distinct", "No two labels differ only in case, spacing or punctuation ('spam' / 'Spam ').",
        "spell each label one way in the source (the listed variants would train as separate classes), or "
        "declare task.labels",
        (gxe.ExpectColumnValuesToBeBetween(column="count", max_value=1), "label_variants", ERROR)))
    checks.append(check_def(
        "texts_look_like_text",
        f"At most quality.max_id_like_fraction ({q.max_id_like_fraction:g}) of the texts look like ids or "
        "numbers.",
        "point task.text_column at the column that holds the text (this one looks like ids or numbers), or "
        "raise quality.max_id_like_fraction",
        (gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=ID_LIKE,
                                               mostly=1 - q.max_id_like_fraction), "rows", ERROR)))
    if raw_data is not None:
        selected = select_examples(raw_data, spec.task)
        lost, tables["lost"] = lost_examples_check(_example_keys(selected), _example_keys(frame), q.max_lost_fraction,
                                                   clean(selected, spec.cleaning).dropped)
        checks.append(lost)
    checks.append(check_def(
        "text_lengths_within_bounds",
        f"Every text has between {q.min_text_chars} and {q.max_text_chars} characters.",
        "shorten or drop over-long texts (cleaning.max_chars), or widen quality.min/max_text_chars",
        (gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=q.min_text_chars,
                                                 max_value=q.max_text_chars), "rows", ERROR)))
    own_splits = "source_split" in present
    # The source's test split kept whole (cleaning.keep_source_test) may hold the duplicates it came with.
    condition = ({"row_condition": 'source_split != "test"', "condition_parser": "pandas"}
                 if own_splits and spec.cleaning.keep_source_test else {})
    checks.append(check_def(
        "texts_are_unique", "No normalised text occurs twice" + (" within a split" if own_splits else "")
        + (" (the source's test split is kept whole)." if condition else "."),
        "enable cleaning.drop_duplicates, or remove the duplicated rows from the source",
        (gxe.ExpectCompoundColumnsToBeUnique(column_list=["norm_text", "source_split"], **condition) if own_splits
         else gxe.ExpectColumnValuesToBeUnique(column="norm_text"), "rows", ERROR)))
    checks.append(check_def(
        "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
        "provide more labelled rows (or fewer are being dropped by cleaning: see the asset's metadata), "
        "or change quality.min_rows / quality.max_rows",
        (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
    warn_at = largest / q.max_imbalance_ratio if largest else 0
    blocking = [(gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=q.min_rows_per_class), "classes",
                 ERROR)]
    if q.imbalance_error_factor is not None:
        blocking.append((gxe.ExpectColumnValuesToBeBetween(
            column="rows", min_value=largest / (q.max_imbalance_ratio * q.imbalance_error_factor)), "classes",
            ERROR))
    checks.append(check_def(
        "classes_are_balanced",
        f"No class is more than quality.max_imbalance_ratio ({q.max_imbalance_ratio:g}) times smaller than "
        f"the largest (a warning: imbalance is common), and every class has at least quality.min_rows_per_class "
        f"({q.min_rows_per_class}) rows to train and evaluate on (an error)"
        + (f"; over {q.max_imbalance_ratio * q.imbalance_error_factor:g} times is an error too."
           if q.imbalance_error_factor is not None else "."),
        "collect more rows of the small classes, merge them, or lower quality.min_rows_per_class",
        *blocking,
        (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=warn_at), "classes", WARN),
        (gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2), "classes", ERROR)))
    return evaluate_checks("cleaned_dataset", checks, tables)


# ------------------------------------------------------------------------------------------ the model
def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from token states: 'mean' over real tokens, 'cls' (first token), 'max', or 'last'
    (the last real token, which in a decoder has seen the whole text; works with left or right padding)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """Encoder -> pooling -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, pooling: str, num_labels: int, hidden_size: int,
                 dropout: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)
        self.frozen_lower: FrozenLowerBlocks | None = None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> Any:
        """`rows`: the batch's row numbers, while training on cached frozen blocks (FrozenLowerBlocks)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        if rows is not None and self.frozen_lower is not None:
            self.frozen_lower.select(rows, attention_mask)

        logits = self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = (F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing if self.training else 0.0)
                if labels is not None else None)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _PassThrough(nn.Module):
    """Stands in for a frozen block whose output is cached: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class FrozenLowerBlocks:
    """The outputs of the frozen blocks below the first adapted one, computed once for every row and fed to that
    block during training instead of recomputing them at every step.

    The blocks below `cut` have no trainable weights, so their output for a text is the same every epoch (in eval
    mode: the frozen blocks' dropout is off). `append` runs them once over the next rows (length-sorted batches,
    alone or within the linear probe's embedding pass); `attached()` swaps them for pass-throughs and makes block
    `cut` read the cached states of the rows the model is given (`select(rows, attention_mask)`), placed at the
    mask's real-token positions (left or right padding).
    """

    def __init__(self, encoder: nn.Module, cut: int) -> None:
        self.blocks = transformer_blocks(encoder)[1]
        self.cut = cut
        self.states: list[torch.Tensor] = []
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._flat: torch.Tensor | None = None  # every row's states, end to end, where the model computes
        self._offsets: torch.Tensor | None = None  # where each row's states start in _flat

    @torch.no_grad()
    def append(self, encoder: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
               compute: ComputeSettings, batch_size: int = 128, pooling: str | None = None) -> np.ndarray | None:
        """Compute the frozen blocks' outputs for `texts` (the next rows) and keep them. With `pooling`, the whole
        model runs and its pooled embeddings are returned, exactly as `embed_texts` computes them (same batches);
        without, the blocks above are skipped."""
        self._flat = self._offsets = None  # built again from every row's states when next fed
        captured: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        hook = self.blocks[self.cut - 1].register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        upper = list(self.blocks[self.cut:])

        def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            masks.append(inputs["attention_mask"].bool())
            return pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], pooling or "mean")

        device = torch.device(compute.device)
        encoder.eval().to(device)
        try:
            if pooling is None:
                for i in range(self.cut, len(self.blocks)):
                    self.blocks[i] = _PassThrough()
            result = _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)
        finally:
            hook.remove()
            for offset, block in enumerate(upper):
                self.blocks[self.cut + offset] = block
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
        states: list[torch.Tensor | None] = [None] * len(texts)
        for batch, hidden, mask in zip(_batches_by_length(lengths, batch_size), captured, masks, strict=True):
            for row, i in enumerate(batch):  # the batches _forward_batches ran, in its order
                states[i] = hidden[row][mask[row].to(hidden.device)].to(dtype).cpu()
        self.states.extend(states)  # type: ignore[arg-type]
        return result if pooling is not None else None

    @property
    def megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.states) / 2**20

    def select(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.batch = (rows, attention_mask)

    def _stored_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The states as one tensor on `device` (built once per attachment; on a CPU the rows become views of it,
        so the memory is not held twice) and each row's offset in it."""
        if self._flat is None or self._flat.device != device:
            lengths = torch.tensor([len(t) for t in self.states], dtype=torch.long)
            self._flat = torch.cat(self.states).to(device)
            self._offsets = (torch.cumsum(lengths, 0) - lengths).to(device)
            if self._flat.device.type == "cpu":
                self.states = list(torch.split(self._flat, lengths.tolist()))
        return self._flat, self._offsets  # type: ignore[return-value]

    def _feed(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.batch is None:
            raise RuntimeError("FrozenLowerBlocks: the model was called without the rows of the batch")
        rows, mask = self.batch
        hidden = args[0] if args else kwargs["hidden_states"]
        flat, offsets = self._stored_on(hidden.device)
        # A gather computed where the model runs: each real token's place in its row's states (left or right
        # padding alike), no per-row copies and nothing that waits for a GPU to finish.
        real = mask.to(hidden.device).bool()
        within = (real.long().cumsum(1) - 1).clamp(min=0)
        fed = flat[offsets[rows.to(hidden.device)].unsqueeze(1) + within].to(hidden.dtype)
        fed = fed * real.unsqueeze(-1).to(hidden.dtype)
        if args:
            return (fed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fed}

    @contextmanager
    def attached(self) -> Iterator[None]:
        lower = list(self.blocks[:self.cut])
        for i in range(self.cut):
            self.blocks[i] = _PassThrough()
        hook = self.blocks[self.cut].register_forward_pre_hook(self._feed, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            for i, block in enumerate(lower):
                self.blocks[i] = block
            self.batch = None
            if self._flat is not None and self._flat.device.type != "cpu":
                self._flat = self._offsets = None  # the device's memory back; the rows stay on the host


def load_encoder(base: BaseModelRecord) -> nn.Module:
    """The base model's encoder, without the task-specific pooler that sentence encoders never trained."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base.local_path, trust_remote_code=base.trust_remote_code)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------ embeddings
def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def _forward_batches(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any,
                     texts: Sequence[str], max_length: int, batch_size: int, compute: ComputeSettings,
                     device: torch.device) -> np.ndarray:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    outputs: list[np.ndarray | None] = [None] * len(texts)
    for batch in _batches_by_length(lengths, batch_size):  # length-sorted batches: little padding
        features = [{k: encoded[k][i] for k in encoded.keys()} for i in batch]
        padded = tokenizer.pad(features, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in padded.items()}
        with compute.autocast():
            result = fn(inputs).float().cpu().numpy()
        for row, i in enumerate(batch):
            outputs[i] = result[row]
    return np.stack(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)  # type: ignore[arg-type]


def embed_texts(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str, max_length: int,
                compute: ComputeSettings, batch_size: int = 128) -> np.ndarray:
    """Frozen pooled embeddings of `texts` (float32, one row per text, in order)."""
    device = torch.device(compute.device)
    encoder.eval().to(device)

    def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], pooling)

    return _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)


EMBEDDING_CACHE_FILES = 32  # the newest files kept in the embedding cache
FROZEN_STATES_BUDGET_MB = 4096  # the most memory the cached outputs of frozen blocks may take


def _embedding_path(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                    batch_size: int, pooling: str, variant: str | None) -> Path | None:
    """Where frozen_embeddings keeps these embeddings: a digest of everything they depend on (None: no cache)."""
    import hashlib

    if not compute.cache_dir:
        return None
    digest = hashlib.sha256("\0".join([base.weights_sha256, pooling, str(max_length), compute.precision,
                                       compute.device, str(batch_size), torch.__version__]
                                      + ([variant] if variant else [])).encode())
    digest.update(b"\1".join(t.encode("utf-8", "surrogatepass") for t in texts))
    return Path(compute.cache_dir) / "embeddings" / f"{digest.hexdigest()[:32]}.npy"


def cached_embeddings(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                      batch_size: int = 128, pooling: str | None = None,
                      variant: str | None = None) -> np.ndarray | None:
    """The embeddings frozen_embeddings computed earlier for exactly these arguments, or None (nothing computed)."""
    return _load_cached(_embedding_path(base, texts, max_length, compute, batch_size, pooling or base.pooling,
                                        variant), len(texts))


def _load_cached(path: Path | None, rows: int) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # a damaged file is recomputed and replaced
        return None
    if found.shape[0] != rows:
        return None
    path.touch()
    return found


def frozen_embeddings(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                      batch_size: int = 128, load: Callable[[], tuple[nn.Module, Any]] | None = None,
                      pooling: str | None = None, lower: FrozenLowerBlocks | None = None,
                      variant: str | None = None) -> np.ndarray:
    """Pooled embeddings of `texts` by the frozen base model, kept in compute.cache_dir so that the steps which
    need the same ones (the linear-probe head of training, the linear-probe baseline of evaluation) compute them
    once. The cache key is everything the result depends on (weights digest, pooling, length, precision, device,
    batch size, torch version and the texts in order), so a hit returns exactly what computing would.
    `load` returns the (encoder, tokenizer), called on a miss only (default: load them from the base model).
    With `lower`, the outputs of its frozen blocks for `texts` are kept too (from the same pass on a miss).
    `variant` names a `load` whose model differs from the base model as loaded (e.g. cast to bf16): part of the key."""
    from pipelines.core.files import write_bytes_atomic

    pooling = pooling or base.pooling
    load = load or (lambda: (load_encoder(base), load_tokenizer(base.local_path)))
    path = _embedding_path(base, texts, max_length, compute, batch_size, pooling, variant)
    found = _load_cached(path, len(texts))
    if found is not None:
        if lower is not None:  # the embeddings are known; the frozen blocks still run for their states
            lower.append(*load(), texts, max_length, compute, batch_size)
        return found
    cache = path.parent if path is not None else None
    encoder, tokenizer = load()
    result = (lower.append(encoder, tokenizer, texts, max_length, compute, batch_size, pooling) if lower
              else embed_texts(encoder, tokenizer, texts, pooling, max_length, compute, batch_size))
    if path is not None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, result, allow_pickle=False)
        try:
            write_bytes_atomic(path, buffer.getvalue())
            for old in sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)[:-EMBEDDING_CACHE_FILES]:
                old.unlink(missing_ok=True)
        except OSError:  # a cache that cannot be written costs time, never the result
            pass
    return result


def frozen_reader(record: BaseModelRecord, compute: ComputeSettings) -> tuple[Callable[[], tuple[nn.Module, Any]],
                                                                             str | None]:
    """(load, variant) for frozen_embeddings of a model that is only read (the selection probe, the data doctor):
    loaded once and only on a cache miss. Under bf16 it holds bf16 weights, since autocast would cast every weight
    again for every batch (a quarter of SmolLM2's probe); such embeddings are kept under their own cache key."""
    variant = "bf16-weights" if compute.precision == "bf16" else None

    @functools.cache
    def load() -> tuple[nn.Module, Any]:
        encoder = load_encoder(record)
        return (encoder.to(torch.bfloat16) if variant else encoder), load_tokenizer(record.local_path)

    return load, variant


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None,
                     val_y: np.ndarray | None, device: str = "cpu") -> LinearProbe:
    """Logistic regression on standardized frozen embeddings (pipelines/core/linear_probe.py, fitted in torch on
    `device`); C chosen on validation when there is one.

    Standardizing matters for decoders: their hidden states have a few dimensions hundreds of times larger than the
    rest, and L-BFGS on them took 7 s where it takes 1 s on standardized features (SmolLM2, 1,024 rows)."""
    candidates = (0.01, 0.1, 1.0) if val_x is not None and len(val_x) else (0.1,)
    best, best_score = None, -1.0
    for c in candidates:
        probe = fit_probe(train_x, train_y, c, device)
        score = probe.score(val_x, val_y) if len(candidates) > 1 else 0.0
        if score > best_score:
            best, best_score = probe, score
    return best


def _head_from_probe(head: nn.Linear, probe: LinearProbe, num_labels: int) -> None:
    """Start the head from the fitted probe: the scaler folded into the regression's weights, so that the head on
    raw embeddings computes the probe's logits (w / scale, b - w . mean / scale). A label the probe never saw in
    training gets no weight and a bias below every other, so the head starts by never predicting it."""
    weight = np.asarray(probe.coef_, dtype=np.float64) / probe.scale_
    intercept = np.asarray(probe.intercept_, dtype=np.float64) - weight @ probe.mean_
    rows = np.asarray(probe.classes_, dtype=np.int64)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(intercept.min()) - 10.0 if len(rows) < num_labels else 0.0)
        head.weight[torch.as_tensor(rows)] = torch.tensor(weight, dtype=head.weight.dtype)
        head.bias[torch.as_tensor(rows)] = torch.tensor(intercept, dtype=head.bias.dtype)


# ---------------------------------------------------------------------------------------- training
def _classification_metrics(eval_pred: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0))}


def _tokenized(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int,
               rows: Sequence[int]) -> Any:
    from datasets import Dataset

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    columns = {k: encoded[k] for k in encoded.keys()}
    columns["labels"] = list(labels)
    columns["rows"] = list(rows)  # where the row's cached frozen-block states are (FrozenLowerBlocks)
    return Dataset.from_dict(columns)


def build_training_arguments(cfg: Any, output_dir: Path, compute: ComputeSettings, has_validation: bool,
                             eval_batch_size: int) -> Any:
    """The one place transformers.TrainingArguments are built (the common part comes from the kernel)."""
    from transformers import TrainingArguments

    return TrainingArguments(**common_training_arguments(cfg, output_dir, compute, has_validation, eval_batch_size),
                             label_names=["labels"])


def train_classifier(splits: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec, out_dir: Path,
                     compute: ComputeSettings, progress: ProgressFn = print,
                     sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
    """Fine-tune `base` with LoRA on the train split, pick the best epoch on validation, save to `out_dir`.
    With `scratch`, resumable checkpoints go there (training.checkpoint_every) and an interrupted run resumes."""
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    cfg = spec.training
    compute.apply()
    train = splits[splits["split"] == "train"]
    validation = splits[splits["split"] == "validation"]
    labels = tuple(sorted(set(splits["label"])))
    index = {label: i for i, label in enumerate(labels)}
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(base.local_path)
    encoder = load_encoder(base)
    own_dropout = set_model_dropout(encoder, cfg.model_dropout)
    model = PooledClassifier(encoder, base.pooling, len(labels), base.hidden_size, dropout=cfg.head_dropout,
                             label_smoothing=cfg.label_smoothing)

    num_layers = len(transformer_blocks(encoder)[1]) if cfg.lora.top_layers else None
    adapted = lora_layers(cfg.lora, num_layers) if num_layers else None
    # The blocks below the adapters never change: their outputs are computed once (with the linear probe's
    # embeddings, in the same pass), not at every step of every epoch.
    lower = FrozenLowerBlocks(encoder, adapted[0]) if adapted else None
    if lower is not None:
        tokens = sum(len(ids) for ids in tokenizer(train["text"].tolist() + validation["text"].tolist(),
                                                   truncation=True, max_length=cfg.max_length)["input_ids"])
        needed = tokens * base.hidden_size * (2 if compute.precision == "bf16" else 4) / 2**20
        if needed > FROZEN_STATES_BUDGET_MB:
            progress(f"frozen blocks 0-{lower.cut - 1}: not cached (their outputs would take {needed:,.0f} MB, over "
                     f"{FROZEN_STATES_BUDGET_MB:,} MB); each step runs them")
            lower = None
    started = time.monotonic()
    if cfg.head_init == "linear_probe":
        progress(f"linear probe: embedding {len(train) + len(validation)} rows with the frozen base model")
        train_x = frozen_embeddings(base, train["text"].tolist(), cfg.max_length, compute,
                                    load=lambda: (encoder, tokenizer), lower=lower)
        val_x = (frozen_embeddings(base, validation["text"].tolist(), cfg.max_length, compute,
                                   load=lambda: (encoder, tokenizer), lower=lower) if len(validation) else None)
        probe = fit_linear_probe(train_x, train["label"].map(index).to_numpy(), val_x,
                                 validation["label"].map(index).to_numpy() if len(validation) else None,
                                 compute.device)
        _head_from_probe(model.head, probe, len(labels))
        if val_x is not None:
            progress(f"linear probe: validation accuracy {probe.score(val_x, validation['label'].map(index)):.4f}")
    elif lower is not None:
        lower.append(encoder, tokenizer, train["text"].tolist() + validation["text"].tolist(), cfg.max_length,
                     compute)
    if lower is not None:
        progress(f"frozen blocks 0-{lower.cut - 1}: computed once for {len(lower.states)} rows "
                 f"({lower.megabytes:.0f} MB; {time.monotonic() - started:.1f} s"
                 + (" with the linear probe" if cfg.head_init == "linear_probe" else "")
                 + f"); each step runs blocks {lower.cut}-{num_layers - 1}")
    model.encoder = get_peft_model(encoder, build_lora_config(cfg.lora, base, "FEATURE_EXTRACTION", encoder))
    store_frozen_weights_for(model, compute)
    trainable, total = trainable_parameters(model)
    progress(f"LoRA r={cfg.lora.r}" + (f" on blocks {adapted[0]}-{adapted[-1]} of {num_layers}" if adapted else "")
             + f": {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%}); pooling={base.pooling}; "
             f"precision={compute.precision}" + dropout_note(cfg.model_dropout, own_dropout))

    model.frozen_lower = lower
    rows = list(range(len(train) + len(validation)))
    train_ds = _tokenized(tokenizer, train["text"].tolist(), train["label"].map(index).tolist(), cfg.max_length,
                          rows[:len(train)])
    val_ds = (_tokenized(tokenizer, validation["text"].tolist(), validation["label"].map(index).tolist(),
                         cfg.max_length, rows[len(train):]) if len(validation) else None)
    head_ids = {id(p) for p in model.head.parameters()}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW([
        {"params": adapter_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        {"params": list(model.head.parameters()), "lr": cfg.head_learning_rate or cfg.learning_rate,
         "weight_decay": cfg.weight_decay},
    ])
    select_by = spec.evaluation.primary_metric  # the epoch kept is the best on validation by this metric
    callback = best_epoch_callback(model, progress, sink, select_by)

    def make_trainer(scratch: Path) -> Any:
        args = build_training_arguments(cfg, scratch, compute, val_ds is not None, spec.evaluation.batch_size)
        return with_global_batch_order(Trainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                                data_collator=DataCollatorWithPadding(tokenizer),
                                                compute_metrics=_classification_metrics,
                                                optimizers=(optimizer, None), callbacks=[callback])

    data_sha256 = frame_digest(splits)  # the same digest the splits asset reports: lineage joins on it
    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256,
                                   compute.world_size)
    with model.frozen_lower.attached() if model.frozen_lower else nullcontext(), fused_lora(model):
        outcome = run_trainer(make_trainer, callback, progress, select_by, resumable)
    model.frozen_lower = None  # the whole model again, for saving and inference
    real_tokens = float(sum(len(ids) for ids in train_ds["input_ids"])) * cfg.epochs
    model.eval()

    def write_files(folder: Path) -> None:
        from safetensors.torch import save_file

        model.encoder.save_pretrained(str(folder / "adapter"))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()},
                  str(folder / "head.safetensors"))
        tokenizer.save_pretrained(str(folder / "tokenizer"))

    manifest = checkpoint_manifest(NAME, base, spec.spec_hash, data_sha256, WEIGHT_FILES, labels,
                                   pooling=model.pooling, hidden_size=model.head.in_features)
    path = save_trained(out_dir, write_files, manifest, spec.to_yaml(), outcome, resumable)
    speed = real_tokens / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    mfu = model_flops_utilization(encoder.config.to_dict(), base.parameter_count, real_tokens,
                                  int(len(train) * cfg.epochs), outcome.train_seconds, False, compute,
                                  share=len(adapted) / num_layers if adapted and num_layers else 1.0)
    progress(f"saved adapter and head to {path} ({speed:.0f} tokens/s, MFU {mfu:.1%}, peak memory "
             f"{peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHT_FILES), base_model=base,
        spec_hash=spec.spec_hash, data_sha256=data_sha256, labels=labels, train_rows=len(train),
        validation_rows=len(validation), best_epoch=outcome.best_epoch, trainable_parameters=trainable,
        train_seconds=outcome.train_seconds, tokens_per_second=speed, precision=compute.precision,
        peak_memory_mb=peak_memory_mb(), history=outcome.history, mfu=mfu)


def load_classifier(record: CheckpointRecord) -> tuple[PooledClassifier, Any]:
    """Load a checkpoint for inference, after checking its weights against the record's digest."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = verified_folder(record, WEIGHT_FILES)
    encoder = load_encoder(record.base_model)
    model = PooledClassifier(encoder, record.base_model.pooling, len(record.labels), record.base_model.hidden_size)
    model.encoder = PeftModel.from_pretrained(encoder, str(path / "adapter"))
    model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    model.eval()
    return model, load_tokenizer(path / "tokenizer")


def predict_proba(model: PooledClassifier, tokenizer: Any, texts: Sequence[str], max_length: int,
                  compute: ComputeSettings, batch_size: int = 128) -> np.ndarray:
    """Class probabilities for `texts`, one row per text, in order."""
    device = torch.device(compute.device)
    model.eval().to(device)

    def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(model(**inputs).logits.float(), dim=-1)

    return _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)


# -------------------------------------------------------------------------------------------- evaluation
def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and precision / recall / F1 averaged over classes (macro) and over rows (weighted)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_labels)),
                                                     average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    return out


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_metric(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, metric: str, seed: int,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """`metric` (accuracy, macro_f1, weighted_f1, ...) on `resamples` bootstrap resamples of the rows, as
    classification_metrics computes it. The resamples depend only on the seed and the number of rows, so two
    models' predictions on the same rows are scored on the same resamples (a paired bootstrap)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n, k = len(y_true), num_labels
    if n == 0:
        return np.zeros(resamples)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    codes = (y_true[rows] * k + y_pred[rows]) + (np.arange(resamples) * k * k)[:, None]
    confusion = np.bincount(codes.ravel(), minlength=resamples * k * k).reshape(resamples, k, k).astype(float)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    if metric == "accuracy":
        return tp.sum(1) / n
    support, predicted = confusion.sum(2), confusion.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    kind, _, name = metric.partition("_")
    values = {"precision": precision, "recall": recall, "f1": f1}[name]
    if kind == "macro":
        return values.mean(1)
    return (values * support).sum(1) / n


def per_class_table(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(labels))),
                                                 zero_division=0)
    return [{"label": label, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, label in enumerate(labels)]


SAMPLE_ERRORS = 20  # test rows the model got wrong, shown in the report


def sample_errors(test: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> ReportTable:
    """The test rows the model got wrong (the first SAMPLE_ERRORS, in test order): text, true and predicted label,
    and the file and row each came from."""
    wrong = np.flatnonzero(np.asarray(y_pred) != np.asarray(y_true))
    shown = wrong[:SAMPLE_ERRORS]
    where = (test["source_file"].astype(str) + ":" + test["source_row"].astype(str)
             if {"source_file", "source_row"} <= set(test.columns) else pd.Series([""] * len(test)))
    rows = tuple((test["text"].iloc[i], labels[int(y_true[i])], labels[int(y_pred[i])], where.iloc[i]) for i in shown)
    return ReportTable(f"Sample errors: {len(wrong)} of {len(test)} test rows wrong"
                       + (f" (the first {len(shown)})" if len(wrong) > len(shown) else ""),
                       ("text", "true label", "predicted label", "source"), rows)


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """A confusion-matrix heat map with counts, rows = true class, columns = predicted class."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(labels) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())



def _predicted_labels(record: CheckpointRecord, texts: list[str], max_length: int, compute: ComputeSettings,
                      batch_size: int) -> np.ndarray:
    model, tokenizer = load_classifier(record)
    return predict_proba(model, tokenizer, texts, max_length, compute, batch_size).argmax(-1)


def evaluate_classifier(splits: pd.DataFrame, checkpoint: CheckpointRecord, spec: PipelineSpec, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
    """Metrics of the checkpoint, its baselines (majority class, linear probe, prompting `prompt_model`) and the
    current champion (if any) on the test split; decides promotion; writes JSON, HTML and the confusion matrix to
    `out_dir`."""
    from sklearn.metrics import confusion_matrix

    compute.apply()
    labels = checkpoint.labels
    index = {label: i for i, label in enumerate(labels)}
    train, validation, test = (splits[splits["split"] == s] for s in ("train", "validation", "test"))
    unknown = sorted(set(test["label"]) - set(labels))
    if unknown:
        raise CheckpointError(f"the test split has labels the checkpoint was not trained on: {unknown}")
    y_test = test["label"].map(index).to_numpy()
    max_length, batch = spec.training.max_length, spec.evaluation.batch_size
    y_pred = _predicted_labels(checkpoint, test["text"].tolist(), max_length, compute, batch)
    metrics = classification_metrics(y_test, y_pred, len(labels))
    matrix = confusion_matrix(y_test, y_pred, labels=list(range(len(labels))))

    baselines: dict[str, dict[str, float]] = {}
    if "majority_class" in spec.evaluation.baselines:
        majority = index[train["label"].value_counts().idxmax()]
        baselines["majority_class"] = classification_metrics(y_test, np.full(len(y_test), majority), len(labels))
    if "linear_probe" in spec.evaluation.baselines:
        base = checkpoint.base_model

        @functools.cache
        def frozen() -> tuple[nn.Module, Any]:  # loaded once, and only if an embedding is not cached
            return load_encoder(base), load_tokenizer(base.local_path)

        def embed(frame: pd.DataFrame) -> np.ndarray:  # train and validation as training embedded them: cached
            return frozen_embeddings(base, frame["text"].tolist(), max_length, compute, load=frozen)

        probe = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(),
                                 embed(validation) if len(validation) else None,
                                 validation["label"].map(index).to_numpy() if len(validation) else None,
                                 compute.device)
        baselines["linear_probe"] = classification_metrics(y_test, probe.predict(embed(test)), len(labels))

    if "prompting" in spec.evaluation.baselines:
        if prompt_model is None:
            raise CheckpointError("evaluation.baselines lists prompting, but no prompted model was pinned")
        prompting = spec.evaluation.prompting
        predicted_by = classification_prompting(
            prompt_model.local_path, prompt_model.weights_sha256, train, test["text"].tolist(), labels,
            prompting.label_names, prompting.shots, spec.training.seed, compute, prompting.batch_size, progress)
        for shots, predicted in predicted_by.items():
            baselines[f"prompt_{shots}_shot"] = classification_metrics(y_test, predicted, len(labels))

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        missing = sorted(set(test["label"]) - set(record.labels))
        if missing:
            raise CheckpointError(f"the champion (v{record.model_version}) does not know the labels {missing} of "
                                  "this test split")
        predicted = np.array(record.labels)[_predicted_labels(record, test["text"].tolist(), max_length, compute,
                                                              batch)]
        return classification_metrics(y_test, [index.get(label, -1) for label in predicted], len(labels))

    per_class = per_class_table(y_test, y_pred, labels)
    errors = sample_errors(test, y_test, y_pred, labels)
    png = out_dir / "confusion_matrix.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(matrix, labels, png, f"{spec.name}: test confusion matrix")
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=len(test), headline=f"{len(test)} test rows",
        metric_names=REPORT_METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(ReportTable("Per class", ("class", "precision", "recall", "F1", "support"),
                            tuple((r["label"], r["precision"], r["recall"], r["f1"], r["support"])
                                  for r in per_class)), errors),
        images=(("Confusion matrix", png.name),),
        details={"labels": list(labels), "per_class": per_class,
                 "confusion_matrix": [[int(v) for v in row] for row in matrix]},
        files={"confusion_matrix": str(png)})


# ------------------------------------------------------------------------------------------------ the task
class ClassificationTask(TaskBase):
    """Text classification: one text column to one label column."""

    name = NAME
    config_class = ClassificationTaskConfig
    evaluation_defaults = {"primary_metric": "macro_f1", "baselines": ("majority_class", "linear_probe")}
    primary_metrics = ("accuracy", "macro_f1", "weighted_f1")
    baselines = ("majority_class", "linear_probe", "prompting")
    split_group_column = "label"
    prepared: PreparedData | None = None
    descriptions = {
        "cleaned_dataset": "Normalised (text, label) rows without empty, over-long, conflicting or duplicate rows.",
        "finetuned_checkpoint": "LoRA adapter and classifier head trained on the train split, best epoch chosen "
                                "on validation.",
        "evaluation_report": "Test metrics of the checkpoint against two baselines and the champion; promotes it "
                             "if it wins.",
    }
    weight_files = WEIGHT_FILES
    predicts_tokens = False  # logits over a few classes: no vocabulary-sized term in training memory
    legacy_metadata_file = "classifier.json"  # what checkpoints of earlier releases hold instead of a manifest
    report_kinds = frozenset({"scikitlearn", "matplotlib"})  # metrics by scikit-learn, plots by matplotlib
    auto_model_class = "AutoModel"
    trainer_name = "transformers.Trainer"

    def clean(self, raw: pd.DataFrame, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        result = clean(select_examples(raw, spec.task), spec.cleaning)  # type: ignore[arg-type]
        counts = result.counts("label")
        total = sum(counts.values()) or 1
        return result.frame, cleaning_log(spec.name, result, spec.cleaning, "rows", {
            "num_classes": len(counts),
            "class_distribution": Markdown(markdown_table(["class", "rows", "share"],
                                                          [[k, v, f"{v / total:.1%}"] for k, v in counts.items()])),
        })

    def quality_suites(self, spec: PipelineSpec) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            return validate_splits(value, spec.splits, spec.quality, "label", every_group_in_train_and_test=True)

        cleaned = tuple(c for c in CLEANED_CHECKS if c != "declared_labels_have_rows" or spec.task.labels is not None)
        return (QualitySuite("cleaned_dataset", cleaned, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_examples(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        raise NotImplementedError("text classification trains on the splits directly; it has no prepared data")

    def model_support(self, config: dict[str, Any]) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        model_type = config.get("model_type")
        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            return f"cannot do {NAME}: transformers has no AutoModelForSequenceClassification for {model_type!r}"
        return None

    def mean_tokens(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame) -> float:
        sample = sample_split(splits, "train", 256, spec.training.seed)
        encoded = load_tokenizer(record.local_path)(sample["text"].tolist(), truncation=True,
                                                    max_length=spec.training.max_length)
        return float(np.mean([len(ids) for ids in encoded["input_ids"]])) if len(sample) else 1.0

    def time_train_step(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        from peft import get_peft_model

        cfg = spec.training
        batch_rows = sample_split(splits, "train", cfg.batch_size, cfg.seed)
        tokenizer = load_tokenizer(record.local_path)
        encoder = load_encoder(record)
        set_model_dropout(encoder, cfg.model_dropout)
        model = PooledClassifier(encoder, record.pooling, max(2, splits["label"].nunique()), record.hidden_size,
                                 dropout=cfg.head_dropout)
        model.encoder = get_peft_model(encoder, build_lora_config(cfg.lora, record, "FEATURE_EXTRACTION"))
        inputs = dict(tokenizer(batch_rows["text"].tolist(), truncation=True, max_length=cfg.max_length,
                                padding=True, return_tensors="pt"))
        inputs["labels"] = torch.zeros(len(batch_rows), dtype=torch.long)
        return time_training_steps(model, inputs, compute, steps)

    def probe(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """A logistic regression on frozen embeddings of a train sample, scored on a validation sample, with the
        score on 1,000 bootstrap resamples of that sample (the same resamples for every candidate)."""
        probe, seed = spec.base_model.probe, spec.training.seed
        validation = sample_split(splits, "validation", probe.sample_rows, seed)
        train = sample_split(splits, "train", 4 * probe.sample_rows, seed)
        labels = sorted(set(splits["label"]))
        index = {label: i for i, label in enumerate(labels)}
        load, variant = frozen_reader(record, compute)

        def embed(frame: pd.DataFrame) -> np.ndarray:  # kept in the embedding cache: probing again is instant
            # The whole split's embeddings when a step has computed them (the data doctor, when its model is this
            # candidate, embeds every split): the sample's rows are taken from them instead of run again.
            whole = splits[splits["split"] == frame["split"].iloc[0]] if len(frame) else frame
            found = cached_embeddings(record, whole["text"].tolist(), spec.training.max_length, compute,
                                      variant=variant) if whole.index.is_unique and len(frame) else None
            if found is not None:
                return found[whole.index.get_indexer(frame.index)]
            return frozen_embeddings(record, frame["text"].tolist(), spec.training.max_length, compute, batch_size=64,
                                     load=load, variant=variant)

        fitted = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(), None, None, compute.device)
        metric = spec.evaluation.primary_metric
        truth = validation["label"].map(index).to_numpy()
        predicted = fitted.predict(embed(validation))
        value = classification_metrics(truth, predicted, len(labels))[metric]
        replicates = bootstrap_metric(truth, predicted, len(labels), metric, seed)
        return ProbeResult(f"linear_probe_{metric}", value, value, replicates)

    doctor_supported = True
    prompts_another_model = True  # an instruction-tuned model picks among the label names
    sweep_metrics = {"macro_f1": "maximize", "accuracy": "maximize", "weighted_f1": "maximize"}

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: PipelineSpec, compute: ComputeSettings,
               progress: ProgressFn = print) -> DoctorReport:
        """Label suspects, cross-class near-duplicates and a learning curve from `encoder`'s frozen embeddings of
        every row (pipelines/core/doctor.py)."""
        cfg, seed = spec.doctor, spec.training.seed
        frame = splits.reset_index(drop=True)
        labels = sorted(set(frame["label"]) | set(spec.task.labels or ()))
        started = time.perf_counter()

        @functools.cache
        def frozen() -> tuple[nn.Module, Any]:  # loaded once, and only if an embedding is not cached
            return load_encoder(encoder), load_tokenizer(encoder.local_path)

        # Split by split, as training's linear-probe head and evaluation's linear-probe baseline embed them (same
        # cache key): when the doctor's encoder is the chosen base model, they find these embeddings cached.
        embeddings = np.zeros((len(frame), encoder.hidden_size), dtype=np.float32)
        for split in ("train", "validation", "test"):
            rows = np.flatnonzero((frame["split"] == split).to_numpy())
            if len(rows):
                embeddings[rows] = frozen_embeddings(encoder, frame["text"].iloc[rows].tolist(),
                                                     spec.training.max_length, compute, load=frozen)
        progress(f"embedded {len(frame):,} rows with {encoder.name} in {time.perf_counter() - started:.1f} s "
                 "(kept in the embedding cache, where training and evaluation find them)")
        metric = spec.evaluation.primary_metric

        def score(truth: np.ndarray, predicted: np.ndarray) -> float:
            return classification_metrics(truth, predicted, len(labels))[metric]

        return examine(frame, embeddings, labels, metric, score,
                       lambda x, y: fit_linear_probe(x, y, None, None, compute.device), encoder.name, cfg.folds,
                       cfg.duplicate_similarity, cfg.learning_curve, seed, progress)

    train = staticmethod(train_classifier)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_accuracy" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation accuracy", "validation macro-F1", "validation loss"],
                              [[f"{h['epoch']:g}", h["eval_accuracy"], h["eval_macro_f1"], h["eval_loss"]]
                               for h in epochs])

    evaluate = staticmethod(evaluate_classifier)

    def predict(self, record: CheckpointRecord, texts: list[str], compute: ComputeSettings,
                max_new_tokens: int) -> list[dict[str, Any]]:
        model, tokenizer = load_classifier(record)
        probs = predict_proba(model, tokenizer, texts, 512, compute)
        return [{"label": record.labels[int(row.argmax())], "probability": round(float(row.max()), 4), "text": text}
                for text, row in zip(texts, probs, strict=True)]

    def export(self, record: CheckpointRecord, out_dir: Path) -> Path:
        raise CheckpointError(f"v{record.model_version} is a {NAME} model (a LoRA adapter with a classifier head); "
                              "`tuneline export` merges the adapters of instruction-tuned chat models")
