"""The code's shape: the task is the unit of extension (no task-type branches elsewhere), pipelines/core has no
import cycle, assets are thin, and every registered task implements the whole Task interface."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from pipelines.core.tasks import TASKS
from pipelines.core.tasks.base import Task
from tests.conftest import PROJECT_ROOT

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
    assert not task_branches("task = task_for(spec)\nprint(spec.task.type)\n")


def runtime_imports(path: Path, module: str) -> set[str]:
    """The modules `module` imports when it runs (at top level or inside functions), without the imports that
    exist only for type checkers (`if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _attribute_path(node.test).endswith("TYPE_CHECKING"):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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
    return {name: {m for m in runtime_imports(path, name) if m in modules and m != name}
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
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


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
