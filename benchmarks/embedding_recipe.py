"""Side by side, in one process, on the same splits and the same training pairs: sentence-transformers' documented
training recipe against tuneline's embedding training of a spec, printing pairs/s, wall seconds and test NDCG@10 of
both and their ratios.

The recipe (sentence-transformers' training overview): SentenceTransformer(model), MultipleNegativesRankingLoss,
SentenceTransformerTrainingArguments with batch 32, one epoch and every other setting at its default (learning rate
5e-5, no warm-up, the default batch sampler), fp32, trainer.train(), the last weights. tuneline: `train_embedding`
exactly as the finetuned_checkpoint asset calls it (its batches never hold two texts of one label or one document,
validation NDCG@10 after each epoch, the best epoch kept, the checkpoint written). Both train on the rows of the
spec's training_pairs asset; the test queries are never seen by either until scoring.

pairs/s = training rows x epochs / wall seconds of the whole training call (model loading and, for tuneline,
validation and saving included).

    .venv/bin/python benchmarks/embedding_recipe.py                    # BANKING77 as retrieval
    .venv/bin/python benchmarks/embedding_recipe.py --spec benchmarks/specs/gsm8k_retrieval.yaml
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.sources import read_source  # noqa: E402
from pipelines.core.spec import load_spec  # noqa: E402
from pipelines.core.steps import split_dataset  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.tasks.embedding.retrieval import Scorer, rank_by_model, retrieval_set  # noqa: E402
from pipelines.core.tasks.embedding.train import train_dataset, train_embedding, training_pairs  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402
from resources.model_store import ModelStore  # noqa: E402


def test_ndcg(model: Any, data: pd.DataFrame, spec: Any) -> float:
    scorer = Scorer(retrieval_set(data, spec.task), "test")
    hits = scorer.rank(lambda q, c: rank_by_model(model, q, c, spec.evaluation.batch_size))
    return scorer.metrics(hits)["ndcg_at_10"]


def run_recipe(data: pd.DataFrame, model_dir: str, spec: Any, folder: Path) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    pairs, _ = train_dataset(data, spec.task)
    dataset = Dataset.from_dict({"anchor": list(pairs["anchor"]), "positive": list(pairs["positive"])})
    started = time.perf_counter()
    model = SentenceTransformer(model_dir, device="cpu")
    args = SentenceTransformerTrainingArguments(output_dir=str(folder), num_train_epochs=1,
                                                per_device_train_batch_size=32, report_to="none",
                                                save_strategy="no", seed=spec.training.seed, use_cpu=True,
                                                disable_tqdm=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                               loss=MultipleNegativesRankingLoss(model)).train()
    seconds = time.perf_counter() - started
    return {"rows": len(dataset), "seconds": seconds, "pairs_per_second": len(dataset) / seconds,
            "ndcg_at_10": test_ndcg(model, data, spec)}


def run_tuneline(data: pd.DataFrame, base: Any, spec: Any, folder: Path) -> dict[str, Any]:
    from pipelines.core.tasks.embedding.train import load_finetuned

    started = time.perf_counter()
    record = train_embedding(data, base, spec, folder / "checkpoint", ComputeSettings(precision="fp32"),
                             progress=lambda line: None)
    seconds = time.perf_counter() - started
    rows = record.train_rows * spec.training.epochs
    return {"rows": rows, "seconds": seconds, "pairs_per_second": rows / seconds,
            "ndcg_at_10": test_ndcg(load_finetuned(record, ComputeSettings()), data, spec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "benchmarks" / "specs" / "banking77_retrieval.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    spec = load_spec(Path(args.spec))
    raw, _ = read_source(spec.source, ROOT)
    cleaned, _ = task_for(spec).clean(raw, spec)
    splits, _ = split_dataset(cleaned, spec)
    base = resolve_base_model(spec.base_model, ModelStore(project_root=str(ROOT),
                                                          cache_dir=str(ROOT / "data" / "models")))
    data, _ = training_pairs(splits, base, spec, ComputeSettings())
    print(f"{spec.name}: {int((data['split'] == 'train').sum())} train rows, base model {base.name}, "
          f"{args.threads} threads, fp32")
    with tempfile.TemporaryDirectory(prefix="tuneline-embedding-bench-") as tmp:
        results = {"recipe": run_recipe(data, base.local_path, spec, Path(tmp) / "recipe"),
                   "tuneline": run_tuneline(data, base, spec, Path(tmp) / "tuneline")}
    print(f"{'':10}{'rows':>8}{'wall s':>10}{'pairs/s':>10}{'NDCG@10':>10}")
    for name, r in results.items():
        print(f"{name:10}{r['rows']:>8}{r['seconds']:>10.1f}{r['pairs_per_second']:>10.1f}{r['ndcg_at_10']:>10.4f}")
    recipe, ours = results["recipe"], results["tuneline"]
    print(f"tuneline / recipe: pairs/s x{ours['pairs_per_second'] / recipe['pairs_per_second']:.2f}, wall "
          f"x{ours['seconds'] / recipe['seconds']:.2f}, NDCG@10 {ours['ndcg_at_10'] - recipe['ndcg_at_10']:+.4f}")


if __name__ == "__main__":
    main()
