"""Instruction tuning of a causal language model with LoRA (TRL's SFTTrainer), its evaluation and export.

Training data arrives rendered and tokenized (see pipelines.core.chat): `input_ids` plus a `completion_mask`
that is 1 on the response tokens only. SFTTrainer is given exactly these ids with `completion_only_loss=True`,
so the tokens a person sees in the rendered_dataset asset are the tokens the model is trained on.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.core.chat import ensure_chat_template, score_generation
from pipelines.core.errors import CheckpointError
from pipelines.core.evaluation import decide_promotion
from pipelines.core.files import atomic_path, write_bytes_atomic
from pipelines.core.lineage import frame_digest
from pipelines.core.records import BaseModelRecord, CheckpointRecord, GenerationReport
from pipelines.core.spec import LoraSettingsConfig, PipelineSpec, TrainingConfig
from pipelines.core.training import (ComputeSettings, MetricsSink, ProgressFn, _make_callback, checkpoint_digest,
                                     lora_for, peak_memory_mb)

TASK = "instruction_tuning"
GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")


def load_causal_lm(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a Hugging Face folder (a GGUF base is converted to one first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer


def build_causal_lora_config(cfg: LoraSettingsConfig) -> Any:
    """The one place a peft.LoraConfig for a causal language model is built."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")


