"""fp32 against bf16 (and all cores against half) on real training steps of each default pipeline's model, timed as
`training.precision: auto` times them (pipelines/core/autotune.py), and what auto chooses on this machine.

Every setting is timed in rounds A B A B, so that a machine that slows down mid-run does not favour one side; the
table gives the median seconds per step and each setting's ratio to fp32 on all cores. On a CPU without native bf16
instructions (auto does not time bf16 there) bf16 is emulated and many times slower: it is timed once, on all cores,
for --emulated-bf16-steps steps after the warm-up.

    .venv/bin/python benchmarks/precision_steps.py                      # both default pipelines
    .venv/bin/python benchmarks/precision_steps.py --spec pipelines/specs/trec_questions.yaml --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_vs_tuneline import device_name, model_store, spec_splits  # noqa: E402

from pipelines.core.autotune import TIMED_STEPS, choose_compute, step_key, thread_options  # noqa: E402
from pipelines.core.hardware import cpu_supports_bf16, usable_cores  # noqa: E402
from pipelines.core.selection import pin_candidate  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402

DEFAULT_SPECS = ("pipelines/specs/trec_questions.yaml", "pipelines/specs/chatterbot_instruct.yaml")


def measure(spec_path: str, rounds: int, device: str, emulated_steps: int) -> None:
    import torch

    spec, frame = spec_splits(ROOT / spec_path)
    task = task_for(spec)
    location = spec.base_model.resolved_candidates[0]
    base = pin_candidate(location, spec.base_model, model_store(), pooling=task.pooling(spec))
    if task.prepared is not None:  # train on what the pipeline trains on (rendered conversations, pairs)
        frame, _ = task.prepare(frame, base, spec)
    threads = thread_options(device, None) if device == "cpu" else [None]
    native = device == "cuda" or cpu_supports_bf16()
    settings = [(p, n) for n in threads for p in (("fp32", "bf16") if native else ("fp32",))]
    seconds: dict[tuple[str, int | None], list[float]] = {s: [] for s in settings}
    previous = torch.get_num_threads()
    if not native and emulated_steps:
        torch.set_num_threads(threads[0] or previous)
        seconds[("bf16", threads[0])] = [task.time_train_step(base, spec, frame, ComputeSettings(device, "bf16",
                                                                                                  threads[0]),
                                                              emulated_steps)]
        print(f"  {spec.name} bf16 (emulated) on {threads[0]} threads: {seconds[('bf16', threads[0])][0]:.4f} s/step",
              file=sys.stderr, flush=True)
    for _ in range(rounds):
        for precision, count in settings:
            torch.set_num_threads(count or previous)
            compute = ComputeSettings(device, precision, count)
            seconds[(precision, count)].append(task.time_train_step(base, spec, frame, compute, TIMED_STEPS))
            print(f"  {spec.name} {precision} on {count or 'all'} threads: {seconds[(precision, count)][-1]:.4f} "
                  "s/step", file=sys.stderr, flush=True)
    torch.set_num_threads(previous)
    reference = statistics.median(seconds[("fp32", threads[0])])
    print(f"\n{spec.name}: {base.name.split('/')[-1]}, batch {spec.training.batch_size}, max_length "
          f"{spec.training.max_length}; {rounds} rounds of {TIMED_STEPS} timed steps (after one warm-up) per setting"
          + ("" if native else f"; bf16 emulated: {emulated_steps} step(s) once"))
    print(f"{'precision':9s} {'threads':>7s} {'median s/step':>13s} {'min':>8s} {'max':>8s} {'vs fp32, all':>12s}")
    for (precision, count), values in seconds.items():
        median = statistics.median(values)
        print(f"{precision:9s} {count or 'all':>7} {median:13.4f} {min(values):8.4f} {max(values):8.4f} "
              f"{reference / median:11.2f}x")
    with tempfile.TemporaryDirectory() as cache:
        said: list[str] = []
        choice = choose_compute(lambda c: task.time_train_step(base, spec, frame, c, TIMED_STEPS),
                                ComputeSettings(device, "fp32", None, cache_dir=cache), precision="auto",
                                model_key=step_key(spec, base), progress=said.append)
    print(f"precision: auto here: {choice.settings.precision} on {choice.settings.num_threads or 'all'} threads "
          f"({len(said)} settings timed; bf16 is timed by auto only on a CPU with native bf16: "
          f"{'yes' if cpu_supports_bf16() else 'no'})")


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", help="a spec to time (may repeat; default: both defaults)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--emulated-bf16-steps", type=int, default=1,
                        help="steps of bf16 timed on a CPU without native bf16 (0: not timed)")
    args = parser.parse_args()
    print(f"{device_name(args.device)}; {usable_cores()} usable cores; native bf16: "
          f"{'yes' if cpu_supports_bf16() else 'no'}", flush=True)
    started = time.perf_counter()
    for spec_path in args.spec or DEFAULT_SPECS:
        measure(spec_path, args.rounds, args.device, args.emulated_bf16_steps)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
