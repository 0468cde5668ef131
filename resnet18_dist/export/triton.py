"""A Triton Inference Server model repository for the exported FP32 ONNX model.

``triton/<name>/1/model.onnx`` with ``triton/<name>/config.pbtxt`` (the ONNX Runtime backend,
the model's input and output, a maximum batch size and dynamic batching) and
``triton/<name>/labels.txt`` (the class names, so Triton's classification extension answers
with labels). The preprocessing the model expects is recorded as the config's ``parameters``,
as it is in the ONNX file's own metadata. Triton itself is not run here (no Triton server is
available to the tests); the file is checked against Triton's own protobuf schema.

The config is written as protobuf text by hand rather than through Triton's generated classes,
so exporting needs no ``tritonclient`` (its gRPC extra pins a protobuf major that Ray's
dependencies do not accept).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from resnet18_dist.model_meta import ExportMeta

TRITON_DIR = "triton"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
VERSION = "1"  # Triton serves the highest numbered version directory
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _text(value: str) -> str:
    """A protobuf text-format string literal."""
    # JSON's escapes are valid in protobuf text format; non-ASCII stays UTF-8 (a \uXXXX
    # surrogate pair for a character beyond the BMP is not).
    return json.dumps(value, ensure_ascii=False)


def render_config(meta: ExportMeta, name: str, max_batch_size: int, queue_delay_us: int) -> str:
    """The ``config.pbtxt`` of the ONNX model described by ``meta``."""
    size = meta.image_size
    parameters = {
        "image_size": str(size),
        "preprocess": meta.preprocess,
        "eval_resize": str(meta.eval_resize),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "input_layout": meta.input_layout,
        "classes": json.dumps(meta.classes),
    }
    lines = [
        f"name: {_text(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_text(meta.input_name)}",
        "    data_type: TYPE_FP32",
        "    format: FORMAT_NCHW",
        f"    dims: [ 3, {size}, {size} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_text(meta.output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {len(meta.classes)} ]",
        f"    label_filename: {_text(LABELS_FILE)}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
    ]
    for key, value in parameters.items():
        lines.append(
            f"parameters {{ key: {_text(key)} value: {{ string_value: {_text(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


def write_model_repository(
    onnx_file: Path,
    meta: ExportMeta,
    repository: Path,
    name: str,
    max_batch_size: int,
    queue_delay_us: int = 100,
) -> Path:
    """Write ``repository/name/`` (a new directory inside the export's staging directory, which
    is published as a whole) and return it."""
    model_dir = repository / name
    (model_dir / VERSION).mkdir(parents=True)
    try:  # the same file as the export's model.onnx: a hard link where the file system allows
        os.link(onnx_file, model_dir / VERSION / "model.onnx")
    except OSError:
        shutil.copyfile(onnx_file, model_dir / VERSION / "model.onnx")
    (model_dir / LABELS_FILE).write_text("\n".join(meta.classes) + "\n", encoding="utf-8")
    config = render_config(meta, name, max_batch_size, queue_delay_us)
    (model_dir / CONFIG_FILE).write_text(config, encoding="utf-8")
    return model_dir
