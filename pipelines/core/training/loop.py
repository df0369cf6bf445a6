"""The best-epoch loop: a Trainer run that reports progress and metrics, keeps the weights of the best epoch and
resumes from a resumable checkpoint; saving its result; and timing a few optimisation steps."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.core.errors import CheckpointError
from pipelines.core.fused_lora import fused_lora
from pipelines.core.training.checkpoints import save_checkpoint, write_failure
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.resume import CALLBACK_STATE, Resumable, _checkpoint_callback


def with_global_batch_order(trainer_class: type) -> type:
    """`trainer_class` whose length-grouped order is the same for any number of processes.

    With N processes each takes every N-th batch of batch_size / N rows from one shared order, so a step sees the
    rows one process would see in one batch, provided every process builds the same order from batches of the
    global size. The Trainer's sampler groups by the per-process size and draws each epoch's permutation from the
    global random state, which dropout moves differently in each process; here the order is grouped by the global
    batch and drawn from its own generator, seeded by data_seed and the epoch (so a resumed run draws the same)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):  # type: ignore[misc]
        def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls this at the start of every epoch
            self.epoch = int(epoch)

        def __iter__(self) -> Iterator[int]:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    class GlobalBatchOrder(trainer_class):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(
                    sampler.lengths, self.args.per_device_train_batch_size * self.args.world_size
                    * self.args.gradient_accumulation_steps, seed)
            return sampler

    GlobalBatchOrder.__name__ = GlobalBatchOrder.__qualname__ = trainer_class.__name__
    return GlobalBatchOrder


