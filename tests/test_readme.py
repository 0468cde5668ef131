from __future__ import annotations

import re

import pytest

from resnet18_dist.cli import options_markdown
from resnet18_dist.commands.benchmark import BenchmarkOptions
from resnet18_dist.commands.compare import CompareOptions
from resnet18_dist.commands.predict import PredictOptions
from resnet18_dist.config import TrainConfig
from resnet18_dist.data.prepare import PrepareOptions
from resnet18_dist.export.pipeline import ExportOptions
from resnet18_dist.serve.options import ServeOptions
from tuning.space import SweepOptions

from .conftest import REPO

TABLES = {
    "train": TrainConfig,
    "prepare": PrepareOptions,
    "export": ExportOptions,
    "predict": PredictOptions,
    "serve": ServeOptions,
    "compare": CompareOptions,
    "sweep": SweepOptions,
    "benchmark": BenchmarkOptions,
}


@pytest.mark.parametrize("command", list(TABLES))
def test_readme_options_tables_match_the_code(command: str) -> None:
    readme = (REPO / "README.md").read_text()
    table = re.search(
        rf"<!-- options:{command}:start -->\n(.*?)\n<!-- options:{command}:end -->", readme, re.S
    )
    assert table, f"README lost its {command} options table markers"
    assert table.group(1) == options_markdown(TABLES[command]), (
        f"regenerate with resnet18_dist.cli.options_markdown({TABLES[command].__name__})"
    )


def test_readme_commands_point_at_files_and_commands_that_exist() -> None:
    from resnet18_dist.commands import COMMANDS

    readme = (REPO / "README.md").read_text()
    scripts = set(re.findall(r"python (launch/\w+\.py)", readme))
    assert "launch/train.py" in scripts  # the pattern still finds the main job
    for script in scripts:
        assert (REPO / script).is_file(), script
    subcommands = set(re.findall(r"resnet18-dist ([a-z][a-z-]+)", readme))
    assert "train" in subcommands
    assert subcommands <= set(COMMANDS), subcommands - set(COMMANDS)
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()
