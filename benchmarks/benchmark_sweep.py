"""Benchmark a sweep's overhead: the wall time of N trials against the sum of the same trials'
training time.

    python benchmarks/benchmark_sweep.py                        # digits, 4 trials, 3 epochs
    python benchmarks/benchmark_sweep.py --num-samples 8 --out sweeps_bench.md

Runs `launch/sweep.py` once (W&B disabled, progress bars off) and reads back what it wrote:
per trial, its training time (the sum of its epochs' `epoch_time_s` in metrics.jsonl: training
steps, validation and checkpoint, plus the test split for a finished trial) and Tune's wall time
for it (`wall_time_s` in trials.csv: the trial's Train driver, its worker group and teardown).
The sweep's wall time is the command's own line ("sweep wall time"), before the export of the best
trial, which is timed separately. Overhead = sweep wall time - sum of training times.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from resnet18_dist.options import absolute_path  # noqa: E402  (after the path)
from resnet18_dist.run_files import METRICS_FILE, REPORT_FILE  # noqa: E402


def trial_training_s(run_dir: Path) -> float:
    total = 0.0
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                total += float(json.loads(line).get("epoch_time_s", 0.0))
    report = run_dir / REPORT_FILE
    if report.is_file():
        total += float(json.loads(report.read_text()).get("timings", {}).get("test_s", 0.0))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--lr-range", default="0.001,5")
    ap.add_argument(
        "--out", type=absolute_path, default="", help="Write the markdown result here too."
    )
    ap.add_argument("extra", nargs="*", help="More launch/sweep.py options (after --).")
    args = ap.parse_args()

    from resnet18_dist.machine import machine_description

    with tempfile.TemporaryDirectory(prefix="r18d-sweep-bench-") as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "sweep.py"),
            *("--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs)),
            *("--grace-period", str(args.grace_period), "--lr-range", args.lr_range),
            *("--output-dir", tmp, "--name", "bench", "--wandb-mode", "disabled", "--quiet"),
            *args.extra,
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        command_s = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        m = re.search(r"sweep wall time (\d+) s", proc.stdout)
        sweep_s = float(m.group(1)) if m else float("nan")
        sweep = Path(tmp) / "bench"
        with (sweep / "trials.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        lines = [
            f"Sweep overhead, {len(rows)} trials of up to {args.max_epochs} epochs "
            f"(digits default, 1 worker per trial, ASHA grace {args.grace_period}, lr "
            f"{args.lr_range}); {machine_description()}.",
            "",
            "| trial | lr | epochs | status | training s | Tune wall s | outside training s |",
            "|---|---|---|---|---|---|---|",
        ]
        total_train = 0.0
        for r in rows:
            train = trial_training_s(Path(r["run_dir"]))
            total_train += train
            wall = float(r["wall_time_s"])
            status = "stopped by ASHA" if r["stopped_by_asha"] == "True" else r["status"]
            lines.append(
                f"| {r['trial']} | {float(r['lr']):.4g} | {r['epochs_run']} | {status} | "
                f"{train:.1f} | {wall:.1f} | {wall - train:.1f} |"
            )
        n = len(rows)
        lines += [
            "",
            f"- sweep wall time (Ray start to the last trial's end): {sweep_s:.0f} s; sum of "
            f"the trials' training time: {total_train:.1f} s; overhead {sweep_s - total_train:.0f}"
            f" s, {(sweep_s - total_train) / n:.1f} s per trial",
            f"- the whole command, with the export of the best trial: {command_s:.0f} s",
            f"- command: `python launch/sweep.py {' '.join(cmd[2:]).replace(tmp, 'DIR')}`",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
