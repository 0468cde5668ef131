"""``--compile``: torch.compile a module, and train eagerly where compiling is not possible.

torch.compile compiles lazily, on the first call: a missing C++ compiler (inductor's CPU
kernels), a GPU without Triton support or a platform Dynamo does not support only shows then.
``Compiled`` runs the compiled module, and if that first call fails while the eager module runs
the same input, warns once naming the cause and stays eager for the rest of the run. An input
that fails eagerly too is the caller's error and is raised as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class Compiled(nn.Module):
    """``module``, called through ``torch.compile(module)`` until that fails.

    The eager module is the only registered child, so ``train()``/``eval()``, ``parameters()``
    and ``state_dict()`` see the model itself (the compiled wrapper shares its tensors).
    """

    def __init__(self, module: nn.Module, what: str = "the model", **compile_kwargs: Any) -> None:
        super().__init__()
        self.eager = module
        self.what = what
        self.failed: str | None = None
        self.succeeded = False  # the first compiled call went through
        compiled: Any = None
        try:
            compiled = torch.compile(module, **compile_kwargs)
        except Exception as exc:  # e.g. Dynamo refusing this Python version
            self._give_up(exc)
        # Kept out of the module tree: its parameters are the eager module's.
        object.__setattr__(self, "_compiled", compiled)

    @property
    def active(self) -> bool:
        """Compiled and not (yet) fallen back to eager."""
        return self.failed is None

    def _give_up(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.failed = f"{type(exc).__name__}: {first}"[:300]
        log.warning(
            "--compile: torch.compile of %s is not available here (%s); continuing eagerly "
            "(CPU needs a working C++ compiler, GPUs a Triton-supported card)",
            self.what,
            self.failed,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        if self.succeeded:
            # Past the first call a failure (out of memory, a recompile for a new shape that
            # fails) is a real error of the run, not "compile unavailable": raised as it is.
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as exc:
            out = self.eager(*args, **kwargs)  # raises if the input itself is at fault
            self._give_up(exc)
            return out
        self.succeeded = True
        return out


def maybe_compile(module: nn.Module, enabled: bool, what: str = "the model") -> nn.Module:
    return Compiled(module, what) if enabled else module
