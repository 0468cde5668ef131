"""Export a training checkpoint to every artifact, verify each on the test split, measure each.

Everything is written into a staging directory that replaces ``out`` only when complete, so a
failed export (a corrupt checkpoint, a full disk, a failing check) never leaves half an output.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from resnet18_dist.atomic import atomic_write_text, staged_directory
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy
from resnet18_dist.data.torch_loader import ShardDataset, eval_transform
from resnet18_dist.export.artifact import model_from_checkpoint, save_model_pt
from resnet18_dist.export.measure import MeasureOptions, measure
from resnet18_dist.export.meta import (
    META_JSON,
    MODEL_DYNAMIC_PT,
    MODEL_INT8_ONNX,
    MODEL_ONNX,
    MODEL_PT,
    MODEL_TRT,
)
from resnet18_dist.export.onnx_export import export_onnx
from resnet18_dist.export.quantize import (
    quantize_dynamic_torch,
    quantize_onnx_int8,
    resolve_reduce_range,
    save_dynamic_torch,
)
from resnet18_dist.export.report import render_markdown
from resnet18_dist.machine import machine_description
from resnet18_dist.metrics import ClassificationMetrics

log = logging.getLogger(__name__)

FP32_REL_TOL = 1e-4
INT8_AGREEMENT_MIN = 0.99
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


class ExportError(RuntimeError):
    """The export could not be produced; nothing was written."""


@dataclass
class ExportOptions:
    checkpoint: str
    out: str
    data_dir: str | None = None  # default: the dataset the checkpoint was trained on
    calibration_images: int = 512
    calibration_method: str = "minmax"
    reduce_range: str = "auto"  # auto | on | off
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    latency_iters: int = 200
    throughput_seconds: float = 3.0
    max_test_images: int = 0  # 0 = the whole test split
    tensorrt: bool = True
    quiet: bool = False


def _split_array(
    manifest: Manifest, split: str, size: int, limit: int, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (N, 3, H, W) float32 and labels, with the training eval transform."""
    ds = ShardDataset(manifest, split, eval_transform(DataPolicy(size, "none")))
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=256)
    xs, ys = [], []
    bar = tqdm(total=n, desc=f"preprocess {split}", unit="img", disable=quiet, leave=False)
    for x, y in loader:
        bar.update(len(y))
        xs.append(x.numpy())
        ys.append(y.numpy())
    bar.close()
    return np.concatenate(xs), np.concatenate(ys)


def _metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    m = ClassificationMetrics(num_classes, torch.device("cpu"))
    lt, yt = torch.from_numpy(logits), torch.from_numpy(labels).long()
    m.update(lt, yt, torch.nn.functional.cross_entropy(lt.float(), yt))
    out = m.compute()
    return {"top1": out["top1"], "top5": out["top5"], "f1_macro": out["f1_macro"]}


