"""The REST endpoint on Ray Serve: one deployment whose replicas each hold an ONNX Runtime
session and answer HTTP through a Starlette app.

    POST /v1/classify         one JPEG/PNG (raw body, or one multipart file)  ?top_k=
    POST /v1/classify/batch   several images in one multipart request         ?top_k=
    GET  /v1/model            classes, input size, normalisation, artifact, replica
    GET  /healthz             liveness (no token needed)

Concurrent requests on a replica are gathered by ``@serve.batch`` into one ONNX Runtime call
(``OnnxClassifier.probabilities``: the same preprocessing as ``launch/predict.py``).
``build_app`` is the application builder that both ``launch/serve.py`` and a Serve config file
(``import_path: resnet18_dist.serve.app:build_app``) use.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations
# (`request: Request`) at run time, and the string annotations of a bound method are not
# resolved, so each route took `request` for a required query parameter (a 422 for every call).
import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from resnet18_dist.export.bucket import export_name
from resnet18_dist.options import ConfigError
from resnet18_dist.serve.classifier import (
    ImageTooLargeError,
    OnnxClassifier,
    PredictError,
    decode_image,
)
from resnet18_dist.serve.guard import ApiError, RequestGuard, check_bearer, error_response
from resnet18_dist.serve.options import ServeOptions, read_api_key
from resnet18_dist.serve.schema import (
    BatchClassified,
    Classified,
    Health,
    ModelInfo,
    errors,
    image_request,
)
from resnet18_dist.storage import is_remote

IMAGE_TYPES = ("image/jpeg", "image/png")
FORMATS = ("JPEG", "PNG")
# curl -F and most clients label a file part by its extension, or as octet-stream if unknown;
# the decoder (JPEG and PNG only) decides what the bytes are.
PART_TYPES = (*IMAGE_TYPES, "application/octet-stream")
ROUTES = ("/healthz", "/v1/model", "/v1/classify", "/v1/classify/batch")
LATENCY_BOUNDS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# ServeOptions that launch/serve.py gives to Ray Serve itself (serve.start), not to the app.
CLUSTER_OPTIONS = ("host", "port", "request_timeout_s", "address", "verbose")


class Metrics:
    """Ray Serve metrics (exported by Ray in Prometheus format with the deployment, replica
    and application as labels): ``ray_resnet18_serve_requests_total{route,status}``,
    ``ray_resnet18_serve_request_latency_ms``, ``ray_resnet18_serve_batch_size`` and
    ``ray_resnet18_serve_images_total``."""

    def __init__(self) -> None:
        self.requests = Counter(
            "resnet18_serve_requests",
            description="HTTP requests answered, by route and status code.",
            tag_keys=("route", "status"),
        )
        self.latency = Histogram(
            "resnet18_serve_request_latency_ms",
            description="Time from request start to the end of the response, in ms.",
            boundaries=LATENCY_BOUNDS_MS,
            tag_keys=("route",),
        )
        self.batch_size = Histogram(
            "resnet18_serve_batch_size",
            description="Images per ONNX Runtime call (dynamic batches).",
            boundaries=BATCH_BOUNDS,
        )
        # Ray exports a histogram's _sum from bucket midpoints, so the exact mean batch size is
        # this counter over resnet18_serve_batch_size's _count.
        self.images = Counter(
            "resnet18_serve_images", description="Images classified (every ONNX Runtime call)."
        )

    def record(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # unknown paths must not add label values
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds * 1000, tags={"route": route})


def file_version(path: Path) -> str:
    """The artifact's identity: the first 16 hex digits of its sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@serve.deployment
