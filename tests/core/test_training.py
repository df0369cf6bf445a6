"""Training on the real packaged all-MiniLM-L6-v2: adapters learn, base weights stay, the checkpoint reloads exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from pipelines.core.cleaning import dedup_key
from pipelines.core.errors import CheckpointError
from pipelines.core.selection import resolve_base_model
from pipelines.core.spec import parse_spec
from pipelines.core.tasks.classification.train import load_classifier, predict_proba, train_classifier
from pipelines.core.tasks.classification.model import pool
from pipelines.core.training.compute import ComputeSettings
from tests.conftest import MINILM_PACKAGE, MINILM_PATH, PROJECT_ROOT, store

SPEC = f"""\
source: {{kind: local, path: unused.csv}}
base_model:
  model: {{source: package, package: {MINILM_PACKAGE}, path: {MINILM_PATH}, name: all-MiniLM-L6-v2}}
training: {{epochs: 2, batch_size: 8, learning_rate: 2.0e-3, max_length: 32, precision: fp32,
           logging_steps: 2, lora: {{r: 4, alpha: 8}}}}
"""


class ListSink:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))


def small_splits(trec_lines: list[str]) -> pd.DataFrame:
    rows: dict[str, str] = {}
    for line in trec_lines:
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in ("HUM", "LOC", "NUM") and text not in rows:
            rows[text] = coarse
        if len(rows) == 90:
            break
    frame = pd.DataFrame({"text": list(rows), "label": list(rows.values())})
    frame["norm_text"] = frame["text"].map(dedup_key)
    frame["split"] = ["validation" if i % 5 == 0 else "train" for i in range(len(frame))]
    return frame


def test_pooling_modes() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]


@pytest.mark.real_model
def test_lora_learns_base_stays_and_checkpoint_reloads(tmp_path: Path, trec_lines: list[str]) -> None:
    spec = parse_spec(SPEC, name="real", origin="real.yaml")
    base = resolve_base_model(spec.base_model, store(PROJECT_ROOT))
    assert base.pooling == "mean" and base.license == "apache-2.0" and base.parameter_count == 22_713_728
    splits = small_splits(trec_lines)
    sink = ListSink()
    compute = ComputeSettings("cpu", "fp32", 2)
    record = train_classifier(splits, base, spec, tmp_path / "ckpt", compute, progress=lambda _: None, sink=sink)

    assert any("loss" in metrics for _, metrics in sink.rows)
    assert record.task_data == {"labels": ["HUM", "LOC", "NUM"]}
    assert record.train_rows == 72 and record.validation_rows == 18

    # Only adapter weights are saved, and every LoRA B matrix (initialised to zero by peft) has learned.
    with safe_open(str(Path(record.path) / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
        b_norms = [handle.get_tensor(k).norm().item() for k in keys if "lora_B" in k]
    assert len(b_norms) == 6 * 6 and min(b_norms) > 0  # 6 layers x (query, key, value, 3 dense)

    # The base weights inside the reloaded model are exactly the packaged ones.
    model, tokenizer = load_classifier(record)
    with safe_open(str(Path(base.local_path) / "model.safetensors"), "pt") as original:
        base_params = {n.split("base_model.model.", 1)[1].replace(".base_layer", ""): p
                       for n, p in model.encoder.named_parameters() if "lora_" not in n}
        for name, param in base_params.items():
            assert torch.equal(param, original.get_tensor(name)), name
        stored = {k for k in original.keys() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    assert set(base_params) == stored and len(stored) > 90

    # The saved checkpoint reproduces the model that training scored on validation (best epoch kept).
    validation = splits[splits["split"] == "validation"]
    probs = predict_proba(model, tokenizer, validation["text"].tolist(), 32, compute)
    predicted = np.array(record.task_data["labels"])[probs.argmax(-1)]
    reloaded_accuracy = float(np.mean(predicted == validation["label"].to_numpy()))
    best = max((h for h in record.history if "eval_macro_f1" in h), key=lambda h: h["eval_macro_f1"])  # primary
    assert record.best_epoch == best["epoch"]
    assert reloaded_accuracy == pytest.approx(best["eval_accuracy"])


def test_tampered_checkpoint_is_refused(tmp_path: Path, trec_lines: list[str], tiny_model_dir: Path) -> None:
    spec = parse_spec(SPEC.replace(f"source: package, package: {MINILM_PACKAGE}, path: {MINILM_PATH}, "
                                   "name: all-MiniLM-L6-v2", f"source: local, path: {tiny_model_dir}")
                      .replace("epochs: 2", "epochs: 1"), name="tiny", origin="tiny.yaml")
    base = resolve_base_model(spec.base_model, store(PROJECT_ROOT))
    record = train_classifier(small_splits(trec_lines), base, spec, tmp_path / "ckpt",
                              ComputeSettings("cpu", "fp32", 2), progress=lambda _: None)
    with pytest.raises(CheckpointError, match="exists already"):
        train_classifier(small_splits(trec_lines), base, spec, tmp_path / "ckpt",
                         ComputeSettings("cpu", "fp32", 2), progress=lambda _: None)
    head = Path(record.path) / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="the files changed after training"):
        load_classifier(record)
    assert not list(tmp_path.glob(".ckpt*")), "no temporary folder is left behind"
