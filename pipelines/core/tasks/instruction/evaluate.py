"""The evaluation report of a chat model: loss and perplexity on validation and test, greedy test generations scored
against the references (exact match, token F1, ROUGE-L) for the base and the fine-tuned model, and the prompting
baseline with example pairs shown first."""

from __future__ import annotations

import json
import math
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
from pipelines.core.tasks.instruction import NAME
from pipelines.core.tasks.instruction.chat import render_conversations, render_prompt, score_generation
from pipelines.core.tasks.instruction.data import GENERATION_METRICS, REPORT_METRICS
from pipelines.core.tasks.instruction.train import load_causal_lm, load_finetuned_lm
from pipelines.core.training.compute import ComputeSettings, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def completion_loss(model: Any, frame: pd.DataFrame, batch_size: int, compute: ComputeSettings,
                    pad_token_id: int) -> tuple[float, int]:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss), and the token count."""
    if len(frame) == 0:
        return math.nan, 0
    device = torch.device(compute.device)
    model.eval().to(device)
    ids = [list(map(int, x)) for x in frame["input_ids"]]
    masks = [list(map(int, m)) for m in frame["completion_mask"]]
    order = np.argsort([len(x) for x in ids], kind="stable")
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(ids[i])
            input_ids[row, :n] = torch.tensor(ids[i])
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.tensor(masks[i]) == 1, torch.tensor(ids[i]), torch.tensor(-100))
        with compute.autocast():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                 shifted.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shifted != -100).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             compute: ComputeSettings) -> list[str]:
    """Greedy answers to rendered prompts (left-padded batches of similar length), special tokens removed."""
    device = torch.device(compute.device)
    model.eval().to(device)
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = np.argsort([len(x) for x in encoded], kind="stable")
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        with compute.autocast():
            generated = model.generate(input_ids=padded["input_ids"].to(device),
                                       attention_mask=padded["attention_mask"].to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = generated[:, padded["input_ids"].shape[1]:]
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return outputs


def _score_model(model: Any, tokenizer: Any, rendered: pd.DataFrame, prompts: pd.DataFrame, spec: SpecView,
                 compute: ComputeSettings,
                 batch_size: int) -> tuple[dict[str, float], list[str], list[dict[str, float]]]:
    validation = rendered[rendered["split"] == "validation"]
    test = rendered[rendered["split"] == "test"]
    metrics: dict[str, float] = {}
    for name, part in (("validation", validation), ("test", test)):
        loss, _ = completion_loss(model, part, batch_size, compute, tokenizer.pad_token_id)
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_perplexity"] = math.exp(loss) if not math.isnan(loss) else math.nan
    outputs = generate(model, tokenizer, prompts["prompt_rendered"].tolist(), spec.task.max_new_tokens,
                       batch_size, compute)
    scores = [score_generation(out, refs) for out, refs in zip(outputs, prompts["references"], strict=True)]
    for name in GENERATION_METRICS:
        metrics[name] = float(np.mean([s[name] for s in scores])) if scores else math.nan
    return metrics, outputs, scores


def distinct_test_prompts(rendered: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """One row per distinct test prompt, with every reference response it has (in split order)."""
    test = rendered[rendered["split"] == "test"]
    extra = {"messages": ("messages", "first")} if "messages" in test.columns else {}
    grouped = test.groupby("prompt_rendered", sort=False).agg(
        text=("text", "first"), references=("response", list), category=("category", "first"),
        **extra).reset_index()
    return grouped.head(limit) if limit else grouped


def few_shot_prompts(tokenizer: Any, prompts: pd.DataFrame, train: pd.DataFrame, shots: int, seed: int) -> list[str]:
    """Each test prompt rendered after `shots` instruction / response pairs of the train split (the same pairs,
    drawn with the seed, for every prompt) as earlier turns of the conversation."""
    picked = train.sample(n=min(shots, len(train)), random_state=seed) if shots else train.head(0)
    examples: list[dict[str, Any]] = []
    for row in picked.itertuples(index=False):
        examples += [{"role": "user", "content": str(row.text)}, {"role": "assistant", "content": str(row.response)}]
    rendered = []
    for row in prompts.itertuples(index=False):
        found = getattr(row, "messages", None)
        messages = (json.loads(found) if isinstance(found, str) else list(found)) if found is not None else \
            [{"role": "user", "content": str(row.text)}]
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        rendered.append(render_prompt(tokenizer, [*system, *examples, *turns, {"role": "assistant", "content": ""}]))
    return rendered


def evaluate_generation(rendered: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
    """Validation/test loss and perplexity, and greedy test generations scored against the references, for
    the base model and the fine-tuned one (and the current champion); decides promotion. The prompting baselines
    prompt the base model itself (`prompt_model` is not used)."""
    compute.apply()
    batch_size = min(spec.evaluation.batch_size, 16)
    prompts = distinct_test_prompts(rendered, spec.task.max_generations)
    model, tokenizer = load_finetuned_lm(checkpoint)
    progress(f"evaluating the fine-tuned model: losses on {int((rendered['split'] != 'train').sum())} rows, "
             f"{len(prompts)} test generations")
    metrics, tuned_out, tuned_scores = _score_model(model, tokenizer, rendered, prompts, spec, compute, batch_size)
    baselines: dict[str, dict[str, float]] = {}
    base_out: list[str] = [""] * len(prompts)
    base_scores: list[dict[str, float]] = [{}] * len(prompts)
    if "base_model" in spec.evaluation.baselines:
        progress("evaluating the base model (the same weights with the adapter switched off)")
        with model.disable_adapter():
            baselines["base_model"], base_out, base_scores = _score_model(model, tokenizer, rendered, prompts, spec,
                                                                          compute, batch_size)

    if "prompting" in spec.evaluation.baselines:  # the base model again, with example pairs shown first
        train = rendered[rendered["split"] == "train"]
        for shots in spec.evaluation.prompting.shots:
            if shots == 0 and "base_model" in baselines:
                baselines["prompt_0_shot"] = {k: baselines["base_model"][k] for k in GENERATION_METRICS}
                continue
            progress(f"prompting the base model {shots}-shot: {len(prompts)} test generations")
            few_shot = few_shot_prompts(tokenizer, prompts, train, shots, spec.training.seed)
            with model.disable_adapter():
                outputs = generate(model, tokenizer, few_shot, spec.task.max_new_tokens, batch_size, compute)
            scored = [score_generation(out, refs) for out, refs in zip(outputs, prompts["references"], strict=True)]
            baselines[f"prompt_{shots}_shot"] = {name: float(np.mean([x[name] for x in scored])) if scored
                                                 else math.nan for name in GENERATION_METRICS}

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        champion_model, champion_tokenizer = load_finetuned_lm(record)
        return _score_model(champion_model, champion_tokenizer, rendered, prompts, spec, compute, batch_size)[0]

    samples = [{"instruction": str(row.text), "reference": str(row.references[0]), "base_output": base_out[i],
                "finetuned_output": tuned_out[i]}
               for i, row in enumerate(prompts.head(spec.task.sample_generations).itertuples(index=False))]
    out_dir.mkdir(parents=True, exist_ok=True)
    generations = out_dir / "generations.jsonl"
    lines = [json.dumps({"instruction": row.text, "category": row.category, "references": list(row.references),
                         "finetuned_output": tuned_out[i], "finetuned_scores": tuned_scores[i],
                         "base_output": base_out[i], "base_scores": base_scores[i]}, ensure_ascii=False)
             for i, row in enumerate(prompts.itertuples(index=False))]
    write_bytes_atomic(generations, ("\n".join(lines) + "\n").encode())
    test_rows = int((rendered["split"] == "test").sum())
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=test_rows,
        headline=f"{test_rows} test rows ({len(prompts)} distinct instructions, greedy decoding; scores take the "
                 "best of an instruction's reference answers)",
        metric_names=REPORT_METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(ReportTable("Sample generations", ("instruction", "reference", "base model", "fine-tuned"),
                            tuple(tuple(s.values()) for s in samples)),),
        details={"test_prompts": len(prompts), "samples": samples}, files={"generations": str(generations)})


def probe_candidate(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                    compute: ComputeSettings) -> ProbeResult:
    """The base model's loss on the responses of a validation sample (lower is better). No resamples: token
    losses under different tokenizers are not paired, so candidates are ranked by the loss alone."""
    validation = sample_split(splits, "validation", spec.base_model.probe.sample_rows, spec.training.seed)
    model, tokenizer = load_causal_lm(record.local_path)
    rendered = render_conversations(validation, tokenizer, spec.training.max_length, "truncate").frame
    loss, _ = completion_loss(model, rendered, 8, compute, tokenizer.pad_token_id)
    return ProbeResult("validation_loss", loss, -loss)
