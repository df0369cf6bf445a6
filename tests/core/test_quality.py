"""Quality suites on small frames: what each check expects, observes and reports."""

from __future__ import annotations

import re
import uuid

import pandas as pd
import pytest

from pipelines.core.cleaning import dedup_key
from pipelines.core.quality import QualityReport
from pipelines.core.spec import PipelineSpec, parse_spec
from pipelines.core.tasks import task_for
from pipelines.core.tasks.classification.data import CLEANED_CHECKS, SPLITS_CHECKS

BASE = """\
source: {kind: local, path: x.csv}
base_model: {model: {source: hub, name: m}}
quality: {min_rows: 4}
task: {min_rows_per_class: 2, max_imbalance_ratio: 3, imbalance_error_factor: 2}
"""


def spec(extra: str = "") -> PipelineSpec:
    """The base spec; a `task: {...}` line in `extra` adds to the base's task section."""
    if extra.startswith("task: {"):
        return parse_spec(BASE.replace("task: {", extra[:-2] + ", ", 1), name="q", origin="q.yaml")
    return parse_spec(BASE + extra, name="q", origin="q.yaml")


def validate(asset: str, frame: pd.DataFrame, pipeline: PipelineSpec) -> QualityReport:
    """The pipeline's task's suite for `asset`, run on `frame`."""
    suites = {suite.asset: suite for suite in task_for(pipeline).quality_suites(pipeline)}
    # The cleaned rows stand in for the raw ones (same columns): cleaning lost nothing.
    return suites[asset].validate(frame, **{name: frame for name in suites[asset].inputs})


def validate_cleaned_dataset(frame: pd.DataFrame, pipeline: PipelineSpec) -> QualityReport:
    return validate("cleaned_dataset", frame, pipeline)


def validate_splits(frame: pd.DataFrame, pipeline: PipelineSpec) -> QualityReport:
    return validate("splits", frame, pipeline)


def clean_frame(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"text": [t for t, _ in pairs], "label": [lab for _, lab in pairs],
                         "norm_text": [dedup_key(t) for t, _ in pairs], "source_file": "f.csv",
                         "source_row": range(2, len(pairs) + 2)}).astype({"text": str, "label": str})


GOOD = [(f"question {i}", "AB"[i % 2]) for i in range(10)]


def test_good_frame_passes_every_check() -> None:
    report = validate_cleaned_dataset(clean_frame(GOOD), spec())
    assert [c.name for c in report.checks] == [c for c in CLEANED_CHECKS if c != "declared_labels_have_rows"]
    assert all(c.passed for c in report.checks), [c.summary() for c in report.checks if not c.passed]


def test_rare_label_without_declared_labels_is_flagged_with_threshold_and_count() -> None:
    report = validate_cleaned_dataset(clean_frame(GOOD + [("question x", "TYPO")]), spec())
    check = report.check("labels_are_known")
    assert not check.passed and check.severity == "ERROR"
    [outcome] = check.failed_expectations
    assert outcome.expectation == "expect_column_values_to_be_between"
    assert outcome.kwargs["min_value"] == 2 and outcome.unexpected_count == 1
    assert check.examples == [{"label": "TYPO", "rows": 1}]


def test_declared_labels_name_the_row_of_the_typo() -> None:
    report = validate_cleaned_dataset(clean_frame(GOOD[:5] + [("question x", "A0")] + GOOD[5:]),
                                      spec("task: {labels: [A, B]}\n"))
    check = report.check("labels_are_known")
    assert check.examples == [{"text": "question x", "label": "A0", "source_file": "f.csv", "source_row": 7}]
    assert "To fix: correct the misspelt labels" in check.summary()


@pytest.mark.parametrize(("counts", "passed", "severity"), [
    ({"A": 6, "B": 3}, True, "ERROR"),             # ratio 2: within max_imbalance_ratio 3
    ({"A": 8, "B": 2}, False, "WARN"),             # ratio 4: over 3, under 3 x 2
    ({"A": 12, "B": 1, "C": 12}, False, "ERROR"),  # ratio 12: over 6
])
def test_imbalance_is_a_warning_when_slightly_over_and_an_error_when_far_over(
        counts: dict[str, int], passed: bool, severity: str) -> None:
    pairs = [(f"q {label} {i}", label) for label, n in counts.items() for i in range(n)]
    check = validate_cleaned_dataset(clean_frame(pairs), spec()).check("classes_are_balanced")
    assert (check.passed, check.severity) == (passed, severity)


