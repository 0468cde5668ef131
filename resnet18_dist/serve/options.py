"""The REST endpoint's options: one validated dataclass for ``launch/serve.py`` flags and for the
``args`` of a Serve config file (``cluster/serve.yaml``), so both are checked by the same rules.
No Ray import here: a bad flag is refused before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet18_dist.model_meta import MODEL_INT8_ONNX, MODEL_ONNX
from resnet18_dist.options import ConfigError, Options, check, opt

MIB = 1024 * 1024


@dataclass
class ServeOptions(Options):
    model: str | None = opt(
        None,
        "An export directory (from resnet18-dist export) holding model.onnx, or its URI on "
        "object storage (s3://, gs://: fetched once into the cache and checked against its "
        "report on every replica's node).",
        required=True,
        path=True,
    )
    int8: bool = opt(False, "Serve model.int8.onnx instead of model.onnx.")
    replicas: int | None = opt(
        None, "Fixed number of replicas (default 1; not with --autoscale).", ge=1
    )
    autoscale: str | None = opt(
        None,
        "MIN:MAX replicas, scaled by Ray Serve on ongoing requests (not with --replicas).",
        metavar="MIN:MAX",
    )
    cpus_per_replica: float = opt(1.0, "CPUs Ray reserves for each replica.", gt=0)
    device: str = opt(
        "cpu",
        "Run each replica's model on the CPU, or on a CUDA GPU (one GPU per replica; ONNX "
        "Runtime's CUDA provider: onnxruntime-gpu on the replicas' nodes).",
        choices=("cpu", "cuda"),
    )
    threads: int = opt(
        0, "ONNX Runtime intra-op threads per replica (0 = CPUs per replica, at least 1).", ge=0
    )
    max_batch_size: int = opt(
        16, "Largest dynamic batch (one ONNX Runtime call); 1 turns batching off.", ge=1, le=1024
    )
    batch_wait_ms: float = opt(
        2.0, "How long a batch waits for more requests before it runs (ms).", ge=0, le=1000
    )
    host: str = opt(
        "127.0.0.1", "Address the HTTP proxy binds to (0.0.0.0 exposes it to the network)."
    )
    port: int = opt(8000, "HTTP port.", ge=1, le=65535)
    api_key_file: str | None = opt(
        None,
        "File holding a bearer token: requests must send `Authorization: Bearer TOKEN`.",
        path=True,
    )
    max_body_bytes: int = opt(8 * MIB, "Largest request body in bytes (413 beyond).", ge=1)
    max_pixels: int = opt(
        16_777_216,
        "Most decoded pixels (width x height) in one request, all its images together (413 "
        "beyond). A replica holds at most --max-ongoing-requests x this x 4 bytes of decoded "
        "images (RGB, RGBA and CMYK take 4 bytes a pixel in Pillow), besides the bodies.",
        ge=1,
    )
    max_images: int = opt(64, "Most images in one /v1/classify/batch request.", ge=1)
    max_ongoing_requests: int = opt(
        64, "Requests one replica works on at once (>= --max-batch-size).", ge=1
    )
    max_queued_requests: int = opt(
        256, "Requests the proxy queues when every replica is full; 503 beyond.", ge=1
    )
    request_timeout_s: float = opt(30.0, "End-to-end time limit of a request (408 beyond).", gt=0)
    address: str | None = opt(
        None, "Ray cluster address. Default: RAY_ADDRESS, a running local cluster, or a new one."
    )
    verbose: bool = opt(False, "Ray Serve's INFO logs and per-request access log.")

    def validate(self) -> None:
        check(
            self.replicas is None or self.autoscale is None,
            "autoscale",
            "give --replicas or --autoscale, not both",
        )
        if self.autoscale is not None:
            self.autoscale_range()  # raises naming --autoscale
        check(
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            f"must be >= --max-batch-size ({self.max_batch_size}), or no batch can fill "
            f"(got {self.max_ongoing_requests})",
        )

    def autoscale_range(self) -> tuple[int, int]:
        text = self.autoscale or ""
        try:
            low, high = (int(x) for x in text.split(":"))
        except ValueError:
            raise ConfigError("--autoscale", f"expected MIN:MAX like 1:4 (got {text!r})") from None
        if not 0 <= low <= high or high < 1:
            raise ConfigError(
                "--autoscale", f"expected 0 <= MIN <= MAX and MAX >= 1 (got {text!r})"
            )
        return low, high

    @property
    def artifact(self) -> str:
        return "int8" if self.int8 else "fp32"

    def local_model(self, pin: str | None = None) -> Path:
        """The export directory on this machine: an export on object storage has its served
        ONNX file fetched into the cache and checked against its report (export/bucket.py;
        ``pin``: the report digest it must still have), a refusal naming the file."""
        from resnet18_dist.export.bucket import BucketExportError, local_export

        try:
            return local_export(str(self.model), [self.model_file(Path()).name], pin)
        except BucketExportError as exc:
            raise ConfigError("--model", str(exc)) from exc

    def model_file(self, root: Path | None = None) -> Path:
        """The served ONNX file under ``root`` (default: ``--model`` itself, a local export)."""
        root = Path(str(self.model)) if root is None else root
        return root / (MODEL_INT8_ONNX if self.int8 else MODEL_ONNX)

    def ort_threads(self) -> int:
        import math

        return self.threads or max(1, math.ceil(self.cpus_per_replica))

    def pinned_export(self, root: Path) -> str | None:
        """The digest that pins a bucket's export as checked in ``root`` (None for a local
        export): every replica then serves that export or refuses to start."""
        from resnet18_dist.export.bucket import report_digest
        from resnet18_dist.model_meta import REPORT_JSON
        from resnet18_dist.storage import is_remote

        if not is_remote(str(self.model)):
            return None
        return report_digest((root / REPORT_JSON).read_bytes())

    def check_files(self) -> Path:
        """Refuse a missing or incomplete export directory, or an unreadable key file, naming
        it (start-up errors, exit code 2, before Ray starts). Returns the local export
        directory (a bucket's export fetched and checked)."""
        root = self.local_model()
        if not root.is_dir():
            raise ConfigError("--model", f"{root}: no such export directory")
        if not self.model_file(root).is_file():
            raise ConfigError(
                "--model",
                f"{self.model}: incomplete export, {self.model_file(root).name} is missing "
                "(export it with launch/export.py)",
            )
        if self.api_key_file is not None:
            read_api_key(self.api_key_file)
        return root


def read_api_key(path: str) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("--api-key-file", f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(key) < 16:
        raise ConfigError(
            "--api-key-file", f"{path}: the token must be at least 16 characters (got {len(key)})"
        )
    return key
