"""What the REST endpoint's routes take and answer, as pydantic models: FastAPI turns them into
the app's OpenAPI document (``/openapi.json``, browsable at ``/docs``). The routes build their
answers themselves (the hardening reads the raw body; see ``app.py``), so these models describe
them; a test checks real answers against the published schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}


class Prediction(BaseModel):
    label: str = Field(description="A class name of the model.")
    probability: float = Field(ge=0, le=1, description="Softmax probability of the class.")


class Identity(BaseModel):
    model: str = Field(description="The export directory's name.")
    artifact: str = Field(description="fp32 (model.onnx) or int8 (model.int8.onnx).")
    version: str = Field(description="The first 16 hex digits of the model file's sha256.")


class Classified(Identity):
    predictions: list[Prediction] = Field(description="The top_k classes, most probable first.")
    onnx_batch: int = Field(description="Images in the ONNX Runtime call that answered this one.")


class FileResult(BaseModel):
    file: str = Field(description="The form part's file name (or field name).")
    predictions: list[Prediction]
    onnx_batch: int


class BatchClassified(Identity):
    results: list[FileResult] = Field(description="One per image file, in the form's order.")


class ModelInfo(Identity):
    classes: list[str]
    input_size: int = Field(description="The model's input is input_size x input_size.")
    preprocess: str = Field(
        description="How an image is brought to that square: squash (resized whole) or photo "
        "(shorter side resized to eval_resize, then the centre crop)."
    )
    eval_resize: int = Field(description="photo: the shorter side before the centre crop.")
    mean: list[float]
    std: list[float]
    input_layout: str
    max_batch_size: int
    batch_wait_ms: float
    replica: dict[str, Any] = Field(description="The replica that answered: id and pid.")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    error: str = Field(description="A stable code, e.g. bad_image, body_too_large, unauthorized.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What was wrong, naming the option or limit at fault.")


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for error statuses, all with the JSON error body."""
    return {code: {"model": ErrorBody} for code in codes}


def image_request(multipart_field: str, many: bool) -> dict[str, Any]:
    """The request body of a classify route (``openapi_extra``): the route reads it itself."""
    part = {"type": "string", "format": "binary"}
    form = {
        "schema": {
            "type": "object",
            "properties": {multipart_field: {"type": "array", "items": part} if many else part},
        }
    }
    content = {"multipart/form-data": form}
    if not many:
        content = {"image/jpeg": IMAGE_BODY, "image/png": IMAGE_BODY, **content}
    top_k = {
        "name": "top_k",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "default": 5},
        "description": "How many classes to answer (at most the model's class count).",
    }
    return {"parameters": [top_k], "requestBody": {"required": True, "content": content}}
