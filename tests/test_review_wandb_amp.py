"""Issue 21: mixed precision (no emulated bf16, fp16 with a scaler, accelerate's own choice kept),
a refused option on every accelerate rank, and W&B (bucket runs' model artifact, one W&B run
across a resume, quiet by default, the export's source artifact)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO, free_port


# ------------------------------------------------------------------------------ mixed precision
def _fake_bf16(native: bool):
    """torch.cuda.is_bf16_supported on a GPU that emulates bf16 (native=False) or has it."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    return is_bf16_supported


@pytest.mark.parametrize(
    ("mode", "device", "native", "expected"),
    [
        ("auto", "cuda", False, "fp16"),  # emulated bf16 is slower than fp32: fp16 + scaler
        ("auto", "cuda", True, "bf16"),
        ("auto", "cpu", True, "off"),
        ("bf16", "cuda", False, "bf16"),  # asked for: given
        ("fp16", "cuda", True, "fp16"),
        ("off", "cuda", True, "off"),
        ("bf16", "cpu", False, "bf16"),
    ],
)
def test_amp_choice(
    mode: str, device: str, native: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet18_dist.engine.runtime import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _fake_bf16(native))
    assert resolve_amp(mode, torch.device(device)) == expected


def test_fp16_on_cpu_is_refused_naming_the_option() -> None:
    from resnet18_dist.engine.runtime import resolve_amp
    from resnet18_dist.options import ConfigError

    with pytest.raises(ConfigError, match="--amp"):
        resolve_amp("fp16", torch.device("cpu"))


def _one_step(runtime) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = runtime.prepare_module(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 4, device=runtime.device)
    y = torch.randint(0, 3, (8,), device=runtime.device)
    before = model.weight.detach().clone()
    with runtime.autocast():
        loss = torch.nn.functional.cross_entropy(model(x), y)
    runtime.backward(loss)
    runtime.step(opt)
    return before, model.weight.detach()


def test_cpu_runtime_steps_without_a_scaler() -> None:
    from resnet18_dist.config import DeviceConfig
    from resnet18_dist.engine.runtime import TorchRuntime

    runtime = TorchRuntime(DeviceConfig(use_gpu="off"))
    assert runtime.amp_mode == "off" and not runtime.amp
    assert not runtime.scaler.is_enabled()  # fp16 only: nothing to scale on CPU
    before, after = _one_step(runtime)
    assert not torch.equal(before, after)  # the optimizer stepped, unscaled


@pytest.mark.gpu
def test_fp16_steps_through_the_gradient_scaler_on_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from resnet18_dist.config import DeviceConfig
    from resnet18_dist.engine.runtime import TorchRuntime

    runtime = TorchRuntime(DeviceConfig(use_gpu="on", amp="fp16"))
    assert runtime.amp_mode == "fp16" and runtime.scaler.is_enabled()
    with runtime.autocast():
        assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == (
            torch.float16
        )
    before, after = _one_step(runtime)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert runtime.scaler.get_scale() == 65536.0  # finite gradients: the scale kept
    auto = TorchRuntime(DeviceConfig(use_gpu="on"))
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert auto.amp_mode == ("bf16" if native else "fp16")


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    ("amp", "launched", "expected"), [("auto", "bf16", "bf16"), ("off", "bf16", "no")]
)
def test_auto_amp_defers_to_accelerate_launch_mixed_precision(
    amp: str, launched: str, expected: str, monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state
) -> None:
    from resnet18_dist.config import DeviceConfig
    from resnet18_dist.integrations.accelerate import AcceleratorRuntime, build_accelerator

    # what `accelerate launch --mixed_precision bf16` puts in its processes' environment
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    run = DeviceConfig(use_gpu="off", amp=amp)
    accelerator = build_accelerator(run)
    assert accelerator.mixed_precision == expected  # --amp off is explicit: it wins
    runtime = AcceleratorRuntime(run, accelerator)
    assert runtime.amp_mode == ("off" if expected == "no" else expected)