@serve.ingress()
class ClassifierDeployment:
    def __init__(self, options: dict[str, Any], pin: str | None = None) -> None:
        self.opts = ServeOptions.from_dict(options)
        self.token = read_api_key(self.opts.api_key_file) if self.opts.api_key_file else None
        # A bucket's export: fetched on this replica's node; the one the driver checked (pin).
        root = self.opts.local_model(pin)
        self.clf = OnnxClassifier.load(
            self.opts.model_file(root),
            int8=self.opts.int8,
            threads=self.opts.ort_threads(),
            device=self.opts.device,
        )
        self.version = file_version(self.opts.model_file(root))
        self.name = export_name(str(self.opts.model))
        self.metrics = Metrics()
        self.infer.set_max_batch_size(self.opts.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000)
        ctx = serve.get_replica_context()
        self.replica = {"id": ctx.replica_id.unique_id, "pid": os.getpid()}

    def __serve_build_asgi_app__(self) -> FastAPI:
        async def api_error(_: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, ApiError)
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            return error_response(exc.status, exc.code, exc.detail, **headers)

        async def http_error(_: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, HTTPException)
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
            return error_response(exc.status_code, code, str(exc.detail))

        async def server_error(_: Request, exc: Exception) -> JSONResponse:
            return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

        # FastAPI for its OpenAPI document (/openapi.json, /docs); the routes still read the
        # request themselves (the body cap, media types and pixel budget need the raw body),
        # so the schema models describe their answers rather than parse them.
        app = FastAPI(
            title="resnet18-dist classifier",
            version=self.version,
            description=(
                f"Image classification with the export {self.name!r} ({self.opts.artifact}). "
                "The application's errors are JSON: {error, status, detail}; Ray Serve's proxy "
                "answers 503 (back-pressure) and 408 (time limit) itself, in plain text. With "
                "--api-key-file, /v1/* routes need `Authorization: Bearer <token>`."
            ),
            redoc_url=None,
            middleware=[
                Middleware(
                    RequestGuard, max_body_bytes=self.opts.max_body_bytes, metrics=self.metrics
                )
            ],
            exception_handlers={
                ApiError: api_error,
                HTTPException: http_error,
                Exception: server_error,
            },
        )
        # Documents the bearer token; check_bearer in each route enforces it (or not, without
        # --api-key-file), with our JSON error instead of FastAPI's.
        bearer = [Depends(HTTPBearer(auto_error=False))]
        # HEAD as well: Starlette's own routes answered it for every GET, FastAPI's do not.
        app.add_api_route("/healthz", self.healthz, methods=["GET", "HEAD"], response_model=Health)
        app.add_api_route(
            "/v1/model",
            self.model_info,
            methods=["GET", "HEAD"],
            response_model=ModelInfo,
            responses=errors(401),
            dependencies=bearer,
            summary="The model: classes, input size, normalisation, batching",
        )
        app.add_api_route(
            "/v1/classify",
            self.classify,
            methods=["POST"],
            response_model=Classified,
            responses=errors(400, 401, 413, 415),
            dependencies=bearer,
            openapi_extra=image_request("image", many=False),
            summary="Classify one image (a JPEG or PNG body, or one file in a form)",
        )
        app.add_api_route(
            "/v1/classify/batch",
            self.classify_batch,
            methods=["POST"],
            response_model=BatchClassified,
            responses=errors(400, 401, 413, 415),
            dependencies=bearer,
            openapi_extra=image_request("images", many=True),
            summary="Classify up to --max-images image files of one multipart form",
        )
        return app

    # ------------------------------------------------------------------ routes
    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def model_info(self, request: Request) -> JSONResponse:
        check_bearer(request, self.token)
        meta = self.clf.meta
        return JSONResponse(
            {
                **self.identity(),
                "classes": meta.classes,
                "input_size": meta.image_size,
                "preprocess": meta.preprocess,
                "eval_resize": meta.eval_resize,
                "mean": list(meta.mean),
                "std": list(meta.std),
                "input_layout": meta.input_layout,
                "max_batch_size": self.opts.max_batch_size,
                "batch_wait_ms": self.opts.batch_wait_ms,
                "replica": self.replica,
            }
        )

    async def classify(self, request: Request) -> JSONResponse:
        check_bearer(request, self.token)
        top_k = self.top_k_param(request)
        kind = media_type(request)
        if kind in IMAGE_TYPES:
            data = await request.body()
            name = "request body"
        elif kind == "multipart/form-data":
            files = await self.form_files(
                request, limit=1, hint="(several images go to /v1/classify/batch)"
            )
            if not files:
                raise ApiError(400, "bad_request", "no image file in the form")
            name, data = files[0]
        else:
            raise self.unsupported(kind, (*IMAGE_TYPES, "multipart/form-data"))
        image = await asyncio.to_thread(self.decode, data, name)
        probs, batch = await self.infer(image)
        return JSONResponse(
            {**self.identity(), "predictions": self.answer(probs, top_k), "onnx_batch": batch}
        )

    async def classify_batch(self, request: Request) -> JSONResponse:
        check_bearer(request, self.token)
        top_k = self.top_k_param(request)
        kind = media_type(request)
        if kind != "multipart/form-data":
            raise self.unsupported(kind, ("multipart/form-data",))
        files = await self.form_files(request, limit=self.opts.max_images, hint="(--max-images)")
        if not files:
            raise ApiError(400, "bad_request", "no image file in the form")
        # --max-pixels bounds a request's decoded images together, not each one: what a
        # replica holds is then at most --max-ongoing-requests x --max-pixels x 4 bytes (Pillow
        # keeps RGB, RGBA and CMYK at 4 bytes a pixel; decode_image drops the metadata).
        images, budget = [], self.opts.max_pixels
        for name, data in files:
            image = await asyncio.to_thread(self.decode, data, name, budget)
            budget -= image.width * image.height
            images.append(image)
        # Each image joins the replica's dynamic batches like a request of its own.
        rows = await asyncio.gather(*(self.infer(img) for img in images))
        results = [
            {"file": name, "predictions": self.answer(p, top_k), "onnx_batch": batch}
            for (name, _), (p, batch) in zip(files, rows, strict=True)
        ]
        return JSONResponse({**self.identity(), "results": results})

    # ------------------------------------------------------------------ inference
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def infer(self, images: list[Any]) -> list[tuple[np.ndarray, int]]:
        """One ONNX Runtime call for every request gathered (in a thread: the event loop keeps
        accepting and decoding requests, which form the next batch, while it runs). Each
        answer carries the size of the call it came from (``onnx_batch`` in the JSON)."""
        self.metrics.batch_size.observe(len(images))
        self.metrics.images.inc(len(images))
        probs = await asyncio.to_thread(self.clf.probabilities, images)
        return [(row, len(images)) for row in probs]

    # ------------------------------------------------------------------ helpers
    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "artifact": self.opts.artifact, "version": self.version}

    def answer(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        return [{"label": c, "probability": p} for c, p in self.clf.top_k(probs, k)]

    def top_k_param(self, request: Request) -> int:
        raw = request.query_params.get("top_k", "5")
        n = len(self.clf.meta.classes)
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= n:  # not "²"
            raise ApiError(
                400, "bad_request", f"top_k must be an integer from 1 to {n} (got {raw!r})"
            )
        return int(raw)

    def unsupported(self, kind: str, accepted: tuple[str, ...]) -> ApiError:
        return ApiError(
            415,
            "unsupported_media_type",
            f"content type {kind or '(none)'!r} is not accepted; send {', '.join(accepted)}",
        )

    async def form_files(self, request: Request, limit: int, hint: str) -> list[tuple[str, bytes]]:
        """The form's file parts in order, as (file name, bytes); text fields are ignored."""
        try:
            form = await request.form(max_files=limit, max_fields=16)
        except HTTPException as exc:  # Starlette's parser refuses the extra file itself
            if "Too many files" not in str(exc.detail):
                raise
            raise ApiError(
                400, "too_many_files", f"more than {limit} image file(s) in one request {hint}"
            ) from exc
        out = []
        try:
            for field, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    continue
                name = value.filename or field
                kind = (value.content_type or "application/octet-stream").split(";")[0].lower()
                if kind not in PART_TYPES:
                    raise ApiError(
                        415,
                        "unsupported_media_type",
                        f"{name}: content type {kind!r} is not accepted; send "
                        f"{', '.join(PART_TYPES)}",
                    )
                out.append((name, await value.read()))
        finally:
            await form.close()
        return out

    def decode(self, data: bytes, name: str, budget: int | None = None) -> Any:
        if not data:
            raise ApiError(400, "empty_body", f"{name} is empty (0 bytes)")
        limit = self.opts.max_pixels if budget is None else budget
        try:
            return decode_image(data, name, max(limit, 1), FORMATS)
        except ImageTooLargeError as exc:
            where = "" if limit == self.opts.max_pixels else ", what is left of this request's"
            raise ApiError(413, "image_too_large", f"{exc} (--max-pixels{where})") from exc
        except PredictError as exc:
            raise ApiError(400, "bad_image", str(exc)) from exc


def deployment_options(opts: ServeOptions) -> dict[str, Any]:
    """Replica count or autoscaling, resources and back-pressure for ``Deployment.options``."""
    out: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": opts.cpus_per_replica,
            # Ray places a cuda replica on a node with a free GPU and sets its CUDA_VISIBLE_DEVICES.
            "num_gpus": 1 if opts.device == "cuda" else 0,
        },
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
    }
    if opts.autoscale is not None:
        low, high = opts.autoscale_range()
        out["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            # A full batch in flight on each replica before another is added.
            "target_ongoing_requests": opts.max_batch_size,
        }
    else:
        out["num_replicas"] = opts.replicas or 1
    return out


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder (``serve run resnet18_dist.serve.app:build_app model=DIR`` or a
    config file's ``import_path``): ``args`` are ServeOptions fields; bad ones raise naming the
    option, and a missing export directory is refused here, before any replica starts."""
    if not isinstance(args, ServeOptions):
        cluster_wide = sorted(set(args) & set(CLUSTER_OPTIONS))
        if cluster_wide:
            raise ConfigError(
                "args",
                f"{', '.join(cluster_wide)} are Serve's own settings: set them in the config "
                "file's http_options (host, port, request_timeout_s), not in the app's args",
            )
    opts = args if isinstance(args, ServeOptions) else ServeOptions.from_dict(dict(args), "args")
    pin = opts.pinned_export(opts.check_files())
    # Replicas load the model by absolute path (they do not share the caller's directory), or
    # fetch it from the bucket themselves.
    model = str(opts.model)
    values = {**opts.to_dict(), "model": model if is_remote(model) else str(Path(model).resolve())}
    if opts.api_key_file:
        values["api_key_file"] = str(Path(opts.api_key_file).resolve())
    return ClassifierDeployment.options(**deployment_options(opts)).bind(values, pin)