def test_over_long_text_and_duplicates_are_named() -> None:
    frame = clean_frame(GOOD + [("x" * 3000, "A")])
    frame.loc[3, "norm_text"] = frame.loc[2, "norm_text"]
    report = validate_cleaned_dataset(frame, spec())
    assert report.check("text_lengths_within_bounds").examples[0]["text"].endswith("(3000 characters)")
    assert report.check("texts_are_unique").failed_expectations[0].unexpected_count == 2


def splits_frame(assign: list[str], origin: str = "hash") -> pd.DataFrame:
    frame = clean_frame([(f"question {i}", "AB"[i % 2]) for i in range(len(assign))])
    frame["split"], frame["split_origin"] = assign, origin
    return frame


def test_split_checks_pass_on_fractions_like_the_spec() -> None:
    assign = ["train"] * 16 + ["validation", "validation", "test", "test"]
    report = validate_splits(splits_frame(assign), spec())
    assert [c.name for c in report.checks] == list(SPLITS_CHECKS)
    assert all(c.passed for c in report.checks), [c.summary() for c in report.checks if not c.passed]


def test_split_proportions_off_spec_report_observed_shares() -> None:
    assign = ["train"] * 10 + ["validation"] * 5 + ["test"] * 5
    check = validate_splits(splits_frame(assign), spec()).check("split_proportions_match_spec")
    assert not check.passed
    assert {row["split"] for row in check.examples} == {"train", "validation", "test"}


def test_a_share_exactly_at_the_tolerance_passes() -> None:
    assign = ["train"] * 15 + ["validation"] * 3 + ["test"] * 2  # 0.8 - 0.75 is 0.05000000000000004 in floats
    pipeline = spec()
    pipeline = pipeline.model_copy(update={"quality": pipeline.quality.model_copy(update={"split_tolerance": 0.05})})
    check = validate_splits(splits_frame(assign), pipeline).check("split_proportions_match_spec")
    assert check.passed, check.summary()


def test_source_splits_keep_their_proportions() -> None:
    assign = ["train"] * 10 + ["validation"] * 5 + ["test"] * 5
    check = validate_splits(splits_frame(assign, origin="source"), spec()).check("split_proportions_match_spec")
    assert check.passed


def test_empty_test_split_and_missing_class_fail() -> None:
    assign = ["train"] * 18 + ["validation", "validation"]
    report = validate_splits(splits_frame(assign), spec())
    assert not report.check("validation_and_test_are_not_empty").passed
    assert not report.check("every_class_in_train_and_test").passed


def test_a_declared_label_without_rows_blocks() -> None:
    report = validate_cleaned_dataset(clean_frame(GOOD), spec("task: {labels: [A, B, C]}\n"))
    check = report.check("declared_labels_have_rows")
    assert not check.passed and check.severity == "ERROR"
    assert check.examples == [{"label": "C", "rows": 0}]


def test_labels_that_differ_only_in_case_or_spacing_block_naming_the_variants() -> None:
    pairs = [(f"mail {i}", ["spam", "Spam", "SPAM!", "ham"][i % 4]) for i in range(24)]
    check = validate_cleaned_dataset(clean_frame(pairs), spec()).check("labels_are_distinct")
    assert not check.passed and check.severity == "ERROR"
    assert check.examples == [{"variants": "SPAM! | Spam | spam", "count": 3}]


def test_a_text_column_of_ids_or_numbers_blocks() -> None:
    pairs = [(f"TCK-{1000 + i}", "AB"[i % 2]) for i in range(8)] + [(str(20240101 + i), "AB"[i % 2]) for i in range(4)]
    check = validate_cleaned_dataset(clean_frame(pairs), spec()).check("texts_look_like_text")
    assert not check.passed and check.severity == "ERROR"
    assert check.failed_expectations[0].unexpected_count == 12
    assert "(text 'TCK-1000')" in check.summary()  # the offending value is the text, not the row's label
    fine = [(f"What is ticket TCK-{1000 + i} about?", "AB"[i % 2]) for i in range(12)]
    assert validate_cleaned_dataset(clean_frame(fine), spec()).check("texts_look_like_text").passed
    # Chinese and Japanese are written without spaces: a sentence with a digit is still one "token" of text.
    cjk = [(f"这部电影非常好看第{i}次观看，给{i % 10}分", "AB"[i % 2]) for i in range(6)] + [
        (f"この映画は{i}回目です", "AB"[i % 2]) for i in range(6)]
    assert validate_cleaned_dataset(clean_frame(cjk), spec()).check("texts_look_like_text").passed


