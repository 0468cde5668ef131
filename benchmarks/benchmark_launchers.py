"""Benchmark the two launchers on the same data and settings, alternating, and split each run's
wall time into phases: Ray Train (`launch/train.py`) against accelerate
(`launch/train_accelerate.py`), and optionally the Ray path of another checkout (the commit
before a change) side by side in the same run.

    python benchmarks/benchmark_launchers.py                       # digits, 15 epochs, 2 rounds
    python benchmarks/benchmark_launchers.py --baseline-repo ../prev --rounds 3

Every run: the digits default (or --data-dir), torchvision backend, 0 loader workers, batch 64,
early stopping off, W&B disabled, progress bars off. The Ray path gets --cpus-per-worker equal to
the cores accelerate's single process uses, so both train with the same threads.

Phases of a run (from its own report.json and metrics.jsonl, and the process's wall time):
start-up (process start to the training function, plus building data and model), training (the
epochs' training steps), checkpoint hand-over, evaluation (validation every epoch, and the test
split), teardown (after the report is written until the process exits), other (the rest: epoch
bookkeeping, logging, writing model.pt). A checkout without the phase timestamps (the
baseline) is split into training and everything outside it. "Outside the run" is the wall time
minus the training function's own timed run (the launcher's cost: starting Ray and the worker
group, tearing down); "outside training" also counts evaluation and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from resnet18_dist.options import absolute_path  # noqa: E402  (after the path)
from resnet18_dist.run_files import METRICS_FILE, REPORT_FILE  # noqa: E402

PHASES = ("start-up", "training", "checkpoint", "evaluation", "teardown", "other")


def _run(repo: Path, launcher: str, out: Path, name: str, args: argparse.Namespace) -> dict:
    script = "train.py" if launcher == "ray" else "train_accelerate.py"
    cmd = [
        sys.executable,
        str(repo / "launch" / script),
        "--data-dir",
        str(args.data_dir),
        "--epochs",
        str(args.epochs),
        "--patience",
        "0",
        "--data-backend",
        "torchvision",
        "--loader-workers",
        "0",
        "--batch-size",
        "64",
        "--wandb-mode",
        "disabled",
        "--quiet",
        "--output-dir",
        str(out),
        "--name",
        name,
    ]
    if launcher == "ray":
        cmd += ["--cpus-per-worker", str(args.cpus)]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")  # a private local Ray, as a user's first run gets
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    run_dir = out / name
    report = json.loads((run_dir / REPORT_FILE).read_text())
    epochs = [json.loads(line) for line in (run_dir / METRICS_FILE).open()]
    wall = end - start
    training = sum(e["train_time_s"] for e in epochs)
    result = {
        "wall": wall,
        "training": training,
        "outside training": wall - training,
        # The launcher's own cost: everything outside the training function's timed run.
        "outside the run": wall - report["wall_time_s"],
        "images_per_s": statistics.median(e["train_images_per_s"] for e in epochs[1:] or epochs),
        "per_epoch": [e["train_images_per_s"] for e in epochs],
    }
    if "started_unix" in report:  # this checkout reports its phases
        timings = report.get("timings", {})
        phases = {
            "start-up": report["started_unix"] - start + timings.get("setup_s", 0.0),
            "training": training,
            "checkpoint": sum(e.get("checkpoint_time_s", 0.0) for e in epochs),
            "evaluation": sum(e.get("val_time_s", 0.0) for e in epochs) + timings.get("test_s", 0),
            "teardown": end - report["finished_unix"],
        }
        phases["other"] = wall - sum(phases.values())
        result["phases"] = phases
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--data-dir", type=absolute_path, default=None, help="Prepared dataset (default: digits)."
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds.")
    parser.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="Cores each launcher trains with."
    )
    parser.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="Another checkout (e.g. `git worktree add ../prev HEAD~1`) whose Ray path runs "
        "alongside, for a before/after of the launcher's overhead.",
    )
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args(argv)

    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.machine import machine_description

    args.data_dir = dataset_dir(args.data_dir)
    variants = [("ray", ROOT, "ray"), ("accelerate", ROOT, "accelerate")]
    if args.baseline_repo is not None:
        variants.append(("ray (baseline)", args.baseline_repo.resolve(), "ray"))
    results: dict[str, list[dict]] = {v[0]: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="r18d-bench-") as tmp:
        for r in range(args.rounds):
            # Alternate the order between rounds so neither launcher always runs first.
            for label, repo, launcher in variants if r % 2 == 0 else variants[::-1]:
                out = Path(tmp) / label.replace(" ", "_").strip("()")
                res = _run(repo, launcher, out, f"run{r}", args)
                results[label].append(res)
                print(
                    f"round {r + 1} {label:15s} wall {res['wall']:6.1f}s, training "
                    f"{res['training']:5.1f}s, {res['images_per_s']:6.0f} img/s (median epochs "
                    f"2-{args.epochs})\n    per-epoch train img/s: "
                    + " ".join(f"{v:.0f}" for v in res["per_epoch"]),
                    flush=True,
                )

    print(f"\nmachine: {machine_description(args.cpus)}")
    print(
        f"data: {args.data_dir}; {args.epochs} epochs, batch 64, torchvision, 0 loader workers, "
        f"{args.cpus} cores per launcher; {args.rounds} alternating rounds (mean of rounds)\n"
    )
    mean = {
        label: {
            k: statistics.mean(r[k] for r in runs)
            for k in ("wall", "training", "outside training", "outside the run", "images_per_s")
        }
        for label, runs in results.items()
    }
    # Ratio columns: accelerate / ray, and ray / its baseline when one ran.
    ratios = [("accelerate / ray", "accelerate", "ray")]
    if "ray (baseline)" in results:
        ratios.append(("ray / baseline", "ray", "ray (baseline)"))

    def row(name: str, values: dict[str, float | None], fmt: str) -> str:
        cells = [format(values[k], fmt) if values[k] is not None else "—" for k in results]
        for _, a, b in ratios:
            va, vb = values[a], values[b]
            cells.append(f"{va / vb:.3f}" if va is not None and vb else "—")
        return f"| {name} | " + " | ".join(cells) + " |"

    print("| phase (s) | " + " | ".join(results) + " | " + " | ".join(r[0] for r in ratios) + " |")
    print("|---|" + "---|" * (len(results) + len(ratios)))
    print(
        row("train img/s (median epochs 2-N)", {k: mean[k]["images_per_s"] for k in results}, ".0f")
    )
    for phase in PHASES:
        values = {
            label: statistics.mean(r["phases"][phase] for r in runs)
            if all("phases" in r for r in runs)
            else None
            for label, runs in results.items()
        }
        print(row(phase, values, ".1f"))
    for key in ("outside the run", "outside training", "wall"):
        print(row(f"**{key}**", {k: mean[k][key] for k in results}, ".1f"))
    print()
    ray, acc = mean["ray"], mean["accelerate"]
    print(f"accelerate / ray train throughput: {acc['images_per_s'] / ray['images_per_s']:.3f}")
    if "ray (baseline)" in mean:
        base = mean["ray (baseline)"]
        for key in ("outside the run", "outside training", "wall"):
            print(
                f"ray {key}, this checkout / baseline: {ray[key] / base[key]:.3f} "
                f"({ray[key]:.1f}s vs {base[key]:.1f}s)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
