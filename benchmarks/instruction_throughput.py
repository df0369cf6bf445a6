"""Instruction tuning throughput: the chatterbot pipeline trained as tuneline trained it before this benchmark's
levers (the reference: padded length-grouped batches, LoRA dropout 0.05 on every block, fp32 frozen weights under
bf16 autocast, which tuneline's precision 'auto' chose wherever the CPU had bf16 instructions; TRL's chunked
log-probability loss), then as the spec trains it now (the precision resolved as a pipeline run resolves it: bf16
only where its matmuls measure faster than fp32), in one process on the same splits.

Prints real (non-padding) tokens per second, the best validation loss, MFU (model FLOPs per second over this
machine's measured matmul peak) and the ratios.

    .venv/bin/python benchmarks/instruction_throughput.py [--epochs 1] [--spec pipelines/specs/chatterbot_instruct.yaml]
    python benchmarks/instruction_throughput.py --device cuda    # on a GPU machine
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.recipe_vs_tuneline import (device_name, fastest_precision, model_store, spec_splits,  # noqa: E402
                                            with_overrides)
from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.tasks.instruction import train as instruction  # noqa: E402
from pipelines.core.training.compute import ComputeSettings  # noqa: E402
from pipelines.core.training.cost import matmul_rate  # noqa: E402


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "chatterbot_instruct.yaml"))
    parser.add_argument("--epochs", type=float, default=None, help="override training.epochs (default: the spec's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    spec, splits = spec_splits(args.spec, [f"training.epochs={args.epochs}"] if args.epochs else [])
    task = task_for(spec)
    base = resolve_base_model(spec.base_model, model_store())
    rendered, _ = task.prepare(splits, base, spec)
    # The reference trains as tuneline did before: bf16 autocast wherever the CPU has bf16 instructions. Now the
    # spec's precision is resolved as a pipeline run resolves it ('auto': bf16 only where it measures faster).
    before_compute = ComputeSettings(args.device, "bf16", args.threads)
    now_compute = resolve_compute(args.device, spec.training.precision, args.threads)
    from trl import SFTTrainer

    lora = spec.training.lora
    runs = [("before: padded, dropout 0.05, all blocks, bf16 (reference)",
             ["task.padding_free=false", "training.lora.dropout=0.05", "training.lora.top_layers=null"], True),
            (f"now: padding-free, dropout {lora.dropout:g}, {now_compute.precision}, "
             + (f"top {lora.top_layers} blocks" if lora.top_layers else "all blocks"), [], False)]
    peak = fastest_precision(args.device, args.threads)
    results = []
    store, plain = instruction.store_frozen_weights_for, instruction._sft_trainer_with_plain_loss
    for name, overrides, before in runs:
        run_spec = with_overrides(spec, overrides)
        compute = before_compute if before else now_compute
        if before:  # the kernel as it was: fp32 frozen weights, TRL's own loss
            instruction.store_frozen_weights_for = lambda model, compute: 0
            instruction._sft_trainer_with_plain_loss = lambda: SFTTrainer
        out = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
        try:
            record = instruction.train_causal_lm(rendered, base, run_spec, out / "ckpt", compute,
                                                 progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        finally:
            instruction.store_frozen_weights_for, instruction._sft_trainer_with_plain_loss = store, plain
            shutil.rmtree(out, ignore_errors=True)
        losses = [h["eval_loss"] for h in record.history if "eval_loss" in h]
        results.append((name, record.tokens_per_second, record.train_seconds, min(losses) if losses else float("nan"),
                        record.mfu * matmul_rate(compute) / matmul_rate(peak)))
        print(f"{name}: {record.tokens_per_second:.0f} real tokens/s in {record.train_seconds:.1f} s", flush=True)

    train_rows = int((rendered["split"] == "train").sum())
    print(f"\n{spec.name}: {train_rows} train examples x {spec.training.epochs:g} epochs, "
          f"batch {spec.training.batch_size}, {args.threads} threads; {device_name(args.device)}; MFU over the measured "
          f"{matmul_rate(peak) / 1e12:.2f} TFLOP/s {peak.precision} matmul peak (this machine's faster precision)")
    print(f"{'run':56s} {'tokens/s':>9s} {'train s':>8s} {'val loss':>9s} {'MFU':>6s}")
    for name, tps, seconds, loss, mfu in results:
        print(f"{name:56s} {tps:9.0f} {seconds:8.1f} {loss:9.4f} {mfu:6.1%}")
    (_, ref_tps, ref_s, ref_loss, _), (_, tps, seconds, loss, _) = results
    print(f"{'ratio now / before':56s} {tps / ref_tps:8.2f}x {seconds / ref_s:7.2f}x {loss - ref_loss:+9.4f}")


if __name__ == "__main__":
    main()
