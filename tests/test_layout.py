"""The package's shape: stages as sub-packages whose imports run one way (data -> models ->
features -> heads -> report -> jobs -> cli), no import circles, functions short enough to
name in one phrase."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "breakhis_tl"
# stage of each sub-package; top-level modules are jobs (6) except the shared base ones
STAGES = {"data": 1, "models": 2, "features": 3, "heads": 4, "report": 5}
BASE = {"breakhis_tl", "breakhis_tl.errors", "breakhis_tl.metrics"}
TOP = {"breakhis_tl.cli": 7, "breakhis_tl.__main__": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> int:
    if module in BASE:
        return 0
    parts = module.split(".")
    return STAGES.get(parts[1], TOP.get(module, 6))


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every package module this file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("breakhis_tl"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_imports_run_down_the_stages_only():
    up = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        for d in deps
        if stage(d) > stage(m) and not m.endswith("__init__") and d != "breakhis_tl"
    ]
    assert not up, "\n".join(up)


def test_no_import_circles():
    g = graph()
    g = {m: {d for d in deps if d != "breakhis_tl"} for m, deps in g.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_stages_are_sub_packages_that_say_what_they_hold():
    for name in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "Imports" in doc, name


def test_functions_are_short_with_few_parameters():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
                params = [p for p in params if p is not None and p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or len(params) > 8:
                    long.append(
                        f"{module_name(path)}.{node.name}: {lines} lines, {len(params)} parameters"
                    )
    assert not long, "\n".join(long)
