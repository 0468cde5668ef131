"""Console logging for the package: one handler on the ``resnet18_dist`` logger.

Library code logs instead of printing: inside a Ray Train V2 worker ``print`` is patched to go
through the root logger *and* the wrapped stdout, so every printed line would show twice.
"""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno == logging.INFO else f"{record.levelname}: {msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (not the one at setup), so a command
    run twice in one process, as tests do, never writes to a closed stream."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Idempotent: messages of the package go to stderr once, whatever else is configured."""
    logger = logging.getLogger("resnet18_dist")
    logger.setLevel(level)
    if not any(getattr(h, "_resnet18_dist", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        handler._resnet18_dist = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
