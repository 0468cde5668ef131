r"""Load-test the REST endpoint on loopback: requests/s and p50/p99 latency at several client
concurrencies, with dynamic batching off and on, side by side in one run.

    python launch/train.py --num-workers 1 --image-size 32 --epochs 2 --name m32 \
        --wandb-mode disabled
    python launch/export.py --checkpoint runs/m32 --out exports/m32 --max-int8-drop 100
    python benchmarks/benchmark_serve.py --model exports/m32 --out serve_bench.md

For each mode it starts `launch/serve.py` (a private Ray, 127.0.0.1 only, one replica) and sends
real digit JPEGs to POST /v1/classify from an aiohttp client: a fixed number of requests per
concurrency level, each level cut off at a time limit (then reported as such), after a warm-up.
Batching off is `--max-batch-size 1`; on is `--max-batch-size B --batch-wait-ms W`. The mean
ONNX Runtime batch the answers report (`onnx_batch`) is shown too. To say where the time goes,
the same model is also timed in this process, without HTTP or Ray: one ONNX Runtime call of 1
image and of B images, on the replica's thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from resnet18_dist.options import absolute_path  # noqa: E402  (after the path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a private Ray, never someone else's
    with log.open("w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "launch" / "serve.py"),
                "--model",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 300
    while "Ctrl-C stops it." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_by_part(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the client), Serve's proxy,
    the replica, the rest of the server's private Ray (driver, GCS, raylet, controller...)
    and the whole machine (from /proc/stat, other users' processes included)."""
    import psutil

    parts = {"client": 0.0, "proxy": 0.0, "replica": 0.0, "other Ray": 0.0}
    me = psutil.Process().cpu_times()
    parts["client"] = me.user + me.system
    root = psutil.Process(server_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())
            t = proc.cpu_times()
        except psutil.Error:
            continue
        part = (
            "proxy"
            if "ProxyActor" in title
            else "replica"
            if "ServeReplica" in title
            else "other Ray"
        )
        parts[part] += t.user + t.system
    machine = psutil.cpu_times()
    parts["machine"] = machine.user + machine.system + machine.nice
    return parts


async def load(
    url: str, images: list[bytes], requests: int, concurrency: int, time_limit: float
) -> dict[str, float]:
    """``requests`` POSTs by ``concurrency`` workers, stopping early at ``time_limit``."""
    import aiohttp

    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    next_index = 0
    start = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, errors
        while next_index < requests and time.perf_counter() - start < time_limit:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            async with session.post(
                url + "/v1/classify?top_k=1",
                data=images[i % len(images)],
                headers={"Content-Type": "image/jpeg"},
            ) as r:
                body = await r.json(content_type=None)
            if r.status == 200:
                latencies.append(time.perf_counter() - t0)
                batches.append(body["onnx_batch"])
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=time_limit + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "done": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_batch": sum(batches) / max(1, len(batches)),
        "cut": float(len(latencies) + errors < requests),
    }


