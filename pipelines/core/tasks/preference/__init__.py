"""Preference tuning: a chat model learns to prefer the chosen answer to a prompt over the rejected one (DPO, IPO
or KTO through TRL, with LoRA: the reference is the same model with the adapter switched off, so no second copy is
loaded). It may start from another pipeline's registered champion (`task.start_from: {champion_of: <pipeline>}`),
and where the data has no rejected answer, the starting model's own greedy answer is the rejected side (on-policy
pairs, generated once and cached).

The package: config (the `task:` section), data (rows to pairs and their checks), pairs (on-policy answers and the
rendered, length-checked pairs), train (DPO / IPO / KTO, and the SFT-on-chosen baseline), evaluate (implicit
rewards, log-probabilities, generations), init (what `tuneline init` proposes) and task (the Task the rest of
tuneline calls). Chat rendering, generation, loading and export come from the instruction-tuning package. Importing
this package imports only its declaration and its config.
"""

from __future__ import annotations

from pipelines.core.tasks.base import TaskDeclaration
from pipelines.core.tasks.preference.config import PreferenceTaskConfig

NAME = "preference"
WEIGHT_FILES = ("adapter/adapter_model.safetensors",)

TASK = TaskDeclaration(
    name=NAME, config_class=PreferenceTaskConfig,
    description="Preference tuning: a chat model's preference for chosen over rejected answers (TRL's DPO, IPO or "
                "KTO, LoRA), from a base model or another pipeline's champion.",
    implementation="pipelines.core.tasks.preference.task:PreferenceTask",
    starter="pipelines.core.tasks.preference.init:PreferenceStarter")
