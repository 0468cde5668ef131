"""The export report as Markdown: one row per artifact, measured side by side."""

from __future__ import annotations

from typing import Any


def render_markdown(report: dict[str, Any]) -> str:
    c = report["checks"]
    lines = [
        "# Export report",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- test split: {report['test_images']} images at {report['image_size']} px "
        f"({report.get('preprocess', 'squash')}) from `{report['data_dir']}`",
        f"- INT8 calibration: {report['calibration_images']} validation images, "
        f"{report['calibration_method']}, reduce_range {report['reduce_range']}",
        f"- machine: {report['machine']}",
        f"- TensorRT: {report['tensorrt']}",
        "- Triton model repository: "
        + (
            f"`{report['triton']['model_dir']}` (FP32 ONNX, max_batch_size "
            f"{report['triton']['max_batch_size']}, dynamic batching)"
            if report.get("triton")
            else "not written (--triton)"
        ),
        "",
        "| artifact | file | size | vs ONNX FP32 | top-1 | top-5 | macro-F1 | agrees w/ FP32 "
        "| max rel err | p50 ms (b=1) | p95 ms (b=1) | img/s (b=64) | peak RSS MB | model MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['artifact']} | `{r['file']}` | {r['size_bytes'] / 2**20:.2f} MB | "
            f"{r['size_vs_onnx_fp32']:.1%} | {r['top1']:.4f} | {r['top5']:.4f} | "
            f"{r['f1_macro']:.4f} | {r['top1_agreement_vs_fp32']:.2%} | "
            f"{r['max_rel_err_vs_torch_fp32']:.1e} | {r['latency_p50_ms']:.2f} | "
            f"{r['latency_p95_ms']:.2f} | {r['throughput_images_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['model_memory_mb']:.0f} |"
        )
    lines += [
        "",
        "Checks: ONNX checker "
        + ", ".join(f"{name} {verdict}" for name, verdict in c["onnx_checker"].items())
        + f"; ONNX FP32 vs PyTorch max relative error {c['fp32_max_rel_err']:.1e} "
        + ("(< 1e-4, ok)" if c["fp32_ok"] else "(FAILED: >= 1e-4)")
        + f"; INT8 top-1 drop against FP32 {c['int8_top1_drop']:+.2f} points "
        + (
            f"(<= {c['max_int8_drop']:g}, ok)"
            if c["int8_ok"]
            else f"(FAILED: more than --max-int8-drop {c['max_int8_drop']:g})"
        )
        + f"; INT8 top-1 agreement with FP32 {c['int8_top1_agreement']:.2%}"
        + "".join(
            f"; {name} top-1 drop against FP32 {c['mobile_top1_drop'][kind]:+.2f} points "
            + (
                f"(<= {c['max_mobile_drop']:g}, ok)"
                if c[f"{kind}_ok"]
                else f"(FAILED: more than --max-mobile-drop {c['max_mobile_drop']:g})"
            )
            for kind, name in (("executorch", "ExecuTorch"), ("litert", "LiteRT"))
            if "mobile_top1_drop" in c
        ),
        "",
        "Peak RSS is the measuring process's peak while loading the artifact and timing it; "
        "model MB is that peak minus the process's size after importing its runtime. Latency is "
        "batch 1 (p50/p95 over the timed runs); throughput is batch 64.",
        "",
    ]
    return "\n".join(lines)
