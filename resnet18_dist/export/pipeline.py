"""Export a training checkpoint to every artifact, verify each on the test split, measure each.

Everything is written into a staging directory that replaces ``out`` only when complete, so a
failed export (a corrupt checkpoint, a full disk, a failing check) never leaves half an output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from resnet18_dist.atomic import WriteError, atomic_write_text, staged_directory
from resnet18_dist.checkpoint_file import CheckpointError
from resnet18_dist.data.digits import dataset_dir
from resnet18_dist.data.manifest import DatasetError, Manifest
from resnet18_dist.data.policy import DataPolicy
from resnet18_dist.data.torch_loader import ShardDataset, eval_transform
from resnet18_dist.errors import UserError
from resnet18_dist.export.artifact import model_from_checkpoint
from resnet18_dist.export.bucket import FILES_KEY, file_hashes
from resnet18_dist.export.measure import (
    MeasureOptions,
    MeasuringProcess,
    measuring_processes,
)
from resnet18_dist.export.mobile import (
    export_executorch,
    export_litert,
    missing_mobile_packages,
)
from resnet18_dist.export.onnx_export import export_onnx
from resnet18_dist.export.quantize import (
    quantize_dynamic_torch,
    quantize_onnx_int8,
    resolve_reduce_range,
    save_dynamic_torch,
)
from resnet18_dist.export.report import render_markdown
from resnet18_dist.export.tensorrt import build_engine, tensorrt_unavailable_reason
from resnet18_dist.export.triton import MODEL_NAME as TRITON_MODEL_NAME
from resnet18_dist.export.triton import TRITON_DIR, write_model_repository
from resnet18_dist.machine import machine_description
from resnet18_dist.metrics import ClassificationMetrics
from resnet18_dist.model_meta import (
    FORMAT,
    META_JSON,
    MODEL_DYNAMIC_PT,
    MODEL_INT8_ONNX,
    MODEL_ONNX,
    MODEL_PT,
    MODEL_PTE,
    MODEL_TFLITE,
    MODEL_TRT,
    REPORT_JSON,
    ExportMeta,
)
from resnet18_dist.models.model_file import save_model_pt
from resnet18_dist.options import Options, check, opt
from resnet18_dist.output_dir import check_output_dir

log = logging.getLogger(__name__)

FP32_REL_TOL = 1e-4
REPORT_MD = "report.md"
# What --out may be besides a new or empty directory: an earlier export. Not report.json, which
# a training run directory holds too; meta.json holds the export format.
EXPORT_MARK = (META_JSON, FORMAT, "an export")


class ExportError(RuntimeError, UserError):
    """The export could not be produced; nothing was written."""


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Report any failure inside one export step as an ExportError naming the step, so the
    launcher prints one line instead of a traceback (the staging directory is discarded)."""
    try:
        yield
    except (ExportError, WriteError, CheckpointError, DatasetError):
        raise
    except Exception as exc:
        raise ExportError(f"{name} failed: {type(exc).__name__}: {exc}") from exc


