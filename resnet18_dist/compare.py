"""Compare run directories without W&B: a side-by-side table and a plot of the learning curves.

A run directory is anything holding ``metrics.jsonl`` (and usually ``config.yaml`` and
``report.json``): a local run, a Ray Train run (on a bucket too) or each trial of a sweep.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resnet18_dist.atomic import atomic_write
from resnet18_dist.config import TrainConfig, with_split_run_section
from resnet18_dist.run_files import CONFIG_FILE, METRICS_FILE, REPORT_FILE
from resnet18_dist.run_location import RunLocation


class CompareError(ValueError):
    """A run directory that cannot be read; the message names it."""


@dataclass
class RunRecord:
    name: str
    path: Path | str  # a URI for a run on object storage
    config: dict[str, Any]  # flattened: "optim.lr" -> 0.1
    epochs: list[dict[str, Any]]
    report: dict[str, Any] | None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(path: str | Path) -> RunRecord:
    """A run's metrics, config and report, read through its ``RunLocation``: a local run
    directory or one on object storage (``s3://...``) alike."""
    loc = RunLocation.at(path)
    try:
        entries = loc.entries()
        if METRICS_FILE not in entries:
            raise CompareError(f"{loc.path}: not a run directory (no {METRICS_FILE})")
        metrics = loc.read_text(METRICS_FILE)
        config_text = loc.read_text(CONFIG_FILE) if CONFIG_FILE in entries else ""
        report_text = loc.read_text(REPORT_FILE) if REPORT_FILE in entries else None
    except OSError as exc:  # unreadable, or a bucket that cannot be reached
        raise CompareError(f"{loc.path}: {exc}") from exc
    epochs = []
    for i, line in enumerate(metrics.splitlines(), 1):
        if line.strip():
            try:
                epochs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CompareError(f"{loc.join(METRICS_FILE)}:{i}: not JSON ({exc})") from exc
    raw = yaml.safe_load(config_text) or {}
    config = {}
    if isinstance(raw, dict) and raw:
        # An older run's config.yaml: its cluster, device and logging options under `run` line
        # up under their sections' names, and an option added since reads as its default (what
        # the run trained with), not as a difference.
        config = {**_flatten(TrainConfig().to_dict()), **_flatten(with_split_run_section(raw))}
    report = json.loads(report_text) if report_text is not None else None
    return RunRecord(loc.name, loc.path, config, epochs, report)


def runs_in_sweep(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise CompareError(f"--sweep {d}: no such directory")
    found = sorted(p.parent for p in d.rglob(METRICS_FILE))
    if not found:
        raise CompareError(f"--sweep {d}: no run directories (metrics.jsonl) below it")
    return found


IGNORED_KEYS = {
    "run.name",
    "run.output_dir",
    "logging.quiet",
    "logging.verbose",
    "cluster.address",
    "logging.log_every",
}


def differing_config(runs: list[RunRecord]) -> list[str]:
    keys = sorted(set().union(*(r.config for r in runs)) - IGNORED_KEYS)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def summary_rows(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    diff = differing_config(runs)
    header = [
        "run",
        *diff,
        "epochs",
        "best val top-1",
        "test top-1",
        "test top-5",
        "test F1",
        "train img/s",
    ]
    rows = []
    for r in runs:
        val = [e["val_top1"] for e in r.epochs if e.get("val_top1") is not None]
        speed = [e["train_images_per_s"] for e in r.epochs if e.get("train_images_per_s")]
        rep = r.report or {}
        rows.append(
            [
                r.name,
                *[str(r.config.get(k, "")) for k in diff],
                str(len(r.epochs)),
                f"{max(val):.4f}" if val else "-",
                f"{rep['test_top1']:.4f}" if "test_top1" in rep else "-",
                f"{rep['test_top5']:.4f}" if "test_top5" in rep else "-",
                f"{rep['test_f1_macro']:.4f}" if "test_f1_macro" in rep else "-",
                f"{statistics.mean(speed):.0f}" if speed else "-",
            ]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot_runs(runs: list[RunRecord], path: Path) -> None:
    """Validation top-1 and loss per epoch (train loss dashed), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        xs = [e["epoch"] + 1 for e in r.epochs]
        ax_acc.plot(
            xs, [e.get("val_top1") for e in r.epochs], marker="o", ms=3, color=color, label=r.name
        )
        ax_loss.plot(
            xs,
            [e.get("val_loss") for e in r.epochs],
            marker="o",
            ms=3,
            color=color,
            label=f"{r.name} (val)",
        )
        ax_loss.plot(
            xs,
            [e.get("train_loss") for e in r.epochs],
            ls="--",
            marker="x",
            ms=3,
            color=color,
            alpha=0.6,
            label=f"{r.name} (train)",
        )
    ax_acc.set(title="Validation top-1 accuracy", xlabel="epoch", ylabel="top-1")
    ax_loss.set(
        title="Loss: validation cross-entropy; dashed, the training objective",
        xlabel="epoch",
        ylabel="loss",
        yscale="log",
    )
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8)
    ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