def ort_profile(model: str, int8: bool, threads: int, batch: int, images: list[bytes]) -> str:
    """One ONNX Runtime call of 1 image and of ``batch`` images in this process (no HTTP)."""
    from resnet18_dist.serve.classifier import OnnxClassifier, decode_image

    clf = OnnxClassifier.load(model, int8=int8, threads=threads)
    decoded = [decode_image(b, "bench") for b in images]
    out = []
    for n in (1, batch):
        group = [decoded[i % len(decoded)] for i in range(n)]
        clf.probabilities(group)  # warm-up
        reps = max(5, 200 // n)
        t0 = time.perf_counter()
        for _ in range(reps):
            clf.probabilities(group)
        ms = 1000 * (time.perf_counter() - t0) / reps
        out.append(f"batch {n}: {ms:.2f} ms per call, {ms / n:.2f} ms per image")
    return "; ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument(
        "--model", type=absolute_path, required=True, help="An export directory (launch/export.py)."
    )
    ap.add_argument("--int8", action="store_true", help="Serve model.int8.onnx.")
    ap.add_argument("--requests", type=int, default=400, help="Requests per concurrency level.")
    ap.add_argument("--concurrency", default="1,8,32", help="Client concurrency levels.")
    ap.add_argument("--time-limit", type=float, default=60.0, help="Seconds per level at most.")
    ap.add_argument("--max-batch-size", type=int, default=16, help="Batching on: batch size.")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0, help="Batching on: wait.")
    ap.add_argument(
        "--out", type=absolute_path, default="", help="Write the markdown result here too."
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model_file = Path(args.model) / ("model.int8.onnx" if args.int8 else "model.onnx")
    if not model_file.is_file():
        ap.error(f"--model: {model_file} does not exist")

    from resnet18_dist.data.digits import render_digits
    from resnet18_dist.machine import machine_description

    modes = {
        "off": ["--max-batch-size", "1"],
        "on": [
            "--max-batch-size",
            str(args.max_batch_size),
            "--batch-wait-ms",
            str(args.batch_wait_ms),
        ],
    }
    ongoing = str(max(levels) + 8)  # every client request reaches the replica: none queued
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="r18d-serve-bench-") as tmp:
        folder = render_digits(Path(tmp) / "digits")
        files = sorted(folder.glob("*/*.jpg"))[:200]
        images = [f.read_bytes() for f in files]
        for mode, flags in modes.items():
            extra = [*flags, "--max-ongoing-requests", ongoing, "--max-queued-requests", ongoing]
            if args.int8:
                extra.append("--int8")
            proc, url = start_server(args.model, Path(tmp) / f"serve-{mode}.log", extra)
            try:
                asyncio.run(load(url, images, 50, 8, 60))  # warm-up: connections, threads
                for c in levels:
                    before = cpu_by_part(proc.pid)
                    r = asyncio.run(load(url, images, args.requests, c, args.time_limit))
                    after = cpu_by_part(proc.pid)
                    r |= {
                        f"cpu {k}": 1000 * (after[k] - before[k]) / max(1, r["done"]) for k in after
                    }
                    results[mode, c] = r
                    print(
                        f"batching {mode:3s} concurrency {c:3d}: {r['rps']:7.1f} req/s, "
                        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, mean ONNX batch "
                        f"{r['mean_batch']:.1f}, {int(r['done'])} ok, {int(r['errors'])} errors"
                        + (" (time limit)" if r["cut"] else ""),
                        flush=True,
                    )
            finally:
                stop_server(proc)
        profile = ort_profile(args.model, args.int8, 1, args.max_batch_size, images)

    lines = [
        f"- machine: {machine_description()}",
        f"- model: `{model_file}` ({'int8' if args.int8 else 'fp32'}); one replica (1 CPU, "
        f"1 ONNX Runtime thread); {args.requests} requests per level, {args.time_limit:g} s limit",
        f"- batching on: `--max-batch-size {args.max_batch_size} --batch-wait-ms "
        f"{args.batch_wait_ms:g}`; off: `--max-batch-size 1`",
        f"- ONNX Runtime alone, in one process: {profile}",
        "",
        "| concurrency | off req/s | off p50 ms | off p99 ms | on req/s | on p50 ms | on p99 ms "
        "| on mean batch | on / off req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        off, on = results["off", c], results["on", c]
        lines.append(
            f"| {c} | {off['rps']:.1f} | {off['p50_ms']:.1f} | {off['p99_ms']:.1f} "
            f"| {on['rps']:.1f} | {on['p50_ms']:.1f} | {on['p99_ms']:.1f} "
            f"| {on['mean_batch']:.1f} | {on['rps'] / off['rps']:.2f}x |"
        )
    parts = ["client", "proxy", "replica", "other Ray", "machine"]
    lines += [
        "",
        "CPU time per answered request (ms; user + system), by process, at each level; "
        "`machine` is every process on the machine, other users' included:",
        "",
        "| batching | concurrency | " + " | ".join(parts) + " |",
        "|---|---|" + "---|" * len(parts),
    ]
    for (mode, c), r in results.items():
        cells = " | ".join(f"{r[f'cpu {k}']:.1f}" for k in parts)
        lines.append(f"| {mode} | {c} | {cells} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = sum(int(r["errors"]) for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
