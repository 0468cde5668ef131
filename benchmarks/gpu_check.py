"""The GPU check: one command that measures this project on a GPU machine and writes the figures.

    python benchmarks/gpu_check.py --out "$OUT"              # on the GPU machine
    python benchmarks/gpu_check.py --tiny --out /tmp/check   # the same steps on CPU, digits, tiny

Steps, each a subprocess whose output is kept in OUT/<step>.log (a failing step is recorded and
the others still run):

1. data: the 50,000 CIFAR-10 JPEGs of ../shared/data/cifar10-jpeg (or --data-dir, already
   prepared) prepared 6:2:2 into 30,000 / 10,000 / 10,000 (launch/prepare_data.py);
2. benchmark-224 and benchmark-32: launch/benchmark.py at 224 px (ImageNet stem; the CIFAR JPEGs
   upscaled, so decoding costs less than photos would) and at 32 px (CIFAR stem), compiled,
   bf16 + channels_last, DALI: compute-only, data-only and end-to-end rates;
3. train: launch/train.py --recipe cifar --compile with one Ray Train GPU worker and the DALI
   backend, test top-1 on the 10,000-image test split and the training time.

OUT/figures.json holds every figure and the acceptance checks of issue 14 (end to end >= 90% of
compute at 224 px, >= 40,000 images/s at 32 px, >= 92% test top-1 in <= 180 s of training);
OUT/summary.md and the last lines printed are a short table of them. --tiny runs the same steps
on the CPU with the built-in digits at toy sizes, which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The shared JPEGs: beside the checkout here; on the device machine, under a `shared/` in the
# checkout (what the device tool carries), or wherever --cifar-tar says.
CIFAR_TARS = [
    root / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz" for root in (REPO, REPO.parent)
]
BARS = {"e2e_over_compute_224": 0.90, "images_per_s_32": 40_000, "top1": 0.92, "train_s": 180}


def run_step(name: str, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run ``python ARGS`` from the repository, output to OUT/<name>.log."""
    log = out / f"{name}.log"
    cmd = [sys.executable, *args]
    start = time.perf_counter()
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    with log.open("w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - start
    print(f"[{name}] exit {rc} after {wall:.0f} s (log {log})", flush=True)
    return {"step": name, "rc": rc, "wall_s": round(wall, 1), "log": str(log)}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        info["torch"] = None
    for module in ("nvidia.dali", "ray"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[module] = getattr(mod, "__version__", "?")
        except ImportError:
            info[module] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        proc = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = proc.stdout.strip()
    return info


def prepare_cifar(
    out: Path, work: Path, timeout: float, archive: str | None
) -> tuple[Path | None, dict[str, Any]]:
    candidates = [Path(archive)] if archive else CIFAR_TARS
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = ", ".join(map(str, candidates))
        return None, {"step": "data", "rc": 2, "error": f"no CIFAR-10 archive at {where}"}
    src = work / "cifar-src"
    with tarfile.open(found) as tar:
        tar.extractall(src, filter="data")
    dest = work / "cifar10"
    args = ["launch/prepare_data.py", "--source", str(src / "train"), "--out", str(dest)]
    step = run_step("data", [*args, "--quiet"], out, timeout)
    return (dest if step["rc"] == 0 else None), step


def read_training(run_dir: Path) -> dict[str, Any] | None:
    """The run's figures; from metrics.jsonl alone when it was stopped before its report."""
    metrics = run_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.open()] if metrics.is_file() else []
    rates = sorted(e["train_images_per_s"] for e in epochs)
    report_file = run_dir / "report.json"
    if not report_file.is_file():
        if not epochs:
            return None
        return {
            "finished": False,
            "epochs_run": len(epochs),
            "best_val_top1": max(e.get("val_top1", 0.0) for e in epochs),
            "train_s": sum(e["train_time_s"] for e in epochs),
            "median_train_images_per_s": rates[len(rates) // 2],
        }
    report = json.loads(report_file.read_text())
    return {
        "test_top1": report["test_top1"],
        "best_val_top1": report["best_val_top1"],
        "epochs_run": report["epochs_run"],
        "fit_s": report["timings"].get("fit_s"),
        "train_s": sum(e["train_time_s"] for e in epochs),
        "wall_time_s": report["wall_time_s"],
        "median_train_images_per_s": rates[len(rates) // 2] if rates else None,
        "resolved": report.get("resolved"),
        "compile_fallback": report.get("compile_fallback"),
    }


def checks(figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_size = {r["size"]: r for b in figures["benchmarks"] for r in b.get("sizes", [])}
    if 224 in by_size:
        ratio = by_size[224]["end_to_end_over_compute"]
        out["e2e_over_compute_224"] = {"value": ratio, "bar": ">= 0.90", "met": ratio >= 0.90}
    if 32 in by_size:
        rate = by_size[32]["end_to_end_images_per_s"]
        out["images_per_s_32"] = {"value": rate, "bar": ">= 40000", "met": rate >= 40_000}
    t = figures.get("training")
    if t and t.get("finished") is False:
        out["recipe_finished"] = {"value": t["epochs_run"], "bar": "all epochs", "met": False}
    elif t:
        out["recipe_top1"] = {
            "value": t["test_top1"],
            "bar": ">= 0.92",
            "met": t["test_top1"] >= 0.92,
        }
        out["recipe_fit_s"] = {"value": t["fit_s"], "bar": "<= 180", "met": t["fit_s"] <= 180}
    return out


def summary(figures: dict[str, Any]) -> str:
    dev = figures["device"]
    lines = [
        "# GPU check",
        "",
        f"device: {dev.get('gpu') or 'no GPU (CPU)'}; torch {dev.get('torch')}, DALI "
        f"{dev.get('nvidia.dali')}, Ray {dev.get('ray')}; mode {figures['mode']}",
        "",
        "| size | stem | compute img/s | data img/s | end-to-end img/s | e2e/compute |",
        "|---|---|---|---|---|---|",
    ]
    for b in figures["benchmarks"]:
        for r in b.get("sizes", []):
            lines.append(
                f"| {r['size']} | {r['stem']} | {r['compute_images_per_s']:.0f} | "
                f"{r['data_images_per_s']:.0f} | {r['end_to_end_images_per_s']:.0f} | "
                f"{r['end_to_end_over_compute']:.3f} |"
            )
    t = figures.get("training")
    if t and t.get("finished") is False:
        lines += [
            "",
            f"training (--recipe cifar) stopped after {t['epochs_run']} epochs: best val top-1 "
            f"{t['best_val_top1']:.4f}, median {t['median_train_images_per_s']:.0f} images/s",
        ]
    elif t:
        lines += [
            "",
            f"training (--recipe cifar): test top-1 {t['test_top1']:.4f}, {t['epochs_run']} "
            f"epochs, fit {t['fit_s']:.0f} s (training steps {t['train_s']:.0f} s), median "
            f"{t['median_train_images_per_s']:.0f} images/s",
        ]
    lines += ["", "| check | value | bar | met |", "|---|---|---|---|"]
    for name, c in figures["checks"].items():
        lines.append(f"| {name} | {c['value']:.4g} | {c['bar']} | {c['met']} |")
    lines += ["", "steps: " + ", ".join(f"{s['step']} rc {s['rc']}" for s in figures["steps"])]
    return "\n".join(lines) + "\n"


def write_figures(out: Path, figures: dict[str, Any]) -> None:
    figures["checks"] = checks(figures)
    tmp = out / "figures.json.tmp"
    tmp.write_text(json.dumps(figures, indent=1) + "\n")
    tmp.replace(out / "figures.json")


def _absolute(path: str) -> str:
    # This script runs before the package is installed (on a bare GPU machine): no import.
    return os.path.abspath(os.path.expanduser(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--out", type=_absolute, default=os.environ.get("OUT", "gpu-check"), help="Output dir."
    )
    parser.add_argument("--tiny", action="store_true", help="CPU, digits, toy sizes.")
    parser.add_argument("--no-train", action="store_true", help="Skip the training run.")
    parser.add_argument("--no-benchmark", action="store_true", help="Skip the benchmarks.")
    parser.add_argument(
        "--data-dir", type=_absolute, help="A prepared dataset (default: CIFAR-10 from shared)."
    )
    parser.add_argument("--epochs", type=int, help="Training epochs (default: the recipe's).")
    parser.add_argument("--timeout", type=float, default=420, help="Seconds per step at most.")
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="Seconds for the whole check (0: no limit): "
        "each step gets at most what is left, so one device command is never cut short blind.",
    )
    parser.add_argument("--cifar-tar", help="The CIFAR-10 JPEG archive (train.tar.gz).")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget if args.budget else None

    def step_timeout() -> float:
        if deadline is None:
            return args.timeout
        return max(1.0, min(args.timeout, deadline - time.monotonic() - 15))  # 15 s to write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps: list[dict[str, Any]] = []
    figures: dict[str, Any] = {
        "mode": "tiny (CPU)" if args.tiny else "GPU",
        "device": device_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": steps,
        "benchmarks": [],
        "training": None,
    }
    if args.tiny:
        data_dir: str | Path | None = args.data_dir  # a path or a bucket URI, passed on as is
        device = ["--use-gpu", "off"]
        bench = [
            ("benchmark-16", ["--sizes", "16", "--batch-size", "8"]),
            ("benchmark-8", ["--sizes", "8", "--batch-size", "16"]),
        ]
        bench_common = ["--steps", "2", "--warmup", "1", *device]
    else:
        if args.data_dir:
            data_dir = args.data_dir
        else:
            data_dir, step = prepare_cifar(out, work, step_timeout(), args.cifar_tar)
            steps.append(step)
        device = ["--use-gpu", "on", "--data-backend", "dali", "--compile"]
        bench = [
            ("benchmark-224", ["--sizes", "224", "--batch-size", "256"]),
            ("benchmark-32", ["--sizes", "32", "--batch-size", "512"]),
        ]
        bench_common = ["--steps", "50", "--warmup", "10", *device]
    data_args = ["--data-dir", str(data_dir)] if data_dir else []
    if data_dir is not None or args.tiny:
        for name, sizes in [] if args.no_benchmark else bench:
            result = out / f"{name}.json"
            cmd = ["launch/benchmark.py", *sizes, *bench_common, *data_args, "--out", str(result)]
            steps.append(run_step(name, cmd, out, step_timeout()))
            if result.is_file():
                figures["benchmarks"].append(json.loads(result.read_text()))
            write_figures(out, figures)  # what is done survives a later step's kill
        if not args.no_train:
            train = ["launch/train.py", *data_args, "--recipe", "cifar", "--num-workers", "1"]
            # The run (checkpoints of 100+ MB) stays in the work directory: $OUT brings back a
            # few small files only. Its report and metrics are copied there.
            train += ["--output-dir", str(work / "runs"), "--name", "recipe", "--fresh"]
            train += ["--wandb-mode", "disabled", "--quiet"]
            if args.tiny:
                train += ["--use-gpu", "off", "--epochs", str(args.epochs or 1)]
                train += ["--batch-size", "64"]
            else:
                # One Ray worker gets most of the machine's CPUs: DALI's threads and the
                # loader's host work (the driver and Ray Train's controller need the rest).
                cpus = max(1, (os.cpu_count() or 2) // 2)
                train += [*device, "--cpus-per-worker", str(cpus)]
                if args.epochs:
                    train += ["--epochs", str(args.epochs)]
            steps.append(run_step("train", train, out, step_timeout()))
            run_dir = work / "runs" / "recipe"
            figures["training"] = read_training(run_dir)
            for name in ("report.json", "metrics.jsonl"):
                if (run_dir / name).is_file():
                    shutil.copy(run_dir / name, out / f"train-{name}")
    write_figures(out, figures)
    text = summary(figures)
    (out / "summary.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    print(text, flush=True)
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
