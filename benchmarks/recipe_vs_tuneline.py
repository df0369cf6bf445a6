"""Side by side, in one process, on the same splits: the Hugging Face documentation's LoRA recipe for sequence
classification against tuneline's training of a spec, printing samples/s, wall seconds, test accuracy and
macro-F1 of both and their ratios.

The recipe (PEFT quicktour / sequence-classification guide): AutoModelForSequenceClassification with its
default pooler head, LoRA r=8, alpha 16, dropout 0.1 on PEFT's default targets for the architecture (query/value
for BERT, q_proj/v_proj for Llama), AdamW at
1e-3, weight decay 0.01, batch 32, 3 epochs, fp32, random order, DataCollatorWithPadding, evaluation each epoch,
the last epoch's weights. tuneline: `train_classifier` exactly as the finetuned_checkpoint asset calls it, on the
spec's own train and validation splits (the test split is never seen by either until scoring).

samples/s = train rows x epochs / wall seconds of the whole training call (model loading, tokenizing, the
linear-probe head, the frozen blocks and every per-epoch validation included), for both; and the same over
Trainer.train() alone, which is how the Trainer itself reports samples/s.

    .venv/bin/python benchmarks/recipe_vs_tuneline.py                       # the default TREC pipeline
    .venv/bin/python benchmarks/recipe_vs_tuneline.py --spec benchmarks/specs/banking77.yaml
    .venv/bin/python benchmarks/recipe_vs_tuneline.py --set training.epochs=3 --skip-recipe
    .venv/bin/python benchmarks/recipe_vs_tuneline.py --seeds 13,14,15,16,17 --precision fp32   # mean and worst
    python benchmarks/recipe_vs_tuneline.py --device cuda     # on a GPU machine (the recipe stays fp32, as documented)

MFU: model FLOPs per second of training over the machine's measured bf16 (or fp32) matmul peak, for both runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.sources import read_source  # noqa: E402
from pipelines.core.spec import PipelineSpec, load_spec  # noqa: E402
from pipelines.core.steps import split_dataset  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.tasks.classification.metrics import classification_metrics  # noqa: E402
from pipelines.core.tasks.classification.train import load_classifier, predict_proba, train_classifier  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402
from pipelines.core.training.cost import matmul_rate, model_flops_utilization  # noqa: E402
from resources.model_store import ModelStore  # noqa: E402

RECIPE = {"r": 8, "alpha": 16, "dropout": 0.1, "targets": None, "learning_rate": 1e-3,
          "weight_decay": 0.01, "batch_size": 32, "epochs": 3}


def device_name(device: str) -> str:
    """What the run computes on, for the table's heading."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU (torch {torch.__version__})"


def with_overrides(spec: PipelineSpec, overrides: list[str]) -> PipelineSpec:
    """The spec with `section.key=value` overrides applied (values read as YAML), validated again."""
    data = spec.model_dump(mode="json", exclude_none=True)
    for item in overrides:
        dotted, _, value = item.partition("=")
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return PipelineSpec.model_validate({**data, "name": spec.name})


def model_store() -> ModelStore:
    """The project's model store, as a run of the default data folder uses it (de-quantized models cached)."""
    return ModelStore(project_root=str(ROOT), cache_dir=str(ROOT / "data" / "models"))


def spec_splits(spec_path: str | Path, overrides: Sequence[str] = ()) -> tuple[PipelineSpec, pd.DataFrame]:
    """The spec (with `section.key=value` overrides) and its data read, cleaned and split as a pipeline run does."""
    spec = with_overrides(load_spec(Path(spec_path)), list(overrides))
    task = task_for(spec)
    raw, _ = read_source(spec.source, ROOT)
    cleaned, _ = task.clean(raw, spec)
    frame, _ = split_dataset(cleaned, spec)
    return spec, frame


