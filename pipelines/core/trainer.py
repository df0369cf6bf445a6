"""The training kernel every task shares: compute settings, the metrics sink, the best-epoch callback, the
arguments common to transformers' TrainingArguments and TRL's SFTConfig, the one LoraConfig builder, and
checkpoint save / verify / load through one manifest file.

Training code never sees mlflow or Dagster: it reports through a `progress` callable and a metrics sink.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipelines.core.errors import CheckpointError
from pipelines.core.files import atomic_path
from pipelines.core.fused_lora import fused_lora
from pipelines.core.plots import loss_curve_png
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.sections import LoraSettingsConfig, TrainingConfig
from pipelines.core.sources import combined_digest, sha256_file

ProgressFn = Callable[[str], None]
MANIFEST = "manifest.json"
LOSS_CURVE = "loss_curve.png"  # in every checkpoint whose history logged a loss


class MetricsSink(Protocol):
    """Where training metrics go (an experiment tracker, a list in a test)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


@dataclass(frozen=True)
class ComputeSettings:
    """Resolved device, precision and thread count for one piece of work."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # bf16 | fp32
    num_threads: int | None = None
    cache_dir: str | None = None  # where results worth reusing across steps are kept (frozen embeddings); None: none
    world_size: int = 1  # data-parallel training processes (torchrun); each takes batch_size / world_size rows a step

    def apply(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return nullcontext()


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory on CUDA, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def store_frozen_weights_for(model: torch.nn.Module, compute: ComputeSettings) -> int:
    """Under bf16 autocast every matmul casts its fp32 weight to bf16, every step; the frozen weights never change,
    so they are stored in bf16 once instead (the same values the matmuls saw; ~15% faster here). Trainable
    weights (adapters, head) stay fp32 for the optimizer. Returns the number of parameters converted."""
    if compute.precision != "bf16":
        return 0
    converted = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(torch.bfloat16)
            converted += parameter.numel()
    return converted


# ------------------------------------------------------------------------------------- library objects
def set_model_dropout(model: torch.nn.Module, p: float | None) -> tuple[float, ...]:
    """Set the rate of every nn.Dropout in `model` and the `attention_dropout` rate that attention functions read
    (Llama-style models) to `p`; None leaves the model as it is. Returns the distinct rates found before."""
    if p is None:
        return ()
    found = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            found.add(float(module.p))
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            found.add(module.attention_dropout)
            module.attention_dropout = p
    return tuple(sorted(found))


def dropout_note(p: float | None, before: tuple[float, ...]) -> str:
    """'; model dropout 0 (its own: 0.1)' for the training's progress line, or '' when the model's own is kept."""
    if p is None:
        return ""
    return f"; model dropout {p:g}" + (f" (its own: {', '.join(f'{r:g}' for r in before)})" if before else "")


def transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks (the module list as long as its config's num_hidden_layers) and
    its name ('encoder.layer', 'layers')."""
    config = model.config
    count = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count > 0:
            return name, module
    raise CheckpointError(f"cannot find the {count} transformer blocks of {type(model).__name__} (training.lora."
                          "top_layers needs them); leave top_layers unset for this model")


def lora_layers(cfg: LoraSettingsConfig, num_layers: int) -> list[int] | None:
    """The transformer blocks that get adapters: the top `cfg.top_layers` of `num_layers` (None: all)."""
    if cfg.top_layers is None or cfg.top_layers >= num_layers:
        return None
    return list(range(num_layers - cfg.top_layers, num_layers))


def build_lora_config(cfg: LoraSettingsConfig, base: BaseModelRecord, peft_task_type: str,
                      model: torch.nn.Module | None = None) -> Any:
    """The one place a peft.LoraConfig is built: the spec's settings on the target modules this base model has
    (selection found them), in the blocks of `model` that `lora.top_layers` names, for the task's peft TaskType
    ('FEATURE_EXTRACTION', 'CAUSAL_LM', ...)."""
    from peft import LoraConfig, TaskType

    targets = base.lora_targets or cfg.target_modules
    layers, pattern = None, None
    if cfg.top_layers is not None and model is not None:
        name, blocks = transformer_blocks(model)
        layers, pattern = lora_layers(cfg, len(blocks)), name.rsplit(".", 1)[-1]
    return LoraConfig(task_type=TaskType[peft_task_type], r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(targets), bias="none", layers_to_transform=layers,
                      layers_pattern=pattern if layers else None)


