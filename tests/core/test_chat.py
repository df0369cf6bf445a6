"""Instruction data: reading (chatterbot YAML, columns, OpenAI messages), cleaning, rendering with the model's
chat template, the loss mask, over-length rules and the generation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.core.errors import SourceError
from pipelines.core.sources import read_file, read_source
from pipelines.core.spec import CleaningConfig, PackageFileSourceConfig, SplitsConfig
from pipelines.core.splitting import assign_splits
from pipelines.core.tasks.instruction.chat import (FALLBACK_CHAT_TEMPLATE, clean_conversations, exact_match,
                                                   render_conversations, render_example, role_problem, rouge_l,
                                                   score_generation, token_f1)
from pipelines.core.tasks.instruction.config import InstructionTuningTaskConfig
from pipelines.core.tasks.instruction.data import select_conversations
from tests.tiny_chat import write_tiny_chat_model

TASK = InstructionTuningTaskConfig(type="instruction_tuning")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))))


def test_chatterbot_corpus_is_read_with_file_category_and_line() -> None:
    cfg = PackageFileSourceConfig(kind="package_file", package="chatterbot-corpus",
                                  path="chatterbot_corpus/data/english", format="chatterbot_yaml")
    raw, record = read_source(cfg, Path("."))
    assert len(raw) == 2026 and record.location.startswith("chatterbot-corpus==")
    assert len(record.files) == len(set(raw["category"])) >= 15
    first = raw.iloc[0]
    assert (first["instruction"], first["category"], first["source_row"]) == ("What is AI?", "ai", 5)
    assert first["source_file"] == "chatterbot-corpus:chatterbot_corpus/data/english/ai.yml"
    # The shipped corpus has one malformed conversation; it is kept with its problem, named by file and line.
    bad = raw[raw["source_problem"].notna()]
    assert bad[["category", "source_row"]].values.tolist() == [["trivia", 35]]
    cleaned = clean_conversations(select_conversations(raw, TASK), CleaningConfig())
    assert cleaned.dropped["malformed_source_row"] == 1
    assert cleaned.dropped_examples["malformed_source_row"][0]["source_row"] == 35


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.yml"
    path.write_text("conversations:\n- - hi\n\t- tab-indented\n- - ok\n  - fine\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"x\.yml, row 3: not valid YAML"):
        read_file(path, "chatterbot_yaml")
    path.write_text("categories: [a]\n", encoding="utf-8")
    with pytest.raises(SourceError, match="'conversations' list"):
        read_file(path, "chatterbot_yaml")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_instruction_columns_in_every_format(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"instruction": ["Add the numbers.", "Say hi"], "input": ["2 and 3", ""],
                          "system": ["", "Be brief."], "response": ["5", "Hi!"]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    raw, _ = read_file(path, "auto")
    raw["source_file"] = str(path)
    conversations = select_conversations(raw, TASK)
    assert json.loads(conversations["messages"][0]) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert json.loads(conversations["messages"][1]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi!"}]
    assert conversations["text"].tolist() == ["Add the numbers.\n\n2 and 3", "Say hi"]
    assert conversations["response"].tolist() == ["5", "Hi!"]


def test_openai_messages_column(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bot"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "A"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw, _ = read_file(path, "auto")
    task = InstructionTuningTaskConfig(type="instruction_tuning", system_prompt="You are terse.")
    conversations = select_conversations(raw, task)
    first = json.loads(conversations["messages"][0])
    assert first[0] == {"role": "system", "content": "You are terse."} and len(first) == 5
    assert conversations["text"][0] == "Hi\nName?" and conversations["response"][0] == "Bot"
    assert role_problem(json.loads(conversations["messages"][1])) is not None
    path.write_text('{"messages": "not json ["}\n', encoding="utf-8")
    raw, _ = read_file(path, "auto")
    with pytest.raises(SourceError, match=r"chat\.jsonl, row 1, column 'messages': not a JSON list"):
        select_conversations(raw, task)


def _jsonl(path: Path, rows: list[dict]) -> pd.DataFrame:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return read_file(path, "auto")[0]


def test_content_parts_sharegpt_messages_and_role_names_are_read_as_text(tmp_path: Path) -> None:
    """OpenAI content parts, ShareGPT's from/value and human/gpt, and a file whose rows mix string and parts
    content (which Parquet cannot hold as one column as they are): every row is the same plain conversation."""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 plus 2?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "It is"},
                                                            {"type": "text", "text": "4."}]}]}
    plain = {"messages": [{"role": "User", "content": "What is 3 plus 3?"},
                          {"role": "assistant", "content": 6}]}
    sharegpt = {"messages": [{"from": "human", "value": "What is 4 plus 4?"}, {"from": "gpt", "value": "8"}]}
    untyped = {"messages": [{"role": "user", "content": [{"text": "What is 5 plus 5?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "10"}]}]}
    raw = _jsonl(tmp_path / "mixed.jsonl", [parts, plain, sharegpt, untyped])
    raw.to_parquet(tmp_path / "raw.parquet")  # raw_data is stored as Parquet, and read back from it
    conversations = select_conversations(pd.read_parquet(tmp_path / "raw.parquet"), TASK)
    assert conversations["text"].tolist() == ["What is 2 plus 2?", "What is 3 plus 3?", "What is 4 plus 4?",
                                              "What is 5 plus 5?"]
    assert conversations["response"].tolist() == ["It is\n4.", "6", "8", "10"]
    # One shape in every row is stored as Parquet's own lists: parts without a type, ShareGPT beside role/content.
    same_shape = _jsonl(tmp_path / "shapes.jsonl", [untyped, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": [
            {"type": "text", "text": "Hello"}]}]}])
    same_shape.to_parquet(tmp_path / "shapes.parquet")
    read_back = select_conversations(pd.read_parquet(tmp_path / "shapes.parquet"), TASK)
    assert read_back["text"].tolist() == ["What is 5 plus 5?", "Hi"]
    both = _jsonl(tmp_path / "roles.jsonl", [sharegpt, {"messages": [{"role": "user", "content": "Hi"},
                                                                     {"role": "assistant", "content": "Hello"}]}])
    both.to_parquet(tmp_path / "roles.parquet")
    roles = select_conversations(pd.read_parquet(tmp_path / "roles.parquet"), TASK)
    assert roles["response"].tolist() == ["8", "Hello"]
    assert all(role_problem(json.loads(m)) is None for m in conversations["messages"])


@pytest.mark.parametrize(("message", "problem"), [
    ({"role": "narrator", "content": "x"}, r"row 1, column 'messages': message 0 has the role 'narrator'; expected "
                                           r"system, user or assistant"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
     r"message 0 has a content part of type 'image_url'; expected text"),
])
def test_unknown_roles_and_non_text_parts_are_named(tmp_path: Path, message: dict, problem: str) -> None:
    raw = _jsonl(tmp_path / "bad.jsonl", [{"messages": [message, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(SourceError, match=problem):
        select_conversations(raw, TASK)


def test_a_file_mixing_messages_and_instruction_pairs_keeps_every_row(tmp_path: Path) -> None:
    raw = _jsonl(tmp_path / "both.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"instruction": "Say bye", "response": "Bye", "system": "Be brief."}])
    conversations = select_conversations(raw, TASK)
    assert conversations["text"].tolist() == ["Hi", "Say bye"]
    assert conversations["response"].tolist() == ["Hello", "Bye"]
    assert json.loads(conversations["messages"][1])[0] == {"role": "system", "content": "Be brief."}


def test_json_values_of_mixed_kinds_are_stored_or_named(tmp_path: Path) -> None:
    """Numbers beside text become text as written; lists beside plain values are an error naming the row."""
    raw = _jsonl(tmp_path / "kinds.jsonl", [{"instruction": "a", "response": "x"},
                                            {"instruction": "b", "response": 12345},
                                            {"instruction": "c", "response": True}])
    assert raw["response"].tolist() == ["x", "12345", "true"]
    raw.to_parquet(tmp_path / "raw.parquet")
    empty = _jsonl(tmp_path / "empty.jsonl", [{"instruction": "a", "response": "x", "meta": {}}] * 2)
    empty.to_parquet(tmp_path / "empty.parquet")  # an object without fields, which Parquet has no type for
    assert empty["meta"].tolist() == ["{}", "{}"]
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
    with pytest.raises(SourceError, match=r"strings\.jsonl, row 4, column 'messages': holds a plain value "
                                          r"\(\"hello\"\) where the other rows hold lists or objects"):
        _jsonl(tmp_path / "strings.jsonl", [*rows, {"messages": "hello"}])


def test_missing_columns_are_named(tmp_path: Path) -> None:
    raw = pd.DataFrame({"question": ["q"], "source_file": ["f.csv"], "source_row": [2]})
    with pytest.raises(SourceError, match=r"no column 'instruction' \(named by task.instruction_column\)"):
        select_conversations(raw, TASK)


@pytest.mark.parametrize(("roles", "problem"), [
    (["user", "assistant"], None),
    (["system", "user", "assistant", "user", "assistant"], None),
    (["user", "user"], "roles must alternate"),
    (["assistant", "user"], "roles must alternate"),
    (["user", "assistant", "user"], "last message is not the assistant"),
    (["user", "system", "assistant"], "system message after"),
    (["user", "bot"], "unknown role 'bot'"),
    (["system"], "no user or assistant"),
])
def test_role_problems(roles: list[str], problem: str | None) -> None:
    found = role_problem([{"role": r, "content": "x"} for r in roles])
    assert found is None if problem is None else problem in found


def test_cleaning_counts_and_keeps_several_answers() -> None:
    raw = pd.DataFrame({
        "instruction": ["What is AI?", "What is AI?", "What is AI?", "what is ai", "", "Tell me", "x"],
        "response": ["A field.", "A science.", "A field.", "A field!", "Nothing", "  ", "y" * 50],
        "source_file": "f.csv", "source_row": range(2, 9)})
    result = clean_conversations(select_conversations(raw, TASK), CleaningConfig(max_chars=40))
    assert result.frame["response"].tolist() == ["A field.", "A science."]  # two answers to one instruction
    assert result.dropped == {"malformed_source_row": 0, "malformed_message": 0, "empty_instruction": 1,
                              "empty_response": 1, "empty_turn": 0, "control_characters": 0, "too_long": 1,
                              "exact_duplicate": 1, "normalised_duplicate": 1}
    splits = assign_splits(result.frame, SplitsConfig(), group_column="category").frame
    assert splits.groupby("norm_text")["split"].nunique().max() == 1  # an instruction stays in one split


def test_conversations_that_differ_only_in_their_system_message_are_not_duplicates(tmp_path: Path) -> None:
    raw = _jsonl(tmp_path / "systems.jsonl", [
        {"system": "Be formal.", "instruction": "Hi", "response": "Hello"},
        {"system": "Be a pirate.", "instruction": "Hi", "response": "Hello"},
        {"system": "be  FORMAL.", "instruction": "hi", "response": "Hello"}])
    result = clean_conversations(select_conversations(raw, TASK), CleaningConfig())
    assert [json.loads(m)[0]["content"] for m in result.frame["messages"]] == ["Be formal.", "Be a pirate."]
    assert result.dropped["normalised_duplicate"] == 1


def test_rendering_uses_the_models_template_and_masks_the_prompt(tokenizer) -> None:
    messages = [{"role": "user", "content": "What colour is the car?"}, {"role": "assistant", "content": "Red."}]
    prompt, completion, ids, mask = render_example(tokenizer, messages)
    assert prompt + completion == tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt == tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "Red.<|im_end|>\n"
    n_prompt = mask.count(0)
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tokenizer.decode(ids[:n_prompt]) == prompt and tokenizer.decode(ids[n_prompt:]) == completion


def _splits_frame(lengths: list[int]) -> pd.DataFrame:
    rows = []
    for i, n in enumerate(lengths):
        messages = [{"role": "user", "content": f"Question {i}"}, {"role": "assistant", "content": "word " * n}]
        rows.append({"split": "train", "text": f"Question {i}", "response": "word " * n, "category": "c",
                     "norm_text": f"question {i}", "messages": json.dumps(messages), "source_file": "f",
                     "source_row": i + 1})
    return pd.DataFrame(rows)


def test_overlength_is_dropped_or_truncated_and_counted(tokenizer) -> None:
    frame = _splits_frame([1, 2, 60])
    whole = render_conversations(frame, tokenizer, max_length=100_000, overlength="drop").frame
    limit = int(whole["total_tokens"][:2].max()) + 5
    assert whole["total_tokens"][2] > limit
    dropped = render_conversations(frame, tokenizer, max_length=limit, overlength="drop")
    assert len(dropped.frame) == 2 and dropped.dropped["over_max_length"] == {"train": 1}
    assert dropped.frame["total_tokens"].max() <= limit
    cut = render_conversations(frame, tokenizer, max_length=limit, overlength="truncate")
    assert len(cut.frame) == 3 and cut.truncated == {"train": 1}
    row = cut.frame.iloc[2]
    assert row["total_tokens"] == limit and row["truncated"] and row["completion_tokens"] >= 1
    assert list(row["completion_mask"]) == [0] * row["prompt_tokens"] + [1] * row["completion_tokens"]
    tiny = render_conversations(frame, tokenizer, max_length=5, overlength="truncate")  # not even the prompt fits
    assert len(tiny.frame) == 0 and tiny.dropped["prompt_over_max_length"] == {"train": 3}


def test_a_model_without_template_gets_the_reported_fallback(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = write_tiny_chat_model(tmp_path / "plain", chat_template=None)
    plain = AutoTokenizer.from_pretrained(str(folder))
    result = render_conversations(_splits_frame([1]), plain, max_length=64, overlength="drop")
    assert "fallback" in result.template and plain.chat_template == FALLBACK_CHAT_TEMPLATE
    assert result.frame["prompt_rendered"][0] == "<|im_start|>user\nQuestion 0<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("prediction", "reference", "em", "f1", "rl"), [
    ("The cat sat on the mat", "the cat is on the mat", 0.0, 5 / 6, 5 / 6),
    ("Hello!", "hello", 1.0, 1.0, 1.0),
    ("", "something", 0.0, 0.0, 0.0),
    ("mat the on", "on the mat", 0.0, 1.0, 1 / 3),  # same words, order matters only for ROUGE-L
    ("a b c d", "x y", 0.0, 0.0, 0.0),
])
def test_generation_metrics(prediction: str, reference: str, em: float, f1: float, rl: float) -> None:
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert rouge_l(prediction, reference) == pytest.approx(rl)


def test_scores_take_the_best_reference() -> None:
    scores = score_generation("A field of science.", ["Sort of.", "A field of science"])
    assert scores == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}


# ------------------------------------------------------------------------- values that are not what they seem
def _conversations(*conversations: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"messages": list(conversations), "source_file": "chat.jsonl",
                         "source_row": range(1, len(conversations) + 1)})


def _turns(*contents: object) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def test_null_roles_null_turns_and_control_characters_are_dropped_with_their_reason() -> None:
    raw = _conversations(
        _turns("What is 2 plus 2?", "4"),
        _turns("What is 3 plus 3?", None, "Please answer.", "6"),    # a null assistant turn before the response
        _turns("What is 4 plus 4?", "  ", "Please answer.", "8"),    # a blank one
        _turns("What is 5 plus 5?", "10", None, "Anything else?"),  # a null user turn
        [{"role": None, "content": "What is 6 plus 6?"}, {"role": "assistant", "content": "12"}],
        _turns("What is 7 plus 7?", None),                           # a null response: empty_response, as before
        _turns("What is \x1b[1m8\x1b[0m plus 8?", "16"),             # a terminal's escape codes
        _turns("What is 9 plus 9?", "18\x00"),                       # NUL in the response
        [{"role": "system", "content": None}, *_turns("What is 10 plus 10?", "20")])
    selected = select_conversations(raw, TASK)
    assert selected["message_problem"].tolist()[4] == "message 0 has no role (null)"
    result = clean_conversations(selected, CleaningConfig())
    assert result.frame["response"].tolist() == ["4", "20"]
    assert {why: n for why, n in result.dropped.items() if n} == {
        "malformed_message": 1, "empty_response": 1, "empty_turn": 3, "control_characters": 2}
    assert [r["source_row"] for r in result.dropped_examples["empty_turn"]] == [2, 3, 4]
    assert result.dropped_examples["malformed_message"][0]["message_problem"] == "message 0 has no role (null)"
    shown = result.dropped_examples["control_characters"]
    assert [(r["text"], r["response"]) for r in shown] == [("What is \\x1b[1m8\\x1b[0m plus 8?", "16"),
                                                            ("What is 9 plus 9?", "18\\x00")]
    # An empty system message carries nothing: it is left out, as an empty system column is.
    assert json.loads(result.frame["messages"][1]) == _turns("What is 10 plus 10?", "20")
    assert all(role_problem(json.loads(m)) is None for m in result.frame["messages"])


def test_bytes_booleans_and_numbers_in_messages_and_columns_are_read_as_text() -> None:
    raw = _conversations(
        _turns(b"Qu'est-ce qu'un caf\xc3\xa9 ?", [{"type": "text", "text": b"Une boisson."}]),
        [{"role": b"user", "content": "Is it true?"}, {"role": "assistant", "content": True}],
        _turns("How many?", 12.5))
    conversations = select_conversations(raw, TASK)
    assert conversations["text"].tolist() == ["Qu'est-ce qu'un café ?", "Is it true?", "How many?"]
    assert conversations["response"].tolist() == ["Une boisson.", "true", "12.5"]  # never b'...' or True
    pairs = pd.DataFrame({"instruction": [b"Say hi", "Say bye"], "response": ["Hi", b"Bye"],
                          "category": [b"greeting", None], "source_file": "p.parquet", "source_row": [1, 2]})
    conversations = select_conversations(pairs, TASK)
    assert conversations["text"].tolist() == ["Say hi", "Say bye"]
    assert conversations["response"].tolist() == ["Hi", "Bye"]
    assert conversations["category"].tolist() == ["greeting", "none"]


@pytest.mark.parametrize(("conversation", "problem"), [
    (_turns("Q", b"\xff\xfe"), r"chat\.jsonl, row 1, column 'messages': holds bytes that are not UTF-8 text "
                               r"\(b'\\xff\\xfe': byte 0xff at offset 0\).* \(expected text as message 1's content\)"),
    (_turns("Q", {"answer": "A"}), r"row 1, column 'messages': message 1 has a content part without a 'text' string "
                                   r"\(\{'answer': 'A'\}\)"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": object()}],
     r"holds a value of type object .*\(expected text as message 1's content\)"),
])
def test_message_content_that_is_not_text_names_the_row(conversation: list[dict], problem: str) -> None:
    with pytest.raises(SourceError, match=problem):
        select_conversations(_conversations(conversation), TASK)


def test_an_instruction_column_that_is_not_text_names_the_row() -> None:
    raw = pd.DataFrame({"instruction": ["a", {"q": "b"}], "response": ["x", "y"], "source_file": "p.jsonl",
                        "source_row": [1, 2]})
    with pytest.raises(SourceError, match=r"p\.jsonl, row 2, column 'instruction': holds a JSON object "
                                          r"\(\{'q': 'b'\}\), not text \(expected text\)"):
        select_conversations(raw, TASK)
