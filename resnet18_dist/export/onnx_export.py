"""FP32 ONNX export (torch.onnx, dynamic batch) with the model's description in its metadata."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from resnet18_dist.atomic import atomic_write
from resnet18_dist.model_meta import INPUT_NAME, OUTPUT_NAME, ExportMeta

log = logging.getLogger(__name__)
OPSET = 18


def set_metadata(model: onnx.ModelProto, meta: ExportMeta) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_props())


def read_metadata(path: str | Path) -> ExportMeta:
    model = onnx.load(str(path), load_external_data=False)
    return ExportMeta.from_props({p.key: p.value for p in model.metadata_props})


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    atomic_write(path, lambda fh: fh.write(model.SerializeToString()))


def export_onnx(model: nn.Module, meta: ExportMeta, path: Path) -> None:
    """Export with a dynamic batch dimension, attach metadata, run the full ONNX checker."""
    example = torch.zeros(2, 3, meta.image_size, meta.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            model.eval(),
            (example,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,  # one self-contained file (ResNet18 is far below 2 GB)
            verbose=False,
        )
        proto = onnx.load(str(raw))
    set_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    save_onnx(proto, path)
