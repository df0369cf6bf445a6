"""The pydantic schema of a pipeline spec: one YAML file describes one pipeline completely.

The shared sections live in pipelines/core/sections.py; the `task:` section is the one its task type declares
(pipelines/core/tasks/). Every model is frozen and rejects unknown keys. Loading a file reports every problem at
once, each with its dotted path in the file and its line number.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from pipelines.core.errors import SpecError
from pipelines.core.files import NotRegular, TooLarge, read_bounded, special_kind
from pipelines.core.sections import *  # noqa: F403 (the shared sections are part of the spec's schema)
from pipelines.core.sections import (BaseModelConfig, CleaningConfig, ComputeConfig, EvaluationConfig, Frozen,
                                     PromotionConfig, QualityConfig, ScheduleConfig, SourceConfig, SplitsConfig,
                                     ScoringConfig, SweepConfig, TaskSection, TrainingConfig)
from pipelines.core.tasks import DEFAULT_TASK, declaration, declarations, on_change, task_named
from pipelines.core.yaml_limits import check_events

PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecDeprecationWarning(FutureWarning):
    """A spec key that still works but has moved (shown by default, unlike DeprecationWarning: a spec's author
    reads it, not a library's)."""


def _task_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", DEFAULT_TASK))
    return str(getattr(value, "type", DEFAULT_TASK))


def _task_union() -> Any:
    """The `task:` section: the section class of the task type it names (the default task when it names none)."""
    found = declarations()
    sections = tuple(Annotated[d.config_class, Tag(name)] for name, d in found.items())
    return Annotated[
        Union[sections],  # noqa: UP007 (a union built from the registry)
        Discriminator(_task_tag, custom_error_type="task_type",
                      custom_error_message=f"task.type must be one of {', '.join(repr(n) for n in found)}"),
    ]


def _pop_path(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """Remove a dotted key from nested mappings: (whether it was there, its value)."""
    *parents, leaf = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _copy_sections(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    """`data` with the mappings along `dotted` copied, so that popping from them leaves the caller's input alone."""
    data = dict(data)
    node = data
    for part in dotted.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            break
        node[part] = dict(node[part])
        node = node[part]
    return data


def move_task_settings(data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Settings given in the shared section they lived in before they moved into a task's section: moved to the task
    section, with (old key, new key) for each one moved. A setting of another task type is an error naming its
    task type."""
    kind = _task_tag(data.get("task") or {})
    if kind not in declarations():
        return data, []
    own = declaration(kind).config_class
    owners: dict[str, list[str]] = {}
    for name, found in declarations().items():
        for old in getattr(found.config_class, "moved_from", {}):
            owners.setdefault(old, []).append(name)
    moved = []
    for old in sorted(owners):
        data = _copy_sections(data, old)
        present, value = _pop_path(data, old)
        if not present:
            continue
        new = getattr(own, "moved_from", {}).get(old)
        if new is None:
            raise ValueError(f"{old} is a setting of task.type {' / '.join(owners[old])} (now under task:); this "
                             f"pipeline's task.type is {kind}, which does not read it: remove it")
        task = dict(data.get("task") or {})
        if new in task:
            raise ValueError(f"{old} and task.{new} are both given: keep task.{new} ({old} is its old place)")
        data = {**data, "task": {**task, new: value}}
        moved.append((old, f"task.{new}"))
    sweep = data.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("space"), dict):  # a searched setting that moved
        space = {}
        for name, parameter in sweep["space"].items():
            path = name if name.split(".", 1)[0] in ("task", "training") else f"training.{name}"
            new = getattr(own, "moved_from", {}).get(path)
            if new is not None:
                moved.append((f"sweep.space.{name}", f"sweep.space.task.{new}"))
            space[f"task.{new}" if new is not None else name] = parameter
        data = {**data, "sweep": {**sweep, "space": space}}
    return data, moved


# ------------------------------------------------------------------------------------------ the spec
class PipelineSpec(Frozen):
    """One pipeline: source, task, cleaning, splits, quality gates, base model, training, evaluation, schedule."""

    name: str = Field(description="The pipeline's name: the spec file's stem, the prefix of its asset keys.")
    description: str = Field(default="", description="Shown in the Dagster UI.")
    source: SourceConfig
    task: TaskSection = Field(default_factory=lambda: declaration(DEFAULT_TASK).config_class())  # see _use_tasks
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    base_model: BaseModelConfig | None = Field(
        description="The models to choose from (required, unless task.start_from names another pipeline's "
                    "champion: then that champion is the model and the section is left out)")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sweep: SweepConfig | None = None
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    schedule: ScheduleConfig | None = None
    scoring: ScoringConfig | None = None
    retrain_on_new_data: bool = Field(
        default=False, description="A sensor watches the source's files and starts the pipeline when their "
                                   "content changes (run key = content digest). Not for Hub sources.")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Settings in their old places move into the task section (with a warning); evaluation and training settings
        the spec leaves out come from its task (e.g. its primary metric and baselines, its recipe's learning rate)."""
        if isinstance(data, dict):
            data, moved = move_task_settings(data)
            for old, new in moved:
                warnings.warn(f"{old} has moved to {new}: write it there (the old place is read for one more "
                              "release)", SpecDeprecationWarning, stacklevel=2)
            kind = _task_tag(data.get("task") or {})
            if kind in declarations() and "base_model" not in data and isinstance(data.get("task"), dict) \
                    and declaration(kind).config_class.starts_from_another_pipeline(data["task"]):
                data = {**data, "base_model": None}  # the model comes from another pipeline (task.start_from)
            evaluation = data.get("evaluation")
            if kind in declarations() and (evaluation is None or isinstance(evaluation, dict)):
                data = {**data, "evaluation": {**task_named(kind).evaluation_defaults, **(evaluation or {})}}
            training = data.get("training")
            if kind in declarations() and (training is None or isinstance(training, dict)):
                data = {**data, "training": {**task_named(kind).training_defaults, **(training or {})}}
        return data

    @model_validator(mode="after")
    def _one_starting_model(self) -> PipelineSpec:
        start = self.task.starts_from()
        if start is None and self.base_model is None:
            raise ValueError("base_model: empty; list the candidate models (base_model.model or "
                             "base_model.candidates)")
        if start is not None and self.base_model is not None:
            raise ValueError(f"base_model: this pipeline starts from the champion of pipeline {start!r} "
                             "(task.start_from), which is its model; remove the base_model section")
        if start == self.name:
            raise ValueError(f"task.start_from: a pipeline cannot start from its own champion ({start!r})")
        return self

    @model_validator(mode="after")
    def _evaluation_fits_task(self) -> PipelineSpec:
        task_named(self.task.type).check_evaluation(self.evaluation)
        return self

    @model_validator(mode="after")
    def _sweep_names_training_settings(self) -> PipelineSpec:
        if self.sweep is None:
            return self
        from pipelines.core.sweep.space import sample_values, with_settings

        for name, parameter in self.sweep.space.items():
            for value in sample_values(parameter):
                try:
                    with_settings(self, {name: value})
                except (KeyError, ValueError) as exc:
                    why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # no quotes around it
                    raise ValueError(f"sweep.space.{name}: {why}") from None
        from pipelines.core.sweep.space import sweep_metric

        sweep_metric(self)  # raises when sweep.metric is not a validation metric of the task
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> PipelineSpec:
        if self.training.batch_size % self.compute.processes:
            raise ValueError(f"training.batch_size {self.training.batch_size} is not a multiple of compute.processes "
                             f"{self.compute.processes}: each process takes an equal share of a step's rows")
        return self

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(f"pipeline name {value!r} must be lower-case letters, digits and '_', "
                             "starting with a letter (rename the spec file)")
        return value

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of some sections of the spec (used as Dagster code versions); with none named, of
        every section that decides the result (all but `compute`, which says only where training runs, `scoring`, which
        says what the champion answers afterwards, and the
        `unhashed` fields of the task and source sections, such as the data doctor's settings, which only look at the
        data, and the source's size limits)."""
        data = self.model_dump(mode="json")
        for field in self.task.unhashed:  # e.g. the data doctor's settings: they only look at the data
            data["task"].pop(field, None)
        for field in self.source.unhashed:  # the source's limits: they decide whether it is read, not what
            data["source"].pop(field, None)
        picked = ({s: data[s] for s in sections} if sections else
                  {k: v for k, v in data.items() if k not in ("compute", "scoring")})
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def spec_hash(self) -> str:
        """Hash of the whole resolved spec."""
        return self.section_hash()

    def to_yaml(self) -> str:
        """The resolved spec (defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------- loading
MAX_SPEC_BYTES = 1 << 20
"""Largest spec file read (a spec is a few KiB; a bigger file is not a spec)."""
MAX_SPEC_NODES = 20_000
"""Most values a spec may hold once its aliases (*name) are expanded: a few aliases that repeat each other can
stand for billions of values ("billion laughs"), which are refused before they are built."""
MAX_SPEC_DEPTH = 40
"""Deepest nesting of mappings and lists in a spec (a real one nests four or five deep)."""


def _compose(text: str) -> yaml.Node | None:
    """The spec's YAML as a node graph, refused (ValueError) past the limits above before any value is built: the
    nesting is counted on the parser's events (no recursion), the size with aliases expanded on the graph."""
    check_events(text, max_depth=MAX_SPEC_DEPTH, max_values=MAX_SPEC_NODES,
                 hint=" (a spec holds a few hundred values, nested a few levels)")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return None
    # Values per node with aliases expanded, children before parents; a node reached again on the path that led to
    # it is an alias inside its own anchor (a cycle).
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            depths[id(node)] = 0 if isinstance(node, yaml.ScalarNode) else \
                1 + max((depths[id(c)] for c in children), default=0)
            if sizes[id(node)] > MAX_SPEC_NODES or depths[id(node)] > MAX_SPEC_DEPTH:
                raise ValueError(
                    f"line {node.start_mark.line + 1}: its aliases (*name) expand to more than "
                    + (f"{MAX_SPEC_NODES} values" if sizes[id(node)] > MAX_SPEC_NODES else
                       f"{MAX_SPEC_DEPTH} levels of nesting")
                    + " (a spec holds a few hundred): write the values out, or use fewer aliases")
            continue
        if id(node) in sizes:
            continue
        if node.tag.endswith((":int", ":float")) and len(node.value) > 4000:  # Python refuses ints past 4300 digits
            raise ValueError(f"line {node.start_mark.line + 1}: a number written with {len(node.value)} characters "
                             "(a spec's numbers are a few digits long)")
        if id(node) in on_path:
            raise ValueError(f"line {node.start_mark.line + 1}: an alias (*name) refers to a value that contains it "
                             "(a loop): write the value out")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return root


def _key_lines(root: yaml.Node | None) -> tuple[dict[tuple[str, ...], int], list[str]]:
    """Each key path of a composed YAML document with its 1-based line number, and the keys given twice in one
    mapping with both lines (YAML itself silently keeps the last)."""
    index: dict[tuple[str, ...], int] = {}
    duplicates: list[str] = []

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name, line = str(key.value), key.start_mark.line + 1
                if name in first:
                    duplicates.append(f"line {line}: {'.'.join(path + (name,))}: given twice (first at line "
                                      f"{first[name]}); YAML would keep only the last one, so merge them into one")
                first.setdefault(name, line)
                index[path + (name,)] = line
                walk(value, path + (name,))
                index[path + (name,)] = line
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (str(i),))

    if root is not None:
        walk(root, ())
    return index, duplicates


def _problem(error: dict[str, Any], lines: dict[tuple[str, ...], int]) -> str:
    # Discriminated unions add the tag ('package_file', 'hub') to the location; it is not a key in the file.
    loc = [str(part) for part in error["loc"]]
    def is_tag(i: int, part: str) -> bool:
        if part not in _union_tags() or i == 0:
            return False
        before = loc[i - 1]
        return before in _UNION_FIELDS or (before.isdigit() and i >= 2 and loc[i - 2] in _UNION_FIELDS)

    file_loc = tuple(p for i, p in enumerate(loc) if not is_tag(i, p))
    if file_loc[:3] == ("base_model", "candidates", "0") and ("base_model", "model") in lines \
            and ("base_model", "candidates") not in lines:  # the one-model form `model:` is candidate 0
        file_loc = ("base_model", "model", *file_loc[3:])
    path = ".".join(file_loc) or "(top level)"
    line = None
    for n in range(len(file_loc), -1, -1):
        if file_loc[:n] in lines:
            line = lines[file_loc[:n]]
            break
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _known_keys(loc), n=1, cutoff=0.6)
        owners = [name for name, d in declarations().items() if loc[-1] in d.config_class.model_fields]
        if file_loc[:1] == ("task",) and len(file_loc) == 2 and owners:
            message = (f"a setting of task.type {' / '.join(owners)}, not of this pipeline's task type (its task "
                       "section reads only its own settings)")
        else:
            message = (f"unknown key; did you mean {close[0]!r}?" if close else
                       "unknown key (not part of the spec schema; check its spelling and indentation)")
    elif error["type"] == "missing":
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    elif isinstance(error.get("input"), str | int | float) and not isinstance(error.get("input"), bool):
        message += f" (got {error['input']!r})"  # the value as YAML read it: `fast`, -5
    # A rule across sections names the key at fault first ("training.batch_size 32 is ...", "sweep.space.lr: ..."):
    # point at its line, or at its nearest enclosing key in the file (a sweep.space key may itself hold dots).
    named = tuple(message.split(" ", 1)[0].rstrip(":").split("."))
    enclosing = next((named[:n] for n in range(len(named), 0, -1) if named[:n] in lines), None)
    if not file_loc and enclosing is not None:
        return f"line {lines[enclosing]}: {message}"
    where = f"line {line}: " if line is not None else ""
    return f"{where}{path}: {message}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: itself, the members of a union, the items of a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) if arg is not Ellipsis for m in _models_in(arg)]


def _known_keys(loc: list[str]) -> list[str]:
    """The keys the schema allows beside the unknown key at `loc` (pydantic's location, union tags included)."""
    current: Any = PipelineSpec
    for part in loc[:-1]:
        models = _models_in(current)
        if part.isdigit():  # an item of a list: the same models
            continue
        tagged = [m for m in models if any(part in get_args(f.annotation) for f in m.model_fields.values()
                                           if get_origin(f.annotation) is Literal)]
        if tagged:  # a union member, named by its tag
            current = tagged[0]
            continue
        fields = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if not fields:
            return []
        current = fields[0]
    return sorted({key for model in _models_in(current) for key in model.model_fields} - {"name"})


_UNION_FIELDS = {"source", "model", "task", "candidates"}
_SOURCE_AND_MODEL_TAGS = {"package_file", "local", "hub", "package", "catalog"}


def _union_tags() -> set[str]:
    return _SOURCE_AND_MODEL_TAGS | set(declarations())


def _use_tasks() -> None:
    """Point the spec's `task:` field at the union of the registered task sections (again after a registration)."""
    PipelineSpec.model_fields["task"].annotation = _task_union()
    PipelineSpec.model_rebuild(force=True)


_use_tasks()
on_change(_use_tasks)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: where, what, and for the usual mistake (a tab) what to do."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) \
        or str(exc)
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces, never tabs: replace the tab with spaces)"
    return f"{where}not valid YAML: {problem}"


def parse_spec(text: str, *, name: str, origin: str) -> PipelineSpec:
    """Validate YAML text as the spec of pipeline `name`; `origin` names the file in errors."""
    try:
        root = _compose(text)
        data = yaml.SafeLoader("").construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise SpecError(origin, [_yaml_problem(exc)]) from None
    except ValueError as exc:  # past a limit of _compose
        raise SpecError(origin, [str(exc)]) from None
    if data is None:
        raise SpecError(origin, ["the file is empty; expected a mapping with source, base_model, ..."])
    if not isinstance(data, dict):
        raise SpecError(origin, [f"expected a mapping at the top level, got {type(data).__name__}"])
    lines, duplicates = _key_lines(root)
    if duplicates:
        raise SpecError(origin, duplicates)
    if "name" in data:
        raise SpecError(origin, [f"line {lines.get(('name',), '?')}: name: unknown key "
                                 f"(a pipeline is named by its file: {name!r})"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecDeprecationWarning)
            spec = PipelineSpec.model_validate({"name": name, **data})
    except ValidationError as exc:
        raise SpecError(origin, [_problem(e, lines) for e in exc.errors()]) from None
    for warning in caught:  # said again as a warning about the spec file's line
        if issubclass(warning.category, SpecDeprecationWarning):
            old = tuple(str(warning.message).split(" ", 1)[0].split("."))
            warnings.warn_explicit(warning.message, warning.category, origin, lines.get(old, 0))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return spec


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where a spec file stops being UTF-8 (line and column), and what its encoding likely is."""
    line = data.count(b"\n", 0, exc.start) + 1
    start = data.rfind(b"\n", 0, exc.start) + 1
    column = len(data[start:exc.start].decode("utf-8", errors="replace")) + 1  # characters, not bytes
    where = f"line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x})"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:200].count(b"\0") > len(data[:200]) // 4:
        guess, source = "UTF-16 (as Windows Notepad and Excel save \"Unicode\" text)", "UTF-16"
    else:
        end = data.find(b"\n", exc.start)
        shown = data[start:end if end >= 0 else len(data)].decode("cp1252", errors="replace").strip()
        guess, source = f"Windows-1252 / Latin-1 (read that way the line is {shown[:60]!r})", "WINDOWS-1252"
    return (f"{where}: it looks like {guess}; save it as UTF-8, e.g. iconv -f {source} -t UTF-8 FILE > NEW "
            "and move NEW over FILE")


def load_spec(path: Path) -> PipelineSpec:
    """Load and validate one spec file; the pipeline is named after the file's stem."""
    special = "a folder" if path.is_dir() else special_kind(path)
    if special is not None:
        raise SpecError(str(path), [f"is {special}, not a spec file (a spec is a regular YAML file)"])
    try:
        data = read_bounded(path, MAX_SPEC_BYTES)
    except NotRegular:
        raise SpecError(str(path), ["is no longer a regular file (it was replaced while being read)"]) from None
    except TooLarge:
        raise SpecError(str(path), [f"is larger than {MAX_SPEC_BYTES // 1024} KiB: not a spec file (a spec is a few "
                                    "KiB of YAML)"]) from None
    except OSError as exc:
        raise SpecError(str(path), [f"cannot be read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [_not_utf8(data, exc)]) from None
    return parse_spec(text.removeprefix("\ufeff"), name=path.stem, origin=str(path))


@dataclass(frozen=True)
class SpecFolder:
    """The specs of a folder that validate, and the files that do not (each with all its problems)."""

    specs: tuple[PipelineSpec, ...]
    broken: tuple[SpecError, ...]


def read_specs(folder: Path) -> SpecFolder:
    """Every *.yaml / *.yml spec in a folder, sorted by name. A broken file never hides the others: it is
    returned among `broken`, so that every valid pipeline still loads."""
    specs: list[PipelineSpec] = []
    broken: list[SpecError] = []
    paths: dict[int, Path] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            specs.append(load_spec(path))
            paths[id(specs[-1])] = path
        except SpecError as exc:
            broken.append(exc)
    names = [s.name for s in specs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        files = [str(folder / f"{name}{suffix}") for suffix in (".yaml", ".yml")]
        broken.append(SpecError(files[1], [f"{files[0]} defines pipeline {name!r} too: keep one of the two files"]))
        specs = [s for s in specs if s.name != name]
    while unstarted := _unknown_starts(specs):  # a pipeline that starts from a missing (or broken) one cannot run
        for spec, problem in unstarted:
            broken.append(SpecError(str(paths[id(spec)]), [problem]))
        specs = [s for s in specs if all(s is not u for u, _ in unstarted)]
    return SpecFolder(tuple(specs), tuple(broken))


def _unknown_starts(specs: list[PipelineSpec]) -> list[tuple[PipelineSpec, str]]:
    """Specs whose task.start_from names a pipeline that is not among `specs`, or that starts a circle."""
    by_name = {s.name: s for s in specs}
    found = []
    for spec in specs:
        start, seen = spec.task.starts_from(), [spec.name]
        if start is not None and start not in by_name:
            found.append((spec, f"task.start_from: no valid pipeline named {start!r} in this folder (pipelines: "
                                f"{', '.join(sorted(by_name)) or 'none'})"))
            continue
        while start is not None and start in by_name:
            if start in seen:
                found.append((spec, "task.start_from: the pipelines start from each other in a circle ("
                                    + " -> ".join([*seen, start]) + ")"))
                break
            seen.append(start)
            start = by_name[start].task.starts_from()
    return found


def load_specs(folder: Path) -> list[PipelineSpec]:
    """Load every spec in a folder; all invalid files are reported together in one SpecError."""
    found = read_specs(folder)
    if found.broken:
        raise SpecError(str(folder), [str(e) for e in found.broken])
    return list(found.specs)