def export_artifacts(opts: ExportOptions) -> dict[str, Any]:
    start = time.perf_counter()
    model, state, meta = model_from_checkpoint(opts.checkpoint)
    data_dir = opts.data_dir or (state.get("resolved") or {}).get("data_dir")
    if not data_dir:
        raise ExportError(f"{opts.checkpoint}: no dataset recorded; pass --data-dir")
    manifest = Manifest.load(data_dir)
    if manifest.classes != meta.classes:
        raise ExportError(f"{data_dir}: classes {manifest.classes} differ from the model's")
    mopts = MeasureOptions(
        threads=opts.threads,
        latency_iters=opts.latency_iters,
        throughput_seconds=opts.throughput_seconds,
    )
    n_classes = len(meta.classes)

    with (
        tempfile.TemporaryDirectory(prefix="r18d-export-") as tmp,
        staged_directory(Path(opts.out)) as stage,
    ):
        test_x, test_y = _split_array(
            manifest, "test", meta.image_size, opts.max_test_images, opts.quiet
        )
        calib, _ = _split_array(
            manifest, "val", meta.image_size, opts.calibration_images, opts.quiet
        )
        test_path, perf_path = Path(tmp) / "test.npy", Path(tmp) / "perf.npy"
        np.save(test_path, test_x)
        np.save(perf_path, test_x[:64])
        log.info(
            "test split: %d images at %d px; calibration: %d validation images",
            len(test_x),
            meta.image_size,
            len(calib),
        )

        artifacts: list[tuple[str, str, Path]] = []
        save_model_pt(model, meta, stage / MODEL_PT)
        artifacts.append(("PyTorch FP32", "torch_fp32", stage / MODEL_PT))
        export_onnx(model, meta, stage / MODEL_ONNX)  # includes the full ONNX checker
        artifacts.append(("ONNX Runtime FP32", "onnx_fp32", stage / MODEL_ONNX))
        reduce_range = resolve_reduce_range(opts.reduce_range)
        quantize_onnx_int8(
            stage / MODEL_ONNX,
            stage / MODEL_INT8_ONNX,
            calib,
            meta,
            opts.calibration_method,
            reduce_range,
        )
        artifacts.append(("ONNX Runtime INT8 (static QDQ)", "onnx_int8", stage / MODEL_INT8_ONNX))
        save_dynamic_torch(quantize_dynamic_torch(model), stage / MODEL_DYNAMIC_PT)
        artifacts.append(
            ("PyTorch dynamic INT8 (Linear only)", "torch_dynamic_int8", stage / MODEL_DYNAMIC_PT)
        )
        trt_note = None
        if opts.tensorrt:
            from resnet18_dist.export.tensorrt import build_engine, tensorrt_unavailable_reason

            trt_note = tensorrt_unavailable_reason()
            if trt_note is None:
                build_engine(stage / MODEL_ONNX, stage / MODEL_TRT, meta.image_size)
                artifacts.append(("TensorRT FP16", "tensorrt", stage / MODEL_TRT))
            else:
                log.info("TensorRT engine skipped: %s", trt_note)
        else:
            trt_note = "disabled with --no-tensorrt"

        rows, logits = [], {}
        for name, kind, path in tqdm(
            artifacts, desc="measure", unit="artifact", disable=opts.quiet
        ):
            log.info("measuring %s ...", name)
            result = measure(kind, path, stage / MODEL_PT, perf_path, test_path, mopts)
            logits[kind] = result.pop("logits")
            rows.append(
                {
                    "artifact": name,
                    "kind": kind,
                    "file": path.name,
                    "size_bytes": path.stat().st_size,
                    **_metrics(logits[kind], test_y, n_classes),
                    **result,
                }
            )

        ref = logits["torch_fp32"]
        pred = ref.argmax(1)
        for row in rows:
            out = logits[row["kind"]]
            row["max_rel_err_vs_torch_fp32"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            row["top1_agreement_vs_fp32"] = float((out.argmax(1) == pred).mean())
        by_kind = {r["kind"]: r for r in rows}
        onnx_size = by_kind["onnx_fp32"]["size_bytes"]
        for row in rows:
            row["size_vs_onnx_fp32"] = row["size_bytes"] / onnx_size
        checks = {
            "onnx_checker": True,  # export_onnx / quantize_onnx_int8 raise otherwise
            "fp32_max_rel_err": by_kind["onnx_fp32"]["max_rel_err_vs_torch_fp32"],
            "fp32_ok": by_kind["onnx_fp32"]["max_rel_err_vs_torch_fp32"] < FP32_REL_TOL,
            "int8_top1_agreement": by_kind["onnx_int8"]["top1_agreement_vs_fp32"],
            "int8_ok": by_kind["onnx_int8"]["top1_agreement_vs_fp32"] >= INT8_AGREEMENT_MIN,
        }
        if not checks["fp32_ok"]:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch: max relative error "
                f"{checks['fp32_max_rel_err']:.2e} >= {FP32_REL_TOL:g}; nothing was written"
            )
        report = {
            "checkpoint": meta.source_checkpoint,
            "data_dir": str(data_dir),
            "test_images": len(test_x),
            "calibration_images": len(calib),
            "calibration_method": opts.calibration_method,
            "reduce_range": reduce_range,
            "image_size": meta.image_size,
            "machine": machine_description(opts.threads),
            "threads": opts.threads,
            "tensorrt": trt_note or "built",
            "checks": checks,
            "rows": rows,
            "seconds": time.perf_counter() - start,
        }
        atomic_write_text(stage / META_JSON, json.dumps(meta.to_dict(), indent=1) + "\n")
        atomic_write_text(stage / REPORT_JSON, json.dumps(report, indent=1) + "\n")
        atomic_write_text(stage / REPORT_MD, render_markdown(report))
    return report
