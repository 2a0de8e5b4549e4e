"""lab/'s modules import one another at the top only, and in one direction (issue 22: the
autoscaling <-> aws <-> topology <-> commands circle, dodged by imports inside functions, is
gone; shared names live in the leaf lab.constants)."""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "lab"


def _lab_imports(node: ast.AST) -> set[str]:
    found = set()
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "lab":
            found |= {a.name for a in node.names}
        elif node.module.startswith("lab."):
            found.add(node.module.removeprefix("lab."))
    elif isinstance(node, ast.Import):
        found |= {a.name.removeprefix("lab.") for a in node.names if a.name.startswith("lab.")}
    return found


def graph() -> dict[str, set[str]]:
    return {
        path.stem: set().union(*(_lab_imports(n) for n in ast.parse(path.read_text()).body))
        for path in LAB.glob("*.py")
    }


def test_no_lab_module_imports_another_inside_a_function():
    late = []
    for path in LAB.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if id(node) not in top and _lab_imports(node):
                late.append(f"{path.name}:{node.lineno}")
    assert late == []


def test_lab_modules_import_one_another_without_a_cycle():
    deps = graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for dep in deps.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in deps:
        visit(module, ())
    assert deps["constants"] <= {"ssm_runner"} and deps["package"] == set()
