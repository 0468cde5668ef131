"""Measure one artifact in a fresh process: latency, throughput, memory, and its test logits.

A fresh process per artifact (``python -m resnet18_dist.export.measure``), so that peak memory
is that artifact's alone and one runtime's thread pools or caches never help another. ONNX
Runtime rows never import torch. Every row runs with the same number of intra-op threads.

Each process is started before its artifact exists and loads its runtime while the parent
exports (``MeasuringProcess``); the rows are measured one after another.

Why a plain ``python -m`` and not multiprocessing's spawn: a spawned child first re-imports the
parent's ``__main__`` (launch/export.py, hence torch and the whole CLI), which cost every row
about 4 s on 2 cores and put torch's memory into the ONNX Runtime rows' peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet18_dist.checkout import pythonpath_with_checkout


def child_env() -> dict[str, str]:
    """The measuring child's environment: this checkout first on its path, as spawn would hand
    over the parent's sys.path."""
    return {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}


KINDS = (
    "torch_fp32",
    "torch_dynamic_int8",
    "onnx_fp32",
    "onnx_int8",
    "tensorrt",
    "executorch",
    "litert",
)


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


def _one_at_a_time(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """The mobile artifacts take one image (a phone classifies one at a time): a batch (the
    throughput row's 64, the test split's) is a loop over its images."""
    return lambda x: np.concatenate(
        [run(np.ascontiguousarray(x[i : i + 1])) for i in range(len(x))]
    )


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

    if kind == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

        def invoke(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"]).copy()

        return _one_at_a_time(invoke)

    import torch

    torch.set_num_threads(threads)
    if kind == "executorch":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        # XNNPACK's thread pool sizes itself to every core; torch.set_num_threads does not
        # reach it, and every row is measured with the same --threads.
        _unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(path).load_method("forward")
        return _one_at_a_time(lambda x: method.execute([torch.from_numpy(x)])[0].numpy())
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
    # Called after _import_runtime(kind): the baseline is the size with the runtime loaded.
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


def _import_runtime(kind: str) -> None:
    """The runtime first (and the modules this row's loading imports), so that "model MB" (peak
    minus the size after this) is the model's alone."""
    if kind.startswith("onnx"):
        import onnxruntime  # noqa: F401
    elif kind == "litert":
        import ai_edge_litert.interpreter  # noqa: F401
    elif kind == "executorch":
        import executorch.runtime  # noqa: F401
    elif kind == "tensorrt":
        import resnet18_dist.export.tensorrt
    else:
        import torch  # noqa: F401

        import resnet18_dist.models.model_file

        if kind == "torch_dynamic_int8":
            import resnet18_dist.export.quantize  # noqa: F401


READY = "ready"


def main(argv: list[str]) -> int:
    """The child: ``python -m resnet18_dist.export.measure KIND``. It loads its runtime, prints
    ``ready``, then waits for one request (a JSON line on stdin), measures, and writes the
    figures to the request's ``out`` (.json) and the logits next to it (.npy)."""
    kind = argv[0]
    # Only ``ready`` ever goes to the parent's pipe: anything printed from here on (a
    # sitecustomize, a library at import, a runtime's native log) goes to stderr, so a stray
    # line can neither be taken for the answer nor fill a pipe nobody reads.
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _import_runtime(kind)
    print(READY, file=ready, flush=True)
    ready.close()
    line = sys.stdin.readline()
    if not line:  # the parent went away (or gave up on this row) before asking
        return 3
    request = json.loads(line)
    out = Path(request.pop("out"))
    opts = MeasureOptions(**request.pop("opts"))
    result = _child(kind=kind, **request, opts=opts)
    np.save(out.with_suffix(".npy"), result.pop("logits"))
    out.write_text(json.dumps(result))
    return 0


class MeasuringProcess:
    """One artifact's measuring process, started before the artifact exists.

    Why started early: starting the interpreter and importing its runtime is most of a row's
    time on a small model (about 2 s each on 2 cores), and the parent's own work (preparing the
    test split, the ONNX export, quantization) leaves the other core idle meanwhile. The rows are
    still measured one at a time, once every process has loaded (``wait_ready``), so no
    measurement shares the CPU with another process's start-up; a waiting process is blocked on
    its stdin and costs nothing but its memory.
    """

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
        self._stderr = (self.dir / "stderr.txt").open("w+", errors="replace")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnet18_dist.export.measure", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            errors="replace",  # a runtime's log in another encoding is not our failure
            cwd=self.dir,  # `-m` puts the working directory first: never another checkout there
            env=child_env(),
        )
        self._ready = False

    def _failure(self, name: str) -> RuntimeError:
        if self.proc.poll() is None:  # still alive but not answering as agreed: never wait on it
            self.proc.kill()
        rc = self.proc.wait()
        if rc < 0:  # killed: the OOM killer's SIGKILL, most likely
            return RuntimeError(
                f"measuring {name}: its process was killed by {signal.Signals(-rc).name}"
            )
        self._stderr.seek(0)
        # The child's own last words: its exception (the traceback's last line).
        last = (self._stderr.read().strip().splitlines() or ["no output"])[-1]
        return RuntimeError(f"measuring {name} failed (exit code {rc}): {last}")

    def wait_ready(self, name: str, timeout_s: float = 600) -> None:
        if self._ready:
            return
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:  # a line printed before the child's own redirect (a sitecustomize) is skipped
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.close()
                raise RuntimeError(
                    f"measuring {name}: its runtime did not load in {timeout_s:.0f}s"
                )
            line = self.proc.stdout.readline()
            if not line:  # it exited while loading
                raise self._failure(name)
            if line.strip() == READY:
                break
        self._ready = True

    def measure(
        self,
        path: Path,
        model_pt: Path,
        perf_images: Path,
        test_images: Path,
        opts: MeasureOptions,
        timeout_s: float = 3600,
    ) -> dict[str, Any]:
        self.wait_ready(path.name, timeout_s)
        out = self.dir / "result.json"
        request = {
            "path": str(path),
            "model_pt": str(model_pt),
            "perf": str(perf_images),
            "data": str(test_images),
            "opts": asdict(opts),
            "out": str(out),
        }
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            raise self._failure(path.name) from None
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise RuntimeError(
                f"measuring {path.name} did not finish in {timeout_s:.0f}s"
            ) from None
        if rc != 0 or not out.is_file():
            raise self._failure(path.name)
        result = json.loads(out.read_text())
        result["logits"] = np.load(out.with_suffix(".npy"))
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self._stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def measuring_processes(kinds: list[str], workdir: Path) -> Iterator[dict[str, MeasuringProcess]]:
    """A started measuring process per kind; any left when the block ends is stopped."""
    procs: dict[str, MeasuringProcess] = {}
    try:
        for kind in kinds:
            procs[kind] = MeasuringProcess(kind, workdir)
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


def measure(
    kind: str,
    path: Path,
    model_pt: Path,
    perf_images: Path,
    test_images: Path,
    opts: MeasureOptions,
    timeout_s: float = 3600,
) -> dict[str, Any]:
    """Measure one artifact in a process of its own, started now."""
    with (
        tempfile.TemporaryDirectory(prefix="r18d-measure-") as tmp,
        measuring_processes([kind], Path(tmp)) as procs,
    ):
        return procs[kind].measure(path, model_pt, perf_images, test_images, opts, timeout_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
