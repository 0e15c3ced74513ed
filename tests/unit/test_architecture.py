"""lisa_dist's import graph (read with ast, every import including those inside functions): no cycles, no import
from a lower layer to a higher one, and subpackages reached only through their `__init__` from outside."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lisa_dist"

# Lowest first; a unit may import only units of a lower layer (and itself).
LAYERS = [
    ["errors"],
    ["ds_config"],
    ["config"],
    ["teardown"],
    ["dist"],
    ["models"],
    ["method", "data"],
    ["backends"],
    ["run"],
    ["tools", "integrations"],
    ["cli"],
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
SUBPACKAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def unit_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported lisa_dist module, line) for every import in the file; `from P import name` counts as an import of
    P.name when that is a module (a submodule of a package), else of P."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("lisa_dist")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lisa_dist"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
    return found


def upward_imports(modules: dict[str, Path]) -> list[str]:
    wrong = []
    for module, path in modules.items():
        for target, line in imports_of(path):
            a, b = unit_of(module), unit_of(target)
            if module != "lisa_dist" and a != b and RANK[b] >= RANK[a]:
                wrong.append(f"{module}:{line} imports {target} ({b}: layer {RANK[b]}, not below {a}: {RANK[a]})")
    return wrong


def inner_imports(modules: dict[str, Path]) -> list[str]:
    wrong = []
    for module, path in modules.items():
        for target, line in imports_of(path):
            unit = unit_of(target)
            inner = unit in SUBPACKAGES and target.count(".") >= 2
            if inner and unit_of(module) != unit and target.split(".")[2] not in _public_submodules(unit):
                wrong.append(f"{module}:{line} imports {target}: use lisa_dist.{unit}")
    return wrong


def _public_submodules(unit: str) -> set[str]:
    """Submodules a package's __init__ exports as modules (lisa_dist.run's checkpoint and outputs)."""
    init = ast.parse((PACKAGE / unit / "__init__.py").read_text())
    exported = next(
        (
            n.value
            for n in init.body
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
        ),
        None,
    )
    names = {e.value for e in exported.elts} if exported is not None else set()
    return {n for n in names if f"lisa_dist.{unit}.{n}" in MODULES}


def cycle(modules: dict[str, Path]) -> list[str] | None:
    graph = {m: sorted({t for t, _ in imports_of(p) if t in modules and t != m}) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    return next((found for m in sorted(graph) if m not in state and (found := visit(m))), None)


def test_every_module_belongs_to_a_layer():
    units = {unit_of(m) for m in MODULES if m != "lisa_dist"}
    assert units <= set(RANK), f"modules outside the layers: {sorted(units - set(RANK))}"


def test_imports_go_down_the_layers_only():
    assert not upward_imports(MODULES), "\n".join(upward_imports(MODULES))


def test_subpackages_are_reached_through_their_init():
    assert not inner_imports(MODULES), "\n".join(inner_imports(MODULES))


def test_no_import_cycles():
    assert cycle(MODULES) is None, " -> ".join(cycle(MODULES))


def test_the_checks_see_violations(tmp_path):
    up, inner = tmp_path / "up.py", tmp_path / "inner.py"
    up.write_text("def f():\n    from lisa_dist.run import train\n")
    inner.write_text("from lisa_dist.models.weights import allocate\n")
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import lisa_dist.tools.memory\n")
    b.write_text("from lisa_dist.tools.comm import count_collectives\n")
    assert upward_imports({"lisa_dist.errors": up}) == [
        "lisa_dist.errors:2 imports lisa_dist.run (run: layer 8, not below errors: 0)"
    ]
    assert inner_imports({"lisa_dist.cli": inner}) == [
        "lisa_dist.cli:1 imports lisa_dist.models.weights: use lisa_dist.models"
    ]
    assert cycle({"lisa_dist.tools.comm": a, "lisa_dist.tools.memory": b}) == [
        "lisa_dist.tools.comm",
        "lisa_dist.tools.memory",
        "lisa_dist.tools.comm",
    ]