def common_training_arguments(cfg: TrainingConfig, output_dir: Path, compute: ComputeSettings,
                              has_validation: bool, eval_batch_size: int) -> dict[str, Any]:
    """The arguments TrainingArguments and SFTConfig share, from the spec's training section."""
    from transformers.utils import logging as hf_logging

    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size // compute.world_size,  # the spec checks that it divides
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_fraction,  # a float below 1 is a fraction of all steps
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=compute.precision == "bf16",
        use_cpu=compute.device == "cpu",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        # One switch for every progress bar: `tuneline run` turns them off (its progress lines say the same).
        disable_tqdm=not hf_logging.is_progress_bar_enabled(),
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Several processes (torchrun) on a CPU talk through gloo; on GPUs the Trainer's default (NCCL) is right.
        ddp_backend="gloo" if compute.world_size > 1 and compute.device == "cpu" else None,
        # Every trainable parameter (adapters, head) takes part in every step: DDP need not search the graph for
        # unused ones (the Trainer turns the search on for a model that is not a transformers PreTrainedModel).
        ddp_find_unused_parameters=False if compute.world_size > 1 else None,
    )


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
                        higher_is_better: bool = True) -> Any:
    """A TrainerCallback that reports progress and metrics and keeps the trainable weights of the best epoch
    (by the validation metric `select_by`)."""
    from transformers import TrainerCallback

    class ProgressAndBestEpoch(TrainerCallback):
        """Progress lines and metrics for every log; keeps the trainable weights of the best epoch."""

        def __init__(self) -> None:
            self.best_score = -math.inf
            self.best_epoch: float | None = None
            self.best_state: dict[str, torch.Tensor] | None = None
            self.started = time.monotonic()
            self.last_shown = -1  # the last step a progress line was written for

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
                              if k in ("eval_accuracy", "eval_macro_f1", "eval_loss") and isinstance(v, (int, float)))
            progress(f"epoch {state.epoch:.2f}: validation {shown}")
            if score > self.best_score:
                self.best_score, self.best_epoch = score, float(state.epoch)
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def state_dict(self) -> dict[str, Any]:
            """What a resumed run needs to keep choosing the best epoch as the uninterrupted run would."""
            return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.best_score, self.best_epoch, self.best_state = (state["best_score"], state["best_epoch"],
                                                                 state["best_state"])

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

    return ProgressAndBestEpoch()


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished Trainer run leaves behind: time, the log history and the epoch whose weights were kept."""

    train_seconds: float
    history: tuple[dict[str, float], ...]
    best_epoch: float | None


RESUMABLE_PREFIX = "resumable-"
CALLBACK_STATE = "tuneline_callback.pt"


@dataclass(frozen=True)
class Resumable:
    """Where and how often a training run saves resumable checkpoints.

    `folder` is the pipeline's scratch folder; checkpoints go to `folder/<key>/`, where the key digests what
    determines the result (spec hash, data digest, base model digest): only a run with the same key resumes.
    The Trainer writes `checkpoint-<step>` there; once complete (with this callback's state) it is renamed to
    `resumable-<step>`, so a folder of that name is always whole, and a crash mid-save leaves nothing usable.
    """

    folder: Path
    key: str
    every_steps: int | None = None
    every_seconds: float | None = None

    @staticmethod
    def for_run(scratch: Path | None, cfg: TrainingConfig, spec_hash: str, data_sha256: str,
                base_sha256: str, world_size: int = 1) -> Resumable | None:
        """None when nothing is to be kept: no scratch folder, checkpoint_every 0, or several processes (their
        per-rank RNG and data positions are not made resumable yet: such a run starts over after a crash)."""
        if scratch is None or world_size > 1 or (cfg.checkpoint_steps is None and cfg.checkpoint_seconds is None):
            return None
        key = combined_digest([("spec", spec_hash), ("data", data_sha256), ("base_model", base_sha256)])[:16]
        return Resumable(scratch, key, cfg.checkpoint_steps, cfg.checkpoint_seconds)

    @property
    def key_folder(self) -> Path:
        return self.folder / self.key

    @contextmanager
    def claimed(self) -> Iterator[bool]:
        """Hold the key's lock while training (a second training of the same key at the same time must not use,
        or remove, this one's checkpoints): yields False when another one holds it. A killed process's lock is
        released by the system."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{self.key}.lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def latest(self) -> Path | None:
        found = sorted(self.key_folder.glob(f"{RESUMABLE_PREFIX}*"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None

    def prepare(self, progress: ProgressFn) -> Path | None:
        """The newest complete checkpoint of this key, or None; says why training starts fresh, and removes what
        can never be resumed (other keys' folders, a save cut short)."""
        others = [p for p in self.folder.glob("*") if p.is_dir() and p.name != self.key and not _locked(p)]
        for other in others:
            shutil.rmtree(other, ignore_errors=True)
            other.with_name(f"{other.name}.lock").unlink(missing_ok=True)
        for partial in self.key_folder.glob("checkpoint-*"):
            shutil.rmtree(partial, ignore_errors=True)
        latest = self.latest()
        if latest is None:
            progress("starting fresh: " + (f"the checkpoint in {self.folder} was made for another spec, data or base "
                                           "model (removed)" if others else "no resumable checkpoint of an "
                                           "interrupted run"))
        return latest

    def discard(self) -> None:
        """Training finished and its result is saved: nothing is left to resume."""
        shutil.rmtree(self.key_folder, ignore_errors=True)
        (self.folder / f"{self.key}.lock").unlink(missing_ok=True)


def _locked(key_folder: Path) -> bool:
    """Whether a training in another process holds the lock of this key folder (it is in use: not removable)."""
    import fcntl

    lock = key_folder.with_name(f"{key_folder.name}.lock")
    if not lock.exists():
        return False
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _checkpoint_callback(resumable: Resumable, best: Any, progress: ProgressFn) -> Any:
    """A TrainerCallback that asks for a save every N steps or M seconds and makes each saved folder whole."""
    from transformers import TrainerCallback

    class ResumableCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.last = self.requested = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= state.max_steps:
                return  # the run ends here: its result is saved, not a checkpoint
            by_steps = resumable.every_steps is not None and state.global_step % resumable.every_steps == 0
            by_time = resumable.every_seconds is not None and time.monotonic() - self.last >= resumable.every_seconds
            if by_steps or by_time:
                control.should_save = True
                self.requested = time.monotonic()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            torch.save(best.state_dict(), written / CALLBACK_STATE)
            older = list(resumable.key_folder.glob(f"{RESUMABLE_PREFIX}*"))
            written.rename(resumable.key_folder / f"{RESUMABLE_PREFIX}{state.global_step}")  # now whole
            for folder in older:
                shutil.rmtree(folder, ignore_errors=True)
            self.last = time.monotonic()
            progress(f"saved a resumable checkpoint at step {state.global_step} of {state.max_steps} "
                     f"({self.last - self.requested:.2f} s)")

    return ResumableCheckpoints()


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
    callback.restore_best()
    if callback.best_epoch is not None:
        progress(f"kept the weights of epoch {callback.best_epoch:g} (best validation {select_by} "
                 f"{callback.best_value:.4f})")
    history = tuple({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                    for entry in trainer.state.log_history)
    return TrainingOutcome(float(result.metrics.get("train_runtime", 0.0)), history, callback.best_epoch)


# ------------------------------------------------------------------------------------------ estimates
def model_dimensions(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden size, layers, attention heads, vocabulary) of a config.json, under the names architectures use."""
    return (int(config.get("hidden_size") or config.get("d_model") or 0),
            int(config.get("num_hidden_layers") or config.get("n_layer") or 0),
            int(config.get("num_attention_heads") or config.get("n_head") or 1),
            int(config.get("vocab_size") or 0))


def estimate_training_memory_mb(config: dict[str, Any], parameters: int, batch_size: int, length: int,
                                precision: str, vocabulary_logits: bool) -> float:
    """Weights (fp32), activations kept for the backward pass (34·s·b·h + 5·a·s²·b bytes per layer at 16 bit,
    doubled for fp32) and, for models that predict tokens (`vocabulary_logits`), the logits with their gradient."""
    hidden, layers, heads, vocab = model_dimensions(config)
    scale = 1.0 if precision == "bf16" else 2.0
    activations = layers * (34 * length * batch_size * hidden + 5 * heads * length * length * batch_size) * scale
    logits = 3 * 4 * batch_size * length * vocab if vocabulary_logits else 0
    return (4 * parameters + activations + logits) / 2**20


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


# The share of this machine's matmul peak (matmul_rate) a LoRA training step reaches: at least the first (small
# models on short texts spend most of a step on per-operation overhead; the lowest measured here was 7.6%, for
# SmolLM2-135M on TREC questions), at most the second. Between the two bounds a few steps are timed.
STEP_EFFICIENCY = (0.05, 0.6)
_MATMUL_RATE: dict[tuple[str, str], float] = {}


def matmul_rate(compute: ComputeSettings) -> float:
    """This machine's matmul peak in FLOP/s: the best of a few n^3 products in the compute's precision (bf16 or
    fp32 tensors, no autocast casts), measured once per process; n = 2048 on a CPU, 8192 on a GPU (smaller products
    leave a GPU's units idle), each timed between device synchronizations."""
    key = (compute.device, compute.precision)
    if key not in _MATMUL_RATE:
        compute.apply()
        gpu = compute.device == "cuda"
        n, repeats = (8192, 10) if gpu else (2048, 4)
        dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
        a = torch.randn(n, n, device=compute.device, dtype=dtype)
        b = torch.randn(n, n, device=compute.device, dtype=dtype)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        (a @ b).sum().item()  # warm-up: the first product pays for kernel selection
        best = math.inf
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - started)
        _MATMUL_RATE[key] = 2 * n**3 / best
        del a, b
    return _MATMUL_RATE[key]


def training_step_flops(config: dict[str, Any], parameters: int, batch_size: int, tokens: float,
                        vocabulary_logits: bool, body_share: float = 1.0) -> float:
    """FLOPs of one LoRA training step: forward and the backward pass for activations (frozen weights need no
    weight gradients) through the non-embedding weights (`body_share` of them, when only some blocks run),
    attention scores, and the vocabulary logits of a model that predicts tokens."""
    hidden, layers, _, vocab = model_dimensions(config)
    body = max(parameters - vocab * hidden, parameters // 2) * body_share
    per_token = (4 * body + 8 * layers * body_share * tokens * hidden
                 + (4 * vocab * hidden if vocabulary_logits else 0))
    return per_token * tokens * batch_size


def model_flops_utilization(config: dict[str, Any], parameters: int, tokens: float, examples: int, seconds: float,
                            vocabulary_logits: bool, compute: ComputeSettings, share: float = 1.0) -> float:
    """MFU of a training run: the FLOPs its `tokens` (in `examples` examples) needed (training_step_flops, with
    `share` of the transformer body run per step) per second, over this machine's matmul peak (matmul_rate)."""
    if seconds <= 0 or examples <= 0 or tokens <= 0:
        return 0.0
    per_example = training_step_flops(config, parameters, 1, tokens / examples, vocabulary_logits, share)
    # With several processes the work is shared: the peak is that of all of them (each measured its own share).
    return per_example * examples / seconds / (matmul_rate(compute) * compute.world_size)


# ------------------------------------------------------------------------------------- checkpoint files
def checkpoint_digest(path: Path, weight_files: tuple[str, ...]) -> str:
    """Digest over the checkpoint's weight files (named in its manifest)."""
    return combined_digest([(name, sha256_file(path / name)) for name in weight_files])


def save_checkpoint(out_dir: Path, write_files: Callable[[Path], None], manifest: dict[str, Any],
                    spec_yaml: str, history: tuple[dict[str, float], ...]) -> Path:
    """Write a checkpoint folder: the task's files (`write_files(folder)`), the manifest, the spec, the training
    history and its loss curve (loss_curve.png). Everything goes to a hidden sibling first, then is renamed: a crash never leaves half
    a checkpoint, and an existing folder is never overwritten."""
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; a checkpoint folder is never overwritten")
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            write_files(tmp)
            missing = [name for name in manifest["weight_files"] if not (tmp / name).is_file()]
            if missing:
                raise CheckpointError(f"the checkpoint's manifest names weight files that were not written: "
                                      f"{missing}")
            manifest = {**manifest, "sha256": checkpoint_digest(tmp, tuple(manifest["weight_files"]))}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            (tmp / "spec.yaml").write_text(spec_yaml, encoding="utf-8")
            (tmp / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
            curve = loss_curve_png(history)
            if curve is not None:
                (tmp / LOSS_CURVE).write_bytes(curve)
    except CheckpointError:
        raise
    except Exception as exc:  # disk full, a file size limit, no permission: nothing of it is left behind
        raise CheckpointError(f"could not write the checkpoint to {out_dir}: {write_failure(exc)}; nothing was "
                              "kept. Free space there or point --data-dir at another disk") from exc
    return out_dir


def save_trained(out_dir: Path, write_files: Callable[[Path], None], manifest: dict[str, Any], spec_yaml: str,
                 outcome: TrainingOutcome, resumable: Resumable | None) -> Path:
    """Save a finished training's result as a checkpoint; then its resumable checkpoints are no longer needed."""
    path = save_checkpoint(out_dir, write_files, manifest, spec_yaml, outcome.history)
    if resumable:
        resumable.discard()
    return path


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in words: the OS error (disk full, file too large, read-only) where there is one."""
    while exc is not None and not isinstance(exc, OSError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def checkpoint_manifest(task: str, base: BaseModelRecord, spec_hash: str, data_sha256: str,
                        weight_files: tuple[str, ...], labels: tuple[str, ...] = (),
                        **extra: Any) -> dict[str, Any]:
    """The manifest of a checkpoint: which task made it, on which base model and data, and its weight files
    (save_checkpoint adds their digest)."""
    return {"task": task, "base_model": base.to_dict(), "spec_hash": spec_hash, "data_sha256": data_sha256,
            "weight_files": list(weight_files), "labels": list(labels), **extra}


def read_manifest(path: Path, legacy: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint folder. `legacy` maps the metadata file of a checkpoint written before
    manifests (by an earlier release) to its task and weight files, so registered models keep loading."""
    file = path / MANIFEST
    if file.is_file():
        return dict(json.loads(file.read_text(encoding="utf-8")))
    for name, (task, weights) in (legacy or {}).items():
        if (path / name).is_file():
            meta = json.loads((path / name).read_text(encoding="utf-8"))
            return {"labels": [], **meta, "task": task, "weight_files": list(weights)}
    raise CheckpointError(f"{path} is not a tuneline checkpoint (no {MANIFEST})")


def record_from_folder(path: Path, model_version: str | None = None,
                       legacy: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> CheckpointRecord:
    """The record of a checkpoint folder copied from elsewhere (e.g. downloaded from the model registry)."""
    meta = read_manifest(path, legacy)
    base = BaseModelRecord.from_dict(meta["base_model"])
    if not Path(base.local_path).is_dir():
        raise CheckpointError(f"checkpoint {path} needs its base model {base.name} at {base.local_path}, which is "
                              "not on this machine (materialize the pipeline's base_model asset first)")
    digest = checkpoint_digest(path, tuple(meta["weight_files"]))
    if meta.get("sha256", digest) != digest:  # checkpoints written before manifests carry no digest
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its {MANIFEST} says "
                              f"{meta['sha256']}: the files changed after training")
    history = json.loads((path / "history.json").read_text(encoding="utf-8"))
    return CheckpointRecord(path=str(path), task=meta["task"], sha256=digest, base_model=base,
                            spec_hash=meta["spec_hash"], data_sha256=meta.get("data_sha256", ""),
                            labels=tuple(meta.get("labels", ())), train_rows=0, validation_rows=0, best_epoch=None,
                            trainable_parameters=0, train_seconds=0.0, tokens_per_second=0.0, precision="",
                            history=tuple(history), model_version=model_version)


def verified_folder(record: CheckpointRecord, weight_files: tuple[str, ...]) -> Path:
    """The checkpoint's folder, after checking its weight files against the record's digest."""
    path = Path(record.path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} is missing")
    digest = checkpoint_digest(path, weight_files)
    if digest != record.sha256:
        raise CheckpointError(f"checkpoint {path} has weights with sha256 {digest}, but its record says "
                              f"{record.sha256}: the files changed after training")
    return path
