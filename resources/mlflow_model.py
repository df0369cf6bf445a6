"""A registered checkpoint as an MLflow Model (python-function flavour) that MLflow's own tools load and serve:
`mlflow.pyfunc.load_model("models:/NAME@champion")`, `mlflow models serve -m models:/NAME@champion`.

The model folder holds the bundle (the checkpoint and a copy of its base model, pipelines/core/serving.py), the
tuneline code that answers with it (code/), a signature (a `text` column in; the task's predict() columns out; a
`max_new_tokens` parameter), an input example from the test split and the inference stack pinned as it trained.
This module imports only mlflow and pipelines.core (no Dagster), so a serving process loads it quickly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipelines.core.records import CheckpointRecord
from pipelines.core.serving import BASE_MODEL, CHECKPOINT, INPUT_COLUMN, copy_base_model, pinned_requirements
from pipelines.core.tasks.base import ServingSchema

MAX_NEW_TOKENS = 64  # a chat model's answer length when the request does not say (tuneline predict's default)
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "specs")


class TunelineModel(mlflow.pyfunc.PythonModel):
    """Loads the bundle once; predict() answers a table with a `text` column (or a list of strings) with the rows
    `tuneline predict` prints."""

    def load_context(self, context: Any) -> None:
        from pipelines.core.hardware import resolve_compute
        from pipelines.core.serving import bundled_record
        from pipelines.core.tasks import task_for

        record = bundled_record(Path(context.artifacts[CHECKPOINT]), Path(context.artifacts[BASE_MODEL]))
        self._outputs = [name for name, _ in task_for(record).serving.outputs]
        self._answer = task_for(record).predictor(record, resolve_compute("auto", "fp32"))

    # No type hints on predict: MLflow reads them as the model's schema, which the signature states instead.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from pipelines.core.serving import input_texts

        texts = input_texts(model_input)
        rows = self._answer(texts, int((params or {}).get("max_new_tokens") or MAX_NEW_TOKENS))
        return pd.DataFrame(rows, columns=self._outputs)


def signature(serving: ServingSchema) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec(kind, name) for name, kind in serving.outputs]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", MAX_NEW_TOKENS)]))


def _code_folders(scratch: Path) -> list[str]:
    """Copies of the packages the model's code imports: pipelines (without its specs) and resources with only this
    module (the rest of resources imports Dagster)."""
    import pipelines
    import resources

    code = [scratch / "pipelines", scratch / "resources"]
    shutil.copytree(Path(pipelines.__file__).parent, code[0], ignore=_IGNORED)
    code[1].mkdir()
    for name in ("__init__.py", Path(__file__).name):
        shutil.copy2(Path(resources.__file__).parent / name, code[1] / name)
    return [str(folder) for folder in code]


def save_mlflow_model(record: CheckpointRecord, serving: ServingSchema, examples: Sequence[str], path: Path) -> Path:
    """Write the checkpoint as an MLflow Model folder at `path` (which must not exist)."""
    with tempfile.TemporaryDirectory(prefix="tuneline-bundle-") as scratch:
        # MLflow names an artifact's folder after its source's: both are staged under the names the loader reads.
        base = copy_base_model(record, Path(scratch) / BASE_MODEL)
        checkpoint = shutil.copytree(record.path, Path(scratch) / CHECKPOINT)
        # MLflow warns on every save that a pickled python_model runs code when loaded: the class is tuneline's
        # own (code/ ships it), so the warning says nothing a user can act on.
        quiet = logging.getLogger("mlflow.pyfunc")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            mlflow.pyfunc.save_model(
                path=str(path), python_model=TunelineModel(),
                artifacts={CHECKPOINT: str(checkpoint), BASE_MODEL: str(base)},
                code_paths=_code_folders(Path(scratch)), signature=signature(serving),
                input_example=pd.DataFrame({INPUT_COLUMN: list(examples)}) if examples else None,
                pip_requirements=pinned_requirements(),
                metadata={"tuneline.task": record.task, "tuneline.base_model": record.base_model.name,
                          "tuneline.checkpoint_sha256": record.sha256, "tuneline.spec_hash": record.spec_hash})
        finally:
            quiet.setLevel(level)
    return path
