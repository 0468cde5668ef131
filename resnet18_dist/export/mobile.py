"""Mobile and edge artifacts (`export --mobile`): an ExecuTorch program with the XNNPACK delegate
(``model.pte``) and a LiteRT flatbuffer (``model.tflite``), converted from the same FP32 model
as the ONNX files and run by their own runtimes when the export measures them.

Both converters are optional (the ``mobile`` extra): their dependencies (JAX, transformers,
coremltools) are large and no training or serving path needs them. The preprocessing a phone
must apply is the export's ``meta.json`` (size, mean, std, classes), written beside them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from resnet18_dist.atomic import atomic_write_bytes
from resnet18_dist.model_meta import ExportMeta

# pip package -> the module it installs.
MOBILE_PACKAGES = {
    "executorch": "executorch",
    "litert-torch": "litert_torch",
    "ai-edge-litert": "ai_edge_litert",
}


def missing_mobile_packages() -> list[str]:
    """The mobile extra's packages that are not installed (none: --mobile can run)."""
    return [pkg for pkg, mod in MOBILE_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def export_executorch(model: nn.Module, meta: ExportMeta, path: Path) -> None:
    """torch.export at batch 1 (what a phone classifies), lowered to ExecuTorch with XNNPACK
    taking every operator it supports (for ResNet18 that is all of them). Not a dynamic batch:
    with one (1..64) ExecuTorch 1.5's memory plan bounded the input at 15 images."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.zeros(1, 3, meta.image_size, meta.image_size)
    program = torch.export.export(model.eval(), (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    atomic_write_bytes(path, lowered.to_executorch().buffer)


def export_litert(model: nn.Module, meta: ExportMeta, path: Path) -> None:
    """litert-torch's converter at batch 1 (what a phone classifies); float32 in and out."""
    import litert_torch

    example = torch.zeros(1, 3, meta.image_size, meta.image_size)
    edge = litert_torch.convert(model.eval(), (example,))
    # The converter writes the file itself: into a temporary name, renamed when whole.
    tmp = path.with_name(path.name + ".part")
    edge.export(str(tmp))
    tmp.replace(path)
