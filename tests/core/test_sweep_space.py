"""A sweep's search space names task.* and training.* settings: a trial's settings replace the spec's values in the
section the name points to, are validated again, and an unknown name fails with the section that lacks it."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.core.spec import PipelineSpec, load_spec
from pipelines.core.sweep.space import setting_path, spec_settings, with_settings
from tests.conftest import PROJECT_ROOT

TREC = PROJECT_ROOT / "pipelines" / "specs" / "trec_questions.yaml"


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return load_spec(TREC)


def with_sweep(spec: PipelineSpec, space: dict[str, Any]) -> PipelineSpec:
    """The spec with a sweep over `space` (validated: the spec checks every name and value of the space)."""
    return PipelineSpec.model_validate({**spec.model_dump(mode="json"), "sweep": {"trials": 2, "space": space}})


@pytest.mark.parametrize(("name", "section", "path"), [
    ("task.label_smoothing", "task", ["label_smoothing"]),
    ("training.learning_rate", "training", ["learning_rate"]),
    ("training.lora.r", "training", ["lora", "r"]),
    ("learning_rate", "training", ["learning_rate"]),  # no section: a training setting, as before task.* existed
    ("lora.r", "training", ["lora", "r"]),
])
def test_a_setting_name_points_into_its_section(name: str, section: str, path: list[str]) -> None:
    assert setting_path(name) == (section, path)


def test_a_task_setting_is_replaced_and_validated(spec: PipelineSpec) -> None:
    tuned = with_settings(spec, {"task.head_learning_rate": 5e-4})
    assert tuned.task.head_learning_rate == 5e-4 != spec.task.head_learning_rate
    assert tuned.training == spec.training
    assert tuned.task.labels == spec.task.labels  # the rest of the task section is the spec's
    assert tuned.sweep is None
    with pytest.raises(ValueError, match="head_learning_rate"):
        with_settings(spec, {"task.head_learning_rate": -1.0})  # the task section's own bounds still apply


def test_training_settings_with_and_without_the_section_name(spec: PipelineSpec) -> None:
    named = with_settings(spec, {"training.learning_rate": 1e-4, "training.lora.r": 8})
    bare = with_settings(spec, {"learning_rate": 1e-4, "lora.r": 8})
    assert named == bare
    assert (named.training.learning_rate, named.training.lora.r) == (1e-4, 8)
    assert named.task == spec.task
    with pytest.raises(ValueError, match="learning_rate"):
        with_settings(spec, {"training.learning_rate": 2.0})


@pytest.mark.parametrize(("name", "message"), [
    ("task.beta", "task has no setting 'beta'"),
    ("task.beta.scale", "task has no section 'beta'"),
    ("training.beta", "training has no setting 'beta'"),
    ("beta", "training has no setting 'beta'"),
    ("lora.beta", "training.lora has no setting 'beta'"),
    ("task.type", "task.type names the task"),
])
def test_an_unknown_setting_names_its_section(spec: PipelineSpec, name: str, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        with_settings(spec, {name: 1})


def test_the_spec_rejects_a_space_naming_an_unknown_task_setting(spec: PipelineSpec) -> None:
    with pytest.raises(ValueError, match=r"sweep\.space\.task\.beta: .*task has no setting 'beta'"):
        with_sweep(spec, {"task.beta": {"low": 0.1, "high": 0.5}})


def test_spec_settings_reads_task_and_training_values(spec: PipelineSpec) -> None:
    assert spec.task.head_learning_rate == 2e-4  # trec_questions.yaml's
    swept = with_sweep(spec, {"task.head_learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
                              "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                              "lora.r": {"choices": [8, 32]}})
    assert spec_settings(swept) == {"task.head_learning_rate": 2e-4,
                                    "training.learning_rate": spec.training.learning_rate, "lora.r": 32}
    outside = with_sweep(spec, {"task.head_learning_rate": {"low": 5e-4, "high": 1e-3}})
    assert spec_settings(outside) is None  # the spec's own value is not in the space: no trial 0 from it
