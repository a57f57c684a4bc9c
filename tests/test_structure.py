"""The layout DESIGN.md promises: no import cycle among lab's modules (imports inside
functions count too), and no private name imported from another lab module."""

import ast
from pathlib import Path

import lab

ROOT = Path(lab.__file__).parent


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("lab", *path.relative_to(ROOT).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text())
    return found


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of a lab module in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in known else (node.module, alias.name))
    return found


def test_no_import_cycles():
    trees = modules()
    edges = {
        name: {target for target, _ in imports(tree, set(trees)) if target not in (name, "lab")}
        for name, tree in trees.items()
    }

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cyclic = sorted(name for name in edges if name in reachable(name))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_no_private_name_crosses_a_module():
    trees = modules()
    crossing = [
        f"{name} imports {target}.{imported}"
        for name, tree in trees.items()
        for target, imported in imports(tree, set(trees))
        if imported is not None and imported.startswith("_") and target != name
    ]
    assert not crossing, crossing
