"""The project's cache directory (the built-in dataset, shard verification stamps, checkpoints
fetched from object storage)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RESNET18_DIST_CACHE"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet18_dist"
