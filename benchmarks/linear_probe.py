"""The linear probe fitted in torch against scikit-learn's StandardScaler + LogisticRegression (the reference, as
tuneline fitted it before), in one process, on frozen embeddings of a spec's train and validation splits.

Each fit is the one a linear-probe head makes: C in (0.01, 0.1, 1.0), the best on validation kept. Prints the seconds
of each fit set, its validation accuracy, how often the two agree on validation and the ratio.

    .venv/bin/python benchmarks/linear_probe.py                                    # TREC, all-MiniLM-L6-v2
    .venv/bin/python benchmarks/linear_probe.py --set 'base_model.candidates=[{source: catalog, id: SmolLM2-135M-Instruct}]'
    python benchmarks/linear_probe.py --device cuda --threads 8                  # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.recipe_vs_tuneline import device_name, model_store, spec_splits  # noqa: E402
from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.tasks.classification.model import fit_linear_probe, frozen_embeddings  # noqa: E402

CANDIDATES = (0.01, 0.1, 1.0)


def fit_reference(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> object:
    """tuneline's probe before: scikit-learn, the same C candidates, the best on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best, best_score = None, -1.0
    for c in CANDIDATES:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)).fit(x, y)
        score = model.score(val_x, val_y)
        if score > best_score:
            best, best_score = model, score
    return best


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "trec_questions.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="fit sets per side, alternating (median reported)")
    args = parser.parse_args()

    spec, frame = spec_splits(args.spec, args.set)
    base = resolve_base_model(spec.base_model, model_store())
    compute = resolve_compute(args.device, spec.training.precision, args.threads,
                              cache_dir=str(ROOT / "data" / "cache"))
    compute.apply()
    train, validation = (frame[frame["split"] == s] for s in ("train", "validation"))
    index = {label: i for i, label in enumerate(sorted(set(frame["label"])))}
    x, val_x = (frozen_embeddings(base, part["text"].tolist(), spec.training.max_length, compute)
                for part in (train, validation))
    y, val_y = (part["label"].map(index).to_numpy() for part in (train, validation))
    print(f"{spec.name}: {base.name}, {len(x)} train and {len(val_x)} validation embeddings of {x.shape[1]} "
          f"features, {len(index)} classes; {args.threads} threads; {device_name(args.device)}", flush=True)

    fit_linear_probe(x[:200], y[:200], val_x, val_y, compute.device)  # the first torch call's start-up, once
    times: dict[str, list[float]] = {"reference": [], "tuneline": []}
    models: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, fit in (("reference", lambda: fit_reference(x, y, val_x, val_y, spec.training.seed)),
                          ("tuneline", lambda: fit_linear_probe(x, y, val_x, val_y, compute.device))):
            started = time.perf_counter()
            models[name] = fit()
            times[name].append(time.perf_counter() - started)
    predicted = {name: model.predict(val_x) for name, model in models.items()}  # type: ignore[attr-defined]
    print(f"\n{'fit (C in 0.01, 0.1, 1.0; best on validation)':58s} {'seconds':>8s} {'val accuracy':>12s}")
    for name, label in (("reference", "scikit-learn StandardScaler + LogisticRegression (before)"),
                        ("tuneline", "tuneline's probe (torch L-BFGS, same objective)")):
        print(f"{label:58s} {np.median(times[name]):8.2f} {(predicted[name] == val_y).mean():12.4f}")
    ratio = np.median(times["reference"]) / np.median(times["tuneline"])
    print(f"{'speed-up (reference seconds / tuneline seconds)':58s} {ratio:7.2f}x "
          f"{(predicted['tuneline'] == val_y).mean() - (predicted['reference'] == val_y).mean():+12.4f}")
    print(f"the two agree on {(predicted['reference'] == predicted['tuneline']).mean():.2%} of validation rows; "
          f"medians of {args.repeats} alternating runs")


if __name__ == "__main__":
    main()
