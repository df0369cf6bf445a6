"""ONE asset factory for every task: the graph of a pipeline spec, built from its Task.

raw_data -> cleaned_dataset -> splits -> [the task's prepared data] -> finetuned_checkpoint -> evaluation_report,
with base_model chosen on the splits. Each asset calls one step in pipelines.core (or a method of the Task) and
hands the StepLog it returns to the tracking resource, which records it in MLflow and as asset metadata.
"""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of asset functions.

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.evaluation import write_report
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport
from pipelines.core.selection import select_base_model
from pipelines.core.serving import example_texts
from pipelines.core.starting import start_from_champion
from pipelines.core.spec import PipelineSpec
from pipelines.core.sweep.record import SweepRecord
from pipelines.core.sweep.run import run_sweep
from pipelines.core.sweep.space import with_settings
from pipelines.core.steps import base_model_log, checkpoint_log, doctor_folder, pin_prompted_model, read_raw_data, \
    report_log, split_dataset, sweep_log, training_params, with_doctor, with_training_context
from pipelines.core.tasks import Task, task_for
from resources.compute import ComputeResource
from resources.models import ModelStoreResource
from resources.storage import StorageResource
from resources.tracking import TrackingResource

CHECKPOINT = "finetuned_checkpoint"  # what a pipeline that starts from another's champion depends on
BASE_MODEL = "base_model"  # the one asset of the graph that is a model, not data (lineage walks around it)
# A step retried after a tracking-server outage (the tracking resource lets nothing else be retried: bad data,
# bad specs and bugs fail at once); waits of about 2 s, then 4 s.
OUTAGE_RETRIES = dg.RetryPolicy(max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
TRAINING_POOL = "training"  # Dagster concurrency pool of finetuned_checkpoint (the instance limits it to 1)
# Asset kinds: what the UI shows as each asset's tools (names with an icon in the Dagster UI where one exists).
RAW_KINDS = frozenset({"pandas"})
TABLE_KINDS = frozenset({"pandas", "greatexpectations"})  # tables with blocking Great Expectations checks
CHECKPOINT_KINDS = frozenset({"pytorch", "transformers", "peft", "mlflow"})  # LoRA weights, registered in MLflow


def source_kinds(spec: PipelineSpec) -> set[str]:
    """The file format of a spec's source as a kind (csv, parquet, json, yaml), when the spec names one."""
    fmt = getattr(spec.source, "format", "auto")
    return {{"jsonl": "json", "chatterbot_yaml": "yaml", "label_text_lines": "text"}.get(fmt, fmt)} - {"auto"}


def build_pipeline_assets(spec: PipelineSpec, project_root: Path) -> list[dg.AssetsDefinition]:
    """The assets of `spec`, keyed `<spec name>/<asset>` and grouped under the spec's name."""
    task = task_for(spec)
    common: dict[str, Any] = {"key_prefix": [spec.name], "group_name": spec.name, "retry_policy": OUTAGE_RETRIES}
    data_asset = task.prepared.name if task.prepared else "splits"  # what training and evaluation read

    def ins(**names: str) -> dict[str, dg.AssetIn]:
        return {param: dg.AssetIn(dg.AssetKey([spec.name, name])) for param, name in names.items()}

    # A task that reads files beside the source (an embedding corpus) names them in its task section.
    raw_sections = ("source", "task") if task.side_sources(spec) else ("source",)

    @dg.asset(**common, code_version=spec.section_hash(*raw_sections), kinds=RAW_KINDS | source_kinds(spec))
    def raw_data(context: dg.AssetExecutionContext, tracking: TrackingResource) -> dg.Output[pd.DataFrame]:
        """Rows read from the spec's data source, with the file and row each came from."""
        with tracking.asset_run(context, spec.name) as run:
            return run.output(*read_raw_data(spec, project_root))

    @dg.asset(**common, ins=ins(raw_data="raw_data"), code_version=spec.section_hash("task", "cleaning"),
              kinds=TABLE_KINDS, description=task.descriptions["cleaned_dataset"])
    def cleaned_dataset(context: dg.AssetExecutionContext, tracking: TrackingResource,
                        raw_data: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        with tracking.asset_run(context, spec.name) as run:
            return run.output(*task.clean(raw_data, spec))

    @dg.asset(**common, ins=ins(cleaned_dataset="cleaned_dataset"), code_version=spec.section_hash("splits"),
              kinds=TABLE_KINDS)
    def splits(context: dg.AssetExecutionContext, tracking: TrackingResource,
               cleaned_dataset: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Every clean row assigned to train, validation or test by a hash of its normalised text."""
        with tracking.asset_run(context, spec.name) as run:
            return run.output(*split_dataset(cleaned_dataset, spec))

    start = spec.task.starts_from()  # another pipeline whose champion this one starts from: a dependency on it
    upstream = [dg.AssetKey([start, CHECKPOINT])] if start else []

    @dg.asset(**common, ins=ins(splits="splits"), code_version=spec.section_hash("base_model", "task", "training"),
              kinds={"huggingface", "transformers"}, deps=upstream)
    def base_model(context: dg.AssetExecutionContext, models: ModelStoreResource, compute: ComputeResource,
                   tracking: TrackingResource, splits: pd.DataFrame) -> dg.Output[BaseModelRecord]:
        """The pre-trained model chosen among the spec's candidates (licence, size, memory, time, task and
        LoRA checks, then a probe on the validation split), or the champion of the pipeline task.start_from names
        (its adapter merged into its base), pinned: path, weights sha256, licence, pooling."""
        with tracking.asset_run(context, spec.name) as run:
            if start:
                record = start_from_champion(spec, tracking.champion_checkpoint(start),
                                             tracking.champion_entry(start), Path(models.cache_dir),
                                             progress=context.log.info)
            else:
                record = select_base_model(spec, splits, models, compute.settings(spec.training.precision),
                                           progress=context.log.info)
            return run.output(record, base_model_log(record))

    swept = {"sweep": "sweep"} if spec.sweep is not None else {}  # the sweep's best settings train the checkpoint

    @dg.asset(**common, ins=ins(data=data_asset, base_model=BASE_MODEL, **swept),
              code_version=spec.section_hash("training", *swept), kinds=CHECKPOINT_KINDS,
              description=task.descriptions["finetuned_checkpoint"], pool=TRAINING_POOL)
    def finetuned_checkpoint(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                             tracking: TrackingResource, data: pd.DataFrame, base_model: BaseModelRecord,
                             **sweep: SweepRecord) -> dg.Output[CheckpointRecord]:
        tuned = with_settings(spec, sweep["sweep"].best_params) if sweep else spec
        with tracking.asset_run(context, spec.name) as run:
            choice = compute.training_settings(task, tuned, data, base_model, progress=context.log.info)
            context.log.info(choice.summary())
            run.record(training_params(tuned, base_model, choice.settings, choice))
            record = compute.train(context, task, tuned, data, base_model,
                                   storage.run_folder("checkpoints", spec.name, context.run_id),
                                   scratch=storage.scratch_folder(spec.name), progress=context.log.info, sink=run,
                                   exchange=storage.run_folder("launch", spec.name, context.run_id),
                                   settings=choice.settings)
            record = tracking.register_checkpoint(run, spec.name, record, context.run_id, task.serving,
                                                  example_texts(data))
            return run.output(record, checkpoint_log(tuned, record, choice))

    @dg.asset(**common, ins=ins(data=data_asset, finetuned_checkpoint="finetuned_checkpoint"),
              code_version=spec.section_hash("evaluation"), kinds=set(task.report_kinds) | {"mlflow"},
              description=task.descriptions["evaluation_report"])
    def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                          tracking: TrackingResource, models: ModelStoreResource, data: pd.DataFrame,
                          finetuned_checkpoint: CheckpointRecord) -> dg.Output[EvaluationReport]:
        # One promotion decision at a time: a second run compares itself with the champion the first one set.
        with tracking.asset_run(context, spec.name) as run, tracking.promotion_lock(spec.name):
            champion = tracking.champion_checkpoint(spec.name)
            report = task.evaluate(data, finetuned_checkpoint, spec,
                                   storage.run_folder("reports", spec.name, context.run_id),
                                   compute.settings(spec.training.precision), champion=champion,
                                   progress=context.log.info, prompt_model=pin_prompted_model(spec, models))
            report = tracking.apply_promotion(spec.name, report, finetuned_checkpoint, champion)
            report = with_training_context(report, finetuned_checkpoint, run.url, context.run_id)
            if (doctor := task.doctor_settings(spec)) is not None:  # the data doctor's findings on these splits
                report = with_doctor(report, doctor_folder(storage.asset_folder(spec.name), data), doctor.shown_rows)
            write_report(report)  # as applied: the promotion as it happened, the doctor's findings
            return run.output(report, report_log(report, finetuned_checkpoint))

    assets = [raw_data, cleaned_dataset, splits, base_model, finetuned_checkpoint, evaluation_report]
    return (assets + ([prepared_asset(spec, task)] if task.prepared else [])
            + ([sweep_asset(spec, data_asset)] if spec.sweep is not None else []))


def sweep_asset(spec: PipelineSpec, data_asset: str) -> dg.AssetsDefinition:
    """The spec's hyperparameter search, between the data and base model and finetuned_checkpoint."""
    key = {"data": dg.AssetIn(dg.AssetKey([spec.name, data_asset])),
           "base_model": dg.AssetIn(dg.AssetKey([spec.name, BASE_MODEL]))}

    @dg.asset(name="sweep", key_prefix=[spec.name], group_name=spec.name, ins=key, retry_policy=OUTAGE_RETRIES,
              code_version=spec.section_hash("training", "sweep"), kinds={"optuna", "mlflow"}, pool=TRAINING_POOL,
              description="Optuna's search over the sweep: section's training settings (TPE, median pruning), each "
                          "trial scored on the validation split and tracked as an MLflow child run; the best "
                          "settings train finetuned_checkpoint.")
    def sweep(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
              tracking: TrackingResource, data: pd.DataFrame, base_model: BaseModelRecord) -> dg.Output[SweepRecord]:
        with tracking.asset_run(context, spec.name) as run:
            settings = compute.training_settings(task_for(spec), spec, data, base_model, context.log.info).settings
            record = run_sweep(spec, data, base_model, settings,
                               storage.run_folder("sweeps", spec.name, context.run_id), storage.sweep_storage(),
                               f"{spec.name}-{context.run_id}", tracking.child_runs_of(run), context.log.info)
            return run.output(record, sweep_log(record))

    return sweep


def prepared_asset(spec: PipelineSpec, task: Task) -> dg.AssetsDefinition:
    """The task's own asset between splits and training, made from the splits and the chosen base model."""
    assert task.prepared is not None
    key = {"splits": dg.AssetIn(dg.AssetKey([spec.name, "splits"])),
           "base_model": dg.AssetIn(dg.AssetKey([spec.name, BASE_MODEL]))}

    @dg.asset(name=task.prepared.name, key_prefix=[spec.name], group_name=spec.name, ins=key,
              code_version=spec.section_hash(*task.prepared.spec_sections), kinds={"huggingface"},
              description=task.prepared.description)
    def prepared(context: dg.AssetExecutionContext, tracking: TrackingResource, storage: StorageResource,
                 compute: ComputeResource, splits: pd.DataFrame,
                 base_model: BaseModelRecord) -> dg.Output[pd.DataFrame]:
        with tracking.asset_run(context, spec.name) as run:
            return run.output(*task.prepare(splits, base_model, spec, compute.settings(spec.training.precision),
                                            cache_dir=storage.asset_folder(spec.name) / "cache",
                                            progress=context.log.info))

    return prepared
