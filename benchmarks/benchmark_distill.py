"""Benchmark: does distillation from a stronger teacher help the ResNet18 student?

Trains, with the project's own training session, (1) a teacher with a larger epoch budget, then
for each seed (2) the student alone and (3) the student distilled from that teacher, both on
the same fixed epoch budget, and prints test top-1 / macro-F1 as mean and standard deviation.

    python launch/prepare_data.py --source cifar-subset/ --out data/cifar-sub
    python benchmarks/benchmark_distill.py --data-dir data/cifar-sub --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet18_dist.options import absolute_path
from resnet18_dist.run_files import REPORT_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", type=absolute_path, required=True, help="Prepared dataset.")
    parser.add_argument(
        "--out", type=absolute_path, default="runs/bench-distill", help="Where runs are written."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--teacher-arch", default="resnet18")
    parser.add_argument("--teacher-se", type=int, default=0, help="Teacher SE reduction.")
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    import os

    from resnet18_dist.config import (
        ClusterConfig,
        DataConfig,
        DistillConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RunDirConfig,
        TrainConfig,
    )
    from resnet18_dist.engine.epoch_sink import LocalEpochSink
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.session import run_training
    from resnet18_dist.logs import setup_logging

    setup_logging()
    out = Path(args.out)
    threads = args.threads or os.cpu_count() or 1

    def run(name: str, epochs: int, seed: int, **sections) -> dict:
        run_dir = out / name
        report_file = run_dir / REPORT_FILE
        if report_file.is_file():  # resumable benchmark: finished runs are not repeated
            return json.loads(report_file.read_text())
        cfg = TrainConfig(
            data=DataConfig(
                data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size
            ),
            model=sections.get("model", ModelConfig()),
            optim=OptimConfig(epochs=epochs, lr=args.lr, patience=0),
            distill=sections.get("distill", DistillConfig()),
            run=RunDirConfig(seed=seed, name=name),
            cluster=ClusterConfig(cpus_per_worker=threads),
            logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
        )
        start = time.perf_counter()
        report = run_training(
            cfg,
            TorchRuntime(cfg.device, threads=cfg.cluster.cpus_per_worker),
            LocalEpochSink(run_dir),
            run_dir,
        )
        print(
            f"{name}: test top-1 {report['test_top1']:.4f} in {time.perf_counter() - start:.0f}s",
            flush=True,
        )
        return report

    teacher = run(
        "teacher",
        args.teacher_epochs,
        1000,
        model=ModelConfig(arch=args.teacher_arch, se_reduction=args.teacher_se),
    )
    rows: dict[str, list[dict]] = {"student alone": [], "student distilled": []}
    for seed in args.seeds:
        rows["student alone"].append(run(f"student-s{seed}", args.student_epochs, seed))
        rows["student distilled"].append(
            run(
                f"distilled-s{seed}",
                args.student_epochs,
                seed,
                distill=DistillConfig(
                    teacher=str(out / "teacher"), temperature=args.temperature, alpha=args.alpha
                ),
            )
        )

    def stat(reports: list[dict], key: str) -> str:
        values = [r[key] for r in reports]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    print(
        f"\nteacher ({args.teacher_arch}, SE {args.teacher_se or 'off'}, {args.teacher_epochs} "
        f"epochs): test top-1 {teacher['test_top1']:.4f}, macro-F1 {teacher['test_f1_macro']:.4f}"
    )
    print(
        f"students: ResNet18, {args.student_epochs} epochs, seeds {args.seeds}, "
        f"T={args.temperature}, alpha={args.alpha}"
    )
    print("| run | test top-1 (mean ± sd) | macro-F1 (mean ± sd) | per seed top-1 |")
    print("|---|---|---|---|")
    for name, reports in rows.items():
        per_seed = ", ".join(f"{r['test_top1']:.4f}" for r in reports)
        print(
            f"| {name} | {stat(reports, 'test_top1')} | {stat(reports, 'test_f1_macro')} | "
            f"{per_seed} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
