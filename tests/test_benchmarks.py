"""The benchmark scripts run where only the training stack is installed (a GPU machine, say): no Dagster, no
MLflow, no Great Expectations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_import_and_resolve_models_without_the_orchestration_stack(tmp_path: Path) -> None:
    script = f"""
import sys
for name in ("dagster", "mlflow", "great_expectations"):
    sys.modules[name] = None  # importing any of them now raises ImportError
sys.path.insert(0, {str(ROOT)!r})
import benchmarks.instruction_throughput, benchmarks.recipe_vs_tuneline, benchmarks.doctor_flipped_labels
import benchmarks.linear_probe, benchmarks.training_step_levers
from pipelines.quiet import quiet_libraries
from pipelines.core.sections import LocalModelConfig
from resources.model_store import ModelStore

quiet_libraries()
folder, revision = ModelStore({str(tmp_path)!r}, {str(tmp_path / "models")!r}).locate(
    LocalModelConfig(source="local", path="m"), allow_pickle=False)
print(folder.name, revision)
"""
    (tmp_path / "m").mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["m", "None"]
