"""A task type that lives in the tests, not in tuneline: text regression (a number from a text), with a ridge
regression on a base model's frozen, mean-pooled embeddings. It proves that a task type is one package plus a
`register` call: the asset graph, the checks, selection, tracking, the registry, init and the CLI run it without a
line changed outside this folder (tests/test_task_package.py)."""

from __future__ import annotations

from pipelines.core.tasks.base import TaskDeclaration
from tests.tasks.regression.config import RegressionTaskConfig

NAME = "text_regression"

TASK = TaskDeclaration(
    name=NAME, config_class=RegressionTaskConfig,
    description="Text regression: a number from a text (ridge regression on frozen embeddings).",
    implementation="tests.tasks.regression.task:RegressionTask",
    starter="tests.tasks.regression.init:RegressionStarter")