# ------------------------------------------------------------------------------------------ callbacks
def best_epoch_callback(model: torch.nn.Module, progress: ProgressFn, sink: MetricsSink | None, select_by: str,
                        higher_is_better: bool = True, patience: int | None = None,
                        average_last: int | None = None) -> Any:
    """A TrainerCallback that reports progress and metrics and keeps the trainable weights of the best epoch
    (by the validation metric `select_by`). With `patience`, training stops once that many evaluations in a row
    have not beaten the best one (training.early_stopping_patience). With `average_last`, the trainable weights of
    the last that many evaluated epochs are kept too, and run_trainer keeps their mean instead of the best epoch
    (training.average_last_epochs: tail averaging, as stochastic weight averaging does)."""
    from collections import deque

    from transformers import TrainerCallback

    class ProgressAndBestEpoch(TrainerCallback):
        """Progress lines and metrics for every log; keeps the trainable weights of the best epoch."""

        def __init__(self) -> None:
            self.best_score = -math.inf
            self.best_epoch: float | None = None
            self.best_state: dict[str, torch.Tensor] | None = None
            self.started = time.monotonic()
            self.last_shown = -1  # the last step a progress line was written for
            self.since_best = 0  # evaluations since the best one
            self.average_last = average_last
            self.recent: deque[tuple[float, dict[str, torch.Tensor]]] = deque(maxlen=average_last or 1)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            progress(f"training: {state.max_steps} steps, {args.num_train_epochs:g} epochs, "
                     f"batch {args.per_device_train_batch_size}, bf16={args.bf16}")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if sink is not None and logs:
                sink.log_metrics(logs, state.global_step)
            if "loss" in logs:
                elapsed = time.monotonic() - self.started
                done = state.global_step / max(state.max_steps, 1)
                eta = elapsed / done - elapsed if done > 0 else float("nan")
                progress(f"step {state.global_step}/{state.max_steps} ({done:.0%}) epoch {state.epoch:.2f} "
                         f"loss {logs['loss']:.4f} lr {logs.get('learning_rate', float('nan')):.2e} "
                         f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
                self.last_shown = state.global_step

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.last_shown != state.global_step:  # the last step was not a logging step: say it ended
                progress(f"step {state.global_step}/{state.max_steps} (100%) epoch {state.epoch:.2f} done in "
                         f"{time.monotonic() - self.started:.0f}s")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kwargs: Any) -> None:
            metrics = metrics or {}
            value = float(metrics.get(f"eval_{select_by}", math.nan))
            score = -math.inf if math.isnan(value) else value if higher_is_better else -value
            shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                              if k in ("eval_accuracy", "eval_macro_f1", "eval_loss", f"eval_{select_by}")
                              and isinstance(v, (int, float)))
            progress(f"epoch {state.epoch:.2f}: validation {shown}")
            if average_last:
                self.recent.append((float(state.epoch), {n: p.detach().clone() for n, p in model.named_parameters()
                                                         if p.requires_grad}))
            if score > self.best_score:
                self.best_score, self.best_epoch = score, float(state.epoch)
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                self.since_best = 0
            else:
                self.since_best += 1
                if patience is not None and self.since_best >= patience and state.global_step < state.max_steps:
                    control.should_training_stop = True
                    progress(f"early stop at epoch {state.epoch:.2f}: validation {select_by} has not beaten epoch "
                             f"{self.best_epoch:g}'s {self.best_value:.4f} for {self.since_best} evaluation"
                             f"{'s' if self.since_best > 1 else ''} (training.early_stopping_patience {patience})")

        def state_dict(self) -> dict[str, Any]:
            """What a resumed run needs to keep choosing the best epoch as the uninterrupted run would."""
            return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                    "since_best": self.since_best, "recent": list(self.recent)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.best_score, self.best_epoch, self.best_state = (state["best_score"], state["best_epoch"],
                                                                 state["best_state"])
            self.since_best = int(state.get("since_best", 0))
            self.recent.clear()
            self.recent.extend(state.get("recent", []))

        @property
        def best_value(self) -> float:
            return self.best_score if higher_is_better else -self.best_score

        def restore_best(self) -> None:
            if self.best_state is None:
                return
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state.items():
                    params[name].copy_(value)

        def restore_average(self) -> list[float]:
            """Put the mean of the recent epochs' trainable weights into the model; the epochs averaged."""
            if not self.average_last or len(self.recent) < 2:
                return []
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name in self.recent[0][1]:
                    params[name].copy_(torch.stack([w[name].float() for _, w in self.recent]).mean(0)
                                       .to(params[name].dtype))
            return [epoch for epoch, _ in self.recent]

    return ProgressAndBestEpoch()


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished Trainer run leaves behind: time, the log history and the epoch whose weights were kept."""

    train_seconds: float
    history: tuple[dict[str, float], ...]
    best_epoch: float | None


def run_trainer(make_trainer: Callable[[Path], Any], callback: Any, progress: ProgressFn,
                select_by: str, resumable: Resumable | None = None) -> TrainingOutcome:
    """Train with the Trainer that `make_trainer(output_dir)` builds, then restore the best epoch's weights.

    With `resumable`, checkpoints are saved as it says, and training resumes from the newest complete one of the
    same key (weights, optimizer, scheduler, RNG and the position in the data order, as the Trainer restores
    them; the best epoch so far from `callback`'s saved state)."""
    with ExitStack() as stack:
        if resumable and not stack.enter_context(resumable.claimed()):
            progress(f"another training of the same spec, data and base model is using {resumable.key_folder}; "
                     "this one keeps no resumable checkpoints")
            resumable = None
        output_dir = stack.enter_context(nullcontext(str(resumable.key_folder)) if resumable
                                         else tempfile.TemporaryDirectory(prefix="tuneline-trainer-"))
        start = resumable.prepare(progress) if resumable else None
        trainer = make_trainer(Path(output_dir))
        if trainer.args.disable_tqdm:  # without bars the Trainer prints every log dict; `callback` reports them
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        if resumable:
            resumable.key_folder.mkdir(parents=True, exist_ok=True)
            trainer.add_callback(_checkpoint_callback(resumable, callback, progress))
        if start is not None:
            saved = json.loads((start / "trainer_state.json").read_text())
            callback.load_state_dict(torch.load(start / CALLBACK_STATE, weights_only=True))
            progress(f"resuming from step {saved['global_step']} of {saved['max_steps']} ({start})")
        try:
            result = trainer.train(resume_from_checkpoint=str(start) if start is not None else None)
        except Exception as exc:
            partial = sorted(resumable.key_folder.glob("checkpoint-*")) if resumable else []
            if not partial:
                raise
            for folder in partial:  # a save that failed half-way: never resumed, so never kept
                shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointError(f"could not write a resumable checkpoint to {partial[-1]}: {write_failure(exc)}; "
                                  "nothing of it was kept. Free space there, point --data-dir at another disk, or "
                                  "set training.checkpoint_every: 0") from exc
    averaged = callback.restore_average()  # [] unless training.average_last_epochs is set
    kept = callback.best_epoch
    if averaged:  # scored like an epoch, and kept in its place
        metrics = trainer.evaluate()
        value = float(metrics.get(f"eval_{select_by}", math.nan))
        kept = averaged[-1]
        progress(f"kept the mean of the weights of epochs {', '.join(f'{e:g}' for e in averaged)} (validation "
                 f"{select_by} {value:.4f}; the best single epoch, {callback.best_epoch:g}, had "
                 f"{callback.best_value:.4f})")
    else:
        callback.restore_best()
        if callback.best_epoch is not None:
            progress(f"kept the weights of epoch {callback.best_epoch:g} (best validation {select_by} "
                     f"{callback.best_value:.4f})")
    history = tuple({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                    for entry in trainer.state.log_history)
    return TrainingOutcome(float(result.metrics.get("train_runtime", 0.0)), history, kept)


def save_trained(out_dir: Path, write_files: Callable[[Path], None], manifest: dict[str, Any], spec_yaml: str,
                 outcome: TrainingOutcome, resumable: Resumable | None) -> Path:
    """Save a finished training's result as a checkpoint; then its resumable checkpoints are no longer needed."""
    path = save_checkpoint(out_dir, write_files, manifest, spec_yaml, outcome.history)
    if resumable:
        resumable.discard()
    return path


def time_training_steps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], compute: ComputeSettings,
                        steps: int) -> float:
    """Median seconds per optimisation step of `model` on one batch (the first, warm-up step not counted), with
    the LoRA layers computed as training computes them (fused_lora)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    with fused_lora(model):
        timings = run_training_steps(model, inputs, compute, optimizer, steps + 1)[1:]  # the first warms up
    return sorted(timings)[len(timings) // 2]


def run_training_steps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], compute: ComputeSettings,
                       optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """Run `steps` optimisation steps (forward, backward, optimizer) of `model` on one batch; seconds of each."""
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        with compute.autocast():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    return timings
