"""Preference tuning's evaluation on the held-out pairs: log-probabilities of the chosen and rejected answers under
the tuned model and the starting model (its reference), the implicit reward (beta times the gain over the
reference), greedy answers with their length and, where answers are checkable, their match with the chosen one;
the same for the starting model and the SFT-on-chosen baseline, and samples before and after."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pipelines.core.evaluation import build_report, champion_metrics
from pipelines.core.files import write_bytes_atomic
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, ReportTable
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.base import ProbeResult
from pipelines.core.tasks.instruction.chat import ensure_chat_template
from pipelines.core.tasks.instruction.evaluate import generate
from pipelines.core.tasks.instruction.train import load_causal_lm, load_finetuned_lm
from pipelines.core.tasks.preference import NAME
from pipelines.core.tasks.preference.data import REPORT_METRICS
from pipelines.core.tasks.preference.pairs import usable
from pipelines.core.training.compute import ComputeSettings, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_END_PUNCTUATION = re.compile(r"[\s.!?;:,]+$")


def answer_key(text: str, check: str) -> str | None:
    """What two answers must share to match: the text (case, spacing and final punctuation ignored), or its last
    number (commas and a trailing .0 ignored); None when there is nothing to compare."""
    if check == "final_number":
        found = _NUMBER.findall(text)
        if not found:
            return None
        value = found[-1].replace(",", "")
        return value[:-2] if value.endswith(".0") else value
    return _END_PUNCTUATION.sub("", " ".join(text.casefold().split())) or None


def answers_match(answer: str, reference: str, check: str) -> float:
    key = answer_key(reference, check)
    return float(key is not None and answer_key(answer, check) == key)


def sequence_logps(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int,
                   compute: ComputeSettings) -> np.ndarray:
    """The summed log-probability of each answer's tokens after its prompt (the quantity DPO's reward is made of),
    in batches of similar length."""
    device = torch.device(compute.device)
    model.eval().to(device)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    order = np.argsort([len(p) + len(a) for p, a in zip(prompt_ids, answer_ids, strict=True)], kind="stable")
    out = np.zeros(len(prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = [prompt_ids[i] + answer_ids[i] for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for n, (i, row) in enumerate(zip(batch, rows, strict=True)):
            ids[n, :len(row)] = torch.tensor(row)
            mask[n, :len(row)] = 1
            scored[n, len(prompt_ids[i]):len(row)] = True
        with torch.no_grad(), compute.autocast():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        sums = (logps * scored[:, 1:].to(device)).sum(dim=1).cpu().numpy()
        out[batch] = sums
    return out


def pair_logps(model: Any, tokenizer: Any, pairs: pd.DataFrame, batch_size: int,
               compute: ComputeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of every pair's chosen and rejected answer."""
    prompts = list(pairs["prompt_rendered"])
    return (sequence_logps(model, tokenizer, prompts, list(pairs["chosen_rendered"]), batch_size, compute),
            sequence_logps(model, tokenizer, prompts, list(pairs["rejected_rendered"]), batch_size, compute))


def preference_metrics(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray | None,
                       ref_rejected: np.ndarray | None, beta: float) -> dict[str, float]:
    """Likelihood accuracy and mean log-probabilities of a model; with the reference's log-probabilities, the
    implicit reward's accuracy and mean margin (NaN for the reference itself: its reward is zero everywhere)."""
    metrics = {"likelihood_accuracy": float(np.mean(chosen > rejected)) if len(chosen) else math.nan,
               "chosen_logp": float(np.mean(chosen)) if len(chosen) else math.nan,
               "rejected_logp": float(np.mean(rejected)) if len(rejected) else math.nan,
               "preference_accuracy": math.nan, "reward_margin": math.nan}
    if ref_chosen is not None and ref_rejected is not None and len(chosen):
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        metrics["preference_accuracy"] = float(np.mean(margin > 0))
        metrics["reward_margin"] = float(np.mean(margin))
    return metrics


