"""The `task:` section of text regression."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.core.sections import TaskSection


class RegressionTaskConfig(TaskSection):
    """What is learned: a number (the target column) from a text."""

    type: Literal["text_regression"]
    text_column: str = Field(default="text", description="Column holding the input text.")
    target_column: str = Field(default="target", description="Column holding the number to predict.")
    ridge: float = Field(default=1.0, gt=0, description="L2 penalty of the ridge regression on the embeddings.")
