"""The package's floors, read from the source: a module imports only from its own floor or
lower ones, so the core (models, data, engine) never depends on exports, integrations, serving,
the sweep (the checkout's top-level ``tuning/``, imported as ``resnet18_dist.tuning``) or
commands. Imports inside functions count too: a
lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "resnet18_dist"
TUNING = REPO / "tuning"  # the sweep: above everything but the commands that run it

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
    "launching": 4,  # the Ray cluster and the preflight every training launcher shares
    "tuning": 4,  # tuning/ as resnet18_dist.tuning (Ray Tune): trains and exports below it
    "commands": 5,
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
        bad += _above(path, f"resnet18_dist/{rel}", own)
    for path in sorted(TUNING.rglob("*.py")):
        bad += _above(path, f"tuning/{path.relative_to(TUNING)}", FLOORS["tuning"])
    return bad


def _above(path: Path, name: str, own: int) -> list[str]:
    return [
        f"{name}:{lineno} imports {module} (floor {floor} > {own})"
        for lineno, module in _imports(path)
        if (floor := _floor_of_module(module)) is not None and floor > own
    ]


def test_no_module_imports_from_a_higher_floor() -> None:
    assert _violations() == []


def test_the_layering_check_sees_a_violation(tmp_path: Path, monkeypatch) -> None:
    """The checker itself: an engine module importing from export or from the sweep, and a
    sweep module importing from the commands, are reported."""
    fake = tmp_path / "resnet18_dist"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "bad.py").write_text(
        "def f():\n    from resnet18_dist.export.pipeline import ExportOptions\n"
    )
    (fake / "engine" / "sweeps.py").write_text("import resnet18_dist.tuning.sweep\n")
    (fake / "integrations").mkdir()
    (fake / "integrations" / "up.py").write_text(
        "from resnet18_dist.launching.preflight import preflight\n"
    )
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    (tuning / "bad.py").write_text("from resnet18_dist.commands.export import main\n")
    module = __import__(__name__, fromlist=["PACKAGE"])
    monkeypatch.setattr(module, "PACKAGE", fake)
    monkeypatch.setattr(module, "TUNING", tuning)
    assert _violations() == [
        "resnet18_dist/engine/bad.py:2 imports resnet18_dist.export.pipeline (floor 3 > 2)",
        "resnet18_dist/engine/sweeps.py:1 imports resnet18_dist.tuning.sweep (floor 4 > 2)",
        "resnet18_dist/integrations/up.py:1 imports resnet18_dist.launching.preflight "
        "(floor 4 > 3)",
        "tuning/bad.py:1 imports resnet18_dist.commands.export (floor 5 > 4)",
    ]


# The run directory's file names are written once, in resnet18_dist/run_files.py (issue 23): a
# name spelled out elsewhere is a second owner that drifts. Allowed elsewhere: the export
# directory's own report.json and the self-describing model.pt (model_meta, which run_files
# reuses), and benchmarks/gpu_check.py, which runs on a GPU machine before the package need be
# importable.
RUN_FILE_NAMES = {"config.yaml", "run_info.json", "metrics.jsonl", "report.json", "model.pt"}
RUN_FILE_OWNERS = {
    "resnet18_dist/run_files.py": RUN_FILE_NAMES,
    # The export's file names (an export holds a model.pt and a report.json of its own).
    "resnet18_dist/model_meta.py": {"model.pt", "report.json"},
    "benchmarks/gpu_check.py": {"report.json", "metrics.jsonl"},
}


def run_file_literals(root: Path) -> list[str]:
    """Every string constant that is exactly a run file's name, outside its owners."""
    found = []
    for top in ("resnet18_dist", "tuning", "launch", "benchmarks"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            allowed = RUN_FILE_OWNERS.get(rel, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Constant)
                    and node.value in RUN_FILE_NAMES
                    and node.value not in allowed
                ):
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
    return found


def test_run_file_names_are_written_once(tmp_path: Path) -> None:
    assert run_file_literals(REPO) == []
    # A literal planted in a copy of one module is reported, naming where.
    planted = tmp_path / "tuning"
    planted.mkdir()
    (planted / "x.py").write_text('from pathlib import Path\n\nP = Path("r") / "metrics.jsonl"\n')
    for top in ("resnet18_dist", "launch", "benchmarks"):
        (tmp_path / top).mkdir()
    assert run_file_literals(tmp_path) == ["tuning/x.py:3 'metrics.jsonl'"]


# ------------------------------------------------------------------------------ packaging
def test_the_install_names_every_package_and_puts_tuning_under_ours() -> None:
    """pyproject.toml lists every package (discovery cannot map tuning/ under ours): a new
    subpackage that is not listed would be missing from the wheel."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join((dotted, *p.parent.relative_to(root).parts))
        for root, dotted in ((PACKAGE, "resnet18_dist"), (TUNING, "resnet18_dist.tuning"))
        for p in root.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(setup["packages"]) == folders
    assert setup["package-dir"] == {"resnet18_dist.tuning": "tuning"}
    assert not any(p.split(".")[0] != "resnet18_dist" for p in setup["packages"])


def test_tuning_is_ours_installed_or_uploaded_and_never_a_top_level_module(
    tmp_path: Path,
) -> None:
    """Installed (this environment), `tuning` is not an importable top-level name; a checkout
    imported from PYTHONPATH without installing it (what `ray job submit --working-dir .`
    uploads) imports its own tuning/ as resnet18_dist.tuning."""
    import os
    import shutil
    import subprocess
    import sys

    probe = (
        "import importlib.util, resnet18_dist.tuning.space as s; "
        "print(importlib.util.find_spec('tuning') is None); print(s.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    top_level, space = installed.stdout.split()
    assert top_level == "True" and Path(space) == REPO / "tuning" / "space.py"

    upload = tmp_path / "upload"
    for top in ("resnet18_dist", "tuning"):
        shutil.copytree(REPO / top, upload / top, ignore=shutil.ignore_patterns("__pycache__"))
    uploaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(upload)},
        capture_output=True,
        text=True,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    assert Path(uploaded.stdout.split()[1]) == upload / "tuning" / "space.py", uploaded.stdout


def top_level_tuning_imports(root: Path) -> list[str]:
    """Imports of tuning/ by its folder name (`import tuning...`, `from tuning... import`): they
    work in a checkout (launch/ and pytest put its root on sys.path) and fail installed."""
    found = []
    for top in ("resnet18_dist", "tuning", "launch", "benchmarks", "tests"):
        for path in sorted((root / top).rglob("*.py")):
            for lineno, module in _imports(path):
                if module.split(".")[0] == "tuning":
                    found.append(f"{path.relative_to(root).as_posix()}:{lineno} imports {module}")
    return found


def test_nothing_imports_tuning_by_its_folder_name(tmp_path: Path) -> None:
    assert top_level_tuning_imports(REPO) == []
    for top in ("resnet18_dist", "tuning", "launch", "benchmarks", "tests"):
        (tmp_path / top).mkdir()
    (tmp_path / "launch" / "x.py").write_text("from tuning.space import SweepConfig\n")
    assert top_level_tuning_imports(tmp_path) == ["launch/x.py:1 imports tuning.space"]
