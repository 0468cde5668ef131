"""Classify images with an exported ONNX model: ONNX Runtime, PIL and numpy only (no torch).

Preprocessing reproduces the training evaluation transform from the model's own metadata:
RGB, its geometry (``preprocess``: the whole image resized to ``image_size``, or a photo's
shorter side to ``eval_resize`` and the centre crop; PIL bilinear, as torchvision resizes PIL
images; ``preprocessing.py``), scale to [0, 1], normalise with ``mean``/``std``. The REST
endpoint (``serve/app.py``) uses this class too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from resnet18_dist.errors import UserError
from resnet18_dist.imaging import BadImage, ImageTooLarge, decode_upright
from resnet18_dist.model_meta import MODEL_INT8_ONNX, MODEL_ONNX, ExportMeta
from resnet18_dist.preprocessing import eval_geometry


class PredictError(ValueError, UserError):
    """A model or an input that cannot be used; the message names the file."""


class ImageTooLargeError(PredictError):
    """An input image declaring more pixels than allowed (a decompression bomb, or a limit)."""


class DeviceError(PredictError):
    """The device asked for (--device) cannot run the model here."""


DEVICES = ("cpu", "cuda")


def providers_for(device: str) -> list[str]:
    """ONNX Runtime's execution providers for ``device``: CUDA first (CPU for any operator it
    does not take), when this ONNX Runtime has it (the onnxruntime-gpu build); else DeviceError."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(
            f"cuda: this ONNX Runtime has no CUDA provider (it has {', '.join(available)}); "
            "install onnxruntime-gpu on a machine with a CUDA GPU, or use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxClassifier:
    def __init__(self, session: object, meta: ExportMeta, path: Path) -> None:
        self.session = session
        self.meta = meta
        self.path = path
        self.mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)

    @classmethod
    def load(
        cls, model: str | Path, int8: bool = False, threads: int = 0, device: str = "cpu"
    ) -> OnnxClassifier:
        import onnxruntime as ort

        path = Path(model)
        if path.is_dir():
            path = path / (MODEL_INT8_ONNX if int8 else MODEL_ONNX)
        if not path.is_file():
            raise PredictError(f"{path}: no such model file")
        providers = providers_for(device)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), so, providers=providers)
            props = session.get_modelmeta().custom_metadata_map
            meta = ExportMeta.from_props(props)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise PredictError(f"{path}: not a resnet18-dist ONNX model ({exc})") from exc
        if session.get_providers()[0] != providers[0]:
            # ONNX Runtime falls back to the CPU by itself when CUDA cannot start (no GPU, no
            # matching CUDA libraries): asked for the GPU, that is an error, not a slow answer.
            raise DeviceError(
                f"cuda: ONNX Runtime could not start its CUDA provider here (it runs "
                f"{', '.join(session.get_providers())}); see its log above, or use --device cpu"
            )
        return cls(session, meta, path)

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        m = self.meta
        arrays = [
            np.asarray(
                eval_geometry(img.convert("RGB"), m.preprocess, m.image_size, m.eval_resize),
                dtype=np.float32,
            )
            for img in images
        ]
        x = np.stack(arrays).transpose(0, 3, 1, 2) / 255.0
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """Softmax probabilities, one row per image, from one ONNX Runtime call for the whole
        list (the REST endpoint's dynamic batches come through here)."""
        logits = self.session.run(None, {self.meta.input_name: self.preprocess(images)})[0]
        z = logits - logits.max(axis=1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable (class, probability) of one row of ``probabilities``."""
        order = np.argsort(-probs)[: min(k, probs.shape[0])]
        return [(self.meta.classes[j], float(probs[j])) for j in order]

    def predict_images(
        self, images: list[Image.Image], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        return [self.top_k(p, top_k) for p in self.probabilities(images)]

    def predict_bytes(
        self, data: bytes, name: str = "image", top_k: int = 5
    ) -> list[tuple[str, float]]:
        return self.predict_images([decode_image(data, name)], top_k)[0]

    def predict_file(self, path: str | Path, top_k: int = 5) -> list[tuple[str, float]]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PredictError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        return self.predict_bytes(data, str(path), top_k)


def decode_image(
    data: bytes, name: str, max_pixels: int | None = None, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Decode as training did (upright: EXIF orientation applied); errors name the file.
    ``formats`` (PIL format names) refuses any other kind of image."""
    try:
        return decode_upright(data, max_pixels, formats)
    except ImageTooLarge as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except BadImage as exc:
        reason = "empty file" if not data else str(exc)
        raise PredictError(f"{name}: {reason}") from exc
