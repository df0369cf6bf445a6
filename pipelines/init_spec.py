"""`tuneline init DATA`: a first spec for a data file or folder, inferred from its columns.

The data is read exactly as the pipeline's raw_data asset will read it (pipelines.core.sources). Each task type's
starter (the `init` module of its package) is asked in turn whether the columns look like its kind of data; the
first that says yes writes the sections, copied from its default recipe with what depends on the data adapted,
and judges the cleaned data. The file is written with a comment on every section, after the project's own loader
has validated it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipelines.core.columns import NOT_DATA_COLUMNS, ColumnProfile, TaskChoice, Undecided, missing, profile_columns
from pipelines.core.errors import InitError, SourceError, SpecError
from pipelines.core.files import write_bytes_atomic
from pipelines.core.markdown import wrap_words
from pipelines.core.sections import LocalSourceConfig
from pipelines.core.sources import DATA_EXTENSIONS, SPLIT_ALIASES, read_source
from pipelines.core.spec import PIPELINE_NAME, PipelineSpec, parse_spec
from pipelines.core.splitting import SPLITS, assign_splits
from pipelines.core.tasks import Starter, declaration, declarations, starter_named, task_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What `init` reads: the formats the source readers know, plus .tsv (read as CSV: the delimiter is detected).
INIT_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SPLIT_COLUMN_NAMES = ("split", "subset", "partition", "part", "fold")  # looked at first
# ------------------------------------------------------------------------------------------------ the data
@dataclass(frozen=True)
class SourcePlan:
    """How the spec will read the data: its source section, and what the choice means."""

    source: dict[str, Any]
    files: tuple[Path, ...]
    official: dict[str, str]  # split -> file name, when the data brings its own splits as files
    notes: tuple[str, ...] = ()
    own_splits: tuple[str, ...] = ()  # the splits the data brings (as files or in a split column)


def spec_path_of(data: Path, project_root: Path) -> str:
    """The data's path as the spec writes it: relative to the project root when inside it, else absolute (a
    relative source.path is taken from the project root, so the spec works from there whatever the cwd)."""
    absolute = Path(os.path.abspath(data))
    try:
        return absolute.relative_to(project_root.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def _split_of(path: Path) -> str | None:
    """The official split a file's name says it holds: train.csv, dev.jsonl, banking_test.csv, ..."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    last = re.split(r"[._\-\s]+", stem.lower())[-1]
    return SPLIT_ALIASES.get(last)


def plan_source(data: Path, project_root: Path) -> SourcePlan:
    """The source section for a data file or folder; official split files are kept as `split_files`."""
    if not data.exists():
        raise InitError(f"{data}: no such file or folder (expected a CSV, TSV, JSONL, JSON-lines or Parquet file, "
                        "or a folder of such files)")
    where = spec_path_of(data, project_root)
    if data.is_file():
        fmt = INIT_FORMATS.get(data.suffix.lower())
        if fmt is None:
            raise InitError(f"{data}: cannot tell the format from the extension {data.suffix!r}; expected one of "
                            f"{sorted(INIT_FORMATS)}")
        source: dict[str, Any] = {"kind": "local", "path": where}
        if DATA_EXTENSIONS.get(data.suffix.lower()) != fmt:  # .tsv: the CSV reader, which detects the tab
            source["format"] = fmt
        return SourcePlan(source, (data,), {})
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in INIT_FORMATS)
    if not files:
        raise InitError(f"{data}: the folder has no data files (expected {sorted(INIT_FORMATS)})")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        split = _split_of(path)
        if split is not None:
            by_split.setdefault(split, []).append(path)
    twice = {s: ps for s, ps in by_split.items() if len(ps) > 1}
    if twice:
        split, paths = min(twice.items())
        raise InitError(f"{data}: {len(paths)} files name the {split} split ({', '.join(p.name for p in paths)}); "
                        "keep one, or run init on one file")
    formats = {INIT_FORMATS[p.suffix.lower()] for p in files}
    tsv = any(p.suffix.lower() == ".tsv" for p in files)
    if tsv and formats != {"csv"}:
        raise InitError(f"{data}: mixes .tsv files with other formats ({', '.join(p.name for p in files)}); a "
                        "source has one format: keep the .tsv files with .csv ones only")
    notes: list[str] = []
    if "train" in by_split:
        official = {s: by_split[s][0].name for s in SPLITS if s in by_split}
        source = {"kind": "local", "path": where, **({"format": "csv"} if tsv else {}), "split_files": official}
        used = {by_split[s][0] for s in official}
        unused = [p.name for p in files if p not in used]
        if unused:
            notes.append(f"not read: {', '.join(unused)} (only the split files {', '.join(official.values())} are)")
        return SourcePlan(source, tuple(sorted(used)), official, tuple(notes), tuple(official))
    if by_split:
        notes.append(f"{', '.join(p.name for ps in by_split.values() for p in ps)} name(s) a split, but "
                     "source.split_files needs a train file: every file is read and split by hash instead")
    return SourcePlan({"kind": "local", "path": where}, tuple(files), {}, tuple(notes))


