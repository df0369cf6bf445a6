"""Instruction tuning: a chat model learns to answer instructions the way the data's responses do, formatted by its
own chat template, with LoRA (TRL's SFTTrainer, loss on the responses only). Examples are rendered and tokenized
once into `rendered_dataset`; evaluation scores greedy generations and the loss on the test split.

The package: config (the `task:` section), chat (conversation formats, cleaning and rendering), data (rows to
conversations and their checks), train (SFT, packed attention), evaluate (losses and generations), init (what
`tuneline init` proposes) and task (the Task the rest of tuneline calls). Importing this package imports only its
declaration and its config.
"""

from __future__ import annotations

from pipelines.core.tasks.base import TaskDeclaration
from pipelines.core.tasks.instruction.config import InstructionTuningTaskConfig

NAME = "instruction_tuning"
WEIGHT_FILES = ("adapter/adapter_model.safetensors",)

TASK = TaskDeclaration(
    name=NAME, config_class=InstructionTuningTaskConfig,
    description="Instruction tuning: a chat model's responses to instructions, in the model's own chat template "
                "(TRL's SFTTrainer, LoRA).",
    implementation="pipelines.core.tasks.instruction.task:InstructionTuningTask",
    starter="pipelines.core.tasks.instruction.init:InstructionStarter")