def run_recipe(frame: pd.DataFrame, model_dir: str, max_length: int, threads: int, seed: int,
               device: str = "cpu") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    torch.set_num_threads(threads)
    set_seed(seed)
    started = time.perf_counter()
    labels = sorted(set(frame["label"]))
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def dataset(part: pd.DataFrame) -> Any:
        encoded = tokenizer(part["text"].tolist(), truncation=True, max_length=max_length)
        return Dataset.from_dict({**{k: encoded[k] for k in encoded.keys()},
                                  "labels": part["label"].map(index).tolist()})

    train, validation = (frame[frame["split"] == s] for s in ("train", "validation"))
    if tokenizer.pad_token is None:  # decoders (Llama) come without one; the docs reuse end-of-sequence
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=RECIPE["r"], lora_alpha=RECIPE["alpha"],
                                             lora_dropout=RECIPE["dropout"], target_modules=RECIPE["targets"]))
    with tempfile.TemporaryDirectory(prefix="tuneline-recipe-") as out:
        args = TrainingArguments(output_dir=out, learning_rate=RECIPE["learning_rate"],
                                 per_device_train_batch_size=RECIPE["batch_size"], per_device_eval_batch_size=128,
                                 num_train_epochs=RECIPE["epochs"], weight_decay=RECIPE["weight_decay"],
                                 eval_strategy="epoch", save_strategy="no", report_to="none",
                                 use_cpu=device == "cpu",
                                 disable_tqdm=True, logging_strategy="no", seed=seed)
        trainer = Trainer(model=model, args=args, train_dataset=dataset(train), eval_dataset=dataset(validation),
                          data_collator=DataCollatorWithPadding(tokenizer))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # no printed log dicts between the figures
        trainer_seconds = float(trainer.train().metrics["train_runtime"])
    wall = time.perf_counter() - started
    train_tokens = sum(len(ids) for ids in tokenizer(train["text"].tolist(), truncation=True,
                                                      max_length=max_length)["input_ids"])
    test = frame[frame["split"] == "test"]
    model.eval()
    predictions = trainer.predict(dataset(test)).predictions.argmax(-1)
    metrics = classification_metrics(test["label"].map(index).to_numpy(), predictions, len(labels))
    # The recipe computes on padding too; its MFU counts only the real tokens, as tuneline's does, over the same
    # peak (the machine's faster precision), so that the column compares the two.
    mfu = model_flops_utilization(model.get_base_model().config.to_dict(),
                                  sum(p.numel() for p in model.get_base_model().parameters()),
                                  train_tokens * RECIPE["epochs"], len(train) * RECIPE["epochs"], trainer_seconds,
                                  False, fastest_precision(device, threads))
    return {"name": "HF docs recipe (r=8, fp32, 3 epochs)", "rows": len(train), "epochs": RECIPE["epochs"],
            "seconds": wall, "trainer_seconds": trainer_seconds, "mfu": mfu, **metrics}


