"""Sentence embeddings for retrieval: a sentence-transformers model fine-tuned so that a query lands next to the
documents relevant to it (search, RAG), with sentence-transformers' losses, hard-negative miner and IR metrics.

Rows come as (query, relevant document[, negative]) pairs, as texts with a label (two texts with the same label are
relevant to each other), or as query -> document id pairs beside a corpus file. Splits are by query; the corpus is
shared by every split.

The package: config (the `task:` section), data (examples, cleaning and the blocking checks), retrieval (queries,
corpus and relevance per split; ranking by a model or BM25; the metrics), train (losses, hard negatives, full or
LoRA fine-tuning), evaluate (the report and the selection probe), init (what `tuneline init` proposes) and task
(the Task the rest of tuneline calls). Importing this package imports only its declaration and its config.
"""

from __future__ import annotations

from pipelines.core.tasks.base import TaskDeclaration
from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig

NAME = "embedding"
WEIGHT_FILES = ("model/model.safetensors",)  # a whole sentence-transformers folder (LoRA merged into it)

TASK = TaskDeclaration(
    name=NAME, config_class=EmbeddingTaskConfig,
    description="Sentence embeddings for retrieval: queries and relevant documents (pairs, texts sharing a label, "
                "or a corpus with query relevance), sentence-transformers losses, full or LoRA fine-tuning.",
    implementation="pipelines.core.tasks.embedding.task:EmbeddingTask",
    starter="pipelines.core.tasks.embedding.init:EmbeddingStarter")
