"""Measure one artifact in a fresh process: latency, throughput, memory, and its test logits.

A fresh process per artifact (``python -m resnet18_dist.export.measure``), so that peak memory
is that artifact's alone and one runtime's thread pools or caches never help another. ONNX
Runtime rows never import torch. Every row runs with the same number of intra-op threads.

Why a plain ``python -m`` and not multiprocessing's spawn: a spawned child first re-imports the
parent's ``__main__`` (launch/export.py, hence torch and the whole CLI), which cost every row
about 4 s on 2 cores and put torch's memory into the ONNX Runtime rows' peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet18_dist.checkout import pythonpath_with_checkout


def child_env() -> dict[str, str]:
    """The measuring child's environment: this checkout first on its path, as spawn would hand
    over the parent's sys.path."""
    return {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}


KINDS = ("torch_fp32", "torch_dynamic_int8", "onnx_fp32", "onnx_int8", "tensorrt")


@dataclass(frozen=True)
class MeasureOptions:
    threads: int
    latency_iters: int = 200
    throughput_seconds: float = 3.0
    throughput_batch: int = 64
    eval_batch: int = 256


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: this process image's peak RSS. (getrusage's ru_maxrss survives exec on Linux,
    so a child started by exec would report its parent's peak.)"""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runner(
    kind: str, path: Path, model_pt: Path, threads: int
) -> Callable[[np.ndarray], np.ndarray]:
    if kind in ("onnx_fp32", "onnx_int8"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    import torch

    torch.set_num_threads(threads)
    if kind == "tensorrt":
        from resnet18_dist.export.tensorrt import engine_runner

        return engine_runner(path)
    from resnet18_dist.models.model_file import load_model_pt

    model, _ = load_model_pt(model_pt)
    if kind == "torch_dynamic_int8":
        from resnet18_dist.export.quantize import quantize_dynamic_torch

        model = quantize_dynamic_torch(model)
        model.load_state_dict(torch.load(path, weights_only=True))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.require(x, requirements="CW"))).float().numpy()

    return run


def _child(
    kind: str, path: str, model_pt: str, perf: str, data: str, opts: MeasureOptions
) -> dict[str, Any]:
    # The runtime first (and the modules this row's loading imports), so that "model MB" (peak
    # minus this baseline) is the model's alone.
    if kind.startswith("onnx"):
        import onnxruntime  # noqa: F401
    elif kind == "tensorrt":
        import resnet18_dist.export.tensorrt
    else:
        import torch  # noqa: F401

        import resnet18_dist.models.model_file

        if kind == "torch_dynamic_int8":
            import resnet18_dist.export.quantize  # noqa: F401
    baseline = _rss_mb()
    run = _runner(kind, Path(path), Path(model_pt), opts.threads)
    images = np.load(perf)
    one = np.ascontiguousarray(images[:1])
    for _ in range(10):
        run(one)
    lat = []
    for _ in range(opts.latency_iters):
        t = time.perf_counter()
        run(one)
        lat.append(time.perf_counter() - t)
    batch = np.ascontiguousarray(np.resize(images, (opts.throughput_batch, *images.shape[1:])))
    run(batch)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < opts.throughput_seconds:
        run(batch)
        n += 1
    throughput = n * len(batch) / (time.perf_counter() - start)
    peak = _peak_rss_mb()
    test = np.load(data, mmap_mode="r")
    logits = np.concatenate(
        [
            run(np.ascontiguousarray(test[i : i + opts.eval_batch]))
            for i in range(0, len(test), opts.eval_batch)
        ]
    )
    return {
        "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "latency_p95_ms": float(np.percentile(lat, 95) * 1e3),
        "latency_runs": len(lat),
        "throughput_batch": len(batch),
        "throughput_images_per_s": throughput,
        "peak_rss_mb": peak,
        "model_memory_mb": peak - baseline,
        "logits": logits.astype(np.float32),
    }


def main(argv: list[str]) -> int:
    """The child: ``python -m resnet18_dist.export.measure REQUEST.json``; writes the figures
    to ``REQUEST.json``'s ``out`` (.json) and the logits next to it (.npy)."""
    request = json.loads(Path(argv[0]).read_text())
    out = Path(request.pop("out"))
    opts = MeasureOptions(**request.pop("opts"))
    result = _child(**request, opts=opts)
    np.save(out.with_suffix(".npy"), result.pop("logits"))
    out.write_text(json.dumps(result))
    return 0


def measure(
    kind: str,
    path: Path,
    model_pt: Path,
    perf_images: Path,
    test_images: Path,
    opts: MeasureOptions,
    timeout_s: float = 3600,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="r18d-measure-") as tmp:
        out = Path(tmp) / "result.json"
        request = Path(tmp) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "kind": kind,
                    "path": str(path),
                    "model_pt": str(model_pt),
                    "perf": str(perf_images),
                    "data": str(test_images),
                    "opts": asdict(opts),
                    "out": str(out),
                }
            )
        )
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "resnet18_dist.export.measure", str(request)],
                capture_output=True,
                text=True,
                errors="replace",  # a runtime's log in another encoding is not our failure
                timeout=timeout_s,
                cwd=tmp,  # `-m` puts the working directory first: never another checkout there
                env=child_env(),
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"measuring {path.name} did not finish in {timeout_s:.0f}s"
            ) from None
        if proc.returncode < 0:  # killed: the OOM killer's SIGKILL, most likely
            name = signal.Signals(-proc.returncode).name
            raise RuntimeError(f"measuring {path.name}: its process was killed by {name}")
        if proc.returncode != 0 or not out.is_file():
            # The child's own last words: its exception (the traceback's last line).
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(
                f"measuring {path.name} failed (exit code {proc.returncode}): {last}"
            )
        result = json.loads(out.read_text())
        result["logits"] = np.load(out.with_suffix(".npy"))
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