def build_sft_config(cfg: TrainingConfig, output_dir: Path, compute: ComputeSettings, has_validation: bool,
                     eval_batch_size: int) -> Any:
    """The one place trl.SFTConfig is built. SFTConfig turns gradient checkpointing and bf16 on by default,
    unlike TrainingArguments: both are set explicitly here."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_fraction,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=compute.precision == "bf16",
        gradient_checkpointing=False,  # a 135M model fits; checkpointing would cost ~30% speed for nothing
        use_cpu=compute.device == "cpu",
        completion_only_loss=True,  # loss on the response tokens only (completion_mask)
        max_length=cfg.max_length,
        packing=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
    )


def _dataset(frame: pd.DataFrame) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(map(int, ids)) for ids in frame["input_ids"]],
                              "completion_mask": [list(map(int, m)) for m in frame["completion_mask"]]})


def train_causal_lm(rendered: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec, out_dir: Path,
                    compute: ComputeSettings, progress: ProgressFn = print,
                    sink: MetricsSink | None = None) -> CheckpointRecord:
    """LoRA on the train split's rendered examples, loss on responses only; keeps the epoch with the lowest
    validation loss; saves the adapter and tokenizer (with its chat template) to `out_dir`."""
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    cfg = spec.training
    compute.apply()
    set_seed(cfg.seed)
    train = rendered[rendered["split"] == "train"]
    validation = rendered[rendered["split"] == "validation"]
    model, tokenizer = load_causal_lm(base.local_path, base.trust_remote_code)
    ensure_chat_template(tokenizer)
    model = get_peft_model(model, build_causal_lora_config(lora_for(cfg.lora, base)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    progress(f"LoRA r={cfg.lora.r} on {list(cfg.lora.target_modules)}: {trainable:,} trainable of {total:,} "
             f"parameters ({trainable / total:.2%}); precision={compute.precision}; {len(train)} train and "
             f"{len(validation)} validation examples")
    train_ds = _dataset(train)
    val_ds = _dataset(validation) if len(validation) else None
    callback = _make_callback(model, progress, sink, "loss", higher_is_better=False)
    with tempfile.TemporaryDirectory(prefix="tuneline-sft-") as scratch:
        args = build_sft_config(cfg, Path(scratch), compute, val_ds is not None, spec.evaluation.batch_size)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                             processing_class=tokenizer, callbacks=[callback])
        result = trainer.train()
    callback.restore_best()
    if callback.best_epoch is not None:
        progress(f"kept the adapter of epoch {callback.best_epoch:g} (lowest validation loss "
                 f"{callback.best_value:.4f})")
    train_seconds = float(result.metrics.get("train_runtime", 0.0))
    real_tokens = float(train["total_tokens"].sum()) * cfg.epochs
    history = tuple({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                    for entry in trainer.state.log_history)
    model.eval()
    data_sha256 = frame_digest(rendered)
    path = _save_lm_checkpoint(model, tokenizer, spec, base, history, out_dir, data_sha256)
    progress(f"saved the adapter to {path} ({real_tokens / train_seconds if train_seconds else 0:.0f} tokens/s, "
             f"peak memory {peak_memory_mb():.0f} MB)")
    return CheckpointRecord(
        path=str(path), sha256=checkpoint_digest(path, TASK), base_model=base, spec_hash=spec.spec_hash,
        data_sha256=data_sha256, labels=(), train_rows=len(train), validation_rows=len(validation),
        best_epoch=callback.best_epoch, trainable_parameters=trainable, train_seconds=train_seconds,
        tokens_per_second=real_tokens / train_seconds if train_seconds > 0 else 0.0, precision=compute.precision,
        peak_memory_mb=peak_memory_mb(), history=history, task=TASK)


def _save_lm_checkpoint(model: Any, tokenizer: Any, spec: PipelineSpec, base: BaseModelRecord,
                        history: tuple[dict[str, float], ...], out_dir: Path, data_sha256: str) -> Path:
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; a checkpoint folder is never overwritten")
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp / "adapter"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"task": TASK, "base_model": base.to_dict(), "spec_hash": spec.spec_hash, "data_sha256": data_sha256}
        (tmp / "causal_lm.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (tmp / "spec.yaml").write_text(spec.to_yaml(), encoding="utf-8")
        (tmp / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
    return out_dir


def lm_record_from_folder(path: Path, model_version: str | None = None) -> CheckpointRecord:
    """The record of a chat-model checkpoint folder copied from elsewhere (e.g. the model registry)."""
    meta = json.loads((path / "causal_lm.json").read_text(encoding="utf-8"))
    base = BaseModelRecord(**meta["base_model"])
    if not Path(base.local_path).is_dir():
        raise CheckpointError(f"checkpoint {path} needs its base model {base.name} at {base.local_path}, which is "
                              "not on this machine (materialize the pipeline's base_model asset first)")
    history = json.loads((path / "history.json").read_text(encoding="utf-8"))
    return CheckpointRecord(path=str(path), sha256=checkpoint_digest(path, TASK), base_model=base,
                            spec_hash=meta["spec_hash"], data_sha256=meta.get("data_sha256", ""), labels=(),
                            train_rows=0, validation_rows=0, best_epoch=None, trainable_parameters=0,
                            train_seconds=0.0, tokens_per_second=0.0, precision="", history=tuple(history),
                            model_version=model_version, task=TASK)


def load_finetuned_lm(record: CheckpointRecord) -> tuple[Any, Any]:
    """The base model with the checkpoint's adapter, after checking the adapter against the record's digest."""
    from peft import PeftModel

    path = Path(record.path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} is missing")
    digest = checkpoint_digest(path, TASK)
    if digest != record.sha256:
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its record says "
                              f"{record.sha256}: the files changed after training")
    model, _ = load_causal_lm(record.base_model.local_path, record.base_model.trust_remote_code)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PeftModel.from_pretrained(model, str(path / "adapter")).eval(), tokenizer


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


def _score_model(model: Any, tokenizer: Any, rendered: pd.DataFrame, prompts: pd.DataFrame, spec: PipelineSpec,
                 compute: ComputeSettings, batch_size: int) -> tuple[dict[str, float], list[str], list[dict[str, float]]]:
    validation = rendered[rendered["split"] == "validation"]
    test = rendered[rendered["split"] == "test"]
    metrics: dict[str, float] = {}
    for name, part in (("validation", validation), ("test", test)):
        loss, _ = completion_loss(model, part, batch_size, compute, tokenizer.pad_token_id)
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_perplexity"] = math.exp(loss) if not math.isnan(loss) else math.nan
    outputs = generate(model, tokenizer, prompts["prompt_rendered"].tolist(), spec.evaluation.max_new_tokens,
                       batch_size, compute)
    scores = [score_generation(out, refs) for out, refs in zip(outputs, prompts["references"], strict=True)]
    for name in GENERATION_METRICS:
        metrics[name] = float(np.mean([s[name] for s in scores])) if scores else math.nan
    return metrics, outputs, scores


def test_prompts(rendered: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """One row per distinct test prompt, with every reference response it has (in split order)."""
    test = rendered[rendered["split"] == "test"]
    grouped = test.groupby("prompt_rendered", sort=False).agg(
        text=("text", "first"), references=("response", list), category=("category", "first")).reset_index()
    return grouped.head(limit) if limit else grouped


def evaluate_generation(rendered: pd.DataFrame, checkpoint: CheckpointRecord, spec: PipelineSpec, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None,
                        progress: ProgressFn = print) -> GenerationReport:
    """Validation/test loss and perplexity, and greedy test generations scored against the references, for
    the base model and the fine-tuned one (and the current champion); decides promotion."""
    compute.apply()
    batch_size = min(spec.evaluation.batch_size, 16)
    prompts = test_prompts(rendered, spec.evaluation.max_generations)
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
    champion_metrics = None
    if champion is not None and champion.model_version == checkpoint.model_version:
        champion_metrics = metrics
    elif champion is not None:
        progress(f"evaluating the champion v{champion.model_version}")
        champion_model, champion_tokenizer = load_finetuned_lm(champion)
        champion_metrics, _, _ = _score_model(champion_model, champion_tokenizer, rendered, prompts, spec, compute,
                                              batch_size)
    primary = spec.evaluation.primary_metric
    beats = {name: metrics[primary] > m[primary] for name, m in baselines.items()}
    promotion = decide_promotion(metrics, champion_metrics, baselines, primary, spec.promotion.min_improvement,
                                 checkpoint.model_version, champion.model_version if champion else None)
    samples = tuple({"instruction": str(row.text), "reference": str(row.references[0]),
                     "base_output": base_out[i], "finetuned_output": tuned_out[i]}
                    for i, row in enumerate(prompts.head(spec.evaluation.sample_generations).itertuples(index=False)))
    out_dir.mkdir(parents=True, exist_ok=True)
    generations = out_dir / "generations.jsonl"
    lines = [json.dumps({"instruction": row.text, "category": row.category, "references": list(row.references),
                         "finetuned_output": tuned_out[i], "finetuned_scores": tuned_scores[i],
                         "base_output": base_out[i], "base_scores": base_scores[i]}, ensure_ascii=False)
             for i, row in enumerate(prompts.itertuples(index=False))]
    write_bytes_atomic(generations, ("\n".join(lines) + "\n").encode())
    report = GenerationReport(
        pipeline=spec.name, checkpoint_sha256=checkpoint.sha256, test_rows=int((rendered["split"] == "test").sum()),
        test_prompts=len(prompts), metrics=metrics, baselines=baselines, primary_metric=primary,
        beats_baselines=beats, promotion=promotion, champion_metrics=champion_metrics, samples=samples,
        json_path=str(out_dir / "report.json"), html_path=str(out_dir / "report.html"),
        generations_path=str(generations))
    write_bytes_atomic(Path(report.json_path), json.dumps(report.to_dict(), indent=2).encode())
    write_bytes_atomic(Path(report.html_path), _report_html(report).encode())
    return report


METRIC_ROWS = ("validation_loss", "validation_perplexity", "test_loss", "test_perplexity", "exact_match",
               "token_f1", "rouge_l")


def _columns(report: GenerationReport) -> dict[str, dict[str, float]]:
    columns = {"fine-tuned": report.metrics, **{b.replace("_", " "): m for b, m in report.baselines.items()}}
    if report.champion_metrics is not None:
        columns[f"champion v{report.promotion.get('champion_version')}"] = report.champion_metrics
    return columns


def _md(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def generation_report_markdown(report: GenerationReport) -> str:
    """The report as Markdown for the Dagster UI: metrics of every model, the promotion, sample generations."""
    columns = _columns(report)
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = "".join(f"| {name} | " + " | ".join(f"{m.get(name, math.nan):.4f}" for m in columns.values()) + " |\n"
                   for name in METRIC_ROWS)
    verdicts = ", ".join(f"{'beats' if won else 'does NOT beat'} the {name.replace('_', ' ')}"
                         for name, won in report.beats_baselines.items())
    samples = "| instruction | reference | base model | fine-tuned |\n|---|---|---|---|\n" + "".join(
        f"| {_md(s['instruction'])} | {_md(s['reference'])} | {_md(s['base_output'])} | {_md(s['finetuned_output'])} |\n"
        for s in report.samples)
    return (f"**{report.pipeline}** on {report.test_rows} test rows ({report.test_prompts} distinct instructions, "
            f"greedy decoding) — on {report.primary_metric} the fine-tuned model {verdicts}.\n\n"
            f"**Promotion:** {report.promotion.get('reason', '')}\n\n{head}{body}\n**Sample generations**\n\n{samples}")


def _report_html(report: GenerationReport) -> str:
    columns = _columns(report)
    th = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{m.get(name, math.nan):.4f}</td>" for m in columns.values())
                   + "</tr>" for name in METRIC_ROWS)
    samples = "".join("<tr>" + "".join(f"<td>{html.escape(s[k])}</td>" for k in
                                       ("instruction", "reference", "base_output", "finetuned_output")) + "</tr>"
                      for s in report.samples)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(report.pipeline)} evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}}</style></head><body>
<h1>{html.escape(report.pipeline)}: evaluation on {report.test_rows} test rows</h1>
<p>{report.test_prompts} distinct test instructions, greedy decoding; scores take the best of an instruction's
reference answers. checkpoint sha256 <code>{html.escape(report.checkpoint_sha256)}</code></p>
<p><b>Promotion:</b> {html.escape(str(report.promotion.get("reason", "")))}</p>
<h2>Metrics</h2><table><thead><tr><th>metric</th>{th}</tr></thead><tbody>{rows}</tbody></table>
<h2>Sample generations</h2><table><thead><tr><th>instruction</th><th>reference</th><th>base model</th>
<th>fine-tuned</th></tr></thead><tbody>{samples}</tbody></table>
</body></html>
"""


# --------------------------------------------------------------------------------------------- export
def export_merged(record: CheckpointRecord, out_dir: Path) -> Path:
    """Base model + adapter merged into one safetensors model, with the tokenizer and its chat template.

    The folder loads with plain transformers `AutoModelForCausalLM.from_pretrained`; written to a temporary
    sibling, then renamed, and never over an existing folder.
    """
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; choose a new folder for the export")
    model, tokenizer = load_finetuned_lm(record)
    merged = model.merge_and_unload()
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(tmp))
        base = record.base_model
        (tmp / "README.md").write_text(
            f"---\nlicense: {base.license}\nbase_model: {base.name}\nlibrary_name: transformers\n---\n\n"
            f"# Fine-tuned {base.name}\n\nMerged by tuneline from checkpoint `{record.sha256}` "
            f"(model version {record.model_version or 'unregistered'}). Base weights sha256 "
            f"`{base.weights_sha256}`; training data digest `{record.data_sha256}`.\n", encoding="utf-8")
    return out_dir
