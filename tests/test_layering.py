"""The package's floors, read from the source: a module imports only from its own floor or
lower ones, so the core (models, data, engine) never depends on exports, integrations, serving
or commands. Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "resnet18_dist"

# Lower number = lower floor. Top-level modules (options, atomic, config, checkpoint_file...)
# are the ground floor that everything may use.
FLOORS = {
    "": 0,
    "models": 1,
    "data": 1,
    "engine": 2,
    "export": 3,
    "integrations": 3,
    "serve": 3,
    "commands": 4,
}


def _floor_of_module(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "resnet18_dist":
        return None
    if len(parts) >= 2 and parts[1] in FLOORS:
        return FLOORS[parts[1]]
    return FLOORS[""]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # `from resnet18_dist import export` imports a package too
            if node.module == "resnet18_dist":
                out += [(node.lineno, f"resnet18_dist.{a.name}") for a in node.names]
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = FLOORS[rel.parts[0]] if len(rel.parts) > 1 else FLOORS[""]
        if rel.name == "__main__.py":  # `python -m resnet18_dist` is the console command
            own = FLOORS["commands"]
        for lineno, module in _imports(path):
            floor = _floor_of_module(module)
            if floor is not None and floor > own:
                bad.append(f"resnet18_dist/{rel}:{lineno} imports {module} (floor {floor} > {own})")
    return bad


def test_no_module_imports_from_a_higher_floor() -> None:
    assert _violations() == []


def test_the_layering_check_sees_a_violation(tmp_path: Path, monkeypatch) -> None:
    """The checker itself: an engine module importing from export is reported."""
    fake = tmp_path / "resnet18_dist"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "bad.py").write_text(
        "def f():\n    from resnet18_dist.export.pipeline import ExportOptions\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert _violations() == [
        "resnet18_dist/engine/bad.py:2 imports resnet18_dist.export.pipeline (floor 3 > 2)"
    ]
