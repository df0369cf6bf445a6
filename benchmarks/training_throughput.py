"""Training throughput of the default recipe's levers, as ratios against an fp32 / random-order reference.

Runs LoRA training of the packaged all-MiniLM-L6-v2 on TREC questions in this process, once per setting,
and prints useful (non-padding) tokens per second and the ratio to the reference run.

    .venv/bin/python benchmarks/training_throughput.py [--rows 2000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.core.tasks.classification.cleaning import clean  # noqa: E402
from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.sources import read_source  # noqa: E402
from pipelines.core.spec import TrainingConfig, load_spec  # noqa: E402
from pipelines.core.splitting import assign_splits  # noqa: E402
from pipelines.core.tasks.classification.data import select_examples  # noqa: E402
from pipelines.core.tasks.classification.train import train_classifier  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402
from resources.model_store import ModelStore  # noqa: E402

SETTINGS = [  # (name, precision, group_by_length); the first is the reference
    ("fp32, random order (reference)", "fp32", False),
    ("fp32, length-grouped", "fp32", True),
    ("bf16 autocast, random order", "bf16", False),
    ("bf16 autocast, length-grouped (default)", "bf16", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="training rows per run")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    spec = load_spec(ROOT / "pipelines" / "specs" / "trec_questions.yaml")
    raw, _ = read_source(spec.source, ROOT)
    frame = assign_splits(clean(select_examples(raw, spec.task), spec.cleaning).frame, spec.splits).frame
    train = frame[frame["split"] == "train"].head(args.rows)  # no validation: time training alone
    models = ModelStore(project_root=str(ROOT), cache_dir=str(ROOT / "data" / "models"))
    base = resolve_base_model(spec.base_model, models)
    results = []
    for name, precision, grouped in SETTINGS:
        training = TrainingConfig.model_validate({**spec.training.model_dump(), "epochs": args.epochs,
                                                  "group_by_length": grouped, "head_init": "random",
                                                  "precision": precision})
        run_spec = spec.model_copy(update={"training": training})
        out = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
        try:
            record = train_classifier(train, base, run_spec, out / "ckpt", ComputeSettings("cpu", precision, args.threads),
                                      progress=lambda _: None)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        results.append((name, record.tokens_per_second, record.train_seconds))
        print(f"{name:42s} {record.tokens_per_second:8.0f} useful tokens/s  ({record.train_seconds:.1f} s)",
              file=sys.stderr)
    reference = results[0][1]
    print(f"\nLoRA r={spec.training.lora.r} on all-MiniLM-L6-v2, {len(train)} rows x {args.epochs:g} epoch(s), "
          f"batch {spec.training.batch_size}, {args.threads} threads")
    print(f"{'setting':42s} {'tokens/s':>9s} {'ratio':>7s}")
    for name, tps, _ in results:
        print(f"{name:42s} {tps:9.0f} {tps / reference:7.2f}x")


if __name__ == "__main__":
    main()