def test_cleaning_that_loses_a_large_share_of_the_examples_blocks() -> None:
    pipeline = spec()
    kept = clean_frame(GOOD)
    raw = pd.concat([kept, clean_frame([("", "A")] * 6)], ignore_index=True)  # 6 empty texts were dropped
    suite = {s.asset: s for s in task_for(pipeline).quality_suites(pipeline)}["cleaned_dataset"]
    check = suite.validate(kept, raw_data=raw).check("cleaning_kept_most_rows")
    assert not check.passed and check.severity == "ERROR"
    assert check.expectations[0].examples == ({"rows_dropped_by_reason": "empty_text 6", "share_lost": 0.375},)
    duplicates = pd.concat([kept] * 3, ignore_index=True)  # duplicates of kept rows are not losses
    assert suite.validate(kept, raw_data=duplicates).check("cleaning_kept_most_rows").passed


def test_imbalance_alone_warns_and_a_class_too_small_to_learn_blocks() -> None:
    pipeline = parse_spec(BASE.replace(", imbalance_error_factor: 2", ""), name="q", origin="q.yaml")
    pairs = [(f"q {label} {i}", label) for label, n in {"A": 70, "B": 2}.items() for i in range(n)]
    check = validate_cleaned_dataset(clean_frame(pairs), pipeline).check("classes_are_balanced")
    assert (check.passed, check.severity) == (False, "WARN")  # 35 times smaller: a warning, training goes on
    tiny = pairs[:-1]  # B has 1 row, under task.min_rows_per_class (2)
    check = validate_cleaned_dataset(clean_frame(tiny), pipeline).check("classes_are_balanced")
    assert (check.passed, check.severity) == (False, "ERROR")


# ------------------------------------------------------------------------- values that are not what they seem
@pytest.mark.parametrize("label", ["A\nB", "A\tB", "A\x00", "A\u2028B", "A\x85B"])
def test_a_label_with_a_line_break_tab_or_control_character_blocks_naming_its_row(label: str) -> None:
    report = validate_cleaned_dataset(clean_frame(GOOD[:5] + [("question x", label)] + GOOD[5:]), spec())
    check = report.check("labels_are_plain_text")
    assert not check.passed and check.severity == "ERROR"
    assert check.examples == [{"text": "question x", "label": label, "source_file": "f.csv", "source_row": 7}]
    assert f"f.csv row 7 (label {label!r})" in check.summary()
    assert report.check("labels_are_plain_text").failed_expectations[0].unexpected_count == 1
    assert validate_cleaned_dataset(clean_frame(GOOD + [("q y", "A B é")]), spec()).check(
        "labels_are_plain_text").passed  # spaces and accents are text


def test_a_label_column_of_ids_is_named_with_its_counts_and_examples() -> None:
    tickets = [(f"printer {i} is broken", f"TCK-{10000 + i}") for i in range(40)]
    check = validate_cleaned_dataset(clean_frame(tickets), spec()).check("labels_look_like_classes")
    assert not check.passed and check.severity == "ERROR"
    assert check.examples == [{"label_column": "label", "distinct_share": 1.0}]
    assert check.summary().endswith(
        "To fix: task.label_column 'label' holds 40 distinct values in 40 rows (e.g. 'TCK-10000', 'TCK-10001', "
        "'TCK-10002'): ids (ticket numbers, uuids), not classes a model can learn; point task.label_column at the "
        "column that holds the classes")
    # 16 distinct in 24 rows (67%): uuids are ids; the same share of words is many small classes.
    for label, ids in ((lambda i: str(uuid.UUID(int=i)), True), (lambda i: f"topic {'abcdefghijklmnop'[i]}", False)):
        pairs = [(f"order {n} arrived late", label(n % 16)) for n in range(24)]
        check = validate_cleaned_dataset(clean_frame(pairs), spec()).check("labels_look_like_classes")
        assert check.passed is not ids
        assert check.expectations[0].kwargs["max_value"] == (0.5 if ids else 0.9)  # id-shaped: a lower bar
    names = [(f"note {i}", f"customer {i}") for i in range(30)]  # not id-shaped, but nearly every one distinct
    assert not validate_cleaned_dataset(clean_frame(names), spec()).check("labels_look_like_classes").passed


@pytest.mark.parametrize(("classes", "rows_per_class"), [
    (77, 20),  # banking77's shape: 77 classes, many rows each
    (12, 3),   # a small dataset of many small classes (36 rows)
    (15, 2),   # 2 rows a class: 50% distinct, not id-shaped
    (9, 2),    # fewer than 20 rows: too few to tell
])
def test_many_classes_are_not_taken_for_ids_but_small_ones_get_the_rows_per_class_message(
        classes: int, rows_per_class: int) -> None:
    pairs = [(f"question {c} {r}", f"intent_{c}") for c in range(classes) for r in range(rows_per_class)]
    pipeline = parse_spec(BASE.replace("min_rows_per_class: 2", "min_rows_per_class: 5"), name="q", origin="q.yaml")
    report = validate_cleaned_dataset(clean_frame(pairs), pipeline)
    assert report.check("labels_look_like_classes").passed
    small = rows_per_class < 5
    assert report.check("classes_are_balanced").passed is not small
    if small:
        assert "collect more rows of the small classes" in report.check("classes_are_balanced").summary()


