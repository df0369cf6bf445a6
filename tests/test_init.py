"""`tuneline init DATA`: a first spec inferred from the data's columns, commented, validated, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from pipelines.core.spec import load_spec
from pipelines.core.tasks.classification.task import ClassificationTask
from pipelines.core.tasks.instruction.task import InstructionTuningTask
from pipelines.init_spec import slug
from tests.conftest import PROJECT_ROOT

BANKING77 = PROJECT_ROOT.parent / "shared" / "datasets" / "banking77"
TOPICS = {
    "greetings": [("Hello there", "Hi, how can I help you today?"), ("Good morning", "Good morning to you too!")],
    "food": [("What is your favourite food?", "I do not eat, but pizza sounds lovely."),
             ("Do you like pasta?", "Pasta is a classic dish from Italy.")],
    "science": [("What is gravity?", "Gravity is the force that pulls masses toward each other."),
                ("What is an atom?", "An atom is the smallest unit of a chemical element.")],
}


def init(*args: str | Path) -> int:
    return main(["init", *map(str, args)])


def chatterbot_rows(n: int = 30) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        category = list(TOPICS)[i % 3]
        question, answer = TOPICS[category][i % 2]
        rows.append({"instruction": f"{question} (question {i})", "response": f"{answer} Answer {i}.",
                     "category": category})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def top_level_keys_without_comment(text: str) -> list[str]:
    lines = text.splitlines()
    return [line for i, line in enumerate(lines)
            if line and not line[0].isspace() and not line.startswith(("#", "-"))
            and (i == 0 or not lines[i - 1].startswith("#"))]


def test_banking77_keeps_its_official_files_and_infers_77_labels(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    if not BANKING77.is_dir():
        pytest.skip("the shared banking77 dataset is not beside this checkout")
    data = Path("..") / "shared" / "datasets" / "banking77"  # as a user in the project root would type it
    assert init(PROJECT_ROOT / data, "--specs-dir", tmp_path) == 0
    spec = load_spec(tmp_path / "banking77.yaml")
    assert spec.task.type == ClassificationTask.name
    assert (spec.task.text_column, spec.task.label_column) == ("text", "category")
    assert len(spec.task.labels) == 77 and "card_arrival" in spec.task.labels
    assert spec.source.split_files == {"train": "train.csv", "test": "test.csv"}
    # Outside the project: absolute, as typed (normalised, a symlinked folder kept as the user named it).
    assert spec.source.path == os.path.abspath(PROJECT_ROOT / data)
    assert Path(spec.source.path).resolve() == BANKING77.resolve()
    assert spec.cleaning.keep_source_test is True
    assert spec.splits.overlap == "drop_from_earlier_splits"  # ~25 train texts equal a test text once normalised
    assert [c.id for c in spec.base_model.candidates] == ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"]
    out = capsys.readouterr().out
    assert "labels:     77 classes" in out and "contactless_not_working 75" in out
    assert "test = test.csv" in out and "test 3,080" in out
    assert "note: not read: categories.json" in out
    assert "the data's own licence allows training on it (README.md says: CC BY 4.0 (the repository's LICENSE))" in out
    assert f"tuneline check banking77 --specs-dir {tmp_path}" in out
    assert f"tuneline run --pipeline banking77 --specs-dir {tmp_path}" in out
    assert top_level_keys_without_comment((tmp_path / "banking77.yaml").read_text()) == []


def test_chatterbot_style_jsonl_becomes_instruction_tuning(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "My Chat-Data.jsonl", chatterbot_rows())
    assert init(data, "--specs-dir", tmp_path / "specs") == 0
    path = tmp_path / "specs" / "my_chat_data.yaml"
    spec = load_spec(path)
    assert spec.task.type == InstructionTuningTask.name
    assert (spec.task.instruction_column, spec.task.response_column, spec.task.category_column) == \
        ("instruction", "response", "category")
    assert spec.source.path == str(data) and spec.source.split_files is None
    assert (spec.splits.train, spec.splits.validation, spec.splits.test, spec.splits.seed) == (0.8, 0.1, 0.1, 13)
    assert spec.evaluation.primary_metric == "rouge_l"
    assert [c.id for c in spec.base_model.candidates] == ["SmolLM2-135M-Instruct"]
    out = capsys.readouterr().out
    assert "categories: 3 (column 'category'): food 10, greetings 10, science 10" in out
    assert "warning: only 30 rows are left after cleaning: quality.min_rows (50) will block training" in out
    text = path.read_text()
    assert top_level_keys_without_comment(text) == []
    assert not list((tmp_path / "specs").glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_messages_column_becomes_instruction_tuning(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}]} for r in chatterbot_rows()]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    assert init(data, "--specs-dir", tmp_path, "--name", "chats_v1") == 0
    spec = load_spec(tmp_path / "chats_v1.yaml")
    assert spec.task.type == InstructionTuningTask.name
    assert spec.task.messages_column == "messages"


def test_a_messages_csv_with_a_row_that_is_not_json_names_the_row(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"messages": json.dumps([{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["response"]}])} for r in chatterbot_rows()]
    data = tmp_path / "chats.csv"
    pd.DataFrame(rows + [{"messages": "hello"}]).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path, "--name", "chats_csv") == 2
    error = capsys.readouterr().err
    assert "chats.csv, row 32, column 'messages': not a JSON list of messages" in error
    assert "Traceback" not in error and not (tmp_path / "chats_csv.yaml").exists()


@pytest.mark.parametrize("named", [False, True])
def test_one_class_only_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str], named: bool) -> None:
    data = tmp_path / "single.csv"
    pd.DataFrame({"text": [f"this is review number {i} of a film" for i in range(60)], "label": ["pos"] * 60}).to_csv(
        data, index=False)
    extra = ["--text-column", "text", "--label-column", "label"] if named else []
    assert init(data, "--specs-dir", tmp_path, *extra) == 2
    error = capsys.readouterr().err
    assert "classification needs at least 2 labels" in error and "'pos'" in error if named else "60 rows" in error
    assert "a bug in tuneline init" not in error and not list(tmp_path.glob("*.yaml"))


@pytest.mark.parametrize(("chars", "max_length", "blocks"), [(5000, 2048, False), (50000, 4096, True)])
def test_long_responses_get_a_length_that_fits_them_or_a_warning(
        tmp_path: Path, chars: int, max_length: int, blocks: bool, capsys: pytest.CaptureFixture[str]) -> None:
    rows = chatterbot_rows(40)
    for row in rows[::2]:  # half the answers are long (about 3.5 characters a token)
        row["response"] = (row["response"] + " ") * (chars // (len(row["response"]) + 1))
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    assert init(data, "--specs-dir", tmp_path, "--name", "long_answers") == 0
    spec = load_spec(tmp_path / "long_answers.yaml")
    assert spec.training.max_length == max_length and spec.task.overlength == "drop"
    printed = capsys.readouterr().out
    assert ("about 50% of the examples need more than 4096 tokens" in printed) == blocks, printed


def test_the_summary_says_why_rows_were_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(f"text number {i} about films", ["pos", "neg", "neu"][i % 3]) for i in range(140)]
    rows += [(f"text number {i} about films", "pos" if i % 3 else "neg") for i in range(30)]  # relabelled copies
    data = tmp_path / "conflict.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path) == 0
    printed = capsys.readouterr().out
    assert "cleaned:    110 rows kept; dropped 60 conflicting_labels" in printed
    assert "warning: cleaning drops 60 of 170 rows (35%): 60 conflicting_labels" in printed


def test_input_output_pairs_do_not_repeat_the_instruction(tmp_path: Path) -> None:
    rows = [{"input": r["instruction"], "output": r["response"]} for r in chatterbot_rows()]
    assert init(write_jsonl(tmp_path / "pairs.jsonl", rows), "--specs-dir", tmp_path) == 0
    task = load_spec(tmp_path / "pairs.yaml").task
    assert (task.instruction_column, task.response_column) == ("input", "output")
    assert task.input_column not in ("input", "output")  # the default `input` would append each instruction to itself


def test_tsv_with_a_split_column_and_named_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"review": f"the {w} service was {a} today, visit {i}", "stars": s, "part": "train" if i % 5 else "test"}
            for i, (w, a, s) in enumerate([("quick", "great", "5"), ("slow", "awful", "1"), ("fine", "ok", "3")] * 20)]
    data = tmp_path / "reviews.tsv"
    pd.DataFrame(rows).to_csv(data, sep="\t", index=False)
    assert init(data, "--specs-dir", tmp_path) == 0
    spec = load_spec(tmp_path / "reviews.yaml")
    assert (spec.task.text_column, spec.task.label_column) == ("review", "stars")
    assert spec.task.labels == ("1", "3", "5")
    assert spec.source.format == "csv" and spec.source.split_column == "part"
    assert spec.cleaning.keep_source_test is True  # the rows marked test are the data's own test split
    assert "column 'part' names each row's split: kept (source.split_column)" in capsys.readouterr().out


def test_a_folder_with_train_dev_test_files_keeps_all_three(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "intents"
    folder.mkdir()
    for name, rows in (("train.csv", range(60)), ("dev.csv", range(60, 72)), ("test.csv", range(72, 90))):
        pd.DataFrame({"sentence": [f"how do I reset item {i}" if i % 2 else f"where is parcel {i}" for i in rows],
                      "label": ["reset" if i % 2 else "track" for i in rows]}).to_csv(folder / name, index=False)
    (folder / "notes.csv").write_text("who,when\nme,today\n", encoding="utf-8")
    assert init(folder, "--specs-dir", tmp_path) == 0
    spec = load_spec(tmp_path / "intents.yaml")
    assert spec.source.split_files == {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"}
    out = capsys.readouterr().out
    assert "train 60, validation 12, test 18" in out and "note: not read: notes.csv" in out


def test_undecidable_columns_exit_2_naming_the_file_and_columns(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "shirts.csv"
    pd.DataFrame({"colour": ["red", "blue", "green"] * 10, "size": ["S", "M"] * 15,
                  "note": [f"shirt number {i} fits well" for i in range(30)]}).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}: cannot tell what to learn from its columns")
    assert "several columns could be the label ('colour', 'size')" in err
    assert "Columns found: 'colour' (text, 3 distinct of 30), 'size' (text, 2 distinct of 30), 'note' (text, 30 " \
           "distinct of 30)" in err
    assert "--column text_column=NAME and --column label_column=NAME" in err and "messages" in err
    assert list(tmp_path.glob("*.yaml")) == []
    # Said outright, the same file is a spec.
    assert init(data, "--specs-dir", tmp_path, "--label-column", "size") == 0
    task = load_spec(tmp_path / "shirts.yaml").task
    assert (task.text_column, task.label_column, task.labels) == ("note", "size", ("M", "S"))


def test_an_unknown_column_option_names_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"text number {i}" for i in range(30)], "label": ["a", "b"] * 15}).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path, "--label-column", "intent") == 2
    assert capsys.readouterr().err.strip() == (f"error: {data}: has no column 'intent' (given by --label-column); "
                                               "its columns are ['text', 'label']")


def test_any_task_sections_column_field_can_be_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--column FIELD=NAME names a column field of any task type's section: the task type that reads that field
    is the one proposed; a field no task type reads, or a column the data lacks, is named in the error."""
    data = tmp_path / "chat.csv"
    messages = [json.dumps([{"role": "user", "content": f"question {i}?"},
                            {"role": "assistant", "content": f"answer {i}"}]) for i in range(60)]
    pd.DataFrame({"talk": messages, "text": [f"note {i}" for i in range(60)],
                  "label": ["a", "b"] * 30}).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path, "--column", "messages_column=talk") == 0
    assert load_spec(tmp_path / "chat.yaml").task.messages_column == "talk"
    assert init(data, "--specs-dir", tmp_path, "--name", "other", "--column", "color_column=talk") == 2
    err = capsys.readouterr().err
    assert "no task type reads the column fields ['color_column']" in err and "messages_column" in err
    assert init(data, "--specs-dir", tmp_path, "--name", "other", "--column", "messages_column=chat") == 2
    assert "has no column 'chat' (given by --column messages_column=chat)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        init(data, "--specs-dir", tmp_path, "--column", "messages_column")