# ------------------------------------------------------------------------------ accelerate ranks
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
def test_a_refused_option_exits_2_on_every_accelerate_rank(tmp_path: Path) -> None:
    # `accelerate launch --num_processes 2` on a CPU machine starts one process; torchrun gives
    # the Accelerator two ranks (as tests/test_accelerate_wandb.py does). Either launcher
    # itself exits 1 for any failed rank; each rank's own code is in its failure report.
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
            *(str(REPO / "launch" / "train_accelerate.py"), "--num-workers", "1:2"),
            *("--wandb-mode", "disabled", "--output-dir", "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    codes = re.findall(r"exitcode\s+:\s*(-?\d+)", log)
    assert sorted(codes) == ["2", "2"], log[-3000:]  # both ranks: 2, none killed (-15)
    assert log.count("error: --num-workers: MIN:MAX is for the Ray launcher") == 1, log[-3000:]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ W&B
def _leet(*args: str) -> str:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_bucket_runs_model_is_logged_as_an_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    from resnet18_dist.integrations.wandb import WandbCallback

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    # Rank 0 of a run on object storage writes its files into a local directory named as the
    # run and mirrors them to the bucket; the report names the bucket's copy.
    run_dir = tmp_path / "remote-runs" / "abc" / "bucketrun"
    location = "s3://r18d-test/runs/bucketrun"
    cb = WandbCallback(mode="offline", project="p", run_dir=run_dir, name="bucketrun", verbose=True)
    classes = ["a", "b"]
    cb.on_start({"config": {"optim": {"lr": 0.1}}, "resolved": {}, "classes": classes})
    (run_dir / "model.pt").write_bytes(b"weights" * 100)
    cb.on_test(
        {
            "classes": classes,
            "test_per_class_acc": {"a": 1.0, "b": 0.5},
            "test_confusion": [[2, 0], [1, 1]],
            "test_top1": 0.75,
            "test_top5": 1.0,
            "test_f1_macro": 0.73,
            "test_loss": 0.5,
            "best_epoch": 0,
            "best_val_top1": 0.7,
            "best_model_path": f"{location}/model.pt",
        }
    )
    cb.on_finish()
    assert "Run summary" in capfd.readouterr().err  # --verbose: all of W&B's own output
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    text = _leet("--json", str(runs[0]))
    assert "model-bucketrun" in text  # the artifact, logged from the local copy


@pytest.mark.slow
def test_a_resumed_run_continues_one_wandb_run_quietly(small_digits: Path, tmp_path: Path) -> None:
    def train(*args: str) -> str:
        proc = subprocess.run(
            [
                *(sys.executable, str(REPO / "launch" / "train_accelerate.py")),
                *("--data-dir", str(small_digits), "--image-size", "8", "--batch-size", "64"),
                *("--output-dir", "runs", "--name", "r", "--wandb-mode", "offline", "--quiet"),
                *("--width", "0.25"),  # W&B's run identity, not learning
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    logs = [train("--epochs", "1"), train("--epochs", "2", "--resume")]
    runs = sorted((tmp_path / "runs" / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one offline directory per process...
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1, runs  # ...of one W&B run
    assert (tmp_path / "runs" / "r" / "wandb_id").read_text().strip() == ids.pop()
    for log in logs:
        wandb_lines = [line for line in log.splitlines() if "wandb" in line.lower()]
        assert "Run summary" not in log and "Run history" not in log, wandb_lines
        sync = [line for line in wandb_lines if "wandb sync" in line]
        assert len(sync) == 1 and "offline-run-" in sync[0], wandb_lines


def test_the_export_names_the_training_runs_model_artifact() -> None:
    from resnet18_dist.integrations.wandb import source_model_artifact

    assert source_model_artifact("/x/runs/r1/checkpoint_epoch0002/checkpoint.pt") == "model-r1:best"
    assert source_model_artifact("s3://b/runs/r2/checkpoint_epoch0010/checkpoint.pt") == (
        "model-r2:best"
    )
    assert source_model_artifact("/x/some.pt") is None