def test_with_declared_labels_only_undeclared_values_count_as_ids() -> None:
    pipeline = spec("task: {labels: [A, B]}\n")
    assert validate_cleaned_dataset(clean_frame(GOOD * 3), pipeline).check("labels_look_like_classes").passed
    tickets = [(f"printer {i} is broken", f"TCK-{10000 + i}") for i in range(30)]
    check = validate_cleaned_dataset(clean_frame(GOOD + tickets), pipeline).check("labels_look_like_classes")
    assert not check.passed and "holds 30 distinct undeclared values in 40 rows" in check.summary()


@pytest.mark.parametrize(("label", "hint"), [
    ("a", "'a' (2 rows) looks like 'A' but differs in case"),
    ("Ｂ", "'Ｂ' (2 rows) looks like 'B' but differs in Unicode normalization"),      # full-width
    ("Café\u00a0Noir", "'Café\\xa0Noir' (2 rows) looks like 'Café Noir' but differs in Unicode normalization or "
                       "spacing"),                                                   # a no-break space
    ("CAFÉ  NOIR!", "'CAFÉ  NOIR!' (2 rows) looks like 'Café Noir' but differs in case and punctuation and "
                    "spacing"),
])
def test_an_undeclared_label_that_looks_like_a_declared_one_says_how_they_differ(label: str, hint: str) -> None:
    pipeline = spec("task: {labels: [A, B, 'Café Noir']}\n")
    pairs = GOOD + [(f"coffee {i}", "Café Noir") for i in range(3)] + [(f"odd {i}", label) for i in range(2)]
    check = validate_cleaned_dataset(clean_frame(pairs), pipeline).check("labels_are_known")
    assert not check.passed
    assert f"To fix: {hint}; correct the misspelt labels in the source" in check.summary()
    typo = validate_cleaned_dataset(clean_frame(GOOD + [("q x", "C")]), pipeline).check("labels_are_known")
    assert "looks like" not in typo.summary()  # another label altogether: no hint


def test_labels_in_two_unicode_forms_are_one_declared_label() -> None:
    """e + U+0301 in the data or in task.labels is é: both are read in NFC, so the rows are known and one class."""
    pipeline = spec("task: {labels: ['Cafe\u0301', 'The\u0301']}\n")
    assert pipeline.task.labels == ("Café", "Thé")
    raw = pd.DataFrame({"text": [f"cup {i}" for i in range(12)],
                        "label": [("Café", "Cafe\u0301", "Thé", "The\u0301")[i % 4] for i in range(12)],
                        "source_file": "f.csv", "source_row": range(2, 14)})
    cleaned = task_for(pipeline).clean(raw, pipeline)[0]
    assert sorted(set(cleaned["label"])) == ["Café", "Thé"]
    report = validate_cleaned_dataset(cleaned, pipeline)
    for name in ("labels_are_known", "declared_labels_have_rows", "labels_are_distinct", "labels_are_plain_text"):
        assert report.check(name).passed, report.check(name).summary()


@pytest.mark.parametrize(("labels", "problem"), [
    (["LOC ", "HUM"], "'LOC ' has white space around it, which the data's labels are read without: write 'LOC'"),
    (["LO\nC", "HUM"], "'LO\\nC' holds a line break, a tab or a control character: a label is one line of text"),
    (["LOC", "A\tB"], "'A\\tB' holds a line break, a tab or a control character"),
    (["LOC", " \t"], "an empty label: a row whose label is empty has no label"),
    (["Café", "Cafe\u0301"], "labels are listed more than once: ['Café']"),  # one label in two Unicode forms
])
def test_declared_labels_are_one_line_of_text_as_the_data_reads_them(labels: list[str], problem: str) -> None:
    from pydantic import ValidationError

    from pipelines.core.tasks.classification.config import ClassificationTaskConfig

    with pytest.raises(ValidationError, match=re.escape(problem)):
        ClassificationTaskConfig(labels=labels)
    names = ClassificationTaskConfig(label_names={"Cafe\u0301": "coffee"}).label_names
    assert names == {"Café": "coffee"}  # the prompting baseline finds the name of the data's (NFC) label
