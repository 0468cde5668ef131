"""Where this package's checkout is, for child processes that must import the same code."""

from __future__ import annotations

import os
from pathlib import Path

# The directory that holds resnet18_dist/ (a clone's root, or site-packages when installed).
ROOT = str(Path(__file__).resolve().parents[1])


def pythonpath_with_checkout() -> str:
    """PYTHONPATH with this checkout first: a Ray worker or a measuring child of an uninstalled
    clone (or of a `ray job submit --working-dir` upload) imports the code its parent runs."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join((ROOT, *rest))
