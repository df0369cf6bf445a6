"""A classification spec's default recipe over several training seeds: base-model selection as the base_model
asset runs it, fine-tuning as the finetuned_checkpoint asset runs it, and the test split scored once at the end,
one row per seed, then the mean and the worst seed.

The splits are the spec's own (splits.seed is not varied: every seed is scored on the same test rows); the seed
varies `training.seed`, which draws the probe's samples (when the probe samples), the initialisation and the order
of the batches. Selection's choice is reported per seed, with how often it differs from the most common choice.

    .venv/bin/python benchmarks/recipe_seeds.py                                   # the default TREC pipeline
    .venv/bin/python benchmarks/recipe_seeds.py --spec benchmarks/specs/banking77.yaml
    .venv/bin/python benchmarks/recipe_seeds.py --set training.epochs=5 --seeds 13,14,15
    .venv/bin/python benchmarks/recipe_seeds.py --select-only        # the probe's choice per seed, no training
    .venv/bin/python benchmarks/recipe_seeds.py --model 2            # fine-tune the second candidate, no selection
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_vs_tuneline import device_name, model_store, spec_splits, with_overrides  # noqa: E402

from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.selection import pin_candidate, select_base_model  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.tasks.classification.metrics import classification_metrics  # noqa: E402
from pipelines.core.tasks.classification.train import load_classifier, predict_proba, train_classifier  # noqa: E402


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def one_seed(spec: Any, frame: Any, seed: int, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Select (or take the candidate asked for), fine-tune and score one seed."""
    overrides = [f"training.seed={seed}"] + ([f"training.precision={args.precision}"] if args.precision else [])
    spec = with_overrides(spec, overrides)
    compute = resolve_compute(args.device, spec.training.precision, args.threads, cache_dir=str(cache))
    row: dict[str, Any] = {"seed": seed, "precision": compute.precision}
    started = time.perf_counter()
    if args.model:
        location = spec.base_model.resolved_candidates[args.model - 1]
        base = pin_candidate(location, spec.base_model, model_store(), pooling=task_for(spec).pooling(spec))
        row["probe"] = {}
    else:
        base = select_base_model(spec, frame, model_store(), compute, progress=log)
        row["probe"] = {r["name"].split("/")[-1]: r["probe_score"] for r in base.selection
                        if r.get("probe_score") is not None}
    row["selected"] = base.name.split("/")[-1]
    row["select_seconds"] = time.perf_counter() - started
    if args.select_only:
        return row
    out = Path(tempfile.mkdtemp(prefix="tuneline-seeds-"))
    try:
        started = time.perf_counter()
        record = train_classifier(frame[frame["split"] != "test"], base, spec, out / "ckpt", compute, progress=log)
        row["train_seconds"] = time.perf_counter() - started
        test = frame[frame["split"] == "test"]
        model, tokenizer = load_classifier(record)
        predicted = predict_proba(model, tokenizer, test["text"].tolist(), spec.training.max_length,
                                  compute).argmax(-1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    labels = record.task_data["labels"]
    index = {label: i for i, label in enumerate(labels)}
    metrics = classification_metrics(test["label"].map(index).to_numpy(), predicted, len(labels))
    metric = spec.evaluation.primary_metric
    # The validation score of the weights kept: the best epoch's, or (training.average_last_epochs) the mean's,
    # scored after the last epoch.
    kept = [h for h in record.history if h.get(f"eval_{metric}") is not None and h.get("epoch") == record.best_epoch]
    best = kept[-1] if kept else {}
    row.update(accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], best_epoch=record.best_epoch,
               validation=best.get(f"eval_{metric}"),
               samples_per_second=record.train_rows * spec.training.epochs / row["train_seconds"])
    return row


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "trec_questions.yaml"))
    parser.add_argument("--seeds", default="13,14,15,16,17", help="training seeds, comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a spec value, e.g. training.epochs=5 (may repeat)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                        help="training.precision for every seed (default: the spec's)")
    parser.add_argument("--model", type=int, default=0, metavar="N",
                        help="fine-tune the spec's N-th candidate (1-based) without selection")
    parser.add_argument("--select-only", action="store_true", help="run selection only: its choice per seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    spec, frame = spec_splits(args.spec, args.set)
    counts = frame["split"].value_counts()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"{spec.name}: train {counts.get('train', 0)}, validation {counts.get('validation', 0)}, test "
          f"{counts.get('test', 0)} rows; seeds {seeds}; {args.threads} threads; {device_name(args.device)}"
          + (f"; overrides {args.set}" if args.set else ""), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneline-seeds-cache-") as cache:  # embeddings shared across seeds
        for seed in seeds:
            rows.append(one_seed(spec, frame, seed, args, Path(cache)))
            log(f"seed {seed}: {json.dumps(rows[-1], default=str)}")

    metric = spec.evaluation.primary_metric
    print(f"\n{'seed':>4s} {'precision':9s} {'selected':24s} {'probe scores':36s} {'select s':>8s}"
          + ("" if args.select_only else f" {'val ' + metric:>14s} {'epoch':>5s} {'train s':>7s} {'samples/s':>9s} "
                                         f"{'accuracy':>8s} {'macro-F1':>8s}"))
    for r in rows:
        probe = ", ".join(f"{k} {v:.4f}" for k, v in r["probe"].items())
        line = f"{r['seed']:4d} {r['precision']:9s} {r['selected']:24s} {probe:36s} {r['select_seconds']:8.1f}"
        if not args.select_only:
            line += (f" {r['validation'] or float('nan'):14.4f} {r['best_epoch'] or 0:5.0f} {r['train_seconds']:7.1f} "
                     f"{r['samples_per_second']:9.1f} {r['accuracy']:8.4f} {r['macro_f1']:8.4f}")
        print(line)
    choices = Counter(r["selected"] for r in rows)
    common, times = choices.most_common(1)[0]
    print(f"selection: {dict(choices)}; differs from the most common choice ({common}) on {len(rows) - times} of "
          f"{len(rows)} seeds")
    if not args.select_only:
        for key in ("accuracy", "macro_f1"):
            values = [r[key] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{key:9s} mean {statistics.mean(values):.4f}  worst {min(values):.4f}  best {max(values):.4f}  "
                  f"stdev {spread:.4f}")
        print(f"samples/s mean {statistics.mean(r['samples_per_second'] for r in rows):.1f} (train rows x epochs / "
              "seconds of the whole training call)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
