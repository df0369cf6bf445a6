"""What resumable checkpoints cost: training seconds of the default TREC pipeline with checkpoints off (the
reference), at the default interval, and (optionally) at an aggressive one, as ratios in the same process.

Trains the packaged all-MiniLM-L6-v2 exactly as `finetuned_checkpoint` does (the spec's own training section,
train and validation splits), once per setting, in the order given, and prints the Trainer's training seconds
(which include the saves), the number of checkpoints written and the ratio to the reference.

    .venv/bin/python benchmarks/checkpoint_overhead.py [--also 100] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--also", action="append", default=[],
                        help="another checkpoint_every to time (steps, or a time like '1m'); may repeat")
    parser.add_argument("--epochs", type=float, default=None, help="override training.epochs (default: the spec's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    spec = load_spec(ROOT / "pipelines" / "specs" / "trec_questions.yaml")
    raw, _ = read_source(spec.source, ROOT)
    frame = assign_splits(clean(select_examples(raw, spec.task), spec.cleaning).frame, spec.splits).frame
    frame = frame[frame["split"].isin(["train", "validation"])]
    models = ModelStore(project_root=str(ROOT), cache_dir=str(ROOT / "data" / "models"))
    base = resolve_base_model(spec.base_model, models)
    default = TrainingConfig.model_fields["checkpoint_every"].default
    settings = [("off (reference)", 0), (f"every {default} (default)", default)]
    settings += [(f"every {int(a) if a.isdigit() else a}" + (" steps" if a.isdigit() else ""),
                  int(a) if a.isdigit() else a) for a in args.also]
    compute = ComputeSettings("cpu", "bf16" if spec.training.precision != "fp32" else "fp32", args.threads)
    results = []
    for name, every in settings:
        training = TrainingConfig.model_validate({**spec.training.model_dump(), "checkpoint_every": every,
                                                  **({"epochs": args.epochs} if args.epochs else {})})
        run_spec = spec.model_copy(update={"training": training})
        out = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
        saves: list[str] = []
        try:
            started = time.perf_counter()
            record = train_classifier(frame, base, run_spec, out / "ckpt", compute,
                                      progress=lambda m: saves.append(m) if m.startswith("saved a resumable") else None,
                                      scratch=out / "scratch")
            wall = time.perf_counter() - started
        finally:
            shutil.rmtree(out, ignore_errors=True)
        saving = sum(float(m.rsplit("(", 1)[1].split(" s)")[0]) for m in saves)  # each save reports its time
        results.append((name, record.train_seconds, wall, len(saves), saving))
        print(f"{name}: training {record.train_seconds:.1f} s, whole call {wall:.1f} s, {len(saves)} checkpoints "
              f"taking {saving:.2f} s", flush=True)

    reference = results[0][1]
    print(f"\ncheckpoint_every{'':22s} train s   ratio   saves   saving s   saving / training   (reference: "
          f"{results[0][0]}, {compute.precision}, {args.threads} threads)")
    for name, seconds, _, count, saving in results:
        print(f"{name:38s} {seconds:7.1f}  {seconds / reference:6.3f}  {count:6d}  {saving:9.2f}  "
              f"{saving / seconds:17.2%}")
    print("\nThe ratio compares whole training runs (machine noise included); the saving time is measured around "
          "each save (from the step that asks for it to the checkpoint renamed whole), so its share is exact.")


if __name__ == "__main__":
    main()
