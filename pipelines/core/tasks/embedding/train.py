"""Fine-tuning a sentence-transformers model for retrieval: the training pairs (positives drawn from a label, hard
negatives mined from the base model's ranking), the loss, batches without in-batch false negatives, full or LoRA
fine-tuning with SentenceTransformerTrainer through the shared kernel, and loading a checkpoint back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

from pipelines.core.digests import checkpoint_digest, frame_digest
from pipelines.core.markdown import markdown_table
from pipelines.core.records import BaseModelRecord, CheckpointRecord, Markdown, StepLog
from pipelines.core.tasks.embedding import NAME, WEIGHT_FILES
from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig
from pipelines.core.tasks.embedding.retrieval import (Scorer, load_sentence_model, rank_by_model,
                                                      retrieval_set)
from pipelines.core.training.arguments import build_lora_config, common_training_arguments
from pipelines.core.training.checkpoints import checkpoint_manifest, verified_folder
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.cost import model_flops_utilization
from pipelines.core.training.loop import best_epoch_callback, run_trainer, save_trained, time_training_steps
from pipelines.core.training.model import peak_memory_mb, trainable_parameters
from pipelines.core.training.resume import Resumable

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

GROUP_WINDOW = 50  # batches whose rows are sorted by length together (training.group_by_length)
SELECT_BY = "ndcg_at_10"  # the validation metric whose best epoch is kept


# ------------------------------------------------------------------------------------------ training pairs
def _negative_columns(frame: pd.DataFrame) -> int:
    lengths = [len(v) for v in frame.get("negatives", pd.Series(dtype=object)) if isinstance(v, (list, np.ndarray))]
    return min(lengths) if lengths else 0


def training_pairs(splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                   progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
    """The splits with what training reads added to the train rows: `positive` (the row's document; with
    task.relevance_label_column another train text of the same label, drawn with training.seed) and `negatives` (the
    row's given negative, or hard negatives mined from the base model's ranking of the corpus, never a relevant
    document)."""
    task: EmbeddingTaskConfig = spec.task
    frame = splits.copy()
    train = frame["split"] == "train"
    rng = np.random.default_rng(spec.training.seed)
    positives: list[Any] = [None] * len(frame)
    negatives: list[Any] = [None] * len(frame)
    no_positive = 0
    if task.mode == "labels":
        members: dict[str, list[int]] = {}
        for i in np.flatnonzero(train.to_numpy()):
            members.setdefault(str(frame["group"].iat[i]), []).append(int(i))
        for rows in members.values():
            for i in rows:
                others = [j for j in rows if j != i]
                if not others:
                    no_positive += 1
                    continue
                positives[i] = frame["text"].iat[others[int(rng.integers(len(others)))]]
    else:
        for i in np.flatnonzero(train.to_numpy()):
            positives[i] = frame["document"].iat[i]
            if isinstance(frame["negative"].iat[i], str):
                negatives[i] = [frame["negative"].iat[i]]
    frame["positive"] = pd.Series(positives, index=frame.index, dtype=object)
    frame["negatives"] = pd.Series(negatives, index=frame.index, dtype=object)
    mined = random_fill = 0
    if task.hard_negatives.enabled:
        mined, random_fill = _mine(frame, base, spec, compute, rng, progress)
    pairs = int(frame["positive"].notna().sum())
    shown = frame[frame["positive"].notna()].head(5)
    digest = frame_digest(frame)
    return frame, StepLog(
        data_version=digest[:32],
        message=f"{pairs} training pairs" + (f", {mined} hard negatives mined" if task.hard_negatives.enabled else ""),
        metadata={"dagster/row_count": len(frame), "training_pairs": pairs,
                  "train_texts_without_a_positive": no_positive, "negatives_per_pair": _negative_columns(frame),
                  "hard_negatives_mined": mined, "random_negatives_filled": random_fill,
                  "loss": task.loss, "preview": Markdown(markdown_table(
                      ["anchor", "positive", "negatives"],
                      [[r.text, r.positive, " | ".join(r.negatives) if isinstance(r.negatives, (list, np.ndarray))
                        else ""] for r in shown.itertuples()], 80)),
                  "sha256": digest},
        metrics={"training_pairs": pairs, "hard_negatives_mined": mined})


def _mine(frame: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
          rng: np.random.Generator, progress: ProgressFn) -> tuple[int, int]:
    """Hard negatives for every training pair, by sentence_transformers.util.mine_hard_negatives over the whole
    corpus with the base model; a mined document relevant to the anchor (its label's texts, its own documents) is
    never kept. Pairs left short of task.hard_negatives.count get random corpus documents (counted)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    task: EmbeddingTaskConfig = spec.task
    cfg = task.hard_negatives
    sets = retrieval_set(frame, task)
    corpus = list(sets.corpus_texts)
    rows = np.flatnonzero(frame["positive"].notna().to_numpy())
    anchors = [frame["text"].iat[i] for i in rows]
    model = load_sentence_model(base.local_path, compute, spec.training.max_length)
    extra = cfg.count + (20 if task.mode == "labels" else 5)  # room for dropping relevant ones
    progress(f"mining {cfg.count} hard negative(s) for {len(rows)} pairs from a corpus of {len(corpus)} documents")
    dataset = Dataset.from_dict({"anchor": anchors, "positive": [frame["positive"].iat[i] for i in rows]})
    mined = mine_hard_negatives(dataset, model, corpus=corpus, range_min=cfg.range_min,
                                range_max=max(cfg.range_max, extra), relative_margin=cfg.relative_margin,
                                num_negatives=min(extra, cfg.range_max - cfg.range_min), sampling_strategy="top",
                                output_format="labeled-list", batch_size=spec.evaluation.batch_size, verbose=False)
    found: dict[str, list[str]] = {}
    for record in mined:
        candidates = [t for t, label in zip(record["candidates"], record["labels"], strict=True) if not label]
        found.setdefault(record["anchor"], candidates)
    texts = sets.document_text()
    relevant_text: dict[str, set[str]] = {}
    for split, by_query in sets.relevant.items():
        for qid, docs in by_query.items():
            relevant_text.setdefault(qid, set()).update(texts.get(d, "") for d in docs)
    count = random_fill = 0
    for i, anchor in zip(rows, anchors, strict=True):
        qid = sets.query_ids.get(frame["norm_text"].iat[i], "")
        own = relevant_text.get(qid, set()) | {frame["positive"].iat[i], anchor}
        chosen = [t for t in found.get(anchor, []) if t not in own][:cfg.count]
        count += len(chosen)
        while len(chosen) < cfg.count:  # too few hard ones: a random document that is not relevant
            pick = corpus[int(rng.integers(len(corpus)))]
            if pick not in own and pick not in chosen:
                chosen.append(pick)
                random_fill += 1
        given = frame["negatives"].iat[i]
        frame.at[frame.index[i], "negatives"] = (list(given) if isinstance(given, (list, np.ndarray)) else []) + chosen
    return count, random_fill


# ------------------------------------------------------------------------------------------------ batches
class DisjointKeysBatchSampler(DefaultBatchSampler):
    """Batches that never hold two rows sharing a key (a query, a document, a label): every other row of a batch is
    a true negative for the in-batch ranking losses. Rows that do not fit a batch wait for the next one; an epoch
    ends when the rows left cannot fill half a batch. The order is drawn from the trainer's seed and the epoch.

    With `lengths` (each row's length in characters), the shuffled rows are sorted by length within windows of
    GROUP_WINDOW batches before batches are formed, and the batches are then shuffled: a batch holds texts of similar
    length, so little of each step is padding, while every batch is still drawn from across the whole set."""

    def __init__(self, dataset: Any, keys: Sequence[frozenset[str]], lengths: Sequence[int] = (),
                 **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.keys = keys
        self.lengths = lengths

    def _plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + epoch)
        pending = torch.randperm(len(self.keys), generator=generator).tolist()
        if self.lengths:
            window = self.batch_size * GROUP_WINDOW
            pending = [i for start in range(0, len(pending), window)
                       for i in sorted(pending[start:start + window], key=lambda i: self.lengths[i])]
        batches = []
        while pending:
            batch: list[int] = []
            used: set[str] = set()
            rest: list[int] = []
            for i in pending:
                if len(batch) < self.batch_size and used.isdisjoint(self.keys[i]):
                    batch.append(i)
                    used |= self.keys[i]
                else:
                    rest.append(i)
            # What is left shares keys (a few labels): batches of one or two rows teach nothing and would be most
            # of the steps; the rows wait for another epoch's order.
            if len(batch) < self.batch_size and (self.drop_last or len(batch) < max(2, self.batch_size // 2)):
                break
            batches.append(batch)
            pending = rest
        if self.lengths:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Any:
        yield from self._plan(self.epoch)

    def __len__(self) -> int:
        if not hasattr(self, "_length"):
            self._length = len(self._plan(0))
        return self._length


@dataclass(frozen=True)
class disjoint_batch_sampler:  # noqa: N801 (a factory the trainer calls, named like one)
    """What SentenceTransformerTrainingArguments(batch_sampler=...) calls to make a DisjointKeysBatchSampler over
    rows with these keys; a plain object, so that resumable checkpoints can pickle the arguments."""

    keys: tuple[frozenset[str], ...]
    lengths: tuple[int, ...] = ()  # each row's length: batches of similar lengths (empty: no grouping)

    def __call__(self, dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: Any = None,
                 generator: Any = None, seed: int = 0) -> DisjointKeysBatchSampler:
        return DisjointKeysBatchSampler(dataset, self.keys, self.lengths, batch_size=batch_size, drop_last=drop_last,
                                        valid_label_columns=valid_label_columns, generator=generator, seed=seed)


def train_dataset(data: pd.DataFrame, task: EmbeddingTaskConfig) -> tuple[Any, list[frozenset[str]]]:
    """The train rows as the loss reads them (columns in the loss's order), and each row's keys for the batches."""
    from datasets import Dataset

    from pipelines.core.cleaning import dedup_key

    rows = data[(data["split"] == "train") & data["positive"].notna()]
    if task.loss == "cosent":
        return Dataset.from_dict({"sentence1": rows["text"].tolist(), "sentence2": rows["positive"].tolist(),
                                  "score": rows["score"].astype(float).tolist()}), []
    negatives = [list(v) if isinstance(v, (list, np.ndarray)) else [] for v in rows["negatives"]]
    width = min((len(n) for n in negatives), default=0)
    columns: dict[str, list[Any]] = {"anchor": rows["text"].tolist(), "positive": rows["positive"].tolist()}
    keys = []
    for text, positive, group, negs in zip(rows["text"], rows["positive"], rows["group"], negatives, strict=True):
        found = {"q" + dedup_key(text), "d" + dedup_key(positive), *("d" + dedup_key(n) for n in negs[:width])}
        if task.mode == "labels":
            found.add("g" + str(group))
        keys.append(frozenset(found))
    if task.loss == "triplet":  # one (anchor, positive, negative) row per negative
        if width == 0:
            raise ValueError("task.loss triplet needs a negative for every training pair: set task.negative_column "
                             "(with a value on every row) or task.hard_negatives.enabled")
        expanded = {"anchor": [], "positive": [], "negative": []}
        for anchor, positive, negs in zip(columns["anchor"], columns["positive"], negatives, strict=True):
            for negative in negs[:width]:
                expanded["anchor"].append(anchor)
                expanded["positive"].append(positive)
                expanded["negative"].append(negative)
        return Dataset.from_dict(expanded), [k for k, negs in zip(keys, negatives, strict=True)
                                             for _ in negs[:width]]
    for n in range(width):
        columns[f"negative_{n + 1}"] = [negs[n] for negs in negatives]
    return Dataset.from_dict(columns), keys


def row_lengths(dataset: Any) -> tuple[int, ...]:
    """Each training row's length: the characters of its texts (every column but a score)."""
    columns = [list(dataset[c]) for c in dataset.column_names if c != "score"]
    return tuple(sum(len(str(column[i])) for column in columns) for i in range(len(dataset)))


def build_loss(model: Any, task: EmbeddingTaskConfig) -> Any:
    """The one place the loss is built, from task.loss and its settings."""
    from sentence_transformers.sentence_transformer import losses

    if task.loss == "multiple_negatives_ranking":
        return losses.MultipleNegativesRankingLoss(model, scale=task.scale)
    if task.loss == "cached_multiple_negatives_ranking":
        return losses.CachedMultipleNegativesRankingLoss(model, scale=task.scale, mini_batch_size=task.mini_batch_size)
    if task.loss == "triplet":
        return losses.TripletLoss(model, triplet_margin=task.triplet_margin)
    return losses.CoSENTLoss(model, scale=task.scale)


def validation_evaluator(data: pd.DataFrame, task: EmbeddingTaskConfig, batch_size: int) -> Any:
    """A sentence-transformers evaluator scoring the validation queries against the whole corpus (the metrics of
    retrieval.Scorer, named as the report names them); None without validation queries."""
    from sentence_transformers.base.evaluation import SentenceEvaluator

    scorer = Scorer(retrieval_set(data, task), "validation")
    if not scorer.query_ids:
        return None

    class ValidationRetrieval(SentenceEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.primary_metric = SELECT_BY
            self.greater_is_better = True

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict:
            model_was_training = model.training
            hits = rank_by_model(model, scorer.query_texts, scorer.sets.corpus_texts, batch_size)
            model.train(model_was_training)
            return scorer.metrics(hits)

    return ValidationRetrieval()


def build_training_arguments(cfg: Any, output_dir: Path, compute: ComputeSettings, has_validation: bool,
                             eval_batch_size: int, sampler: Any) -> Any:
    """The one place SentenceTransformerTrainingArguments are built (the common part comes from the kernel)."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    common = common_training_arguments(cfg, output_dir, compute, has_validation, eval_batch_size)
    common["train_sampling_strategy"] = "random"  # the batch sampler decides the batches
    return SentenceTransformerTrainingArguments(**common, batch_sampler=sampler)


def train_embedding(data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
                    compute: ComputeSettings, progress: ProgressFn = print, sink: MetricsSink | None = None,
                    scratch: Path | None = None) -> CheckpointRecord:
    """Fine-tune `base` on the training pairs (full or LoRA), keep the epoch with the best validation NDCG@10,
    save a whole sentence-transformers folder (LoRA merged) to `out_dir`."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import set_seed

    task: EmbeddingTaskConfig = spec.task
    cfg = spec.training
    compute.apply()
    set_seed(cfg.seed)
    model = load_sentence_model(base.local_path, compute, cfg.max_length)
    dataset, keys = train_dataset(data, task)
    if len(dataset) == 0:
        raise ValueError("no training pairs: the train split has no query with a relevant document")
    transformer = model[0]
    if task.finetuning == "lora":
        from peft import get_peft_model

        transformer.model = get_peft_model(transformer.model, build_lora_config(cfg.lora, base, "FEATURE_EXTRACTION"))
    trainable, total = trainable_parameters(model)
    progress(f"{task.finetuning} fine-tuning with {task.loss}: {len(dataset)} training rows "
             f"({', '.join(dataset.column_names)}), {trainable:,} trainable of {total:,} parameters; "
             f"precision={compute.precision}")
    evaluator = validation_evaluator(data, task, spec.evaluation.batch_size)
    callback = best_epoch_callback(model, progress, sink, SELECT_BY, patience=cfg.early_stopping_patience,
                                  average_last=cfg.average_last_epochs)
    lengths = row_lengths(dataset) if keys and cfg.group_by_length else ()
    sampler = disjoint_batch_sampler(tuple(keys), lengths) if keys else "batch_sampler"

    def make_trainer(folder: Path) -> Any:
        args = build_training_arguments(cfg, folder, compute, evaluator is not None, spec.evaluation.batch_size,
                                        sampler)
        return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=build_loss(model, task),
                                          evaluator=evaluator, callbacks=[callback])

    data_sha256 = frame_digest(data)  # the prepared data's digest: lineage joins on it
    resumable = Resumable.for_run(scratch, cfg, spec.spec_hash, data_sha256, base.weights_sha256, compute.world_size)
    outcome = run_trainer(make_trainer, callback, progress, SELECT_BY, resumable)
    if task.finetuning == "lora":
        transformer.model = transformer.model.merge_and_unload()
    model.eval()
    tokenizer = transformer.tokenizer
    columns = [c for c in dataset.column_names if c != "score"]
    tokens = float(sum(len(ids) for c in columns for ids in tokenizer(list(dataset[c]), truncation=True,
                                                                       max_length=cfg.max_length)["input_ids"]))
    real_tokens = tokens * cfg.epochs
    pairs_per_second = len(dataset) * cfg.epochs / outcome.train_seconds if outcome.train_seconds > 0 else 0.0

    sets = retrieval_set(data, task)

    def write_files(folder: Path) -> None:
        model.save(str(folder / "model"))
        # The corpus `tuneline predict` ranks: the one the model was evaluated on.
        pd.DataFrame({"id": list(sets.corpus_ids), "text": list(sets.corpus_texts)}).to_parquet(
            folder / "corpus.parquet", index=False)

    task_data = {"mode": task.mode, "loss": task.loss, "finetuning": task.finetuning, "training_rows": len(dataset),
                 "pairs_per_second": round(pairs_per_second, 2), "corpus_documents": len(sets.corpus_ids),
                 "top_k": task.top_k}
    manifest = checkpoint_manifest(NAME, base, spec.spec_hash, data_sha256, WEIGHT_FILES, task_data)
    path = save_trained(out_dir, write_files, manifest, spec.to_yaml(), outcome, resumable)
    speed = real_tokens / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    mfu = model_flops_utilization(transformer.model.config.to_dict(), base.parameter_count, real_tokens,
                                  int(len(dataset) * cfg.epochs * len(columns)), outcome.train_seconds, False,
                                  compute)
    progress(f"saved the model to {path} ({pairs_per_second:.1f} pairs/s, {speed:.0f} tokens/s, MFU {mfu:.1%}, "
             f"peak memory {peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path), task=NAME, sha256=checkpoint_digest(path, WEIGHT_FILES), base_model=base,
        spec_hash=spec.spec_hash, data_sha256=data_sha256, task_data=task_data,
        train_rows=len(dataset), validation_rows=len(evaluator_queries(data, task)) if evaluator else 0,
        best_epoch=outcome.best_epoch, trainable_parameters=trainable, train_seconds=outcome.train_seconds,
        tokens_per_second=speed, precision=compute.precision, peak_memory_mb=peak_memory_mb(),
        history=outcome.history, mfu=mfu)


def evaluator_queries(data: pd.DataFrame, task: EmbeddingTaskConfig) -> list[str]:
    return Scorer(retrieval_set(data, task), "validation").query_ids


def load_finetuned(record: CheckpointRecord, compute: ComputeSettings) -> Any:
    """The fine-tuned sentence-transformers model, after checking its weights against the record's digest."""
    path = verified_folder(record, WEIGHT_FILES)
    return load_sentence_model(str(path / "model"), compute)


def mean_tokens(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
    """Mean tokens per training row (query and document together) with this model's tokenizer, on a train sample."""
    from transformers import AutoTokenizer

    from pipelines.core.splitting import sample_split

    tokenizer = AutoTokenizer.from_pretrained(record.local_path)
    sample = sample_split(splits, "train", 256, spec.training.seed)
    texts = sample["text"].tolist() + [d for d in sample["document"] if isinstance(d, str)]
    if not texts:
        return 0.0
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=spec.training.max_length)["input_ids"]]
    return float(np.mean(lengths)) * (1 if spec.task.mode == "labels" else 2)


def time_train_step(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame, compute: ComputeSettings,
                    steps: int) -> float:
    """Median seconds per training step of the real model with the spec's loss on a batch of real train rows."""
    from pipelines.core.splitting import sample_split

    task: EmbeddingTaskConfig = spec.task
    cfg = spec.training
    sample = sample_split(splits, "train", cfg.batch_size, cfg.seed)
    model = load_sentence_model(record.local_path, compute, cfg.max_length)
    if task.finetuning == "lora":
        from peft import get_peft_model

        model[0].model = get_peft_model(model[0].model, build_lora_config(cfg.lora, record, "FEATURE_EXTRACTION"))
    loss = build_loss(model, task)
    anchors = sample["text"].tolist()
    others = [d if isinstance(d, str) else t for d, t in zip(sample["document"], sample["text"], strict=True)]
    if task.loss == "triplet":
        others = [others, others[::-1]]
    features = [model.tokenize(anchors)] + [model.tokenize(o) for o in (others if task.loss == "triplet"
                                                                        else [others])]

    class LossModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = loss

        def forward(self, **_: Any) -> Any:
            labels = torch.zeros(len(anchors)) if task.loss == "cosent" else None
            value = self.inner(features, labels)
            return type("Out", (), {"loss": value})()

    return time_training_steps(LossModule(), {}, compute, steps)

