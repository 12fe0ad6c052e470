"""The package's import layers: nothing imports upward, the library never imports the lab, packages form no cycle.

Every ``import`` statement counts, including those inside functions (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmalign

SRC = Path(mmalign.__file__).parent

# Top-level module or package → layer; a module may import its own layer and those below.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "types": 0, "cachedir": 0, "limits": 0, "userfn": 0,
    "config": 1, "stats": 1, "losses": 1, "reward_losses": 1, "rl_losses": 1, "logprobs": 1,
    "models": 2,
    "data": 3, "runtime": 3,
    "forward": 4, "reward": 4, "generation": 4, "eval": 4, "judges": 4,
    "recipes": 5,
    "lab": 6,
    "cli": 7, "__main__": 7,
}  # fmt: skip


def _unit(dotted: str) -> str:
    """``mmalign.data.loaders`` → ``data``; ``mmalign`` → ``__init__``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """The ``mmalign`` modules that the source of module ``name`` imports, relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mmalign")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "mmalign":
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names if module == "mmalign")
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _graph()}
    assert units <= set(LAYERS), f"modules without a layer: {sorted(units - set(LAYERS))}"


def test_no_import_runs_up_the_layers() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if LAYERS[_unit(target)] > LAYERS[_unit(module)]
    ]
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_the_lab() -> None:
    into_lab = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _unit(target) == "lab" and _unit(module) not in ("lab", "cli")
    ]
    assert not into_lab, "\n".join(into_lab)


def test_packages_form_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        edges.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        if state.get(unit) == 1:
            raise AssertionError("import cycle: " + " → ".join([*path, unit]))
        if state.get(unit) == 2:
            return
        state[unit] = 1
        for nxt in sorted(edges.get(unit, ())):
            visit(nxt, [*path, unit])
        state[unit] = 2

    for unit in sorted(edges):
        visit(unit, [])


def test_the_checker_sees_deferred_and_relative_imports() -> None:
    """The rules are not vacuous: imports inside functions and relative imports are found and resolved."""
    source = "\n".join(
        [
            "import os",
            "def f():",
            "    from mmalign.recipes import sft",
            "    from ..lab import world",
            "    import mmalign.cli",
        ]
    )
    found = imports_of(source, "mmalign.data.x", is_package=False)
    assert found == {"mmalign.recipes", "mmalign.lab", "mmalign.cli"}
    assert {_unit(t) for t in found} == {"recipes", "lab", "cli"}
    assert all(LAYERS[_unit(t)] > LAYERS["data"] for t in found)
