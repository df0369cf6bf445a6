"""The `task:` section of retrieval embeddings: where queries, documents and relevance come from, and the settings
of its own method (the loss, hard negatives, full or LoRA fine-tuning, the report's k)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.core.sections import Frozen, LocalSourceConfig, MaxFileMb, MaxRows, Name, TaskSection

LOSSES = ("multiple_negatives_ranking", "cached_multiple_negatives_ranking", "triplet", "cosent")


class HardNegativesConfig(Frozen):
    """Hard negatives mined from the base model's own ranking (sentence_transformers.util.mine_hard_negatives):
    for every training pair, documents the base model ranks high for the query that are not relevant to it."""

    enabled: bool = Field(default=False, description="Mine hard negatives for the training pairs.")
    count: int = Field(default=1, ge=1, le=20, description="Negatives per training pair (each becomes a triplet).")
    range_min: int = Field(default=0, ge=0, description="Skip this many of the most similar documents first (the "
                                                        "very top is often an unlabelled relevant document).")
    range_max: int = Field(default=50, ge=1, description="Only look at the base model's top-N documents per query.")
    relative_margin: float | None = Field(
        default=0.05, ge=0, lt=1,
        description="A negative must score below (1 - margin) x the positive's score: mined documents nearly as "
                    "close as the positive are often relevant, not negative.")

    @model_validator(mode="after")
    def _range(self) -> HardNegativesConfig:
        if self.range_max <= self.range_min:
            raise ValueError(f"task.hard_negatives.range_max ({self.range_max}) must be above range_min "
                             f"({self.range_min})")
        return self


class CorpusConfig(Frozen):
    """A corpus file: one document per row, with an id the relevance pairs name (task.document_id_column)."""

    path: Name = Field(description="File or folder of CSV, JSONL or Parquet files; a relative path is taken from the "
                                   "project root, as source.path is.")
    format: Literal["auto", "csv", "jsonl", "parquet"] = Field(
        default="auto", description="'auto' chooses by file extension (.csv, .jsonl/.json, .parquet).")
    id_column: Name = Field(default="id", description="Column holding each document's id.")
    text_column: Name = Field(default="text", description="Column holding each document's text.")
    max_duplicate_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="Largest share of documents whose text another document holds under another id before "
                    "documents_are_distinct blocks training (a duplicate that is not marked relevant counts as a "
                    "wrong answer, so the metrics understate the model).")
    max_file_mb: MaxFileMb = 512
    max_rows: MaxRows = 10_000_000

    def as_source(self) -> LocalSourceConfig:
        """The corpus as raw_data reads it (beside the spec's source)."""
        return LocalSourceConfig(kind="local", path=self.path, format=self.format, max_file_mb=self.max_file_mb,
                                 max_rows=self.max_rows)


class EmbeddingTaskConfig(TaskSection):
    """What is learned: an embedding under which a query is close to the documents relevant to it.

    Two ways to say what is relevant:
    - pairs (default): each row holds a query and a relevant document (query_column, document_column), optionally
      a negative document (negative_column) or a similarity score (score_column, for the cosent loss). A query on
      several rows has several relevant documents; the corpus is every document of every split;
    - relevance_label_column: each row holds one text (text_column) and a label; texts with the same label are
      relevant to each other (a labelled intent set becomes a retrieval set). The corpus is the train split's texts; the
      validation and test texts are the queries;
    - corpus: a corpus file (id and text per document) and, in the source, query-relevance pairs: each row holds a
      query and the id of a relevant document (document_id_column). The corpus is the whole file, documents no
      query names included.
    """

    type: Literal["embedding"]
    query_column: Name = Field(default="query", description="Column holding the query (the anchor).")
    document_column: Name = Field(default="document", description="Column holding a document relevant to the query "
                                                                  "(the positive).")
    negative_column: Name | None = Field(default=None, description="Optional column holding a document that is not "
                                                                   "relevant to the query (a given hard negative).")
    score_column: Name | None = Field(
        default=None, description="Optional column holding the pair's similarity score in [0, 1] (the cosent loss "
                                  "reads it); pairs scored at least task.relevance_threshold count as relevant.")
    text_column: Name = Field(default="text", description="With relevance_label_column: the column holding the text.")
    relevance_label_column: Name | None = Field(
        default=None, description="Relevance from labels: texts sharing a label are relevant to each other.")
    corpus: CorpusConfig | None = Field(
        default=None, description="A corpus file the source's rows point into by document id (query-relevance pairs).")
    document_id_column: Name = Field(default="document_id", description="With corpus: the source's column holding the "
                                                                        "id of a document relevant to the query.")
    relevance_threshold: float = Field(default=0.5, ge=0, le=1, description="With score_column: the score from which "
                                                                            "a pair counts as relevant.")

    # Settings of this task's method, read by its training, checks and report only.
    loss: Literal["multiple_negatives_ranking", "cached_multiple_negatives_ranking", "triplet", "cosent"] = Field(
        default="multiple_negatives_ranking",
        description="multiple_negatives_ranking: every other document in the batch is a negative (the default "
                    "for query/document pairs); cached_multiple_negatives_ranking: the same with batches larger "
                    "than memory allows (GradCache, in mini-batches of task.mini_batch_size); triplet: a margin "
                    "between the positive and a negative (needs negative_column or hard_negatives); cosent: scored "
                    "pairs (needs score_column).")
    scale: float = Field(default=20.0, gt=0, le=1000, description="Inverse temperature of the ranking losses "
                                                                  "(similarities are multiplied by it).")
    triplet_margin: float = Field(default=5.0, gt=0, le=100, description="The triplet loss's margin (Euclidean "
                                                                         "distance).")
    mini_batch_size: int = Field(default=32, ge=1, le=4096, description="The cached loss's mini-batch (memory), not "
                                                                        "its batch (training.batch_size).")
    hard_negatives: HardNegativesConfig = Field(default_factory=HardNegativesConfig)
    finetuning: Literal["full", "lora"] = Field(
        default="full", description="full: every weight is trained (the default: a small encoder trains fully on a "
                                    "CPU; see benchmarks/embedding_recipe.py); lora: adapters from training.lora, "
                                    "merged into the saved model.")
    max_document_chars: int = Field(default=5000, ge=1, description="Longer documents are dropped as over-long "
                                                                    "(queries: cleaning.max_chars).")
    max_broken_pair_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="Largest share of rows with an empty query or document, or a query equal to its own document, "
                    "before pairs_are_complete blocks training (such rows are dropped either way).")
    top_k: int = Field(default=10, ge=1, le=1000, description="Documents `tuneline predict` prints per query, and "
                                                              "the results the report shows per query.")
    shown_queries: int = Field(default=10, ge=0, le=500, description="Queries listed in the report as most improved "
                                                                     "and most worsened by fine-tuning.")

    @model_validator(mode="after")
    def _one_relevance(self) -> EmbeddingTaskConfig:
        if self.loss == "triplet" and self.negative_column is None and not self.hard_negatives.enabled:
            raise ValueError("task.loss triplet needs negatives: set task.negative_column, or task.hard_negatives."
                             "enabled: true")
        if self.loss == "cosent" and self.score_column is None:
            raise ValueError("task.loss cosent learns from scored pairs: set task.score_column")
        if self.score_column is not None and self.loss != "cosent":
            raise ValueError(f"task.score_column is read by the cosent loss only; task.loss is {self.loss}")
        if self.corpus is not None and self.relevance_label_column is not None:
            raise ValueError("task.corpus holds the documents of query-relevance pairs; with "
                             "task.relevance_label_column the documents are the train texts: give one of them")
        if self.corpus is not None and self.negative_column is not None:
            raise ValueError("task.negative_column holds a negative document's text, which a corpus file names by "
                             "id: with task.corpus, mine negatives instead (task.hard_negatives.enabled: true)")
        if self.score_column is not None and self.relevance_label_column is not None:
            raise ValueError("task.score_column scores query/document pairs: it does not go with "
                             "task.relevance_label_column")
        return self

    @property
    def mode(self) -> str:
        """How relevance is given: 'pairs', 'labels' or 'corpus'."""
        return "labels" if self.relevance_label_column is not None else "corpus" if self.corpus is not None else "pairs"
