"""A classifier exported to ONNX (adapters merged, softmax included) and checked against the registered model.

The folder holds model.onnx (inputs: the tokenizer's model_input_names; output: `probabilities`, one row per text),
the tokenizer, and tuneline-export.json (the labels in output order, the maximum length, the parity check). It is
written to a temporary sibling, verified with onnxruntime against the checkpoint's own predictions on a fixed set of
texts, and renamed only when every label matches and every probability is within PARITY_TOLERANCE.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.core.errors import CheckpointError
from pipelines.core.files import atomic_path
from pipelines.core.records import CheckpointRecord
from pipelines.core.training.compute import ComputeSettings

PARITY_TOLERANCE = 1e-4  # largest difference in any class probability between the export and the checkpoint
MAX_LENGTH = 512  # what predict() truncates to (or the base model's own limit, when lower)
ONNX_OPSET = 17
EXPORT_MANIFEST = "tuneline-export.json"
# Texts of different lengths and scripts: the check covers padding inside a batch, truncation and unknown tokens.
PARITY_TEXTS = (
    "What is the capital of Peru ?",
    "hi",
    "How many people live in the largest city of the country with the longest coastline in the world , and why "
    "did its population grow so quickly during the second half of the twentieth century ?",
    "¿Dónde está la estación de tren? Ça coûte combien ? 東京はどこですか",
    "refund my card payment please, it was charged twice yesterday and the shop says it never received it",
    " ".join(["a very long text that is cut at the maximum length"] * 80),
    "1234 5678 !!!",
    "Who wrote the novel ' War and Peace ' ?",
)


class _Probabilities(nn.Module):
    """The classifier with its adapters merged, answering class probabilities from the tokenizer's inputs."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs, strict=True))
        return torch.softmax(self.model(**named).logits.float(), dim=-1)


def max_length(record: CheckpointRecord) -> int:
    return min(MAX_LENGTH, record.base_model.max_position_embeddings)


def _onnx_probabilities(session: Any, tokenizer: Any, texts: Sequence[str], length: int) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    encoded = tokenizer(list(texts), truncation=True, max_length=length, padding=True, return_tensors="np")
    return np.asarray(session.run(["probabilities"], {n: encoded[n].astype(np.int64) for n in names})[0])


def export_onnx(record: CheckpointRecord, out_dir: Path) -> Path:
    """The checkpoint as an ONNX classifier folder at `out_dir` (which must not exist), verified before it appears."""
    import onnxruntime

    from pipelines.core.tasks.classification.train import load_classifier, predict_proba

    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; choose a new folder for the export")
    compute = ComputeSettings(device="cpu", precision="fp32")
    model, tokenizer = load_classifier(record)
    length = max_length(record)
    expected = predict_proba(model, tokenizer, PARITY_TEXTS, length, compute)
    model.encoder = model.encoder.merge_and_unload()  # plain linear layers: a smaller, faster graph
    model.eval()
    names = list(tokenizer.model_input_names)
    sample = tokenizer(list(PARITY_TEXTS[:2]), padding=True, return_tensors="pt")
    labels = list(record.task_data["labels"])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        # The TorchScript exporter: it needs no onnxscript and handles the encoder's dynamic batch and length
        # axes as they are; torch 2.13 still ships it (with a deprecation warning, silenced here).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_Probabilities(model, names), tuple(sample[n] for n in names), str(tmp / "model.onnx"),
                              input_names=names, output_names=["probabilities"], opset_version=ONNX_OPSET,
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                            "probabilities": {0: "batch"}}, dynamo=False)
        tokenizer.save_pretrained(str(tmp))
        session = onnxruntime.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        got = _onnx_probabilities(session, tokenizer, PARITY_TEXTS, length)
        difference = float(np.abs(got - expected).max())
        same_labels = bool((got.argmax(axis=1) == expected.argmax(axis=1)).all())
        if not same_labels or difference > PARITY_TOLERANCE:
            raise CheckpointError(f"the ONNX export of v{record.model_version} does not answer as the checkpoint "
                                  f"does: labels {'match' if same_labels else 'differ'}, largest probability "
                                  f"difference {difference:.2e} (allowed {PARITY_TOLERANCE:.0e}); nothing was written")
        (tmp / EXPORT_MANIFEST).write_text(json.dumps({
            "format": "onnx", "labels": labels, "inputs": names, "output": "probabilities",
            "max_length": length, "opset": ONNX_OPSET, "checkpoint_sha256": record.sha256,
            "model_version": record.model_version, "base_model": record.base_model.name,
            "license": record.base_model.license,
            "parity": {"texts": len(PARITY_TEXTS), "max_probability_difference": difference,
                       "tolerance": PARITY_TOLERANCE, "labels_match": same_labels}}, indent=2), encoding="utf-8")
    return out_dir


def onnx_classifier(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """An exported folder loaded for inference: the onnxruntime session, the tokenizer, its manifest (labels...)."""
    import onnxruntime
    from transformers import AutoTokenizer

    manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session, AutoTokenizer.from_pretrained(str(folder)), manifest


def onnx_predict(session: Any, tokenizer: Any, texts: Sequence[str], length: int) -> np.ndarray:
    """Class probabilities of an exported classifier, one row per text (one padded batch)."""
    return _onnx_probabilities(session, tokenizer, texts, length)
