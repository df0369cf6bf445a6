"""The front door, as a new user meets it: every case of tests/fixtures/bad_inputs/README.md through `tuneline`.

Each case runs the real command in a subprocess and asserts its exit code and its whole stderr: progress lines
(`HH:MM:SS asset: message`), then either nothing more (a run that trains), warnings, or one short error block
that names the check or step, the file/row/column or field, and what to do. Never a traceback.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.tiny_chat import write_tiny_chat_model

BAD = PROJECT_ROOT / "tests" / "fixtures" / "bad_inputs"
SPECS = BAD / "specs"
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d [a-z_]+: ")
CLASSIFICATION_ASSETS = ["raw_data", "cleaned_dataset", "splits", "base_model", "finetuned_checkpoint",
                         "evaluation_report"]


def tuneline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    env.pop("TUNELINE_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------- broken specs
SPEC_ERRORS = {  # file -> the one problem `tuneline run` reports for it
    "sum_too_high": "line 5: splits: splits.train + splits.validation + splits.test must sum to 1, "
                    "got 0.9 + 0.2 + 0.1 = 1.2",
    "negative_length": "line 7: training.max_length: Input should be greater than or equal to 8 (got -5)",
    "learning_rate_fast": "line 6: training.learning_rate: Input should be a valid number, unable to parse string "
                          "as a number (got 'fast')",
    "misspelt_key": "line 5: trainig: unknown key; did you mean 'training'?",
    "duplicate_section": "line 9: training: given twice (first at line 5); YAML would keep only the last one, so "
                         "merge them into one",
    "tab_indent": "line 6, column 1: not valid YAML: while scanning for the next token found character '\\t' that "
                  "cannot start any token (YAML indents with spaces, never tabs: replace the tab with spaces)",
    "labels_yes_no": "line 3: task.labels: YAML reads 'true' (and yes/no/on/off) as true/false, not as a label: "
                     "quote each label, e.g. labels: ['yes', 'no']",
    "label_is_text": "line 3: task.label_column: 'text' is also task.text_column: the label must come from a column "
                     "of its own",
}


@pytest.mark.parametrize("name", sorted(SPEC_ERRORS))
def test_a_broken_spec_is_refused_with_its_file_line_and_field(tmp_path: Path, name: str) -> None:
    out = tuneline("run", "--pipeline", name, "--specs-dir", str(SPECS), "--data-dir", str(tmp_path / "d"),
                   home=tmp_path / "home")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"error: {SPECS / name}.yaml: 1 problem in pipeline spec:",
                                       f"  - {SPEC_ERRORS[name]}"]
    assert not (tmp_path / "d").exists()


def test_validate_reports_every_broken_spec_and_passes_the_valid_one(tmp_path: Path) -> None:
    out = tuneline("validate", *sorted(str(p) for p in SPECS.glob("*.yaml")), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stdout.startswith("ok: valid (spec hash ") and len(out.stdout.splitlines()) == 1
    expected = []
    for name in sorted(SPEC_ERRORS):
        expected += [f"error: {SPECS / name}.yaml: 1 problem in pipeline spec:", f"  - {SPEC_ERRORS[name]}"]
    assert out.stderr.splitlines() == expected


# ------------------------------------------------------------------------------------------------ bad data
@dataclass(frozen=True)
class Case:
    """One bad input: its data, how the spec differs from the tiny spec, and what `tuneline run` must print."""

    data: str  # a file of the corpus, or "tmp:<name>" for one the test builds (symlinks)
    task: dict[str, Any] = field(default_factory=lambda: {"text_column": "text", "label_column": "label"})
    spec: dict[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # the block's error lines, each given by its start
    warnings: tuple[str, ...] = ()  # a run that trains: its warning lines, each given by its start
    not_run: tuple[str, ...] = ()  # the assets named by "not run, because of the failures above"
    progress: tuple[str, ...] = ()  # messages that must be among the progress lines


def check(asset: str, name: str) -> str:
    return f"error: check gate/{asset}:{name} failed (ERROR): {name} failed: "


AFTER_CLEANED = ("splits", "base_model", "finetuned_checkpoint", "evaluation_report")
CASES = {
    "label_case_variants": Case(
        "label_case_variants.csv",
        errors=(check("cleaned_dataset", "labels_are_distinct")
                + "expect_column_values_to_be_between(column='count', max_value=1.0) observed 1 unexpected row(s) "
                  "— e.g. count 2, variants 'LOC | loc'. To fix: spell each label one way",),
        not_run=AFTER_CLEANED),
    "declared_label_without_rows": Case(
        "good.csv", task={"text_column": "text", "label_column": "label",
                          "labels": ["DESC", "ENTY", "HUM", "LOC", "NUM"]},
        errors=(check("cleaned_dataset", "declared_labels_have_rows")
                + "expect_column_values_to_be_between(column='rows', min_value=1.0) observed 1 unexpected row(s) — "
                  "e.g. rows 0, label 'ENTY'. To fix: add rows of the listed labels",),
        not_run=AFTER_CLEANED),
    "ticket_ids": Case(
        "ticket_ids.csv",
        errors=(check("cleaned_dataset", "texts_look_like_text")
                + "expect_column_values_to_not_match_regex(column='text', mostly=0.5, ",),
        not_run=AFTER_CLEANED),
    "half_empty": Case(
        "half_empty.csv",
        errors=(check("cleaned_dataset", "cleaning_kept_most_rows")
                + "expect_column_values_to_be_between(column='share_lost', max_value=0.3) observed 1 unexpected "
                  "row(s) — e.g. share_lost 0.5, rows_dropped_by_reason 'empty_text 120'. To fix: see "
                  "rows_dropped_by_reason",),
        not_run=AFTER_CLEANED),
    "half_empty_responses": Case(
        "half_empty_responses.jsonl", task={"type": "instruction_tuning"},
        spec={"base_model": {"model": {"source": "local", "path": "tmp:chat", "name": "tiny-chat"}},
              "training": {"max_length": 64}},
        errors=(check("cleaned_dataset", "cleaning_kept_most_rows")
                + "expect_column_values_to_be_between(column='share_lost', max_value=0.3) observed 1 unexpected "
                  "row(s) — e.g. share_lost 0.5, rows_dropped_by_reason 'empty_response 120'. To fix: ",),
        not_run=("splits", "base_model", "rendered_dataset", "finetuned_checkpoint", "evaluation_report")),
    "multiline_label_typo": Case(
        "multiline_label_typo.csv", task={"text_column": "text", "label_column": "label",
                                          "labels": ["DESC", "HUM", "LOC", "NUM"]},
        errors=(check("cleaned_dataset", "labels_are_known")
                + "expect_column_values_to_be_in_set(column='label', value_set=['DESC', 'HUM', 'LOC', 'NUM']) "
                  "observed 1 unexpected row(s) — e.g. {bad}/multiline_label_typo.csv row 108 (label 'H0M'). "
                  "To fix: correct the misspelt labels",),
        not_run=AFTER_CLEANED),
    # Values that are not what they seem: ids, line breaks, look-alike labels, control characters, null turns.
    "label_column_holds_ids": Case(
        "label_ids.csv", task={"text_column": "text", "label_column": "ticket"},
        errors=(check("cleaned_dataset", "labels_look_like_classes")
                + "expect_column_values_to_be_between(column='distinct_share', max_value=0.5) observed 1 unexpected "
                  "row(s) — e.g. distinct_share 1.0, label_column 'ticket'. To fix: task.label_column 'ticket' holds "
                  "240 distinct values in 240 rows (e.g. 'TCK-10000', 'TCK-10001', 'TCK-10002'): ids (ticket numbers, "
                  "uuids), not classes a model can learn; point task.label_column at the column that holds the "
                  "classes",
                check("cleaned_dataset", "labels_are_known"), check("cleaned_dataset", "classes_are_balanced")),
        not_run=AFTER_CLEANED),
    "label_line_breaks": Case(
        "label_line_breaks.csv",
        errors=(check("cleaned_dataset", "labels_are_plain_text")
                + "expect_column_values_to_not_match_regex(column='label', regex='[\\\\x00-\\\\x1f\\\\x7f-\\\\x9f"
                  "\\\\u2028\\\\u2029]') observed 12 unexpected row(s) — e.g. {bad}/label_line_breaks.csv row 62 "
                  "(label 'HUM\\n(checked)'); {bad}/label_line_breaks.csv row 68 (label 'HUM\\n(checked)'); "
                  "{bad}/label_line_breaks.csv row 74 (label 'HUM\\n(checked)'). To fix: correct the listed labels",),
        not_run=AFTER_CLEANED),
    "label_look_alike": Case(
        "label_case_variants.csv", task={"text_column": "text", "label_column": "label",
                                         "labels": ["DESC", "HUM", "LOC", "NUM"]},
        errors=(check("cleaned_dataset", "labels_are_known")
                + "expect_column_values_to_be_in_set(column='label', value_set=['DESC', 'HUM', 'LOC', 'NUM']) "
                  "observed 20 unexpected row(s) — e.g. {bad}/label_case_variants.csv row 3 (label 'loc'); "
                  "{bad}/label_case_variants.csv row 6 (label 'loc'); {bad}/label_case_variants.csv row 9 (label "
                  "'loc'). To fix: 'loc' (20 rows) looks like 'LOC' but differs in case; correct the misspelt labels",),
        not_run=AFTER_CLEANED),
    "terminal_escapes_in_texts": Case(
        "terminal_escapes.csv",
        errors=(check("cleaned_dataset", "cleaning_kept_most_rows")
                + "expect_column_values_to_be_between(column='share_lost', max_value=0.3) observed 1 unexpected "
                  "row(s) — e.g. share_lost 0.5, rows_dropped_by_reason 'control_characters 120'. To fix: ",),
        not_run=AFTER_CLEANED),
    "null_chat_turns": Case(
        "null_chat_turns.jsonl", task={"type": "instruction_tuning"},
        spec={"base_model": {"model": {"source": "local", "path": "tmp:chat", "name": "tiny-chat"}},
              "training": {"max_length": 64}},
        errors=(check("cleaned_dataset", "cleaning_kept_most_rows")
                + "expect_column_values_to_be_between(column='share_lost', max_value=0.3) observed 1 unexpected "
                  "row(s) — e.g. share_lost 0.5, rows_dropped_by_reason 'malformed_message 60, empty_turn 60'. "
                  "To fix: ",),
        not_run=("splits", "base_model", "rendered_dataset", "finetuned_checkpoint", "evaluation_report")),
    "leaky_official_splits": Case(
        "leaky_splits", spec={"source": {"split_files": {"train": "train.csv", "test": "test.csv"}}},
        errors=(check("splits", "splits_do_not_overlap"),),
        not_run=("base_model", "finetuned_checkpoint", "evaluation_report")),
    "broken_symlink_in_folder": Case(
        "tmp:broken_symlink",
        errors=("error: step raw_data failed: {data}/more.csv: is a symbolic link to missing.csv, which does not "
                "exist: restore the file or remove the link",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "symlink_loop": Case(
        "tmp:loop",
        errors=("error: step raw_data failed: {data}/a.csv: is a symbolic link loop (it points back to itself): "
                "replace it with the file",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "named_pipe_in_folder": Case(
        "tmp:fifo",
        errors=("error: step raw_data failed: {data}/more.csv: is a named pipe (FIFO), not a regular file: only "
                "regular files are read (reading a pipe or a device can wait forever or never end); write the data "
                "to a file and point the source at it",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "spreadsheets_only": Case(
        "tmp:spreadsheets",
        errors=("error: step raw_data failed: {data}: folder has no data files (expected .csv, .json, .jsonl, "
                ".parquet, .tsv, .txt, .yaml, .yml files); it holds answers.xlsx, questions.xlsx; spreadsheets "
                "(.xlsx) are not read: save each sheet as CSV UTF-8 (Excel: File > Save As > CSV UTF-8; LibreOffice: "
                "Save As > Text CSV, character set UTF-8)",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "json_wrapped_in_an_object": Case(
        "tmp:wrapped",
        errors=("error: step raw_data failed: {data}: is one JSON object whose key 'data' holds a list of 240 records "
                "(beside ['source']); expected one JSON object per line (JSON Lines) or a JSON array of objects: "
                "convert it with  python -c \"import json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in "
                "json.load(sys.stdin)['data']]\" < questions.json > questions.jsonl  and use questions.jsonl in its "
                "place",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "over_max_rows": Case(
        "good.csv", spec={"source": {"max_rows": 100}},
        errors=("error: step raw_data failed: {bad}/good.csv: has 240 rows, more than source.max_rows allows (100): "
                "raise source.max_rows in the spec to read it",),
        not_run=tuple(CLASSIFICATION_ASSETS[1:])),
    "model_folder_missing": Case(
        "good.csv", spec={"base_model": {"model": {"source": "local", "path": "tmp:no_such_model",
                                                   "name": "mine"}}},
        errors=("error: step base_model failed: base_model: every candidate was rejected:",
                "  - mine: path: '{model}' is not a folder"),
        not_run=("finetuned_checkpoint", "evaluation_report")),
    # Inputs that must train: read as they are, or a warning that does not block.
    "excel_semicolon_bom": Case("excel_semicolon_bom.csv", progress=("raw_data: read 240 rows from",)),
    "labels_in_two_unicode_forms": Case(  # e + U+0301 in the data and the spec reads as é: four classes, not six
        "labels_unicode_forms.csv", task={"text_column": "text", "label_column": "label", "labels": [
            "Lieu", "Personne", "Quantite\u0301", "De\u0301finition"]}),
    "imbalanced_like_reuters_r8": Case(
        "imbalanced.csv",
        warnings=("warning: check gate/cleaned_dataset:classes_are_balanced (WARN): classes_are_balanced failed: ",)),
    "leaky_official_splits_dropped_from_train": Case(
        "leaky_splits", spec={"source": {"split_files": {"train": "train.csv", "test": "test.csv"}},
                              "splits": {"overlap": "drop_from_earlier_splits"}},
        progress=("splits: ",)),
}


def _tmp_data(kind: str, root: Path) -> Path:
    """The data of a case the test builds: a folder, or for "wrapped" a file."""
    folder = root / kind
    folder.mkdir()
    if kind == "fifo":
        shutil.copy(BAD / "good.csv", folder / "good.csv")
        os.mkfifo(folder / "more.csv")
    elif kind == "spreadsheets":
        for name in ("questions.xlsx", "answers.xlsx"):
            (folder / name).write_bytes(b"PK\x03\x04")
    elif kind == "wrapped":
        with (BAD / "good.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        (folder / "questions.json").write_text(json.dumps({"source": "export", "data": rows}, indent=2),
                                               encoding="utf-8")
        return folder / "questions.json"
    elif kind == "broken_symlink":
        shutil.copy(BAD / "good.csv", folder / "good.csv")
        (folder / "more.csv").symlink_to("missing.csv")
    elif kind == "loop":
        (folder / "a.csv").symlink_to("b.csv")
        (folder / "b.csv").symlink_to("a.csv")
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_gets_one_short_error_block_or_trains_as_it_should(
        tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path], name: str) -> None:
    case = CASES[name]
    data = _tmp_data(case.data[4:], tmp_path) if case.data.startswith("tmp:") else BAD / case.data
    spec = tiny_spec(data, tiny_model_dir, **case.spec)
    spec["task"] = case.task if "type" in case.task else {**spec["task"], **case.task}
    model = spec["base_model"]["model"]
    if model.get("path") == "tmp:chat":
        model["path"] = str(write_tiny_chat_model(tmp_path / "chat"))
    elif model.get("path") == "tmp:no_such_model":
        model["path"] = str(tmp_path / "no_such_model")
    specs = write_spec("gate", spec)
    out = tuneline("run", "--pipeline", "gate", "--specs-dir", str(specs), "--data-dir", str(tmp_path / "d"),
                   home=tmp_path / "home")
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    progress = [line for line in lines if PROGRESS.match(line)]
    rest = [line for line in lines if not PROGRESS.match(line)]
    assert lines[:len(progress)] == progress, "progress lines come first, the summary after them"
    if progress:
        assert re.search(rf"raw_data: read \d+ rows from {re.escape(str(data))}$", progress[0]), progress[0]
    for message in case.progress:
        assert any(message in line for line in progress), (message, progress)

    if not case.errors:  # it trains: stdout is the report, stderr its progress and the warnings alone
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(rest) == len(case.warnings), rest
        for line, start in zip(rest, case.warnings, strict=True):
            assert line.startswith(start), (line, start)
        assert "evaluation_report" in "\n".join(progress) and "test" in out.stdout
        return

    assert out.returncode == 1, out.stderr[-3000:]
    assert 3 <= len(rest) <= 15, out.stderr
    errors = rest[:-2]
    assert len(errors) == len(case.errors), rest
    for line, start in zip(errors, case.errors, strict=True):
        assert line.startswith(start.format(data=data, bad=BAD, model=model.get("path"))), (line, start)
        assert "To fix:" in line or not line.startswith("error: check "), line
    assert rest[-2] == f"not run, because of the failures above: {', '.join(case.not_run)}"
    if case.errors[0].startswith("error: step raw_data failed"):  # nothing half-written: no raw data stored
        assert not list((tmp_path / "d").rglob("raw_data*")), sorted((tmp_path / "d").rglob("*"))
    assert re.fullmatch(r"gate: Dagster run [0-9a-f-]{36} failed; its events are in the Dagster UI \(make ui\)",
                        rest[-1]), rest[-1]
    assert not (tmp_path / "d" / "checkpoints").exists()