def test_prompts(pairs: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The distinct test prompts with their chosen answer (the first pair's), at most `limit`."""
    test = pairs[pairs["split"] == "test"].drop_duplicates("prompt_rendered")
    return test.head(limit) if limit else test


def generation_metrics(answers: list[str], chosen: Sequence[str], tokenizer: Any, check: str) -> dict[str, float]:
    lengths = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] if answers else []
    match = [answers_match(a, c, check) for a, c in zip(answers, chosen, strict=True)]
    return {"exact_match": float(np.mean(match)) if match and check != "none" else math.nan,
            "mean_generated_tokens": float(np.mean(lengths)) if lengths else math.nan}


def _score(model: Any, tokenizer: Any, test: pd.DataFrame, prompts: pd.DataFrame, spec: SpecView,
           compute: ComputeSettings, reference: tuple[np.ndarray, np.ndarray] | None,
           batch_size: int) -> tuple[dict[str, float], list[str], tuple[np.ndarray, np.ndarray]]:
    chosen, rejected = pair_logps(model, tokenizer, test, batch_size, compute)
    metrics = preference_metrics(chosen, rejected, *(reference or (None, None)), spec.task.beta)
    answers = generate(model, tokenizer, list(prompts["prompt_rendered"]), spec.task.max_new_tokens, batch_size,
                       compute)
    metrics.update(generation_metrics(answers, list(prompts["chosen"]), tokenizer, spec.task.answer_check))
    return metrics, answers, (chosen, rejected)


def evaluate_preference(pairs: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print) -> EvaluationReport:
    """The tuned model, the starting model (the same weights with the adapter off) and the SFT-on-chosen baseline
    on every test pair, greedy answers to the distinct test prompts; decides promotion."""
    from pipelines.core.tasks.preference.train import train_sft_on_chosen

    compute.apply()
    batch_size = min(spec.evaluation.batch_size, 16)
    pairs = usable(pairs)
    test = pairs[pairs["split"] == "test"].reset_index(drop=True)
    prompts = test_prompts(pairs, spec.task.max_generations)
    model, tokenizer = load_finetuned_lm(checkpoint)
    progress(f"evaluating the starting model: {len(test)} test pairs, {len(prompts)} greedy answers")
    with model.disable_adapter():
        start, start_out, reference = _score(model, tokenizer, test, prompts, spec, compute, None, batch_size)
    progress(f"evaluating the preference-tuned model: {len(test)} test pairs, {len(prompts)} greedy answers")
    metrics, tuned_out, _ = _score(model, tokenizer, test, prompts, spec, compute, reference, batch_size)
    baselines: dict[str, dict[str, float]] = {}
    if "starting_model" in spec.evaluation.baselines:
        baselines["starting_model"] = start
    sft_out: list[str] | None = None
    sft_seconds = math.nan
    if "sft_on_chosen" in spec.evaluation.baselines:
        steps = int(checkpoint.task_data.get("steps") or 0)
        started_at = time.perf_counter()
        sft = train_sft_on_chosen(pairs, checkpoint.base_model, spec, steps, compute, progress)
        sft_seconds = time.perf_counter() - started_at
        progress(f"evaluating the SFT-on-chosen baseline: {len(test)} test pairs, {len(prompts)} greedy answers")
        baselines["sft_on_chosen"], sft_out, _ = _score(sft, tokenizer, test, prompts, spec, compute, reference,
                                                        batch_size)
        del sft

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        champion_model, champion_tokenizer = load_finetuned_lm(record)
        with champion_model.disable_adapter():
            ref = pair_logps(champion_model, champion_tokenizer, test, batch_size, compute)
        return _score(champion_model, champion_tokenizer, test, prompts, spec, compute, ref, batch_size)[0]

    samples = [{"prompt": str(row.text), "chosen": str(row.chosen), "starting model": start_out[i],
                "preference-tuned": tuned_out[i], **({"SFT on chosen": sft_out[i]} if sft_out is not None else {})}
               for i, row in enumerate(prompts.head(spec.task.sample_generations).itertuples(index=False))]
    out_dir.mkdir(parents=True, exist_ok=True)
    generations = out_dir / "generations.jsonl"
    lines = [json.dumps({"prompt": row.text, "chosen": row.chosen, "starting_model": start_out[i],
                         "preference_tuned": tuned_out[i],
                         "sft_on_chosen": sft_out[i] if sft_out is not None else None},
                        ensure_ascii=False)
             for i, row in enumerate(prompts.itertuples(index=False))]
    write_bytes_atomic(generations, ("\n".join(lines) + "\n").encode())
    started = checkpoint.base_model.started_from
    origin = (f"the champion v{started['version']} of {started['pipeline']}" if started
              else checkpoint.base_model.name)
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=len(test),
        headline=f"{len(test)} test pairs ({len(prompts)} greedy answers, {spec.task.answer_check} answer check); "
                 f"{spec.task.method} from {origin}; rewards are beta ({spec.task.beta:g}) times the log-probability "
                 "gain over the starting model",
        metric_names=REPORT_METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(ReportTable("Sample generations", tuple(samples[0]) if samples else ("prompt",),
                            tuple(tuple(s.values()) for s in samples)),),
        details={"test_prompts": len(prompts), "samples": samples, "method": spec.task.method,
                 "started_from": started, "steps": checkpoint.task_data.get("steps"),
                 "train_seconds": checkpoint.train_seconds,
                 "pairs_per_second": checkpoint.task_data.get("pairs_per_second"),
                 "sft_on_chosen_train_seconds": sft_seconds}, files={"generations": str(generations)})


def probe_candidate(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                    compute: ComputeSettings) -> ProbeResult:
    """The candidate's likelihood accuracy on a validation sample of pairs that have both answers: how often it
    already gives the chosen answer the higher log-probability."""
    from pipelines.core.tasks.preference.pairs import render_answer, render_prompt_text

    sample = sample_split(splits[splits["rejected"].astype(str).str.strip() != ""], "validation",
                          spec.base_model.probe.sample_rows, spec.training.seed)
    model, tokenizer = load_causal_lm(record.local_path, record.trust_remote_code)
    ensure_chat_template(tokenizer)
    prompts = [render_prompt_text(tokenizer, p) for p in sample["prompt_messages"]]
    chosen = [render_answer(tokenizer, p, t, a) for p, t, a in zip(sample["prompt_messages"], prompts,
                                                                    sample["chosen"], strict=True)]
    rejected = [render_answer(tokenizer, p, t, a) for p, t, a in zip(sample["prompt_messages"], prompts,
                                                                      sample["rejected"], strict=True)]
    good = sequence_logps(model, tokenizer, prompts, chosen, 8, compute)
    bad = sequence_logps(model, tokenizer, prompts, rejected, 8, compute)
    value = float(np.mean(good > bad)) if len(good) else 0.0
    return ProbeResult("likelihood_accuracy", value, value)