def read_data(plan: SourcePlan, project_root: Path, data: Path) -> pd.DataFrame:
    """The rows as the raw_data asset will read them."""
    try:
        frame, _ = read_source(LocalSourceConfig.model_validate(plan.source), project_root)
    except SourceError as exc:
        raise InitError(f"{data}: cannot be read as the pipeline would read it: {exc}") from None
    return frame


# ------------------------------------------------------------------------------------------ the task
def starters(given: Mapping[str, str] | None = None) -> list[tuple[str, Starter]]:
    """The registered task types' starters that can take the given column fields, in the order they are asked."""
    found = [(name, starter_named(name)) for name in declarations()]
    return sorted(((n, s) for n, s in found if set(given or {}) <= set(s.column_fields)),
                  key=lambda ns: ns[1].priority)


def choose_task(profiles: Sequence[ColumnProfile], data: Path, columns: Mapping[str, str] | None = None,
                options: Mapping[str, str] | None = None) -> TaskChoice:
    """The first task type whose starter recognises the columns; `columns` names some of a task section's column
    fields outright (`options` says how each was given, for messages)."""
    given = dict(columns or {})
    names = {p.name for p in profiles}
    for field_name, column in given.items():
        if column not in names:
            option = (options or {}).get(field_name, f"--column {field_name}={column}")
            raise InitError(f"{data}: has no column {column!r} (given by {option}); its columns are "
                            f"{[p.name for p in profiles]}")
    asked = starters(given)
    if not asked:
        fields = sorted({f for _, s in starters() for f in s.column_fields})
        raise InitError(f"{data}: no task type reads the column fields {sorted(given)} together; the column fields "
                        f"are: {', '.join(fields)}")
    undecided: list[str] = []
    for _, starter in asked:
        try:
            choice = starter.choose(profiles, given)
        except Undecided as exc:
            undecided.append(str(exc))
            continue
        except InitError as exc:
            raise InitError(f"{data}: {exc}") from None
        if choice is not None:
            return choice
    found = ", ".join(p.describe() for p in profiles) or "none"
    why = "; ".join(undecided) or "no task type recognises them"
    expected = "; or ".join(s.expects for _, s in starters())
    raise InitError(f"{data}: cannot tell what to learn from its columns: {why}. Columns found: {found}. "
                    f"Expected {expected}")


# -------------------------------------------------------------------------------------------- the spec
def _data_name(plan: SourcePlan) -> str:
    return Path(plan.source["path"]).name


