"""The one mark of an error a user can act on from its message alone.

Each domain's error (a checkpoint, a dataset, an export, a write, object storage, ...) keeps its
own class and base, and also derives from ``UserError``: the console entry prints such an error
as one ``error:`` line and exits 1 (``commands.run``), while anything else is a bug and keeps its
traceback behind ``--verbose``. Option errors are ``options.ConfigError`` (exit code 2).
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message names the file, object or value at fault; exit code 1."""