def test_an_existing_spec_is_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chatterbot_rows())
    existing = tmp_path / "chat.yaml"
    existing.write_text("# mine\n", encoding="utf-8")
    assert init(data, "--specs-dir", tmp_path) == 2
    assert capsys.readouterr().err.strip() == (f"error: {existing}: a spec named 'chat' exists already; pass --force "
                                               "to overwrite it, or choose another --name")
    assert existing.read_text(encoding="utf-8") == "# mine\n"
    assert init(data, "--specs-dir", tmp_path, "--force") == 0
    assert load_spec(existing).task.type == InstructionTuningTask.name


def test_a_spec_that_would_not_validate_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.core.tasks.instruction.init import InstructionStarter

    def broken(self: InstructionStarter, *args: object) -> dict[str, object]:
        return {**build(self, *args), "training": {"epochs": "fast"}}

    build = InstructionStarter.sections
    monkeypatch.setattr(InstructionStarter, "sections", broken)
    assert init(write_jsonl(tmp_path / "chat.jsonl", chatterbot_rows()), "--specs-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert "does not validate, so nothing was written (a bug in tuneline init" in err
    assert "training.epochs: Input should be a valid number" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # no spec, no temporary file


def test_a_json_array_of_records_is_read_like_json_lines(tmp_path: Path) -> None:
    data = tmp_path / "records.json"
    data.write_text(json.dumps(chatterbot_rows()), encoding="utf-8")
    assert init(data, "--specs-dir", tmp_path) == 0
    spec = load_spec(tmp_path / "records.yaml")
    assert spec.task.type == "instruction_tuning"
    from pipelines.core.sources import read_source

    frame, _ = read_source(spec.source, PROJECT_ROOT)
    assert len(frame) == len(chatterbot_rows()) and list(frame["source_row"][:2]) == [1, 2]


def test_a_path_inside_the_project_is_written_relative_to_its_root() -> None:
    from pipelines.init_spec import spec_path_of

    assert spec_path_of(PROJECT_ROOT / "data" / "raw" / "q.csv", PROJECT_ROOT) == "data/raw/q.csv"
    assert spec_path_of(Path("/elsewhere/q.csv"), PROJECT_ROOT) == "/elsewhere/q.csv"
    assert [slug(n) for n in ("My Data-2024", "2024 sales", "___")] == ["my_data_2024", "data_2024_sales", "pipeline"]


def tiny_classification_csv(path: Path) -> Path:
    words = {"billing": ("invoice", "refund", "charge"), "shipping": ("parcel", "courier", "delivery"),
             "account": ("password", "login", "profile")}
    rows = [{"id": f"T-{len(words) * i + j:04d}", "utterance": f"please help with my {ws[i % 3]} question number {i}",
             "intent": label} for i in range(60) for j, (label, ws) in enumerate(words.items())]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.real_model  # the data doctor's check on `splits` embeds with the packaged all-MiniLM-L6-v2
def test_written_classification_spec_materializes_its_data_assets(tmp_path: Path) -> None:
    import dagster as dg

    from pipelines.definitions import build_definitions, resources_for

    data = tiny_classification_csv(tmp_path / "tickets.csv")
    specs = tmp_path / "specs"
    assert init(data, "--specs-dir", specs) == 0
    spec = load_spec(specs / "tickets.yaml")
    assert (spec.task.text_column, spec.task.label_column) == ("utterance", "intent")  # not the id column
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    keys = [dg.AssetKey(["tickets", name]) for name in ("raw_data", "cleaned_dataset", "splits")]
    result = defs.resolve_job_def("tickets_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), asset_selection=keys, raise_on_error=False)
    assert result.success
    assert {e.asset_key for e in result.get_asset_materialization_events()} == set(keys)
    evaluations = result.get_asset_check_evaluations()
    blocking = {e.check_name: e.passed for e in evaluations if e.blocking}
    assert {"labels_are_known", "classes_are_balanced", "splits_do_not_overlap", "every_class_in_train_and_test"} \
        <= set(blocking)
    assert all(blocking.values()), blocking


def test_labels_are_proposed_as_the_task_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One label in two Unicode forms is one label (NFC), and a label with a line break is left out, with a note."""
    labels = ["Café", "Cafe\u0301", "Thé"]
    rows = [(f"review number {i} of the coffee shop", labels[i % 3]) for i in range(90)]
    rows += [(f"review number {i} of the tea shop", "Thé\n(checked)") for i in range(90, 93)]
    data = tmp_path / "drinks.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    assert init(data, "--specs-dir", tmp_path) == 0
    assert load_spec(tmp_path / "drinks.yaml").task.labels == ("Café", "Thé")
    assert "left out of task.labels: 'Thé\\n(checked)' (a line break, tab or control character" in (
        capsys.readouterr().out)


def test_a_folder_of_tsv_files_is_read_whole(tmp_path: Path) -> None:
    from pipelines.core.sources import read_source

    folder = tmp_path / "exports"
    folder.mkdir()
    for part in range(2):
        pd.DataFrame({"sentence": [f"how do I reset item {i}" if i % 2 else f"where is parcel {i}"
                                   for i in range(30 * part, 30 * part + 30)],
                      "label": ["reset", "track"] * 15}).to_csv(folder / f"part{part}.tsv", sep="\t", index=False)
    assert init(folder, "--specs-dir", tmp_path) == 0
    spec = load_spec(tmp_path / "exports.yaml")
    frame, record = read_source(spec.source, tmp_path)
    assert len(frame) == 60 and sorted(name for name, _ in record.files) == ["part0.tsv", "part1.tsv"]


def test_chosen_and_rejected_columns_become_preference_tuning(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": r["instruction"], "chosen": r["response"], "rejected": f"I do not know ({i})."}
            for i, r in enumerate(chatterbot_rows(60))]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert init(data, "--specs-dir", tmp_path / "specs") == 0
    spec = load_spec(tmp_path / "specs" / "prefs.yaml")
    assert spec.task.type == "preference" and spec.task.method == "dpo"
    assert (spec.task.prompt_column, spec.task.chosen_column, spec.task.rejected_column) == \
        ("prompt", "chosen", "rejected")
    assert spec.evaluation.baselines == ("starting_model", "sft_on_chosen")
    assert [c.id for c in spec.base_model.candidates] == ["SmolLM2-135M-Instruct"]
    text = (tmp_path / "specs" / "prefs.yaml").read_text()
    assert top_level_keys_without_comment(text) == [] and "champion_of" in text  # the comment says how
