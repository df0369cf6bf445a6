"""The prompting baseline's scorer: the shared cache of the instructions and examples, the rows' own turns and
each label's later tokens must give exactly the log-likelihood of scoring each whole conversation on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.core.prompting import conversation_prefix, few_shot_examples, render, score_choices
from pipelines.core.trainer import ComputeSettings

FP32 = ComputeSettings("cpu", "fp32", num_threads=2)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_chat import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def brute_force(model: object, tokenizer: object, prefix: list[dict[str, str]], text: str, choice: str) -> float:
    """log p(answer | conversation), from one forward pass over the whole rendered conversation."""
    turn = render(tokenizer, [*prefix, {"role": "user", "content": text}], True)
    full = render(tokenizer, [*prefix, {"role": "user", "content": text}, {"role": "assistant", "content": choice}],
                  False)
    prompt_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(turn):].rstrip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return float(sum(logp[len(prompt_ids) + j - 1, t] for j, t in enumerate(answer_ids)))


@pytest.mark.parametrize("shots", [0, 1])
def test_cached_scores_equal_scoring_each_conversation_alone(tiny_chat_dir: Path, shots: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_dir)).eval()
    # Labels of 1 to several tokens, texts of different lengths (the batch is padded in the middle).
    choices = ["red", "green house", "The car is blue."]
    train = pd.DataFrame({"text": ["What colour is the car number 1?", "What colour is the hat number 2?",
                                   "What colour is the cup number 3?"], "label": choices})
    prefix = conversation_prefix(choices, few_shot_examples(train, shots, 0, choices))
    texts = ["What colour is the ball number 7?", "What is AI?", "Tell me a joke about the lamp number 11 please."]
    scores = score_choices(model, tokenizer, prefix, texts, choices, FP32, batch_size=2)
    expected = np.array([[brute_force(model, tokenizer, prefix, t, c) for c in choices] for t in texts])
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert len({len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices}) > 1


def test_few_shot_examples_take_k_rows_of_every_label_interleaved() -> None:
    train = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": ["a", "b", "c"] * 4})
    examples = few_shot_examples(train, 2, 0, ["a", "b", "c"])
    assert [label for _, label in examples] == ["a", "b", "c", "a", "b", "c"]
    assert len({text for text, _ in examples}) == 6
    assert all(train.set_index("text").at[text, "label"] == label for text, label in examples)
