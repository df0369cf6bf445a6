"""The instruction-tuning assets of a spec: cleaned conversations, the rendered dataset (chat template applied,
tokenized, over-length rule applied), the LoRA adapter of a causal LM, and its generation report."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of asset functions.

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.chat import CHAT_DROP_REASONS, RENDER_DROP_REASONS, clean_conversations, \
    render_conversations, select_conversations
from pipelines.core.generation import evaluate_generation, generation_report_markdown, train_causal_lm
from pipelines.core.lineage import frame_digest, value_digest
from pipelines.core.records import BaseModelRecord, CheckpointRecord, GenerationReport
from pipelines.core.spec import InstructionTuningTaskConfig, PipelineSpec
from pipelines.core.splitting import SPLITS
from pipelines.core.training import record_from_folder
from resources.compute import ComputeResource
from resources.storage import StorageResource
from resources.tracking import AssetRun, TrackingResource

RENDERED_EXAMPLES_SHOWN = 3


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: Any, limit: int = 100) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tracked(run: AssetRun, data_version: str, metadata: dict[str, Any]) -> dict[str, Any]:
    run.set_tags({"dagster.data_version": data_version})
    return {**metadata, "mlflow_run_id": run.run_id, "mlflow_run": dg.MetadataValue.url(run.url)}


def _fenced(text: str) -> str:
    """A Markdown code block that holds `text` verbatim, even when it contains ``` itself."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}"


def rendered_examples_md(frame: pd.DataFrame, count: int) -> str:
    """The first training examples exactly as the model sees them; the part that carries loss is marked."""
    parts = []
    for i, row in enumerate(frame[frame["split"] == "train"].head(count).itertuples(index=False), start=1):
        parts.append(f"**Example {i}** ({row.prompt_tokens} prompt tokens without loss, {row.completion_tokens} "
                     f"response tokens with loss{', truncated' if row.truncated else ''}; {row.source_file} row "
                     f"{row.source_row})\n\nPrompt (no loss):\n{_fenced(row.prompt_rendered)}\n\n"
                     f"Response (loss):\n{_fenced(row.completion_rendered)}")
    return "\n\n".join(parts) or "no training examples"


def build_instruction_assets(spec: PipelineSpec, project_root: Path,
                             common: dict[str, Any]) -> list[dg.AssetsDefinition]:
    """cleaned_dataset, rendered_dataset, finetuned_checkpoint and evaluation_report for instruction tuning."""
    task = spec.task
    assert isinstance(task, InstructionTuningTaskConfig)

    def key(name: str) -> dg.AssetKey:
        return dg.AssetKey([spec.name, name])

    @dg.asset(**common, name="cleaned_dataset", ins={"raw_data": dg.AssetIn(key("raw_data"))},
              code_version=spec.section_hash("task", "cleaning"), kinds={"pandas"})
    def cleaned_dataset(context: dg.AssetExecutionContext, tracking: TrackingResource,
                        raw_data: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Conversations (JSON messages) without malformed, empty, over-long or duplicate rows."""
        with tracking.asset_run(context, spec.name) as run:
            result = clean_conversations(select_conversations(raw_data, task), spec.cleaning)
            digest = frame_digest(result.frame)
            run.log_dataset(result.frame, f"{spec.name}/cleaned_dataset", digest, "cleaned", "cleaning")
            run.log_metrics({"rows_in": result.rows_in, "rows_kept": result.rows_kept,
                             **{f"dropped_{why}": n for why, n in result.dropped.items()}}, 0)
            run.log_params({f"cleaning.{k}": v for k, v in spec.cleaning.model_dump().items()})
        examples = "\n\n".join(
            f"**{why}** (first {len(rows)}):\n\n" + _md_table(
                list(rows[0]), [[_cell(v, 80) for v in r.values()] for r in rows])
            for why, rows in result.dropped_examples.items())
        per_instruction = result.frame.groupby("norm_text").size()
        context.log.info(f"kept {result.rows_kept} of {result.rows_in} conversations; dropped "
                         + (", ".join(f"{n} {why}" for why, n in result.dropped.items() if n) or "none"))
        counts = result.category_counts()
        return dg.Output(result.frame, data_version=dg.DataVersion(digest[:32]), metadata=_tracked(run, digest[:32], {
            "dagster/row_count": result.rows_kept,
            "rows_in": result.rows_in,
            "rows_kept": result.rows_kept,
            "rows_dropped": result.rows_in - result.rows_kept,
            **{f"dropped_{why}": n for why, n in result.dropped.items()},
            "dropped_by_reason": dg.MetadataValue.md(_md_table(["reason", "rows"],
                                                               [[w, result.dropped[w]] for w in CHAT_DROP_REASONS])),
            "dropped_examples": dg.MetadataValue.md(examples or "nothing dropped"),
            "distinct_instructions": int(len(per_instruction)),
            "instructions_with_several_responses": int((per_instruction > 1).sum()),
            "categories": dg.MetadataValue.md(_md_table(["category", "rows"], [[k, v] for k, v in counts.items()])),
            "preview": dg.MetadataValue.md(_md_table(["instruction", "response", "category"], [
                [_cell(r.text), _cell(r.response), r.category] for r in result.frame.head(5).itertuples()])),
            "sha256": digest,
        }))

    @dg.asset(**common, name="rendered_dataset",
              ins={"splits": dg.AssetIn(key("splits")), "base_model": dg.AssetIn(key("base_model"))},
              code_version=spec.section_hash("task", "training"), kinds={"huggingface"})
    def rendered_dataset(context: dg.AssetExecutionContext, tracking: TrackingResource, splits: pd.DataFrame,
                         base_model: BaseModelRecord) -> dg.Output[pd.DataFrame]:
        """Every split's conversations rendered with the base model's chat template and tokenized; prompt
        tokens are masked from the loss; examples over training.max_length are dropped or truncated."""
        from transformers import AutoTokenizer

        with tracking.asset_run(context, spec.name) as run:
            tokenizer = AutoTokenizer.from_pretrained(base_model.local_path)
            result = render_conversations(splits, tokenizer, spec.training.max_length, task.overlength)
            frame = result.frame
            digest = frame_digest(frame)
            run.log_dataset(frame.drop(columns=["input_ids", "completion_mask"]), f"{spec.name}/rendered_dataset",
                            digest, "rendered", "chat template")
            run.log_metrics({"rows_in": result.rows_in, "rows_kept": len(frame), "rows_dropped": result.dropped_total,
                             "rows_truncated": result.truncated_total,
                             **{f"{s}_tokens": int(frame.loc[frame["split"] == s, "total_tokens"].sum())
                                for s in SPLITS}}, 0)
            run.log_text(rendered_examples_md(frame, RENDERED_EXAMPLES_SHOWN), "rendered_examples.md")
        lengths = frame["total_tokens"]
        by_split = [[s, int((frame["split"] == s).sum()),
                     sum(result.dropped[w].get(s, 0) for w in RENDER_DROP_REASONS), result.truncated.get(s, 0),
                     int(frame.loc[frame["split"] == s, "total_tokens"].sum())] for s in SPLITS]
        context.log.info(f"rendered {len(frame)} of {result.rows_in} examples with the {result.template} chat "
                         f"template; {result.dropped_total} dropped and {result.truncated_total} truncated at "
                         f"{spec.training.max_length} tokens ({task.overlength})")
        return dg.Output(frame, data_version=dg.DataVersion(digest[:32]), metadata=_tracked(run, digest[:32], {
            "dagster/row_count": len(frame),
            "chat_template": result.template,
            "max_length": spec.training.max_length,
            "overlength": task.overlength,
            "rows_in": result.rows_in,
            "rows_dropped_over_max_length": result.dropped_total,
            "rows_truncated": result.truncated_total,
            "per_split": dg.MetadataValue.md(_md_table(["split", "rows", "dropped", "truncated", "tokens"], by_split)),
            "tokens_per_example": dg.MetadataValue.json({
                "min": int(lengths.min()) if len(lengths) else 0, "median": float(lengths.median()) if len(lengths) else 0,
                "p95": float(lengths.quantile(0.95)) if len(lengths) else 0, "max": int(lengths.max()) if len(lengths) else 0}),
            "response_token_share": round(float(frame["completion_tokens"].sum() / max(lengths.sum(), 1)), 4),
            "rendered_examples": dg.MetadataValue.md(rendered_examples_md(frame, RENDERED_EXAMPLES_SHOWN)),
            "sha256": digest,
        }))

    @dg.asset(**common, name="finetuned_checkpoint",
              ins={"rendered_dataset": dg.AssetIn(key("rendered_dataset")),
                   "base_model": dg.AssetIn(key("base_model"))},
              code_version=spec.section_hash("training"), kinds={"pytorch"})
    def finetuned_checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
                             compute: ComputeResource, tracking: TrackingResource, rendered_dataset: pd.DataFrame,
                             base_model: BaseModelRecord) -> dg.Output[CheckpointRecord]:
        """LoRA adapter of the chat model trained on the rendered train split (loss on responses only); the
        epoch with the lowest validation loss is kept."""
        settings = compute.settings(spec.training.precision)
        out_dir = storage.run_folder("checkpoints", spec.name, context.run_id)
        with tracking.asset_run(context, spec.name) as run:
            run.log_params({**{f"training.{k}": v for k, v in spec.training.model_dump().items() if k != "lora"},
                            **{f"lora.{k}": v for k, v in spec.training.lora.model_dump().items()},
                            "precision": settings.precision, "device": settings.device, "trainer": "trl.SFTTrainer",
                            "base_model": base_model.name, "base_model_sha256": base_model.weights_sha256,
                            "spec_hash": spec.spec_hash})
            run.log_text(spec.to_yaml(), "spec.yaml")
            record = train_causal_lm(rendered_dataset, base_model, spec, out_dir, settings, progress=context.log.info,
                                     sink=run)
            run.log_metrics({"train_seconds": record.train_seconds, "tokens_per_second": record.tokens_per_second,
                             "peak_memory_mb": record.peak_memory_mb,
                             "trainable_parameters": record.trainable_parameters}, 0)
            run.log_artifact(record.path, "checkpoint")
            version = tracking.register(run, spec.name, "checkpoint", {
                "tuneline.data_sha256": record.data_sha256, "tuneline.spec_hash": record.spec_hash,
                "tuneline.checkpoint_sha256": record.sha256, "dagster.run_id": context.run_id,
                "tuneline.base_model_sha256": base_model.weights_sha256, "tuneline.task": record.task})
            record = dataclasses.replace(record, model_version=version)
            context.log.info(f"registered {spec.name} version {version} in the MLflow model registry")
        epochs = [h for h in record.history if "eval_loss" in h]
        history_md = _md_table(["epoch", "validation loss", "validation token accuracy"],
                               [[f"{h['epoch']:g}", f"{h['eval_loss']:.4f}",
                                 f"{h.get('eval_mean_token_accuracy', float('nan')):.4f}"] for h in epochs]) \
            if epochs else "no validation split"
        return dg.Output(record, data_version=dg.DataVersion(record.sha256[:32]), metadata=_tracked(run, record.sha256[:32], {
            "path": dg.MetadataValue.path(record.path),
            "sha256": record.sha256,
            "trainer": "trl.SFTTrainer (completion_only_loss)",
            "base_model": record.base_model.name,
            "base_model_sha256": record.base_model.weights_sha256,
            "spec_hash": record.spec_hash,
            "data_sha256": record.data_sha256,
            "train_rows": record.train_rows,
            "validation_rows": record.validation_rows,
            "best_epoch": record.best_epoch if record.best_epoch is not None else -1,
            "trainable_parameters": record.trainable_parameters,
            "train_seconds": round(record.train_seconds, 1),
            "tokens_per_second": round(record.tokens_per_second, 1),
            "precision": record.precision,
            "validation_by_epoch": dg.MetadataValue.md(history_md),
            "peak_memory_mb": round(record.peak_memory_mb, 1),
            "model_version": f"{spec.name} v{record.model_version}",
        }))

    @dg.asset(**common, name="evaluation_report",
              ins={"rendered_dataset": dg.AssetIn(key("rendered_dataset")),
                   "finetuned_checkpoint": dg.AssetIn(key("finetuned_checkpoint"))},
              code_version=spec.section_hash("evaluation"), kinds={"pytorch"})
    def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                          tracking: TrackingResource, rendered_dataset: pd.DataFrame,
                          finetuned_checkpoint: CheckpointRecord) -> dg.Output[GenerationReport]:
        """Loss and perplexity on validation and test, and scored greedy test generations (exact match, token
        F1, ROUGE-L), for the base and the fine-tuned model; promotes the checkpoint if it wins."""
        settings = compute.settings(spec.training.precision)
        out_dir = storage.run_folder("reports", spec.name, context.run_id)
        with tracking.asset_run(context, spec.name) as run:
            found = tracking.champion(spec.name)
            champion = record_from_folder(found[1], model_version=found[0]) if found else None
            report = evaluate_generation(rendered_dataset, finetuned_checkpoint, spec, out_dir, settings,
                                         champion=champion, progress=context.log.info)
            run.log_metrics({**report.metrics, **{f"{b}_{k}": v for b, m in report.baselines.items()
                                                  for k, v in m.items()},
                             **({f"champion_{k}": v for k, v in report.champion_metrics.items()}
                                if report.champion_metrics else {})}, 0)
            run.log_text(json.dumps(list(report.samples), indent=2, ensure_ascii=False), "samples.json")
            for path in (report.json_path, report.html_path, report.generations_path):
                run.log_artifact(path, "report")
            run.set_tags({"tuneline.promotion": report.promotion["reason"],
                          "tuneline.model_version": finetuned_checkpoint.model_version or ""})
            if report.promotion["promote"] and finetuned_checkpoint.model_version:
                tracking.promote(spec.name, finetuned_checkpoint.model_version, report.promotion["reason"])
            m, b = report.metrics, report.baselines.get("base_model", {})
            context.log.info(f"test perplexity {m['test_perplexity']:.2f} (base {b.get('test_perplexity', float('nan')):.2f}), "
                             f"ROUGE-L {m['rouge_l']:.4f} (base {b.get('rouge_l', float('nan')):.4f}); "
                             f"{report.promotion['reason']}")
        version = value_digest(report.to_dict())[:32]
        return dg.Output(report, data_version=dg.DataVersion(version), metadata=_tracked(run, version, {
            **{name: dg.MetadataValue.float(value) for name, value in report.metrics.items()},
            **{f"{b}_{k}": dg.MetadataValue.float(v) for b, ms in report.baselines.items() for k, v in ms.items()},
            **{f"beats_{b}": won for b, won in report.beats_baselines.items()},
            "test_rows": report.test_rows,
            "test_prompts": report.test_prompts,
            "report": dg.MetadataValue.md(generation_report_markdown(report)),
            "report_html": dg.MetadataValue.path(report.html_path),
            "report_json": dg.MetadataValue.path(report.json_path),
            "generations": dg.MetadataValue.path(report.generations_path),
            "promoted": bool(report.promotion["promote"]),
            "promotion": report.promotion["reason"],
        }))

    return [cleaned_dataset, rendered_dataset, finetuned_checkpoint, evaluation_report]
