"""Which ``--out`` directory a command may replace.

``prepare`` and ``export`` publish their output by renaming a staged directory over ``--out``
(``atomic.staged_directory``), which deletes whatever was there. So before any work they check
that ``--out`` is new, empty, or their own earlier output (told by its marker file, which holds
the output's format); anything else (a run directory, the working directory, raw images) is
refused with exit code 2 naming ``--out``, and nothing is touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from resnet18_dist.options import ConfigError

# (marker file name, the "format" value it holds, what such a directory is called)
Marker = tuple[str, str, str]


def holds_marker(directory: Path, marker: Marker) -> bool:
    """True when ``directory/<file>`` is JSON whose ``format`` is the marker's."""
    name, fmt, _ = marker
    try:
        raw = json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == fmt


def _within(path: Path, outer: Path) -> bool:
    return path == outer or outer in path.parents


def check_output_dir(
    out: str | os.PathLike[str],
    marker: Marker,
    inputs: Mapping[str, str | os.PathLike[str] | None],
) -> None:
    """Raise ``ConfigError("--out", ...)`` unless replacing ``out`` loses nothing but an output
    of the same kind: ``out`` may not be or contain the working directory or any of ``inputs``
    (option name -> local path; None and URIs are skipped), and if it exists it must be an
    empty directory or hold ``marker``."""
    # realpath: `--out link` must not pass for a new name while it points at the input.
    target = Path(os.path.realpath(out))
    shown = os.fspath(out)
    cwd = Path(os.path.realpath(os.getcwd()))
    if _within(cwd, target):
        where = "is" if cwd == target else "contains"
        raise ConfigError(
            "--out",
            f"{shown} {where} the current directory, which it would replace; "
            "choose a new directory",
        )
    for option, value in inputs.items():
        if value is None or "://" in os.fspath(value):
            continue
        path = Path(os.path.realpath(value))
        if _within(path, target):
            where = "is" if path == target else "contains"
            raise ConfigError(
                "--out", f"{shown} {where} {option} {os.fspath(value)}, which it would replace"
            )
    if not os.path.lexists(target):
        return
    name, _, kind = marker
    if not target.is_dir():
        raise ConfigError("--out", f"{shown} exists and is not a directory")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise ConfigError("--out", f"{shown}: cannot read ({exc.strerror or exc})") from exc
    if empty or holds_marker(target, marker):
        return
    raise ConfigError(
        "--out",
        f"{shown} exists and is not {kind} (no {name} of one); it would be replaced, so give "
        "a new or empty directory, or an earlier output of this command",
    )
