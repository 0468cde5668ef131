"""The test report as the launchers print it (a light module: the driver of a Ray run imports
it, and nothing of the training stack)."""

from __future__ import annotations

from typing import Any


def format_test_report(report: dict[str, Any]) -> str:
    """The test-split report as printed at the end of a run."""
    lines = [
        f"test report ({report['test_samples']} images, best epoch {report['best_epoch'] + 1} "
        f"of {report['epochs_run']}{', stopped early' if report['stopped_early'] else ''}):",
        f"  top-1 {report['test_top1']:.4f}   top-5 {report['test_top5']:.4f}   "
        f"macro-F1 {report['test_f1_macro']:.4f}   loss {report['test_loss']:.4f}",
        "  per-class accuracy: "
        + "  ".join(f"{c}={a:.3f}" for c, a in report["test_per_class_acc"].items()),
        f"  eval {report['test_images_per_s']:.0f} images/s; "
        f"wall time {report['wall_time_s']:.1f}s",
        f"  run directory: {report['run_dir']}",
    ]
    return "\n".join(lines)
