"""The check an export passes before its folder appears: the registered model's greedy answers, ties allowed."""

from __future__ import annotations

import torch

from pipelines.core.tasks.instruction.train import answers_differ


def _scores(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(r) for r in rows]


def test_the_same_greedy_answers_pass() -> None:
    expected = [([3, 1], _scores([0.0, 1.0, 0.0, 5.0], [0.0, 4.0, 0.0, 1.0]))]
    assert answers_differ(expected, [([3, 1], [])]) is None


def test_a_different_token_where_the_model_is_sure_is_named() -> None:
    expected = [([3, 1], _scores([0.0, 1.0, 0.0, 5.0], [0.0, 4.0, 0.0, 1.0]))] * 2
    problem = answers_differ(expected, [([3, 1], []), ([3, 2], [])])
    assert problem == ("prompt 2 ('Write one sentence about the sea.'): token 2 is 2 where the registered model "
                       "answers 1")


def test_a_different_token_after_a_tie_passes_and_a_shorter_answer_does_not() -> None:
    tie = [([3, 1], _scores([0.0, 1.0, 0.0, 5.0], [0.0, 4.0, 3.9995, 1.0]))]
    assert answers_differ(tie, [([3, 2], [])]) is None
    problem = answers_differ(tie, [([3], [])])
    assert problem == "prompt 1 ('What is the capital of France?'): 1 tokens where the registered model has 2"


def test_gguf_export_names_the_architectures_it_writes(tmp_path: object) -> None:
    from pathlib import Path

    import pytest
    from transformers import BertConfig, BertModel

    from pipelines.core.errors import CheckpointError
    from pipelines.core.tasks.instruction.gguf_export import write_gguf

    model = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    with pytest.raises(CheckpointError, match="GGUF export writes Llama-architecture models .* this model is 'bert'"):
        write_gguf(model, None, Path(str(tmp_path)) / "m.gguf", "bert")
    assert not (Path(str(tmp_path)) / "m.gguf").exists()