# Why each section is there and what to check in it, written above it in the spec file.
COMMENTS: dict[str, str] = {
    "description": "Shown in the Dagster UI beside the pipeline's assets: say in one sentence what the model is for.",
    "source": "Where the data is. `kind: local` reads a file or a folder of files; a relative `path` is taken from "
              "the project root, so the spec works from there whatever the current folder. `split_files` keeps the "
              "data's own train / validation / test files as they are (a split it lacks is carved from train). "
              "Check: the path, and that every file you mean to train on is read.",
    "task": "What is learned, from which columns (inferred by `tuneline init`), and the settings of the task's own "
            "method. Check: these are the right columns.",
    "cleaning": "How raw rows become clean ones: Unicode normal form, white space, duplicates, texts that are too "
                "short or too long. Every dropped row is counted by reason in the cleaned_dataset asset. Check: "
                "max_chars keeps your longest genuine texts.",
    "splits": "Train / validation / test fractions. Rows are assigned by a hash of their normalised text and the "
              "seed: a row keeps its split when data is added, and equal texts always share a split. With "
              "`stratify`, every class (or category) with at least 3 rows gets a row in validation and test.",
    "quality": "Thresholds of the blocking data-quality checks on cleaned_dataset and splits: when one fails, "
               "training does not start and the Dagster UI names the failing rows. Check: min_rows is a floor your "
               "data should never fall below.",
    "base_model": "The pre-trained models that may be fine-tuned: candidates from tuneline's catalog of packaged, "
                  "offline models (pipelines/core/catalog.py), the constraints they must meet, and the probe that "
                  "ranks the ones that do. Check: allowed_licenses lists only licences you may ship a model under.",
    "training": "LoRA fine-tuning settings: the default pipeline's recipe for this task. More data needs fewer epochs; "
                "a sweep: section can search these (see README, \"Sweeps\").",
    "evaluation": "How the fine-tuned model is judged on the test split: against baselines that need no training, on "
                  "primary_metric (which also decides promotion).",
    "promotion": "A newly trained model replaces the registry's `champion` only when it beats it by at least "
                 "min_improvement on evaluation.primary_metric, on the same test split.",
    "schedule": "Retrain on a schedule (needs the Dagster daemon: `make ui` starts it). Off until you set "
                "`enabled: true`.",
    "retrain_on_new_data": "true: a sensor watches the source's files and starts the pipeline when their content "
                           "changes.",
}


def _section_comment(key: str, sections: dict[str, Any], choice: TaskChoice, counts: dict[str, int]) -> str:
    comment = COMMENTS[key]
    if key == "task":
        comment += starter_named(choice.task).task_comment(sections, counts)
    elif key == "splits" and {"split_files", "split_column"} & set(sections["source"]):
        comment += (" Here the source brings its own splits, so the fractions only size what is carved from train"
                    + (" and `overlap` keeps the official test set whole: a text also in it is dropped from train "
                       "and validation (counted in the splits asset)." if "overlap" in sections["splits"] else "."))
    elif key == "cleaning" and sections["cleaning"].get("keep_source_test"):
        comment += (" keep_source_test: every row of the official test split is kept (normalised, never dropped), "
                    "so metrics are on the official rows.")
    return comment


class _SpecDumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists of scalars and small mappings (`[a, b]`, `{source: ...}`),
    as the default specs write them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # A long list (77 labels) reads better one item a line.
    flow = all(not isinstance(v, list | dict) for v in data) and sum(len(str(v)) + 2 for v in data) <= 90
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = len(data) <= 3 and all(not isinstance(v, list | dict) and len(str(v)) <= 40 for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


class _Block(dict):  # type: ignore[type-arg]
    """A mapping always written in block style: the file's top level and each section."""


def _represent_block(dumper: yaml.SafeDumper, data: _Block) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=False)


_SpecDumper.add_representer(list, _represent_list)
_SpecDumper.add_representer(dict, _represent_dict)
_SpecDumper.add_representer(_Block, _represent_block)


def _dump(key: str, value: Any) -> str:
    """One top-level section as YAML."""
    section = _Block({key: _Block(value) if isinstance(value, dict) else value})
    return yaml.dump(section, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, width=116).rstrip("\n")


