from __future__ import annotations

import re

from resnet18_dist.cli import options_markdown

from .conftest import REPO


def test_readme_options_table_matches_the_code() -> None:
    readme = (REPO / "README.md").read_text()
    table = re.search(
        r"<!-- options-table:start -->\n(.*?)\n<!-- options-table:end -->", readme, re.S
    )
    assert table, "README lost its options table markers"
    assert table.group(1) == options_markdown(), (
        "regenerate with resnet18_dist.cli.options_markdown()"
    )


def test_readme_commands_point_at_files_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    for script in set(re.findall(r"python (launch/\w+\.py)", readme)):
        assert (REPO / script).is_file(), script
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()
