"""How well the data doctor finds wrong labels: flip a share of the train split's labels at random (each to
another class, seeded), run the doctor on the splits as its check does, and count the flipped rows among its top
suspects. The reference is chance: a random ranking finds `top x share` flipped rows in its top `top`.

    .venv/bin/python benchmarks/doctor_flipped_labels.py                   # TREC, 5% of train flipped, top 100
    .venv/bin/python benchmarks/doctor_flipped_labels.py --spec benchmarks/specs/banking77.yaml --share 0.05

The data's own wrong labels count against the doctor here (they are suspects that were not flipped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.recipe_vs_tuneline import model_store, spec_splits  # noqa: E402
from pipelines.core.steps import examine_data  # noqa: E402
from pipelines.core.hardware import resolve_compute  # noqa: E402


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "trec_questions.yaml"))
    parser.add_argument("--share", type=float, default=0.05, help="share of train rows whose label is flipped")
    parser.add_argument("--top", type=int, default=100, help="how many of the doctor's top suspects to look at")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    spec, frame = spec_splits(args.spec)
    frame = frame.reset_index(drop=True)
    rng = np.random.default_rng(args.seed)
    train = np.flatnonzero((frame["split"] == "train").to_numpy())
    flipped = rng.choice(train, size=round(args.share * len(train)), replace=False)
    labels = sorted(set(frame["label"]))
    for row in flipped:
        given = frame.at[row, "label"]
        frame.at[row, "label"] = rng.choice([label for label in labels if label != given])
    marker = "\x00flipped"  # the flipped rows are known by their provenance, which the doctor reports
    frame["source_file"] = frame["source_file"].astype(str)
    frame.loc[flipped, "source_file"] = frame.loc[flipped, "source_file"] + marker

    with tempfile.TemporaryDirectory() as folder:
        compute = resolve_compute("cpu", spec.training.precision, args.threads,  # as a run resolves it
                                  cache_dir=str(Path(folder) / "cache"))
        models = model_store()
        started = time.perf_counter()
        report, _ = examine_data(spec, frame, models, compute, Path(folder), progress=lambda m: print(f"  {m}"))
        seconds = time.perf_counter() - started
    top = report.suspects.head(args.top)
    found = int(top["source_file"].str.endswith(marker).sum())
    all_found = int(report.suspects["source_file"].str.endswith(marker).sum())
    chance = args.top * len(flipped) / len(frame)
    print(f"\n{spec.name}: {len(frame):,} rows, {len(flipped):,} train labels flipped ({args.share:.0%} of "
          f"{len(train):,}), doctor encoder {report.model}, {seconds:.1f} s (embedding included)")
    print(f"flipped rows among the top {args.top} suspects: {found} (chance: {chance:.1f}; "
          f"{found / max(chance, 1e-9):.1f}x chance)")
    print(f"all suspects: {len(report.suspects):,}, of which flipped {all_found:,} "
          f"(recall {all_found / max(len(flipped), 1):.1%}, precision {all_found / max(len(report.suspects), 1):.1%})")
    print(f"cross-class near-duplicate pairs: {len(report.duplicates):,}; learning curve: "
          + ", ".join(f"{c['train_rows']} rows -> {c[report.metric]:.4f}" for c in report.curve))


if __name__ == "__main__":
    main()