def run_tuneline(frame: pd.DataFrame, spec: PipelineSpec, threads: int, device: str = "cpu") -> dict[str, Any]:
    base = resolve_base_model(spec.base_model, model_store())
    cfg = spec.training
    compute = resolve_compute(device, cfg.precision, threads)  # as a pipeline run resolves it ('auto': measured)
    out = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
    try:
        started = time.perf_counter()
        record = train_classifier(frame[frame["split"] != "test"], base, spec, out / "ckpt", compute,
                                  progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        wall = time.perf_counter() - started
        test = frame[frame["split"] == "test"]
        model, tokenizer = load_classifier(record)
        predicted = predict_proba(model, tokenizer, test["text"].tolist(), cfg.max_length, compute).argmax(-1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    index = {label: i for i, label in enumerate(record.task_data["labels"])}
    metrics = classification_metrics(test["label"].map(index).to_numpy(), predicted, len(record.task_data["labels"]))
    lora = cfg.lora
    peak = fastest_precision(device, threads)
    mfu = record.mfu * matmul_rate(compute) / matmul_rate(peak)  # over the same peak as the recipe's
    return {"name": f"tuneline (r={lora.r}, {compute.precision}, {cfg.epochs:g} epochs, batch {cfg.batch_size})",
            "rows": record.train_rows, "epochs": cfg.epochs, "seconds": wall, "trainer_seconds": record.train_seconds,
            "mfu": mfu, **metrics}


def fastest_precision(device: str, threads: int) -> ComputeSettings:
    """The precision whose matmuls this machine runs fastest: MFU is over its peak, for every run."""
    return max((ComputeSettings(device, p, threads) for p in ("bf16", "fp32")), key=matmul_rate)


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()  # no library progress bars or printed log dicts between the figures
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "trec_questions.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a spec value for tuneline's run, e.g. training.epochs=3 (may repeat)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: both runs once per seed (training.seed and the recipe's seed); "
                             "default: the spec's training.seed")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                        help="tuneline's training.precision (default: the spec's); the recipe stays fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-recipe", action="store_true", help="run tuneline only (no ratios)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    overrides = list(args.set) + ([f"training.precision={args.precision}"] if args.precision else [])
    spec, frame = spec_splits(args.spec, overrides)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [spec.training.seed]
    counts = frame["split"].value_counts()
    print(f"{spec.name}: train {counts.get('train', 0)}, validation {counts.get('validation', 0)}, "
          f"test {counts.get('test', 0)} rows; seeds {seeds}; {args.threads} threads; {device_name(args.device)}",
          flush=True)

    model_dir = resolve_base_model(spec.base_model, model_store()).local_path
    runs: list[tuple[int, list[dict[str, Any]]]] = []
    for seed in seeds:
        results = []
        if not args.skip_recipe:
            results.append(run_recipe(frame, model_dir, spec.training.max_length, args.threads, seed, args.device))
            print(f"  seed {seed}: recipe done in {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
        results.append(run_tuneline(frame, with_overrides(spec, [f"training.seed={seed}"]), args.threads,
                                    args.device))
        for r in results:
            r["samples_per_second"] = r["rows"] * r["epochs"] / r["seconds"]
            r["trainer_samples_per_second"] = r["rows"] * r["epochs"] / r["trainer_seconds"]
        runs.append((seed, results))

    print(f"\n{'seed':>4s} {'run':58s} {'samples/s':>9s} {'wall s':>7s} {'Trainer samples/s':>17s} "
          f"{'Trainer s':>9s} {'accuracy':>8s} {'macro-F1':>8s} {'MFU':>6s}")
    for seed, results in runs:
        for r in results:
            print(f"{seed:4d} {r['name']:58s} {r['samples_per_second']:9.1f} {r['seconds']:7.1f} "
                  f"{r['trainer_samples_per_second']:17.1f} {r['trainer_seconds']:9.1f} {r['accuracy']:8.4f} "
                  f"{r['macro_f1']:8.4f} {r['mfu']:6.1%}")
        if len(results) == 2:
            ref, ours = results
            print(f"{seed:4d} {'ratio tuneline / recipe':58s} "
                  f"{ours['samples_per_second'] / ref['samples_per_second']:8.2f}x "
                  f"{ours['seconds'] / ref['seconds']:6.2f}x "
                  f"{ours['trainer_samples_per_second'] / ref['trainer_samples_per_second']:16.2f}x "
                  f"{ours['trainer_seconds'] / ref['trainer_seconds']:8.2f}x "
                  f"{ours['accuracy'] - ref['accuracy']:+8.4f} {ours['macro_f1'] - ref['macro_f1']:+8.4f}")
    if len(runs) > 1:
        names = ["recipe", "tuneline"] if not args.skip_recipe else ["tuneline"]
        for place, name in enumerate(names):
            accuracy = [results[place]["accuracy"] for _, results in runs]
            f1 = [results[place]["macro_f1"] for _, results in runs]
            speed = [results[place]["samples_per_second"] for _, results in runs]
            print(f"{name:9s} over {len(runs)} seeds: accuracy mean {np.mean(accuracy):.4f} worst {min(accuracy):.4f}; "
                  f"macro-F1 mean {np.mean(f1):.4f} worst {min(f1):.4f}; samples/s mean {np.mean(speed):.1f}")
        if not args.skip_recipe:
            ratios = [results[1]["samples_per_second"] / results[0]["samples_per_second"] for _, results in runs]
            inner = [results[1]["trainer_samples_per_second"] / results[0]["trainer_samples_per_second"]
                     for _, results in runs]
            print(f"ratio tuneline / recipe samples/s: whole call mean {np.mean(ratios):.2f}x (lowest "
                  f"{min(ratios):.2f}x); Trainer.train() mean {np.mean(inner):.2f}x (lowest {min(inner):.2f}x)")
    peak = fastest_precision(args.device, args.threads)
    print("samples/s and wall s: the whole training call (loading, tokenizing, the linear-probe head, frozen blocks, "
          "validation); Trainer: Trainer.train() alone. Accuracy and macro-F1 differences are absolute. MFU: over "
          f"the measured {matmul_rate(peak) / 1e12:.2f} TFLOP/s {peak.precision} matmul peak for both (this machine's "
          f"faster precision; the recipe trains in fp32).")
    if not all(np.isfinite(results[-1]["accuracy"]) for _, results in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