def render_spec(sections: dict[str, Any], choice: TaskChoice, counts: dict[str, int], data: Path, name: str) -> str:
    """The spec file's text: a header, then every section with a comment above it."""
    section = declaration(choice.task).config_class.__module__.replace(".", "/") + ".py"
    lines = [f"# A first spec written by `tuneline init {data}`, from the columns of the data.",
             f"# Read every comment, check what it asks, then run the data checks (`tuneline check {name}`) first.",
             f"# Every key is documented in pipelines/core/sections.py and {section};",
             "# unknown keys are rejected.", ""]
    for key, value in sections.items():
        comment = _section_comment(key, sections, choice, counts)
        lines += [f"# {line}" for line in wrap_words(comment.split(), 116)]
        lines.append(_dump(key, value))
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- init
def slug(name: str) -> str:
    """A pipeline name from a file or folder name: lower case, words joined by '_', starting with a letter."""
    text = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not text:
        return "pipeline"
    return text if text[0].isalpha() else f"data_{text}"


@dataclass
class InitResult:
    """What `tuneline init` inferred and wrote."""

    name: str
    path: Path
    spec: PipelineSpec
    data: Path
    choice: TaskChoice
    columns: list[str]
    rows_read: dict[str, int]  # file name -> rows
    rows_clean: int
    counts: dict[str, int]  # rows per group after cleaning (the task's split_group_column: a label, a category)
    split_rows: dict[str, int]
    split_origin: str  # in words: the data's own files, a split column, or hash fractions
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped by cleaning, by reason
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checklist: list[str] = field(default_factory=list)
    specs_dir_option: str = ""


def init_spec(data: Path, *, name: str | None = None, specs_dir: Path | None = None, force: bool = False,
              columns: Mapping[str, str] | None = None, column_options: Mapping[str, str] | None = None,
              project_root: Path = PROJECT_ROOT) -> InitResult:
    """Infer a spec for `data`, validate it with the project's loader and write it to `specs_dir`/NAME.yaml.
    `columns` names task-section column fields outright ({"label_column": "intent"}); `column_options` says how
    each was given on the command line, for messages."""
    folder = specs_dir if specs_dir is not None else project_root / "pipelines" / "specs"
    name = name if name is not None else slug(data.stem if data.is_file() else Path(os.path.abspath(data)).name)
    if not PIPELINE_NAME.match(name):
        raise InitError(f"--name {name!r}: a pipeline name is lower-case letters, digits and '_', starting with a "
                        "letter")
    target = folder / f"{name}.yaml"
    if target.exists() and not force:
        raise InitError(f"{target}: a spec named {name!r} exists already; pass --force to overwrite it, or choose "
                        "another --name")
    if (folder / f"{name}.yml").exists():
        raise InitError(f"{folder / (name + '.yml')}: defines pipeline {name!r} already; choose another --name")

    plan = plan_source(data, project_root)
    raw = read_data(plan, project_root, data)
    notes = list(plan.notes)
    if not plan.official:
        split_column = _split_column(raw)
        if split_column is not None:
            plan = SourcePlan({**plan.source, "split_column": split_column}, plan.files, {}, plan.notes)
            raw = read_data(plan, project_root, data)
            plan = SourcePlan(plan.source, plan.files, {}, plan.notes, tuple(s for s in SPLITS
                                                                             if s in set(raw["source_split"])))
            notes.append(f"column {split_column!r} names each row's split: kept (source.split_column)")
    profiles = profile_columns(raw)
    choice = choose_task(profiles, data, columns, column_options)
    built = dict(starter_named(choice.task).sections(raw, choice, plan.source, plan.own_splits, _data_name(plan),
                                                     notes))
    sections = {"description": built.pop("description"), "source": plan.source, **built}

    spec = _validated(sections, choice, data, name, target)
    task = task_for(spec)
    cleaned, clean_log = task.clean(raw, spec)
    if cleaned.empty:
        raise InitError(f"{data}: no row is left after cleaning ({choice.reason}): every one is empty, too short, a "
                        "duplicate or under conflicting labels; name the right columns with --column FIELD=NAME")
    result = assign_splits(cleaned, spec.splits, group_column=task.split_group_column)
    if result.overlapping_texts:  # only the data's own splits can share a text (a hash never splits equal texts)
        # Leakage between the data's own splits: keep the later split (an official test set) whole.
        sections["splits"] = {**sections["splits"], "overlap": "drop_from_earlier_splits"}
        notes.append(f"{result.overlapping_texts} normalised text(s) are in two of the official splits: "
                     "splits.overlap drops them from the earlier split, so the official test set stays whole")
        spec = _validated(sections, choice, data, name, target)
        result = assign_splits(cleaned, spec.splits, group_column=task.split_group_column)
    group = task.split_group_column
    counts = ({str(k): int(v) for k, v in cleaned[group].value_counts().items()} if group in cleaned.columns else {})
    text = render_spec(sections, choice, counts, data, name)
    spec = _validated_text(text, data, name, target)  # what is written is what was validated
    write_bytes_atomic(target, text.encode("utf-8"))

    rows_read = {Path(str(f)).name: int(n) for f, n in raw["source_file"].value_counts(sort=False).items()}
    out = InitResult(name=name, path=target, spec=spec, data=data, choice=choice, columns=[p.name for p in profiles],
                     rows_read=rows_read, rows_clean=len(cleaned), counts=counts, split_rows=result.counts(),
                     dropped={k.removeprefix("dropped_"): v for k, v in clean_log.metadata.items()
                              if k.startswith("dropped_") and isinstance(v, int) and v},
                     split_origin=_split_origin(plan, spec), notes=notes,
                     specs_dir_option="" if specs_dir is None else f" --specs-dir {specs_dir}")
    _judge(out, result, plan)
    return out


