"""The speed options keep results correct: the fused / foreach optimizer, loss reading every N
steps, --compile (and its fallback), no host synchronisation per step (on a GPU), and the
benchmark and GPU check commands at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from resnet18_dist.config import (
    ClusterConfig,
    DataConfig,
    DeviceConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
)
from resnet18_dist.engine.callbacks import Callback, CallbackList
from resnet18_dist.engine.checkpoint import LoopState
from resnet18_dist.engine.compiling import Compiled
from resnet18_dist.engine.epoch_sink import LocalEpochSink
from resnet18_dist.engine.loop import evaluate, train_one_epoch
from resnet18_dist.engine.optim import build_optimizer
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import build_data, build_setup, run_training
from resnet18_dist.models import ModelSpec, build_model
from resnet18_dist.seeding import seed_everything

from .conftest import REPO, launch


def _cfg(data: Path, width: float = 1.0, **device: Any) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(data_dir=str(data), batch_size=32, augment="cifar"),
        model=ModelConfig(width=width),
        optim=OptimConfig(epochs=1, lr=0.05, ema_decay=0.9),
        run=RunDirConfig(seed=5),
        cluster=ClusterConfig(cpus_per_worker=2),
        device=DeviceConfig(**device),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_fused_and_foreach_sgd_match_the_per_parameter_loop(impl: str) -> None:
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    models, optimizers = [], []
    for kind in ("for-loop", impl):
        torch.manual_seed(0)
        model = build_model(ModelSpec(num_classes=10, stem="cifar"))
        models.append(model)
        optimizers.append(build_optimizer(model, cfg, backbone_lr=0.01, impl=kind))
    assert optimizers[1].defaults[impl] is True and not optimizers[0].defaults["foreach"]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, opt in zip(models, optimizers, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    a, b = models[0].state_dict(), models[1].state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    p0 = next(iter(optimizers[0].state.values()))["momentum_buffer"]
    p1 = next(iter(optimizers[1].state.values()))["momentum_buffer"]
    assert torch.allclose(p0, p1, rtol=1e-5, atol=1e-7) and p0.abs().sum() > 0


class _Steps(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["loss"])


def _one_epoch(data: Path, log_every: int) -> tuple[dict[str, float], list[float], list[int]]:
    cfg = _cfg(data)
    runtime = TorchRuntime(cfg.device, threads=cfg.cluster.cpus_per_worker)
    seed_everything(cfg.run.seed)
    run_data = build_data(cfg, runtime)
    run = build_setup(cfg, runtime, run_data, resuming=False)
    sizes = [int(y.shape[0]) for _, y in run_data.loaders.train]
    seed_everything(11)
    steps = _Steps()
    out = train_one_epoch(
        run.setup, run_data.loaders.train, runtime, LoopState(), CallbackList([steps]), log_every
    )
    return out, steps.losses, sizes


def test_reading_the_loss_every_n_steps_reports_the_same_epoch_loss(small_digits: Path) -> None:
    every, logged, sizes = _one_epoch(small_digits, log_every=1)
    sparse, few, _ = _one_epoch(small_digits, log_every=4)
    assert len(logged) == len(sizes) == 8 and len(few) == 2
    assert few == logged[3::4]  # the same steps, only read less often
    assert sparse["train_loss"] == every["train_loss"]
    assert sparse["train_top1"] == every["train_top1"]
    # The epoch loss is the sample-weighted mean of the step losses, summed on the device.
    weighted = sum(x * n for x, n in zip(logged, sizes, strict=True)) / sum(sizes)
    assert every["train_loss"] == pytest.approx(weighted, rel=1e-6)


@pytest.mark.slow
def test_compile_gives_the_eager_loss_on_a_fixed_batch() -> None:
    """Inductor on this CPU (it needs a C++ compiler: here g++); about 90 s on 2 cores."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelSpec(num_classes=10, stem="cifar")).train()
        step = Compiled(model) if compiled else model
        opt = build_optimizer(model, OptimConfig(lr=0.1))
        run = []
        for _ in range(2):  # the second loss is after one optimizer step on the first
            loss = F.cross_entropy(step(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(float(loss))
        if compiled:
            assert step.active, step.failed  # it really ran compiled
        losses.append(run)
    torch._dynamo.reset()
    eager, compiled_losses = losses
    assert compiled_losses == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compile_without_a_cxx_compiler_warns_once_and_trains_eagerly(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Inductor's CPU kernels need a C++ compiler: pointed at a missing one (and a fresh
    kernel cache, so nothing compiled earlier is reused), the run still trains."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = _cfg(small_digits, width=0.25, compile=True)  # the fallback, not the network
    with caplog.at_level("WARNING"):
        report = run_training(
            cfg,
            TorchRuntime(cfg.device, threads=cfg.cluster.cpus_per_worker),
            LocalEpochSink(tmp_path),
            tmp_path,
        )
    torch._dynamo.reset()
    warned = [r for r in caplog.records if "--compile" in r.getMessage()]
    assert len(warned) == 1 and "continuing eagerly" in warned[0].getMessage()
    assert "C++ compiler" in report["compile_fallback"]
    assert report["epochs_run"] == 1  # it trained, eagerly, every sample once
    (epoch,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert epoch["train_samples"] == 240 and 0 < epoch["train_loss"] < 10


@pytest.mark.gpu
def test_a_failure_after_the_first_compiled_call_is_raised_not_hidden() -> None:
    """Falling back to eager is for "compile is unavailable here" (the first call); a later
    failure (out of memory, a failing recompile for a new shape) is the run's own error."""
    model = torch.nn.Linear(4, 2)
    wrapped = Compiled(model)
    calls = {"n": 0}

    def compiled_then_broken(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return model(x)

    object.__setattr__(wrapped, "_compiled", compiled_then_broken)
    x = torch.ones(3, 4)
    assert torch.equal(wrapped(x), model(x)) and wrapped.succeeded
    with pytest.raises(RuntimeError, match="out of memory"):
        wrapped(x)
    assert wrapped.active  # not silently switched to eager


def test_no_host_synchronisation_inside_training_and_evaluation_steps(small_digits: Path) -> None:
    """CUDA's sync debug mode turns every implicit host synchronisation into an error while
    the loop's steps run (set after the loader's first batch, cleared after its last)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = _cfg(small_digits, use_gpu="on")
    runtime = TorchRuntime(
        cfg.device,
        threads=cfg.cluster.cpus_per_worker,
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
    )
    data = build_data(cfg, runtime)
    run = build_setup(cfg, runtime, data, resuming=False)
    batches = list(data.loaders.train)

    class Strict:
        def __iter__(self):
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield from batches
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def __len__(self) -> int:
            return len(batches)

    out = train_one_epoch(run.setup, Strict(), runtime, LoopState(), CallbackList(), 10**9)
    assert out["train_samples"] == sum(len(y) for _, y in batches)
    val = list(data.loaders.val)

    class StrictVal(Strict):
        def __iter__(self):
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield from val
            finally:
                torch.cuda.set_sync_debug_mode("default")

    result = evaluate(run.setup.eval_model, StrictVal(), runtime, 10)
    assert result["samples"] == sum(len(y) for _, y in val)


@pytest.mark.slow
def test_benchmark_prints_the_three_rates_and_their_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = launch(
        "benchmark",
        *("--sizes", "16,8", "--batch-size", "8", "--steps", "2", "--warmup", "1"),
        *("--use-gpu", "off", "--out", str(out)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if "compute img/s" in line)
    for column in ("compute img/s", "data img/s", "end-to-end img/s", "e2e/compute"):
        assert column in header
    assert "data/compute" in header
    assert "device: CPU" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["size"] for r in result["sizes"]] == [16, 8]
    assert [r["stem"] for r in result["sizes"]] == ["cifar", "cifar"]
    for r in result["sizes"]:
        rates = [r[k] for k in ("compute_images_per_s", "data_images_per_s")]
        rates.append(r["end_to_end_images_per_s"])
        assert all(v > 0 for v in rates)
        assert r["end_to_end_over_compute"] == pytest.approx(rates[2] / rates[0])
        assert r["data_over_compute"] == pytest.approx(rates[1] / rates[0])
        assert r["optimizer_impl"] == "foreach"
        table_rows = [line.split() for line in proc.stdout.splitlines()[-2:]]
        row = next(cells for cells in table_rows if cells[0] == str(r["size"]))
        assert row[-2:] == [f"{r['end_to_end_over_compute']:.3f}", f"{r['data_over_compute']:.3f}"]


def test_benchmark_refuses_bad_sizes_naming_the_option() -> None:
    proc = launch("benchmark", "--sizes", "4", timeout=120)
    assert proc.returncode == 2 and "--sizes" in proc.stderr


@pytest.mark.slow
def test_gpu_check_runs_at_a_tiny_size_and_writes_its_figures(tmp_path: Path) -> None:
    """The GPU check's CPU mode: the same steps (benchmark, figures file) on the digits; its
    Ray training step is left out here (--no-train), so no Ray cluster starts in this test."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--no-train", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert [b["sizes"][0]["size"] for b in figures["benchmarks"]] == [16, 8]
    assert all(s["rc"] == 0 for s in figures["steps"]) and figures["training"] is None
    assert figures["device"]["torch"] == torch.__version__
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_channels_last_batches_need_no_conversion_in_the_step(
    small_digits: Path, backend: str
) -> None:
    """Batches arrive in channels_last memory (DALI: its NHWC output viewed as NCHW, no copy;
    torchvision: collated so in the loader's workers), so the step's own `.to(device,
    memory_format=channels_last)` and the channels_last model take them as they are."""
    from resnet18_dist.data.manifest import Manifest
    from resnet18_dist.data.policy import DataPolicy

    from .conftest import cpu_settings

    m = Manifest.load(small_digits)
    settings = cpu_settings(32, workers=1, channels_last=True)
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        from resnet18_dist.data.dali import build_dali_loaders as build
    else:
        from resnet18_dist.data.torch_loader import build_torchvision_loaders as build
    loaders = build(m, DataPolicy(8, "trivialaugment", random_erasing=0.5), settings)
    for split in ("train", "val"):
        images, _ = next(iter(loaders[split]))
        assert images.shape[1] == 3
        assert images.is_contiguous(memory_format=torch.channels_last), split
        assert images.permute(0, 2, 3, 1).is_contiguous()  # NHWC underneath
        moved = images.to(torch.device("cpu"), memory_format=torch.channels_last)
        assert moved.data_ptr() == images.data_ptr()  # no copy
    for loader in loaders.values():
        loader.close()