@dataclass
class ExportOptions(Options):
    checkpoint: str | None = opt(
        None,
        "A checkpoint file, checkpoint directory or run directory.",
        required=True,
        path=True,
    )
    out: str | None = opt(
        None,
        "Output directory: a new or empty one, or an earlier export (replaced atomically); any "
        "other existing directory is refused. Or a prefix on object storage (s3://, gs://): "
        "published there with report.json last.",
        required=True,
        path=True,
    )
    data_dir: str | None = opt(
        None,
        "Prepared dataset for verification and calibration (a path, or s3:// / gs:// as for "
        "training). Default: the one the checkpoint was trained on.",
        path=True,
    )
    calibration_images: int = opt(512, "Validation images for INT8 calibration.", ge=1)
    calibration_method: str = opt(
        "minmax", "INT8 calibration.", choices=("minmax", "entropy", "percentile")
    )
    reduce_range: str = opt(
        "auto",
        "7-bit INT8 weights. auto = on for x86 CPUs without VNNI, whose AVX2 int8 kernels would "
        "otherwise saturate.",
        choices=("auto", "on", "off"),
    )
    threads: int | None = opt(
        None, "Intra-op threads for every measured runtime. Default: all CPUs.", ge=1
    )
    latency_iters: int = opt(200, "Timed batch-1 runs per artifact.", ge=1)
    throughput_seconds: float = opt(3.0, "Seconds of batch-64 runs per artifact.", gt=0)
    max_test_images: int = opt(0, "Use only the first N test images (0 = all).", ge=0)
    max_int8_drop: float = opt(
        1.0,
        "The INT8 gate: the most test top-1 (in points) the INT8 model may lose against FP32 "
        "ONNX; beyond it the export exits 1 (the artifacts are still written and measured).",
        ge=0,
    )
    mobile: bool = opt(
        False,
        "Also write model.pte (an ExecuTorch program, XNNPACK delegate) and model.tflite (LiteRT), "
        "each measured by its own runtime on the test split and held to --max-mobile-drop. "
        "Needs the mobile extra: pip install -e '.[mobile]'.",
    )
    max_mobile_drop: float = opt(
        1.0,
        "The mobile gate: the most test top-1 (in points) the ExecuTorch or LiteRT model may lose "
        "against FP32 ONNX; beyond it the export exits 1, as for INT8.",
        ge=0,
    )
    tensorrt: bool = opt(True, "Build a TensorRT engine when CUDA and tensorrt are present.")
    triton: bool = opt(
        False,
        "Also write a Triton Inference Server model repository: triton/NAME/1/model.onnx (the "
        "FP32 ONNX model), triton/NAME/config.pbtxt and triton/NAME/labels.txt.",
    )
    triton_name: str = opt("resnet18", "The model's name in the Triton repository.")
    triton_max_batch_size: int = opt(
        64, "The Triton model's max_batch_size (dynamic batching up to it).", ge=1
    )
    wandb_mode: str = opt(
        "auto",
        "Log the report table and the ONNX files to W&B (job_type export). auto = online with "
        "an API key, else offline.",
        choices=("auto", "online", "offline", "disabled"),
    )
    wandb_project: str = opt("resnet18-dist", "W&B project.")
    wandb_group: str = opt("", "W&B group (e.g. the training run's).")
    quiet: bool = opt(False, "Less output.")

    def validate(self) -> None:
        check(
            bool(TRITON_MODEL_NAME.fullmatch(self.triton_name)),
            "triton_name",
            f"must be letters, digits, '_', '.' and '-', not starting with '.' or '-' "
            f"(got {self.triton_name!r})",
        )
        if self.mobile:
            missing = missing_mobile_packages()
            check(
                not missing,
                "mobile",
                f"needs the mobile extra, which is not installed (missing: {', '.join(missing)}): "
                "pip install -e '.[mobile]'",
            )
        if self.threads is None:
            self.threads = os.cpu_count() or 1