def _split_origin(plan: SourcePlan, spec: PipelineSpec) -> str:
    """Where the splits come from, in words."""
    if plan.official:
        kept = ", ".join(f"{split} = {file}" for split, file in plan.official.items())
        carved = [s for s in SPLITS if s not in plan.official]
        return f"the data's own files kept ({kept})" + (f"; {' and '.join(carved)} carved from train" if carved else "")
    if "split_column" in plan.source:
        return f"the data's own, from column {plan.source['split_column']!r}"
    s = spec.splits
    return (f"{s.train:.0%}/{s.validation:.0%}/{s.test:.0%} by a hash of each text"
            + (", stratified" if s.stratify else "") + f", seed {s.seed}")


def _split_column(raw: pd.DataFrame) -> str | None:
    """A column that names each row's split (train and test, or dev, ...): the data's own splits."""
    named = sorted((c for c in raw.columns if c not in NOT_DATA_COLUMNS),
                   key=lambda c: str(c).lower() not in SPLIT_COLUMN_NAMES)
    for column in named:
        values = {str(v).strip().lower() for v in raw[column] if not missing(v)}
        if values and values <= set(SPLIT_ALIASES):
            splits = {SPLIT_ALIASES[v] for v in values}
            if "train" in splits and len(splits) > 1:
                return str(column)
    return None


def _validated(sections: dict[str, Any], choice: TaskChoice, data: Path, name: str, target: Path) -> PipelineSpec:
    return _validated_text(render_spec(sections, choice, {}, data, name), data, name, target)


def _validated_text(text: str, data: Path, name: str, target: Path) -> PipelineSpec:
    try:
        return parse_spec(text, name=name, origin=str(target))
    except SpecError as exc:  # init wrote something its own loader refuses: a bug in init, not in the data
        raise InitError(f"the spec written for {data} does not validate, so nothing was written (a bug in tuneline "
                        f"init: please report it with this message):\n{exc}") from None


