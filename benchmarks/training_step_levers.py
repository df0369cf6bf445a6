"""Two training-step levers, in one process on the same batch: the base model's own dropout turned off
(`training.model_dropout: 0`) and the LoRA layers fused into one autograd node (`pipelines/core/fused_lora.py`).

Three runs alternate (A B C A B C ...): the reference (peft's LoRA layers, the model's own dropout, as tuneline trained
before), then without the model's dropout, then with fused layers too (as tuneline trains now). Each times
optimisation steps (forward, backward, AdamW) of the spec's base model with its LoRA settings on one batch of the
train split, and prints the median milliseconds per step and the ratios. Text classification runs the whole encoder
(the frozen lower blocks are not cached here); instruction tuning runs one padding-free row of `batch_size` packed
examples, as TRL builds it, with tuneline's packed attention (the loss on every token here, not only the responses).

    .venv/bin/python benchmarks/training_step_levers.py                                     # TREC, all-MiniLM-L6-v2
    .venv/bin/python benchmarks/training_step_levers.py --spec pipelines/specs/chatterbot_instruct.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.recipe_vs_tuneline import device_name, model_store, spec_splits  # noqa: E402
from pipelines.core.fused_lora import fused_lora  # noqa: E402
from pipelines.core.hardware import resolve_compute  # noqa: E402
from pipelines.core.selection import resolve_base_model  # noqa: E402
from pipelines.core.splitting import sample_split  # noqa: E402
from pipelines.core.tasks import task_for  # noqa: E402
from pipelines.core.training.arguments import build_lora_config  # noqa: E402
from pipelines.core.training.loop import run_training_steps  # noqa: E402
from pipelines.core.training.model import set_model_dropout  # noqa: E402


def classification_step(spec, splits, base):  # type: ignore[no-untyped-def]
    from peft import get_peft_model

    from pipelines.core.tasks.classification.model import PooledClassifier, load_encoder, load_tokenizer

    cfg = spec.training
    rows = sample_split(splits, "train", cfg.batch_size, cfg.seed)
    labels = sorted(set(splits["label"]))
    tokenizer = load_tokenizer(base.local_path)
    encoder = load_encoder(base)
    model = PooledClassifier(encoder, base.pooling, len(labels), base.hidden_size, dropout=cfg.head_dropout)
    model.encoder = get_peft_model(encoder, build_lora_config(cfg.lora, base, "FEATURE_EXTRACTION", encoder))
    inputs = dict(tokenizer(rows["text"].tolist(), truncation=True, max_length=cfg.max_length, padding=True,
                            return_tensors="pt"))
    inputs["labels"] = torch.tensor([labels.index(label) for label in rows["label"]])
    return model, encoder, inputs, nullcontext


def instruction_step(spec, splits, base):  # type: ignore[no-untyped-def]
    from peft import get_peft_model

    from pipelines.core.tasks.instruction.train import load_causal_lm, packed_attention

    cfg = spec.training
    task = task_for(spec)
    rendered, _ = task.prepare(splits, base, spec)
    rows = sample_split(rendered, "train", cfg.batch_size, cfg.seed)
    model, _ = load_causal_lm(base.local_path, base.trust_remote_code)
    model = get_peft_model(model, build_lora_config(cfg.lora, base, "CAUSAL_LM", model))
    ids = [list(map(int, row)) for row in rows["input_ids"]]
    flat = torch.tensor([[t for row in ids for t in row]])
    positions = torch.tensor([[p for row in ids for p in range(len(row))]])
    inputs = {"input_ids": flat, "position_ids": positions, "labels": flat.clone(), "use_cache": False}
    return model, model, inputs, lambda: packed_attention(model, True)


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "specs" / "trec_questions.yaml"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    spec, splits = spec_splits(args.spec)
    base = resolve_base_model(spec.base_model, model_store())
    compute = resolve_compute("cpu", spec.training.precision, args.threads)
    compute.apply()
    torch.manual_seed(spec.training.seed)
    build = instruction_step if task_for(spec).predicts_tokens else classification_step
    model, backbone, inputs, attention = build(spec, splits, base)
    rates = {m: m.p for m in backbone.modules() if isinstance(m, torch.nn.Dropout)}
    attn_rates = {m: m.attention_dropout for m in backbone.modules()
                  if isinstance(getattr(m, "attention_dropout", None), float)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def restore_dropout() -> None:
        for module, rate in rates.items():
            module.p = rate
        for module, rate in attn_rates.items():
            module.attention_dropout = rate

    runs = {"reference: peft layers, the model's own dropout": [], "model dropout 0": [],
            "model dropout 0 + fused LoRA layers (now)": []}
    with attention():
        run_training_steps(model, inputs, compute, optimizer, 2)  # warm-up
        for _ in range(args.rounds):
            for name, times in runs.items():
                restore_dropout()
                if name != next(iter(runs)):
                    set_model_dropout(backbone, 0.0)
                with fused_lora(model, enabled=name.endswith("(now)")):
                    times.extend(run_training_steps(model, inputs, compute, optimizer, args.steps))
    tokens = int(inputs["input_ids"].numel())
    print(f"\n{spec.name}: {base.name}, one batch of {spec.training.batch_size} rows ({tokens} tokens in the batch, "
          f"padding included), {compute.precision}, {args.threads} threads; {device_name('cpu')}; the model's own "
          f"dropout rates: {sorted(set(rates.values()) | set(attn_rates.values()))}")
    reference = statistics.median(next(iter(runs.values())))
    print(f"{'run':52s} {'ms/step':>8s} {'ratio':>7s}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"{name:52s} {median * 1000:8.1f} {reference / median:6.2f}x")


if __name__ == "__main__":
    main()
