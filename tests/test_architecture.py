"""Import directions the layering relies on, read from the source (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gcsl"


def _imports(path: Path) -> set[str]:
    """Every gcsl module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gcsl"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gcsl"))
    return out


def test_generation_and_the_loader_import_no_training_module():
    files = [*(SRC / "generation").glob("*.py"), SRC / "models.py", SRC / "goal_embedding.py", SRC / "stages.py"]
    offending = {f.name: sorted(m for m in _imports(f) if m.startswith("gcsl.training")) for f in files}
    assert {k: v for k, v in offending.items() if v} == {}


def test_experiment_modules_import_one_way():
    order = ["layout", "plots", "report", "runner", "quickstart"]  # each may import only those before it
    for i, name in enumerate(order):
        deps = {m.rsplit(".", 1)[-1] for m in _imports(SRC / "experiments" / f"{name}.py")
                if m.startswith("gcsl.experiments.")}
        assert deps <= set(order[:i]), f"{name} imports {sorted(deps - set(order[:i]))}"


def test_tasks_do_not_import_the_evaluate_workflow():
    for f in (SRC / "tasks").rglob("*.py"):
        assert "gcsl.evaluation" not in _imports(f), f"{f.relative_to(SRC)} imports the evaluate workflow"
