"""The GPU paths: DALI's nvJPEG ("mixed") decoder, bf16 autocast training and a TensorRT engine.
Each test skips, saying why, on a machine without CUDA (CI), and runs on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy

from .conftest import cpu_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.dali
def test_dali_mixed_decoder_matches_the_cpu_pipeline(small_digits: Path) -> None:
    """The same pipeline definition decodes with nvJPEG on the GPU; evaluation batches (no
    random augmentation) agree with the CPU pipeline's to within a grey level or two."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from dataclasses import replace

    from resnet18_dist.data.dali import DaliLoader

    m = Manifest.load(small_digits)
    policy = DataPolicy(8, "none")
    cpu = DaliLoader(m, "val", policy, cpu_settings(1000), train=False)
    gpu_settings = replace(cpu_settings(1000), device=torch.device("cuda", 0), workers=2)
    gpu = DaliLoader(m, "val", policy, gpu_settings, train=False)
    assert gpu.gpu
    ((x_cpu, y_cpu),) = list(cpu)
    ((x_gpu, y_gpu),) = list(gpu)
    assert x_gpu.is_cuda and y_gpu.is_cuda
    assert torch.equal(y_gpu.cpu(), y_cpu)
    diff = (x_gpu.float().cpu() - x_cpu.float()).abs()
    # nvJPEG and libjpeg-turbo may round a few pixels differently: 2/255/0.229 = 0.034.
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_bf16_training_on_the_gpu(small_digits: Path, tmp_path: Path) -> None:
    from resnet18_dist.config import (
        DataConfig,
        DeviceConfig,
        LoggingConfig,
        OptimConfig,
        TrainConfig,
    )
    from resnet18_dist.engine.epoch_sink import LocalEpochSink
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.session import run_training

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = TrainConfig(
        data=DataConfig(data_dir=str(small_digits), batch_size=32, data_backend="torchvision"),
        optim=OptimConfig(epochs=2, lr=0.05),
        device=DeviceConfig(amp="auto", use_gpu="auto"),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )
    runtime = TorchRuntime(cfg.device)
    assert runtime.device.type == "cuda" and runtime.amp  # auto = bf16 on a capable GPU
    with runtime.autocast():
        probe = torch.nn.Linear(4, 4).cuda()(torch.ones(2, 4, device="cuda"))
    assert probe.dtype == torch.bfloat16
    report = run_training(cfg, runtime, LocalEpochSink(tmp_path), tmp_path)
    assert report["resolved"]["amp"] == "bf16"
    assert report["test_top1"] > 0.5  # it learned, in bf16, on the GPU


def test_tensorrt_engine_is_built_verified_and_measured(small_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="the tensorrt Python package is not installed")
    from resnet18_dist.export.pipeline import ExportOptions, export_artifacts

    out = tmp_path / "export"
    report = export_artifacts(
        ExportOptions(
            checkpoint=str(small_run),
            out=str(out),
            latency_iters=20,
            throughput_seconds=0.5,
            quiet=True,
        )
    )
    assert report["tensorrt"] == "built" and (out / "model.trt.engine").is_file()
    row = next(r for r in report["rows"] if r["kind"] == "tensorrt")
    assert row["top1_agreement_vs_fp32"] >= 0.99  # FP16 engine agrees with the FP32 model
    assert row["throughput_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.ray  # the main job (tests/conftest.py)
def test_predict_on_the_gpu_gives_the_cpu_answers(
    digits_export: tuple[Path, dict], digits_folder: Path
) -> None:
    """`predict --device cuda` (ONNX Runtime's CUDA provider) answers as on the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
    from resnet18_dist.serve.classifier import OnnxClassifier

    files = [sorted(d.iterdir())[0] for d in sorted(digits_folder.iterdir())]
    export = digits_export[0]
    cpu = OnnxClassifier.load(export, device="cpu")
    gpu = OnnxClassifier.load(export, device="cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    from PIL import Image

    images = [Image.open(f) for f in files]
    import numpy as np

    np.testing.assert_allclose(gpu.probabilities(images), cpu.probabilities(images), atol=1e-4)
