"""Side by side, in one process, on the same splits and the same training pairs: sentence-transformers' documented
training recipe against tuneline's embedding training of a spec, printing pairs/s, wall seconds and test NDCG@10 of
both and their ratios.

The recipe (sentence-transformers' training overview): SentenceTransformer(model), MultipleNegativesRankingLoss,
SentenceTransformerTrainingArguments with batch 32, one epoch and every other setting at its default (learning rate
5e-5, no warm-up, the default batch sampler), fp32, trainer.train(), the last weights. tuneline: `train_embedding`
exactly as the finetuned_checkpoint asset calls it (its batches never hold two texts of one label or one document
and hold texts of similar length, validation NDCG@10 after each epoch, the best epoch kept, the checkpoint
written). Both train on the rows of the
spec's training_pairs asset; the test queries are never seen by either until scoring.

pairs/s = training rows x epochs / wall seconds of the whole training call (model loading and, for tuneline,
validation and saving included).

    .venv/bin/python benchmarks/embedding_recipe.py                    # BANKING77 as retrieval
    .venv/bin/python benchmarks/embedding_recipe.py --spec benchmarks/specs/gsm8k_retrieval.yaml
    .venv/bin/python benchmarks/embedding_recipe.py --seeds 13,14,15       # mean and worst over seeds
    .venv/bin/python benchmarks/embedding_recipe.py --runs tuneline,lora   # full fine-tuning against LoRA
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.sources import read_sources  # noqa: E402
from pipelines.core.spec import load_spec  # noqa: E402
from pipelines.core.steps import split_dataset  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.tasks.embedding.retrieval import Scorer, rank_by_model, retrieval_set  # noqa: E402
from pipelines.core.tasks.embedding.train import train_dataset, train_embedding, training_pairs  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402
from resources.model_store import ModelStore  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe_vs_tuneline import with_overrides  # noqa: E402


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
    rows = int(record.train_rows * spec.training.epochs)
    return {"rows": rows, "seconds": seconds, "pairs_per_second": rows / seconds,
            "ndcg_at_10": test_ndcg(load_finetuned(record, ComputeSettings()), data, spec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "benchmarks" / "specs" / "banking77_retrieval.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="recipe,tuneline",
                        help="comma-separated: recipe, tuneline (the spec as written), lora (the spec with "
                             "task.finetuning lora at --lora-learning-rate), ungrouped (training.group_by_length "
                             "false)")
    parser.add_argument("--lora-learning-rate", type=float, default=1e-3)
    parser.add_argument("--seeds", default="", help="comma-separated training seeds (default: the spec's); each run "
                                                    "trains once per seed (the splits, so the test queries, stay)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    spec = load_spec(Path(args.spec))
    raw, _ = read_sources(spec.source, task_for(spec).side_sources(spec), ROOT)
    cleaned, _ = task_for(spec).clean(raw, spec)
    splits, _ = split_dataset(cleaned, spec)
    base = resolve_base_model(spec.base_model, ModelStore(project_root=str(ROOT),
                                                          cache_dir=str(ROOT / "data" / "models")))
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - {"recipe", "tuneline", "lora", "ungrouped"})
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from recipe, tuneline, lora, ungrouped")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [spec.training.seed]
    print(f"{spec.name}: {int((splits['split'] == 'train').sum())} train rows, base model {base.name}, "
          f"{args.threads} threads, fp32, seeds {seeds}")
    print(f"{'seed':>6} {'run':10}{'rows':>8}{'wall s':>10}{'pairs/s':>10}{'NDCG@10':>10}")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for seed in seeds:
        seeded = with_overrides(spec, [f"training.seed={seed}"])
        variants = {"tuneline": seeded,
                    "lora": with_overrides(seeded, ["task.finetuning=lora",
                                                    f"training.learning_rate={args.lora_learning_rate}"]),
                    "ungrouped": with_overrides(seeded, ["training.group_by_length=false"])}
        data, _ = training_pairs(splits, base, seeded, ComputeSettings())  # label-drawn positives use the seed
        with tempfile.TemporaryDirectory(prefix="tuneline-embedding-bench-") as tmp:
            for name in runs:
                r = (run_recipe(data, base.local_path, seeded, Path(tmp) / name) if name == "recipe"
                     else run_tuneline(data, base, variants[name], Path(tmp) / name))
                results[name].append(r)
                print(f"{seed:>6} {name:10}{r['rows']:>8}{r['seconds']:>10.1f}{r['pairs_per_second']:>10.1f}"
                      f"{r['ndcg_at_10']:>10.4f}", flush=True)
    print(f"\nover {len(seeds)} seed(s): {'run':10}{'pairs/s':>10}{'wall s':>10}{'NDCG@10 mean':>14}{'worst':>8}")
    for name, rs in results.items():
        ndcg = [r["ndcg_at_10"] for r in rs]
        print(f"{'':18}{name:10}{np.mean([r['pairs_per_second'] for r in rs]):>10.1f}"
              f"{np.mean([r['seconds'] for r in rs]):>10.1f}{np.mean(ndcg):>14.4f}{min(ndcg):>8.4f}")
    reference = runs[0]
    for name in runs[1:]:
        ours, ref = results[name], results[reference]
        gaps = [o["ndcg_at_10"] - r["ndcg_at_10"] for o, r in zip(ours, ref, strict=True)]
        speed = np.mean([o["pairs_per_second"] / r["pairs_per_second"] for o, r in zip(ours, ref, strict=True)])
        wall = np.mean([o["seconds"] / r["seconds"] for o, r in zip(ours, ref, strict=True)])
        print(f"{name} / {reference}: pairs/s x{speed:.2f}, wall x{wall:.2f}, NDCG@10 {np.mean(gaps):+.4f} on "
              f"average, {min(gaps):+.4f} on the worst seed")

if __name__ == "__main__":
    main()
