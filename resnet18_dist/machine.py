"""A one-line description of the machine, printed and stored with every measured result."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: int | None = None) -> str:
    import torch

    parts = [cpu_model(), f"{os.cpu_count()} logical CPUs"]
    if threads is not None:
        parts.append(f"{threads} intra-op thread(s) for every measured row")
    parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    versions = f"torch {torch.__version__}"
    try:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        pass
    parts.append(f"{versions}, Python {platform.python_version()}")
    return "; ".join(parts)
