"""Text classification: a pre-trained encoder (or decoder) pools its token states the way the model declares, a
linear head on top, LoRA adapters on its linear layers. The head starts from a logistic regression on the frozen
embeddings (LP-FT) unless the spec says otherwise, so fine-tuning starts where the linear probe ends.

The package: config (the `task:` section), data and cleaning (examples and their checks), model (pooling, frozen
embeddings, the probe), train, metrics, evaluate, doctor (label suspects), linear_probe, prompting (the prompting
baseline), init (what `tuneline init` proposes) and task (the Task the rest of tuneline calls). Importing this
package imports only its declaration and its config.
"""

from __future__ import annotations

from pipelines.core.tasks.base import TaskDeclaration
from pipelines.core.tasks.classification.config import ClassificationTaskConfig

NAME = "text_classification"
WEIGHT_FILES = ("adapter/adapter_model.safetensors", "head.safetensors")

TASK = TaskDeclaration(
    name=NAME, config_class=ClassificationTaskConfig,
    description="Text classification: one text column to one label column (a pooled encoder or decoder, a linear "
                "head, LoRA).",
    implementation="pipelines.core.tasks.classification.task:ClassificationTask",
    starter="pipelines.core.tasks.classification.init:ClassificationStarter")
