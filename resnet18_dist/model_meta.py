"""The deployable model's description, shared by every artifact and by the clients (no torch).

``ExportMeta`` is written into ``model.pt``, into the ONNX models' ``metadata_props`` and into
``meta.json``, so a consumer of any one file knows the classes, the input size and the
normalisation without the training code or the dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

MODEL_PT = "model.pt"
MODEL_ONNX = "model.onnx"
MODEL_INT8_ONNX = "model.int8.onnx"
MODEL_DYNAMIC_PT = "model.dynamic_int8.pt"
MODEL_TRT = "model.trt.engine"
MODEL_PTE = "model.pte"  # ExecuTorch program (export --mobile)
MODEL_TFLITE = "model.tflite"  # LiteRT model (export --mobile)
META_JSON = "meta.json"
# An export's report, written last: its "files" hold every other file's sha256, which a copy of
# the export (one fetched from a bucket) is checked against.
REPORT_JSON = "report.json"
FORMAT = "resnet18-dist/export-v1"
SQUASH_LAYOUT = "NCHW float32 RGB, resize (bilinear) then (x/255 - mean) / std"
PHOTO_LAYOUT = (
    "NCHW float32 RGB, shorter side resized to {resize} (bilinear, longer side truncated), "
    "centre {size}x{size} crop (offsets rounded half to even), then (x/255 - mean) / std"
)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportMeta:
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_spec: dict[str, Any]
    source_checkpoint: str
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    # The model takes float32 NCHW, RGB, brought to image_size x image_size by ``preprocess``
    # (bilinear, as PIL and torchvision resize), scaled to [0, 1] and normalised with mean/std;
    # it returns logits. Exports from before ``preprocess`` was recorded squashed the image.
    input_layout: str = SQUASH_LAYOUT
    format: str = FORMAT
    preprocess: str = "squash"  # squash | photo (resnet18_dist/preprocessing.py)
    # photo: the shorter side before the centre crop; squash: image_size (also for exports
    # from before it was recorded, which read 0 here).
    eval_resize: int = 0

    def __post_init__(self) -> None:
        if not self.eval_resize:
            object.__setattr__(self, "eval_resize", self.image_size)

    @classmethod
    def describe(cls, *, preprocess: str, eval_resize: int, **fields: Any) -> ExportMeta:
        """A description whose ``input_layout`` spells out its geometry for other clients."""
        size = fields["image_size"]
        layout = (
            PHOTO_LAYOUT.format(resize=eval_resize, size=size)
            if preprocess == "photo"
            else SQUASH_LAYOUT
        )
        return cls(
            **fields,
            preprocess=preprocess,
            eval_resize=eval_resize if preprocess == "photo" else size,
            input_layout=layout,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_props(self) -> dict[str, str]:
        """ONNX metadata_props: string to string."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ExportMeta:
        fields = cls.__dataclass_fields__
        raw = {}
        for k, v in props.items():
            if k not in fields:
                continue
            raw[k] = v if fields[k].type in ("str", str) else json.loads(v)
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)