def _judge(out: InitResult, splits: Any, plan: SourcePlan) -> None:
    """Warnings about the data, and the list of what to check before running."""
    spec, warn, check = out.spec, out.warnings, out.checklist
    quality = spec.quality
    rows_in = out.rows_clean + sum(out.dropped.values())
    if rows_in and sum(out.dropped.values()) > 0.1 * rows_in:
        warn.append(f"cleaning drops {sum(out.dropped.values()):,} of {rows_in:,} rows "
                    f"({sum(out.dropped.values()) / rows_in:.0%}): "
                    + ", ".join(f"{n:,} {why}" for why, n in out.dropped.items())
                    + "; the cleaned_dataset asset lists examples of each reason")
    if out.rows_clean < quality.min_rows:
        warn.append(f"only {out.rows_clean} rows are left after cleaning: quality.min_rows ({quality.min_rows}) will "
                    "block training (row_count_within_bounds); add data, or lower it if that is really enough")
    starter_named(out.choice.task).judge(spec, out.choice, out.counts, splits, warn, check)
    if not plan.own_splits:
        total = sum(out.split_rows.values()) or 1
        off = [f"{split} {rows / total:.0%} (spec {getattr(spec.splits, split):.0%})"
               for split, rows in out.split_rows.items()
               if abs(rows / total - getattr(spec.splits, split)) > quality.split_tolerance]
        if off:
            warn.append(f"with {total} rows the hash splits come out uneven: {', '.join(off)}; "
                        f"split_proportions_match_spec (quality.split_tolerance {quality.split_tolerance}) will block "
                        "training: add data, or raise the tolerance")
        check.append(f"the splits: {out.split_origin}; the data brings none of its own (no train/test files or split "
                     "column found)")
    stated = _data_licence(out.data)
    check.append(f"base_model.allowed_licenses ({', '.join(spec.base_model.allowed_licenses)}): only licences you may "
                 "ship a model under; and that the data's own licence allows training on it"
                 + (f" ({stated[0]} says: {stated[1]})" if stated else ""))
    check.append("training.epochs: the default pipeline's recipe; a much larger dataset needs fewer")


def _data_licence(data: Path) -> tuple[str, str] | None:
    """The licence line of a README beside the data (its file, the line), if there is one."""
    folder = data if data.is_dir() else data.parent
    for readme in sorted(folder.glob("README*")):
        try:
            text = readme.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = re.search(r"^[\s*#>-]*licen[cs]e\W*\s*:?\**\s*(.+)$", text, re.IGNORECASE | re.MULTILINE)
        if match:
            return readme.name, match.group(1).strip().strip("*").strip().split(". ")[0][:160]
    return None


def report_lines(out: InitResult) -> list[str]:
    """What `tuneline init` prints: what it inferred, what to check, and how to run the pipeline."""
    spec = out.spec
    read = ", ".join(f"{name} ({rows:,})" for name, rows in out.rows_read.items())
    lines = [f"{out.name}: {spec.task.type} from {out.data}",
             f"  read:       {sum(out.rows_read.values()):,} rows from {read}",
             f"  columns:    {', '.join(out.columns)}",
             f"  task:       {spec.task.type}: {out.choice.reason}",
             f"  cleaned:    {out.rows_clean:,} rows kept"
             + (f"; dropped {', '.join(f'{n:,} {why}' for why, n in out.dropped.items())}" if out.dropped else
                ", none dropped")]
    lines += [f"  {line}" for line in starter_named(out.choice.task).summary(out.choice, out.counts)]
    shares = ", ".join(f"{split} {rows:,}" for split, rows in out.split_rows.items())
    lines.append(f"  splits:     {out.split_origin}: {shares}")
    models = [getattr(c, "id", None) or getattr(c, "name", None) or getattr(c, "path", "")
              for c in spec.base_model.candidates]
    lines.append(f"  candidates: {', '.join(models)} (licences allowed: {', '.join(spec.base_model.allowed_licenses)})")
    lines.append(f"  baselines:  {', '.join(spec.evaluation.baselines)}; primary metric "
                 f"{spec.evaluation.primary_metric}")
    lines += [f"  note: {n}" for n in out.notes]
    lines += [f"  warning: {w}" for w in out.warnings]
    lines.append(f"wrote {out.path}")
    lines.append("")
    lines.append("check before running:")
    lines += [f"  - {c}" for c in out.checklist]
    lines.append("")
    lines.append("then:")
    lines.append(f"  .venv/bin/tuneline check {out.name}{out.specs_dir_option}")
    lines.append("      materializes the data assets (raw_data, cleaned_dataset, splits) and runs their checks only")
    lines.append(f"  .venv/bin/tuneline run --pipeline {out.name}{out.specs_dir_option}")
    lines.append("      the whole pipeline: choose the base model, fine-tune, evaluate")
    return lines
