"""The code's shape: the task is the unit of extension (no task-type branches, task names, concrete task imports or
task-specific fields outside its package), pipelines/core has no import cycle (not even through imports made for
type checkers), loading specs and building the definitions import no torch, assets are thin, and every registered
task implements the whole Task interface."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core import sections
from pipelines.core.tasks import declarations, task_named
from pipelines.core.tasks.base import Task
from tests.conftest import PROJECT_ROOT

TASKS = {name: task_named(name) for name in declarations()}

TASKS_DIR = PROJECT_ROOT / "pipelines" / "core" / "tasks"
CODE = [p for folder in ("pipelines", "assets", "resources") for p in sorted((PROJECT_ROOT / folder).rglob("*.py"))]


def _attribute_path(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def task_branches(source: str) -> list[str]:
    """Comparisons of a task type (`x.task.type == ...`, `record.task != ...`, `... in (...)`), and string literals
    that name a registered task type."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_attribute_path(o).endswith(("task.type", ".task")) for o in operands):
                found.append(f"line {node.lineno}: compares {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value in TASKS:
            found.append(f"line {node.lineno}: names the task type {node.value!r}")
    return found


def test_no_task_type_branch_outside_the_task_modules() -> None:
    offenders = {str(p.relative_to(PROJECT_ROOT)): hits for p in CODE if TASKS_DIR not in p.parents
                 for hits in [task_branches(p.read_text(encoding="utf-8"))] if hits}
    assert offenders == {}


def test_the_branch_detector_finds_branches() -> None:
    assert task_branches("if spec.task.type == 'x':\n    pass\n")
    assert task_branches("ok = record.task != other\n")
    assert task_branches(f"name = {next(iter(TASKS))!r}\n")
    assert not task_branches("name = 'text_column'\n")
    assert not task_branches("task = task_for(spec)\nprint(spec.task.type)\n")


def imports_of(path: Path, module: str) -> set[str]:
    """The modules `module` imports: at top level, inside functions, and for type checkers (`if TYPE_CHECKING:`),
    since a cycle hidden from the interpreter is still a two-way dependency."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from package import submodule`
    return found


def core_import_graph() -> dict[str, set[str]]:
    core = PROJECT_ROOT / "pipelines" / "core"
    modules = {}
    for path in core.rglob("*.py"):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {name: {m for m in imports_of(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_pipelines_core_has_no_import_cycle() -> None:
    graph = core_import_graph()
    assert "pipelines.core.tasks.classification" in graph["pipelines.core.tasks"]
    assert "pipelines.core.sections" in graph["pipelines.core.tasks.base"]  # a type-checking import is counted
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def concrete_task_imports(module: str, path: Path) -> list[str]:
    """Imports of a task type's own package (pipelines.core.tasks.<name>...), which only the registry and the
    package itself may import."""
    return sorted(m for m in imports_of(path, module)
                  if m.startswith("pipelines.core.tasks.")
                  and m.split(".")[3] in {p.name for p in TASKS_DIR.iterdir() if p.is_dir()})


def test_no_concrete_task_module_is_imported_outside_the_tasks_folder() -> None:
    offenders = {}
    for path in CODE:
        if TASKS_DIR in path.parents or path.parent == TASKS_DIR:
            continue
        module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        found = concrete_task_imports(module, path)
        if found:
            offenders[str(path.relative_to(PROJECT_ROOT))] = found
    assert offenders == {}


def test_the_import_detector_finds_concrete_task_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipelines.core.tasks.classification.train import train_classifier\n")
    assert "pipelines.core.tasks.classification.train" in concrete_task_imports("pipelines.m", module)
    module.write_text("from pipelines.core.tasks import task_for\nfrom pipelines.core.tasks.base import Task\n")
    assert concrete_task_imports("pipelines.m", module) == []


def shared_sections() -> list[type]:
    return [c for c in vars(sections).values() if isinstance(c, type) and issubclass(c, sections.Frozen)
            and c.__module__ == sections.__name__ and c not in (sections.Frozen, sections.TaskSection)]


def test_the_shared_sections_hold_no_task_specific_field() -> None:
    """A field of a task section (its own knob, or one that moved there) is in no shared section: a shared
    section would accept it silently for every other task type."""
    shared = {f"{c.__name__}.{name}" for c in shared_sections() for name in c.model_fields}
    for declared in declarations().values():
        own = set(declared.config_class.model_fields) - {"type"}
        clashes = sorted(field for field in shared if field.split(".", 1)[1] in own)
        assert clashes == [], f"{declared.name}'s fields also in shared sections: {clashes}"
        for old in getattr(declared.config_class, "moved_from", {}):  # the old place is gone from the schema
            section, *rest = old.split(".")
            assert not rest or rest[-1] not in {n for c in shared_sections() for n in c.model_fields}, old


@pytest.mark.parametrize("code", [
    "from pipelines.core.spec import read_specs\n"
    "for folder in ('pipelines/specs', 'benchmarks/specs'):\n"
    "    found = read_specs(Path(folder))\n"
    "    assert found.specs and not found.broken, found.broken\n"
    "    for spec in found.specs:\n"
    "        task = task_for(spec)\n"
    "        task.quality_suites(spec), task.descriptions, task.prepared\n",
    "from pipelines.definitions import defs\n"
    "assert defs.resolve_asset_graph().get_all_asset_keys()\n",
], ids=["specs", "definitions"])
def test_loading_specs_and_definitions_imports_no_torch(code: str) -> None:
    """`tuneline validate`, `init` and every code-location load pay only for what they use: the task
    implementations import torch, transformers and peft when a step runs, not when a spec is read."""
    script = ("import sys\nfrom pathlib import Path\nfrom pipelines.core.tasks import task_for\n" + code
              + "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_asset_functions_are_thin() -> None:
    """Assets call one step and hand its log to the tracking resource: about 20 lines each, at most."""
    lengths = {}
    for path in (PROJECT_ROOT / "assets").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any("asset" in ast.unparse(d) for d in node.decorator_list):
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    assert len(lengths) >= 8  # six assets, the prepared-data asset and the quality checks
    assert {name: n for name, n in lengths.items() if n > 20} == {}


def test_every_registered_task_implements_the_task_interface() -> None:
    wanted = {name for name, member in inspect.getmembers(Task) if not name.startswith("_")} | set(
        Task.__annotations__)
    for name, task in TASKS.items():
        assert task.name == name
        missing = sorted(attr for attr in wanted if not hasattr(task, attr))
        assert missing == [], f"{name} lacks {missing}"
        assert set(task.descriptions) == {"cleaned_dataset", "finetuned_checkpoint", "evaluation_report"}
        assert set(task.evaluation_defaults) == {"primary_metric", "baselines"}
        assert task.evaluation_defaults["primary_metric"] in task.primary_metrics
        assert task.config_class is declarations()[name].config_class
        assert set(task.metric_names) >= set(task.primary_metrics)
