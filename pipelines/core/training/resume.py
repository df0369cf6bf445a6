"""Resumable checkpoints: where and how often a training run saves them, the lock that keeps two trainings of the
same key apart, and the callback that makes each saved folder whole."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.core.digests import combined_digest
from pipelines.core.sections import TrainingConfig
from pipelines.core.training.compute import ProgressFn

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
