"""What makes training fast must not change what it computes: cached frozen blocks give the model's own outputs,
cached embeddings are the ones computing would give, padding-free batches give the padded batches' loss, and
selection rejects from an estimate only what cannot fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.core.errors import ModelSourceError
from pipelines.core.sections import LoraSettingsConfig
from pipelines.core.selection import resolve_base_model, select_base_model
from pipelines.core.spec import PipelineSpec, parse_spec
from pipelines.core.tasks.classification.model import (FrozenLowerBlocks, PooledClassifier, embed_texts,
                                                       frozen_embeddings, load_encoder, load_tokenizer)
from pipelines.core.tasks.classification.train import load_classifier, predict_proba, train_classifier
from pipelines.core.training.arguments import build_lora_config
from pipelines.core.training.compute import ComputeSettings
from pipelines.core.training.model import lora_layers, store_frozen_weights_for
from tests.conftest import store
from tests.core.test_candidates import rows, spec_for
from tests.tiny_chat import write_tiny_chat_model

FP32 = ComputeSettings("cpu", "fp32", 2)
TEXTS = ["What is the capital of France?", "Who wrote Hamlet?", "How many legs does a spider have?",
         "Where is the Eiffel Tower?", "Why is the sky blue?", "When did the war end?", "What does NASA stand for?"]


def _spec(model_dir: Path, **training: object) -> object:
    import json

    return parse_spec(f"""\
source: {{kind: local, path: unused.csv}}
base_model:
  model: {{source: local, path: {model_dir}}}
training: {json.dumps({"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "max_length": 32, "precision": "fp32",
                       "logging_steps": 2, "checkpoint_every": 0, **training})}
""", name="speed", origin="speed.yaml")


@pytest.mark.parametrize("decoder", [False, True], ids=["bert", "llama"])
def test_cached_frozen_blocks_give_the_models_own_outputs(tmp_path: Path, tiny_model_dir: Path, decoder: bool) -> None:
    from peft import get_peft_model

    folder = write_tiny_chat_model(tmp_path / "llama") if decoder else tiny_model_dir
    base = resolve_base_model(_spec(folder).base_model, store(tmp_path))  # type: ignore[attr-defined]
    tokenizer = load_tokenizer(base.local_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = load_encoder(base)
    model = PooledClassifier(encoder, base.pooling, 3, base.hidden_size)
    lora = LoraSettingsConfig(r=4, alpha=8, dropout=0.0, target_modules=("query", "value", "q_proj", "v_proj"),
                              top_layers=1)
    assert lora_layers(lora, 2) == [1]
    model.encoder = get_peft_model(encoder, build_lora_config(lora, base, "FEATURE_EXTRACTION", encoder))
    with torch.no_grad():  # adapters that do something (peft starts B at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted = {name.split(".layer")[-1].split(".")[1] for name, p in model.named_parameters()
               if p.requires_grad and "lora_" in name}
    assert adapted == {"1"}, "only the top block has adapters"
    model.eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    expected = model(**batch).logits

    lower = FrozenLowerBlocks(model.encoder, 1)
    assert lower.append(model.encoder, tokenizer, TEXTS[:4], 32, FP32, batch_size=3) is None  # other batches
    lower.append(model.encoder, tokenizer, TEXTS[4:], 32, FP32, batch_size=3)
    assert len(lower.states) == len(TEXTS) and lower.megabytes > 0
    # The linear probe's embedding pass keeps the same states on the way, and embeds as embed_texts does.
    both = FrozenLowerBlocks(model.encoder, 1)
    embedded = both.append(model.encoder, tokenizer, TEXTS, 32, FP32, batch_size=3, pooling=base.pooling)
    assert np.array_equal(embedded, embed_texts(model.encoder, tokenizer, TEXTS, base.pooling, 32, FP32, 3))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(both.states, lower.states, strict=True))
    assert type(both.blocks[1]).__name__ != "_PassThrough"
    model.frozen_lower = lower
    order = torch.tensor([4, 0, 6, 2, 1, 5, 3])  # rows in another order than they were computed
    shuffled = tokenizer([TEXTS[i] for i in order], padding=True, return_tensors="pt")
    with lower.attached():
        assert all(type(b).__name__ == "_PassThrough" for b in list(lower.blocks)[:1])
        cached = model(**shuffled, rows=order).logits
        model.train()
        loss = model(**shuffled, rows=order, labels=torch.zeros(len(TEXTS), dtype=torch.long)).loss
        loss.backward()
    assert torch.allclose(cached, expected[order], atol=1e-5), (cached - expected[order]).abs().max()
    assert type(lower.blocks[0]).__name__ != "_PassThrough", "the frozen blocks are back after training"
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_on_the_top_blocks_saves_a_checkpoint_of_the_whole_model(tmp_path: Path, tiny_model_dir: Path,
                                                                          trec_splits: pd.DataFrame) -> None:
    spec = _spec(tiny_model_dir, model_dropout=0.0, lora={"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 1})
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    said: list[str] = []
    record = train_classifier(trec_splits, base, spec, tmp_path / "ckpt", FP32, progress=said.append)  # type: ignore[arg-type]
    assert any(m.startswith("frozen blocks 0-0: computed once for") for m in said), said
    assert any("LoRA r=4 on blocks 1-1 of 2" in m and m.endswith("model dropout 0 (its own: 0.1)") for m in said)
    assert record.mfu > 0 and record.history
    from safetensors import safe_open

    with safe_open(str(Path(record.path) / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(".layer.1." in k for k in keys), keys
    model, tokenizer = load_classifier(record)  # the whole model, the frozen block computed as usual
    probabilities = predict_proba(model, tokenizer, TEXTS, 32, FP32)
    assert probabilities.shape == (len(TEXTS), len(record.task_data["labels"]))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("decoder", [False, True], ids=["bert", "llama"])
def test_model_dropout_turns_the_models_own_dropout_off(decoder: bool) -> None:
    """training.model_dropout sets every dropout the model applies in training (nn.Dropout modules, and the rate
    Llama-style attention reads): a training-mode forward is then deterministic. None leaves the model alone."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    from pipelines.core.training.model import dropout_note, set_model_dropout

    torch.manual_seed(0)
    model = (LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, attention_dropout=0.5)) if decoder else
             BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.5)))
    model.train()
    ids = torch.arange(12).reshape(2, 6)
    assert not torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    assert set_model_dropout(model, None) == ()
    assert set_model_dropout(model, 0.0) == ((0.5,) if decoder else (0.3, 0.5))
    assert torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    assert dropout_note(0.0, (0.3, 0.5)) == "; model dropout 0 (its own: 0.3, 0.5)" and dropout_note(None, ()) == ""