def _split_array(
    manifest: Manifest, split: str, meta: ExportMeta, limit: int, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (N, 3, H, W) float32 and labels, with the training eval transform
    of the model's geometry."""
    policy = DataPolicy(
        meta.image_size, "none", preprocess=meta.preprocess, resize=meta.eval_resize
    )
    ds = ShardDataset(manifest, split, eval_transform(policy))
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


def int8_gate(
    fp32_correct: int, int8_correct: int, images: int, max_drop: float
) -> tuple[bool, float]:
    """(passes, drop in points): INT8 may get at most ``max_drop`` points of ``images`` fewer
    right than FP32. Decided on counts of correct images, exactly: in floats a drop of exactly
    the limit fails (100 * (0.9 - 0.89) is 1.0000000000000009). ``max_drop`` is taken as the
    decimal the user typed (``Fraction("0.3")``, not the binary float nearest to it)."""
    lost = fp32_correct - int8_correct
    allowed = Fraction(repr(float(max_drop))) * images / 100
    return lost <= allowed, float(Fraction(100 * lost, images))


def _onnx_checker(*paths: Path) -> dict[str, str]:
    """Run ONNX's full checker (shape inference included) on the files as written."""
    import onnx

    out = {}
    for path in paths:
        with _step(f"ONNX checker on {path.name}"):
            onnx.checker.check_model(str(path), full_check=True)
        out[path.name] = "passed"
    return out


# The rows every export measures; TensorRT's, when built, starts once it is.
PRESTARTED = ("torch_fp32", "onnx_fp32", "onnx_int8", "torch_dynamic_int8")
MOBILE_KINDS = ("executorch", "litert")


def measure_row(
    measurers: dict[str, MeasuringProcess],
    kind: str,
    path: Path,
    model_pt: Path,
    perf: Path,
    test: Path,
    opts: MeasureOptions,
) -> dict[str, Any]:
    """One artifact's figures, from its measuring process (started now if it was not)."""
    if kind not in measurers:
        measurers[kind] = MeasuringProcess(kind, perf.parent)
    return measurers[kind].measure(path, model_pt, perf, test, opts)


def export_artifacts(opts: ExportOptions) -> dict[str, Any]:
    start = time.perf_counter()
    # Publishing replaces --out: refuse, before any work, one that holds anything else.
    inputs = {"--checkpoint": opts.checkpoint, "--data-dir": opts.data_dir}
    check_output_dir(str(opts.out), EXPORT_MARK, inputs)
    model, state, meta = model_from_checkpoint(opts.checkpoint)
    data_dir = opts.data_dir or (state.get("resolved") or {}).get("data_dir")
    if not data_dir:
        raise ExportError(f"{opts.checkpoint}: no dataset recorded; pass --data-dir")
    if not opts.data_dir:
        check_output_dir(str(opts.out), EXPORT_MARK, {"the checkpoint's dataset": data_dir})
    try:
        manifest = Manifest.load(dataset_dir(data_dir))  # a bucket's dataset is fetched first
    except DatasetError as exc:
        raise ExportError(str(exc)) from exc
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
        # Their interpreters and runtimes load while this process exports (measure.py).
        measuring_processes(
            [*PRESTARTED, *(MOBILE_KINDS if opts.mobile else ())], Path(tmp)
        ) as measurers,
        staged_directory(Path(opts.out)) as stage,
    ):
        test_x, test_y = _split_array(manifest, "test", meta, opts.max_test_images, opts.quiet)
        calib, _ = _split_array(manifest, "val", meta, opts.calibration_images, opts.quiet)
        test_path, perf_path = Path(tmp) / "test.npy", Path(tmp) / "perf.npy"
        np.save(test_path, test_x)
        np.save(perf_path, test_x[:64])
        log.info(
            "test split: %d images at %d px (%s); calibration: %d validation images",
            len(test_x),
            meta.image_size,
            meta.preprocess,
            len(calib),
        )

        artifacts: list[tuple[str, str, Path]] = []
        save_model_pt(model, meta, stage / MODEL_PT)
        artifacts.append(("PyTorch FP32", "torch_fp32", stage / MODEL_PT))
        with _step("ONNX export"):
            export_onnx(model, meta, stage / MODEL_ONNX)  # includes the full ONNX checker
        artifacts.append(("ONNX Runtime FP32", "onnx_fp32", stage / MODEL_ONNX))
        reduce_range = resolve_reduce_range(opts.reduce_range)
        with _step("INT8 quantization"):
            quantize_onnx_int8(
                stage / MODEL_ONNX,
                stage / MODEL_INT8_ONNX,
                calib,
                meta,
                opts.calibration_method,
                reduce_range,
            )
        artifacts.append(("ONNX Runtime INT8 (static QDQ)", "onnx_int8", stage / MODEL_INT8_ONNX))
        with _step("PyTorch dynamic quantization"):
            save_dynamic_torch(quantize_dynamic_torch(model), stage / MODEL_DYNAMIC_PT)
        artifacts.append(
            ("PyTorch dynamic INT8 (Linear only)", "torch_dynamic_int8", stage / MODEL_DYNAMIC_PT)
        )
        if opts.mobile:
            with _step("ExecuTorch program"):
                export_executorch(model, meta, stage / MODEL_PTE)
            artifacts.append(
                ("ExecuTorch FP32 (XNNPACK, batch 1)", "executorch", stage / MODEL_PTE)
            )
            with _step("LiteRT model"):
                export_litert(model, meta, stage / MODEL_TFLITE)
            artifacts.append(("LiteRT FP32 (batch 1)", "litert", stage / MODEL_TFLITE))
        triton = None
        if opts.triton:
            with _step("Triton model repository"):
                model_dir = write_model_repository(
                    stage / MODEL_ONNX,
                    meta,
                    stage / TRITON_DIR,
                    opts.triton_name,
                    opts.triton_max_batch_size,
                )
            triton = {
                "model_dir": model_dir.relative_to(stage).as_posix(),
                "max_batch_size": opts.triton_max_batch_size,
            }
        trt_note = None
        if opts.tensorrt:
            trt_note = tensorrt_unavailable_reason()
            if trt_note is None:
                with _step("TensorRT engine build"):
                    build_engine(stage / MODEL_ONNX, stage / MODEL_TRT, meta.image_size)
                artifacts.append(("TensorRT FP16", "tensorrt", stage / MODEL_TRT))
            else:
                log.info("TensorRT engine skipped: %s", trt_note)
        else:
            trt_note = "disabled with --no-tensorrt"

        for name, kind, _ in artifacts:  # none measures while another still starts
            if kind in measurers:
                with _step(f"measuring {name}"):
                    measurers[kind].wait_ready(name)
        rows, logits = [], {}
        for name, kind, path in tqdm(
            artifacts, desc="measure", unit="artifact", disable=opts.quiet
        ):
            log.info("measuring %s ...", name)
            with _step(f"measuring {name}"):
                result = measure_row(
                    measurers, kind, path, stage / MODEL_PT, perf_path, test_path, mopts
                )
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
        correct = {
            k: int((logits[k].argmax(1) == test_y).sum()) for k in ("onnx_fp32", "onnx_int8")
        }
        int8_ok, int8_drop = int8_gate(
            correct["onnx_fp32"], correct["onnx_int8"], len(test_y), opts.max_int8_drop
        )
        checks = {
            "onnx_checker": _onnx_checker(stage / MODEL_ONNX, stage / MODEL_INT8_ONNX),
            "fp32_max_rel_err": by_kind["onnx_fp32"]["max_rel_err_vs_torch_fp32"],
            "fp32_ok": by_kind["onnx_fp32"]["max_rel_err_vs_torch_fp32"] < FP32_REL_TOL,
            # Reported, not gated: a few borderline images flipping is not a broken model.
            "int8_top1_agreement": by_kind["onnx_int8"]["top1_agreement_vs_fp32"],
            # The gate: how much test top-1 INT8 loses against FP32 ONNX, in points, decided
            # on the counts of correct test images (int8_gate).
            "fp32_test_correct": correct["onnx_fp32"],
            "int8_test_correct": correct["onnx_int8"],
            "int8_top1_drop": int8_drop,
            "max_int8_drop": opts.max_int8_drop,
            "int8_ok": int8_ok,
        }
        if opts.mobile:
            # The INT8 gate's rule for each mobile artifact, on counts of correct test images.
            drops = {}
            for kind in MOBILE_KINDS:
                ok, drops[kind] = int8_gate(
                    correct["onnx_fp32"],
                    int((logits[kind].argmax(1) == test_y).sum()),
                    len(test_y),
                    opts.max_mobile_drop,
                )
                checks[f"{kind}_ok"] = ok
            checks["mobile_top1_drop"] = drops
            checks["max_mobile_drop"] = opts.max_mobile_drop
            checks["mobile_ok"] = all(checks[f"{k}_ok"] for k in drops)
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
            "preprocess": meta.preprocess,
            "machine": machine_description(opts.threads),
            "threads": opts.threads,
            "tensorrt": trt_note or "built",
            "triton": triton,
            "checks": checks,
            "rows": rows,
            "seconds": time.perf_counter() - start,
        }
        atomic_write_text(stage / META_JSON, json.dumps(meta.to_dict(), indent=1) + "\n")
        atomic_write_text(stage / REPORT_MD, render_markdown(report))
        report[FILES_KEY] = file_hashes(stage)  # the report is the one file it does not list
        atomic_write_text(stage / REPORT_JSON, json.dumps(report, indent=1) + "\n")
    return report