def test_frozen_blocks_over_the_memory_budget_are_run_at_every_step(tmp_path: Path, tiny_model_dir: Path,
                                                                     trec_splits: pd.DataFrame,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.core.tasks.classification import train

    monkeypatch.setattr(train, "FROZEN_STATES_BUDGET_MB", 0.01)
    spec = _spec(tiny_model_dir, epochs=1, lora={"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 1})
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    said: list[str] = []
    record = train_classifier(trec_splits, base, spec, tmp_path / "ckpt", FP32, progress=said.append)  # type: ignore[arg-type]
    assert any(m.startswith("frozen blocks 0-0: not cached (their outputs would take") for m in said), said
    assert not any("computed once" in m for m in said) and record.history


def test_frozen_embeddings_are_computed_once_and_keyed_by_what_they_depend_on(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    base = resolve_base_model(_spec(tiny_model_dir).base_model, store(tmp_path))  # type: ignore[attr-defined]
    compute = ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "cache"))
    loads: list[int] = []

    def load() -> tuple[object, object]:
        loads.append(1)
        return load_encoder(base), load_tokenizer(base.local_path)

    first = frozen_embeddings(base, TEXTS, 32, compute, load=load)  # type: ignore[arg-type]
    again = frozen_embeddings(base, TEXTS, 32, compute, load=load)  # type: ignore[arg-type]
    assert len(loads) == 1 and np.array_equal(first, again)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 1
    uncached = frozen_embeddings(base, TEXTS, 32, FP32)  # no cache folder: computed, nothing written
    assert np.allclose(first, uncached, atol=1e-6)
    frozen_embeddings(base, TEXTS[:-1], 32, compute, load=load)  # other texts
    frozen_embeddings(base, TEXTS, 16, compute, load=load)  # another length
    assert len(loads) == 3 and len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 3
    damaged = next((tmp_path / "cache" / "embeddings").glob("*.npy"))
    damaged.write_bytes(b"not an array")
    frozen_embeddings(base, TEXTS, 32, compute, load=load)
    frozen_embeddings(base, TEXTS[:-1], 32, compute, load=load)
    frozen_embeddings(base, TEXTS, 16, compute, load=load)
    assert len(loads) == 4, "only the damaged file is recomputed"


def test_the_probe_takes_its_sample_from_a_split_already_embedded(tmp_path: Path, tiny_model_dir: Path,
                                                                 trec_splits: pd.DataFrame,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When the data doctor has embedded every split with a candidate, selection's probe reads its sample's rows
    from those embeddings (nothing is run again) and fits on the same features as when it embeds the sample."""
    from pipelines.core.tasks import task_for
    from pipelines.core.tasks.classification import model as classification

    data = _spec(tiny_model_dir).model_dump(mode="json", exclude_none=True)  # type: ignore[attr-defined]
    data["base_model"]["probe"].update(sample_rows=8, train_rows=32)  # samples, not whole splits
    spec = PipelineSpec.model_validate(data)
    assert (trec_splits["split"] == "train").sum() > 32 and (trec_splits["split"] == "validation").sum() > 8
    base = resolve_base_model(spec.base_model, store(tmp_path))
    task = task_for(spec)
    fitted: list[np.ndarray] = []
    fit = classification.fit_linear_probe
    monkeypatch.setattr(classification, "fit_linear_probe", lambda x, *rest: fitted.append(x) or fit(x, *rest))

    alone = ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "alone"))
    embedded = task.probe(base, spec, trec_splits, alone)
    shared = ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "shared"))
    for split in ("train", "validation", "test"):  # as the data doctor embeds them
        frozen_embeddings(base, trec_splits.loc[trec_splits["split"] == split, "text"].tolist(),
                          spec.training.max_length, shared)
    files = sorted((tmp_path / "shared" / "embeddings").glob("*.npy"))
    read = task.probe(base, spec, trec_splits, shared)
    assert sorted((tmp_path / "shared" / "embeddings").glob("*.npy")) == files, "the sample was embedded again"
    assert len(fitted) == 2 and fitted[0].shape == fitted[1].shape
    assert np.allclose(fitted[0], fitted[1], atol=1e-5), "the sample's rows were not the ones read"
    assert read.value == pytest.approx(embedded.value, abs=0.02)


def test_padding_free_batches_give_the_padded_batches_loss(tmp_path: Path) -> None:
    """TRL's padding-free collation (one row, per-example position ids, no KV cache) keeps examples apart."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    folder = write_tiny_chat_model(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    rng = np.random.default_rng(0)
    examples = [{"input_ids": rng.integers(5, 300, size=n).tolist()} for n in (5, 11, 3, 8)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert flat["input_ids"].shape == (1, 27) and "attention_mask" not in flat
    flat["labels"][flat["position_ids"] == 0] = -100  # as padded: the first token of each example predicts nothing
    with torch.no_grad():
        padded_loss = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                            labels=padded["labels"], use_cache=False).loss
        flat_loss = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                          use_cache=False).loss
        one_row = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss  # no boundaries
    assert torch.allclose(padded_loss, flat_loss, atol=1e-5), (padded_loss, flat_loss)
    assert not torch.allclose(padded_loss, one_row, atol=1e-3), "without position ids the examples see each other"


def test_packed_attention_attends_example_by_example_as_the_masked_sdpa_does(tmp_path: Path) -> None:
    """On a CPU, padding-free rows attend one example at a time (causal SDPA per example, no row-wide mask): the
    same logits and gradients as transformers' SDPA under its block-diagonal mask; padded batches and generation
    with a KV cache keep transformers' SDPA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipelines.core.tasks.instruction import train as instruction

    folder = write_tiny_chat_model(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # adapters that do something (peft starts B at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    rng = np.random.default_rng(2)
    examples = [{"input_ids": rng.integers(5, 300, size=n).tolist()} for n in (6, 13, 2, 9, 1)]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    reference, reference_grads = run(dict(flat))
    padded_reference = run(dict(padded))[0]
    calls: list[list[int] | None] = []
    starts = instruction._packed_starts
    with instruction.packed_attention(model, True) as used:
        assert used and model.get_base_model().config._attn_implementation == instruction.PACKED_ATTENTION
        try:
            instruction._packed_starts = lambda *a: calls.append(starts(*a)) or calls[-1]
            packed, packed_grads = run(dict(flat))
            padded_logits = run(dict(padded))[0]
        finally:
            instruction._packed_starts = starts
        generated = model.generate(torch.tensor([examples[1]["input_ids"]]), max_new_tokens=3, do_sample=False)
    assert model.get_base_model().config._attn_implementation == "sdpa", "restored after training"
    assert calls and calls[0] == [0, 6, 19, 21, 30, 31], calls[0]
    assert torch.allclose(packed, reference, atol=1e-5), (packed - reference).abs().max()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(packed_grads, reference_grads, strict=True))
    assert torch.allclose(padded_logits, padded_reference, atol=1e-6), "padded batches: transformers' SDPA"
    assert generated.shape[1] == len(examples[1]["input_ids"]) + 3
    assert torch.equal(generated, model.generate(torch.tensor([examples[1]["input_ids"]]), max_new_tokens=3,
                                                 do_sample=False))
    with instruction.packed_attention(model, False) as used:
        assert not used and model.get_base_model().config._attn_implementation == "sdpa"


def test_packed_attention_leaves_sliding_windows_and_biases_to_transformers() -> None:
    """A sliding window shorter than a packed example, or a position bias, lives in transformers' mask: the call
    goes to transformers' SDPA with that mask, unchanged."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipelines.core.tasks.instruction.train import packed_sdpa_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2]])
    mask = torch.rand(1, 1, 9, 9) > 0.3
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    theirs = sdpa_attention_forward(module, q, k, v, mask)[0]
    for extra in ({"sliding_window": 4}, {"position_bias": torch.zeros(1, 2, 9, 9)}):
        ours = packed_sdpa_attention(module, q, k, v, mask, position_ids=positions, **extra)[0]
        expected = sdpa_attention_forward(module, q, k, v, mask, **extra)[0]
        assert torch.equal(ours, expected), extra
    # A window wider than every example changes nothing: attention within each example, the mask not used.
    wide = packed_sdpa_attention(module, q, k, v, mask, position_ids=positions, sliding_window=16)[0]
    within = torch.cat([sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None,
                                               is_causal=True)[0] for a, b in ((0, 6), (6, 9))], dim=1)
    assert torch.allclose(wide, within, atol=1e-6) and not torch.allclose(wide, theirs)


@pytest.mark.parametrize("num_items", [None, 9])
def test_response_only_logits_give_the_models_own_loss_and_gradients(tmp_path: Path, num_items: int | None) -> None:
    """The CPU trainer computes vocabulary logits only where a label is; loss and gradients are the model's own
    (shifted cross-entropy over the labelled positions: the mean, or the sum over the Trainer's item count)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipelines.core.tasks.instruction.train import _sft_trainer_with_plain_loss

    folder = write_tiny_chat_model(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    rng = np.random.default_rng(1)
    examples = []
    for n, k in ((7, 3), (12, 5), (4, 1)):  # n tokens, of which the last k are the response (labelled)
        ids = rng.integers(5, 300, size=n).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k:]})
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert (batch["labels"] == -100).sum() > 0 and (batch["labels"] != -100).sum() == 9
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    own = model(**batch, use_cache=False, **kwargs).loss
    own.backward()
    own_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compute_loss = _sft_trainer_with_plain_loss().compute_loss
    ours = compute_loss(None, model, dict(batch), num_items_in_batch=kwargs.get("num_items_in_batch"))
    ours.backward()
    assert torch.allclose(own, ours, atol=1e-6), (own, ours)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(own_grads, model.parameters(), strict=True))
    loss, outputs = compute_loss(None, model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[0] == 9, "logits only where a label is"


def test_bf16_frozen_weights_leave_trainable_ones_in_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import get_peft_model

    base = resolve_base_model(_spec(tiny_model_dir).base_model, store(tmp_path))  # type: ignore[attr-defined]
    model = PooledClassifier(load_encoder(base), base.pooling, 3, base.hidden_size)
    model.encoder = get_peft_model(model.encoder, build_lora_config(LoraSettingsConfig(r=4), base,
                                                                    "FEATURE_EXTRACTION"))
    assert store_frozen_weights_for(model, FP32) == 0
    converted = store_frozen_weights_for(model, ComputeSettings("cpu", "bf16", 2))
    assert converted == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_selection_estimates_first_and_times_only_when_the_estimate_cannot_decide(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame) -> None:
    said: list[str] = []
    record = select_base_model(spec_for([tiny_model_dir]), trec_splits, store(tmp_path, tmp_path / "m"), FP32,
                               progress=said.append)
    row = rows(record)[tiny_model_dir.name]
    assert row["train_minutes_from"] == "estimate (at most)" and row["estimated_train_minutes"] > 0
    assert not any("timing 3 training steps" in m for m in said), "no limit: nothing to time"
    at_most = row["estimated_train_minutes"]

    said.clear()  # a limit between the optimistic and pessimistic estimates: the steps are timed, and decide
    try:
        record = select_base_model(spec_for([tiny_model_dir], max_train_minutes=at_most / 2), trec_splits,
                                   store(tmp_path, tmp_path / "m"), FP32, progress=said.append)
        assert rows(record)[tiny_model_dir.name]["train_minutes_from"] == "timed"
    except ModelSourceError as exc:  # a tiny model is mostly per-step overhead: its timed steps may exceed it
        assert ", timed) exceeds base_model.max_train_minutes" in str(exc)
    assert any("timing 3 training steps" in m for m in said)

    said.clear()  # a limit below even the optimistic estimate: rejected without timing
    with pytest.raises(ModelSourceError, match="rejected from the estimate, without timing a step"):
        select_base_model(spec_for([tiny_model_dir], max_train_minutes=at_most / 1000), trec_splits,
                          store(tmp_path, tmp_path / "m"), FP32, progress=said.append)
    assert not any("timing 3 training steps" in m for m in said)


def _weak_and_strong(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """Two candidates the probe tells apart: 2 dimensions cannot separate six classes, 32 can."""
    import shutil

    from transformers import BertConfig, BertModel

    weak, strong = tmp_path / "weak", tmp_path / "strong"
    shutil.copytree(tiny_model_dir, weak)
    shutil.copytree(tiny_model_dir, strong)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=2, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=4, max_position_embeddings=128)).save_pretrained(str(weak))
    return weak, strong


def test_selection_times_a_candidate_only_when_its_time_could_change_the_choice(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both estimates straddle the limit (a range of efficiencies from 1e-9 to 1): the probe ranks first, then only
    the winner's steps are timed; the loser's time cannot change the choice and is left as the estimated range.
    When the winner's timed steps break the limit, it is rejected and the next in rank is timed in turn."""
    import pipelines.core.selection as selection

    weak, strong = _weak_and_strong(tmp_path, tiny_model_dir)
    monkeypatch.setattr(selection, "STEP_EFFICIENCY", (1e-9, 1.0))
    said: list[str] = []
    record = select_base_model(spec_for([weak, strong], max_train_minutes=60), trec_splits,
                               store(tmp_path, tmp_path / "m"), FP32, progress=said.append)
    found = rows(record)
    assert record.name == "strong" and found["strong"]["train_minutes_from"] == "timed"
    assert found["weak"]["verdict"] == "ranked"
    assert "not timed, since its time could not change the choice" in found["weak"]["train_minutes_from"]
    timed = [m for m in said if "timing 3 training steps" in m]
    assert len(timed) == 1 and timed[0].startswith("candidate strong:")
    # the probe ran before any step was timed
    assert said.index(timed[0]) > max(i for i, m in enumerate(said) if "linear_probe_macro_f1" in m)

    timed_minutes = found["strong"]["estimated_train_minutes"]
    unlimited = select_base_model(spec_for([weak, strong]), trec_splits, store(tmp_path, tmp_path / "m"), FP32,
                                  progress=lambda _: None)
    fastest = rows(unlimited)["strong"]["estimated_train_minutes"] * 1e-9  # "at most" is at efficiency 1e-9
    assert fastest < timed_minutes
    said.clear()  # a limit twice the winner's estimate at 100% of the matmul peak, which a tiny model's timed steps
    # (mostly per-step overhead) exceed many times: timed, rejected, and the next in rank is timed in turn (it
    # passes or is rejected by its own timed steps)
    limit = 2 * fastest
    try:
        record = select_base_model(spec_for([weak, strong], max_train_minutes=limit), trec_splits,
                                   store(tmp_path, tmp_path / "m"), FP32, progress=said.append)
        found = rows(record)
        assert record.name == "weak" and found["weak"]["train_minutes_from"] == "timed"
        assert found["strong"]["verdict"] == "rejected"
        assert ", timed) exceeds base_model.max_train_minutes" in found["strong"]["reason"]
    except ModelSourceError as exc:
        assert str(exc).count(", timed) exceeds base_model.max_train_minutes") == 2
    assert [m.split(":")[0] for m in said if "timing 3 training steps" in m] == ["candidate strong", "candidate weak"]


def test_a_costlier_candidate_within_the_probes_noise_is_not_timed_when_it_cannot_be_the_cheaper(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame) -> None:
    """Equal probe scores tie, and the cheaper to train wins. A candidate with 20M more parameters has an optimistic
    estimate above the cheap one's pessimistic one: timing its steps could not change the choice."""
    import shutil

    from safetensors.torch import load_file, save_file

    cheap, costly = tmp_path / "cheap", tmp_path / "costly"
    shutil.copytree(tiny_model_dir, cheap)
    shutil.copytree(tiny_model_dir, costly)
    weights = load_file(str(costly / "model.safetensors"))
    weights["unused.extra"] = torch.zeros(20_000_000, dtype=torch.bfloat16)
    save_file(weights, str(costly / "model.safetensors"), metadata={"format": "pt"})
    unlimited = rows(select_base_model(spec_for([cheap, costly]), trec_splits, store(tmp_path, tmp_path / "m"), FP32,
                                       progress=lambda _: None))
    at_most = {name: row["estimated_train_minutes"] for name, row in unlimited.items()}
    limit = at_most["costly"] / 2  # above the cheap one's pessimistic estimate, within the costly one's range
    assert at_most["cheap"] < limit
    said: list[str] = []
    record = select_base_model(spec_for([cheap, costly], max_train_minutes=limit), trec_splits,
                               store(tmp_path, tmp_path / "m"), FP32, progress=said.append)
    found = rows(record)
    assert record.name == "cheap" and found["cheap"]["train_minutes_from"] == "estimate (at most)"
    assert found["costly"]["best_better_on_resamples"] == 0.5  # tied with the best
    assert "not timed, since its time could not change the choice" in found["costly"]["train_minutes_from"]
    assert not any("timing 3 training steps" in m for m in said)


def test_auto_precision_takes_bf16_on_a_cpu_only_where_its_products_are_faster() -> None:
    """The instruction flags do not decide: a CPU with AVX512-BF16 but no AMX multiplies bf16 at half its fp32
    speed. 'auto' follows the measured ratio of this machine's bf16 and fp32 matmul rates."""
    from pipelines.core.hardware import BF16_MIN_SPEEDUP, cpu_bf16_speedup, cpu_supports_bf16, resolve_compute

    if cpu_supports_bf16():
        speedup = cpu_bf16_speedup(2)
        assert speedup > 0
        expected = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    else:  # emulated bf16 products (minutes to measure) are never taken
        expected = "fp32"
    assert resolve_compute("cpu", "auto", 2).precision == expected
    assert resolve_compute("cpu", "bf16", 2).precision == "bf16"  # asked for: kept, however slow
    assert resolve_compute("cpu", "fp32", 2).precision == "fp32"


def test_gguf_header_reader_gives_what_the_gguf_library_reads(tmp_path: Path) -> None:
    """Selection reads a GGUF file's licence and size from its header, skipping the tokenizer's arrays: the result
    is the gguf library's own, and a damaged file is refused with its path."""
    from gguf import GGUFReader, GGUFWriter

    from pipelines.core.selection import gguf_metadata

    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("Tiny")
    writer.add_license("apache-2.0")
    writer.add_uint32("general.quantization_version", 2)
    writer.add_array("general.languages", ["en", "fr"])
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(500)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(500)])
    writer.add_bool("llama.use_parallel_residual", True)
    writer.add_tensor("token_embd.weight", np.zeros((500, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    meta, parameters = gguf_metadata(path)
    reader = GGUFReader(str(path))
    expected = {k: v.contents() for k, v in reader.fields.items() if k.startswith("general.")}
    assert meta == expected and meta["general.license"] == "apache-2.0" and meta["general.languages"] == ["en", "fr"]
    assert parameters == sum(int(t.n_elements) for t in reader.tensors) == 500 * 8 + 8

    path.write_bytes(path.read_bytes()[:200])  # cut inside the tokenizer's strings
    with pytest.raises(ModelSourceError, match=r"model\.gguf: not a readable GGUF file \(truncated"):
        gguf_metadata(path)
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelSourceError, match="does not start with the GGUF magic bytes"):
        gguf_metadata(path)


@pytest.mark.parametrize("classes", [2, 4])
def test_linear_probe_head_computes_the_probes_decision(classes: int) -> None:
    """The probe is fitted on standardized embeddings; the head that starts from it works on raw embeddings, with
    the scaler folded into its weights, and gives the probe's own scores."""
    from pipelines.core.tasks.classification.model import _head_from_probe, fit_linear_probe

    rng = np.random.default_rng(0)
    scale = np.array([300.0, 1.0, 0.01, 5.0, 1.0, 50.0])  # a few huge dimensions, as decoders' hidden states have
    y = rng.integers(0, classes, 300)
    x = (rng.normal(size=(300, 6)) + y[:, None] * 0.7) * scale + 3.0
    probe = fit_linear_probe(x[:200], y[:200], x[200:250], y[200:250])
    assert probe.score(x[250:], y[250:]) > 1 / classes + 0.2
    head = torch.nn.Linear(6, classes)
    _head_from_probe(head, probe, classes)
    with torch.no_grad():
        logits = head(torch.tensor(x[250:], dtype=torch.float32)).double().numpy()
    assert np.allclose(logits, probe.decision_function(x[250:]), atol=1e-3)
    assert (logits.argmax(1) == probe.predict(x[250:])).all()


def test_linear_probe_head_never_starts_on_a_label_its_probe_did_not_see() -> None:
    from pipelines.core.tasks.classification.model import _head_from_probe, fit_linear_probe

    rng = np.random.default_rng(1)
    y = rng.choice([0, 2], 120)  # label 1 has no training row
    x = rng.normal(size=(120, 5)) + y[:, None]
    probe = fit_linear_probe(x, y, None, None)
    head = torch.nn.Linear(5, 3)
    _head_from_probe(head, probe, 3)
    with torch.no_grad():
        logits = head(torch.tensor(x, dtype=torch.float32)).numpy()
    assert set(logits.argmax(1)) <= {0, 2} and (logits.argmax(1) == probe.predict(x)).all()
    assert np.allclose(logits[:, [0, 2]], probe.decision_function(x), atol=1e-3)


def test_selection_probe_embeddings_are_cached(tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Selecting again on the same data probes from the embedding cache: no candidate is loaded to embed."""
    import pipelines.core.tasks.classification.model as classification

    compute = ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "cache"))
    first = rows(select_base_model(spec_for([tiny_model_dir]), trec_splits, store(tmp_path, tmp_path / "m"),
                                   compute))[tiny_model_dir.name]
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 2  # the train and validation splits

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the probe loaded the model although its embeddings are cached")

    monkeypatch.setattr(classification, "load_encoder", no_loading)
    again = rows(select_base_model(spec_for([tiny_model_dir]), trec_splits, store(tmp_path, tmp_path / "m"),
                                   compute))[tiny_model_dir.name]
    assert again["probe_value"] == first["probe_value"] and again["verdict"] == "selected"


def test_the_winners_probe_embeddings_are_the_ones_its_linear_probe_head_starts_from(
        tmp_path: Path, tiny_model_dir: Path, trec_splits: pd.DataFrame) -> None:
    """The probe embeds the whole train and validation splits (they are smaller than probe.train_rows and
    probe.sample_rows) with the arguments of the linear-probe head: training the winner embeds nothing again."""
    compute = ComputeSettings("cpu", "fp32", 2, cache_dir=str(tmp_path / "cache"))
    spec = spec_for([tiny_model_dir])
    winner = select_base_model(spec, trec_splits, store(tmp_path, tmp_path / "m"), compute)
    cached = sorted((tmp_path / "cache" / "embeddings").glob("*.npy"))
    assert len(cached) == 2
    shapes = sorted(np.load(p).shape[0] for p in cached)
    assert shapes == sorted(int((trec_splits["split"] == s).sum()) for s in ("train", "validation"))
    said: list[str] = []
    train_classifier(trec_splits[trec_splits["split"] != "test"], winner, spec, tmp_path / "ckpt", compute,
                     progress=said.append)
    assert any(m.startswith("linear probe: embedding") for m in said), said  # the LP-FT head of the spec's default
    assert sorted((tmp_path / "cache" / "embeddings").glob("*.npy")) == cached, "the head embedded the splits again"


def test_early_stopping_ends_training_once_validation_stops_improving(tmp_path: Path, tiny_model_dir: Path,
                                                                      trec_splits: pd.DataFrame) -> None:
    """With a learning rate too small to change anything, validation never beats the first epoch: patience 2
    stops after epoch 3 of 8 and keeps epoch 1's weights; without patience every epoch runs."""
    said: list[str] = []
    spec = _spec(tiny_model_dir, epochs=8, batch_size=32, learning_rate=1e-12, early_stopping_patience=2)
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    record = train_classifier(trec_splits, base, spec, tmp_path / "ckpt", FP32, progress=said.append)  # type: ignore[arg-type]
    epochs = [h["epoch"] for h in record.history if "eval_loss" in h]
    assert epochs == [1.0, 2.0, 3.0], record.history
    assert record.best_epoch == 1.0
    assert any(m.startswith("early stop at epoch 3.00: validation macro_f1 has not beaten epoch 1") for m in said), said
    plain = train_classifier(trec_splits, base, _spec(tiny_model_dir, epochs=4, batch_size=32, learning_rate=1e-12),  # type: ignore[arg-type]
                             tmp_path / "plain", FP32, progress=said.append)
    assert [h["epoch"] for h in plain.history if "eval_loss" in h] == [1.0, 2.0, 3.0, 4.0]


def test_tail_averaging_keeps_the_mean_of_the_last_epochs_weights() -> None:
    """average_last: the callback keeps the trainable weights of the last N evaluated epochs (frozen ones are not
    copied) and restore_average puts their mean into the model, whatever the best single epoch was; the state a
    resumed run restores carries them."""
    from types import SimpleNamespace

    from pipelines.core.training.loop import best_epoch_callback

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    callback = best_epoch_callback(model, lambda m: None, None, "accuracy", average_last=2)
    seen = []
    for epoch, score in ((1, 0.9), (2, 0.5), (3, 0.6)):  # epoch 1 is the best single epoch
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(float(epoch))
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        callback.on_evaluate(SimpleNamespace(), SimpleNamespace(epoch=float(epoch), global_step=epoch, max_steps=3),
                             SimpleNamespace(), metrics={"eval_accuracy": score})
    resumed = best_epoch_callback(model, lambda m: None, None, "accuracy", average_last=2)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.restore_average() == [2.0, 3.0]
    assert torch.allclose(model[0].weight, torch.full_like(model[0].weight, 2.5))
    assert torch.allclose(model[0].bias, torch.full_like(model[0].bias, 2.5))
    assert torch.equal(model[1].weight, frozen)
    assert callback.best_epoch == 1.0
    callback.restore_best()
    assert torch.equal(model[0].weight, seen[0]["0.weight"])


def test_a_classifier_trained_with_tail_averaging_says_what_it_kept(tmp_path: Path, tiny_model_dir: Path,
                                                                   trec_splits: pd.DataFrame) -> None:
    """training.average_last_epochs through the real Trainer: the mean of the last epochs is scored on validation,
    the run says so, and the checkpoint names the last averaged epoch."""
    said: list[str] = []
    spec = _spec(tiny_model_dir, epochs=3, batch_size=32, average_last_epochs=2)
    base = resolve_base_model(spec.base_model, store(tmp_path))  # type: ignore[attr-defined]
    record = train_classifier(trec_splits, base, spec, tmp_path / "ckpt", FP32, progress=said.append)  # type: ignore[arg-type]
    assert any(m.startswith("kept the mean of the weights of epochs 2, 3 (validation macro_f1 ") for m in said), said
    assert record.best_epoch == 3.0
    assert len([h for h in record.history if "eval_loss" in h]) == 4  # three epochs, then the mean
