from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from resnet18_dist.atomic import WriteError
from resnet18_dist.config import DataConfig, OptimConfig, RunConfig, TrainConfig
from resnet18_dist.engine import checkpoint as ckpt_mod
from resnet18_dist.engine import loop as loop_mod
from resnet18_dist.engine.callbacks import Callback
from resnet18_dist.engine.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from resnet18_dist.engine.reporting import LocalReporter
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import run_training
from resnet18_dist.models import ModelSpec


def _cfg(data: Path, **optim) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(data_dir=str(data), batch_size=32, augment="cifar"),
        optim=OptimConfig(**{"epochs": 2, "lr": 0.05, **optim}),
        run=RunConfig(seed=7, quiet=True, wandb_mode="disabled"),
    )


def _train(cfg: TrainConfig, run_dir: Path, **kw) -> dict:
    return run_training(cfg, TorchRuntime(cfg.run), LocalReporter(run_dir, keep=5), run_dir, **kw)


class Payload:
    """An arbitrary class: unpickling a checkpoint holding it would run this module's code."""


class _KillAfterFirstCheckpoint(Callback):
    """Stands in for a worker killed right after epoch 1's checkpoint was written."""

    def on_checkpoint(self, path, metrics):
        raise KeyboardInterrupt("killed")


def test_resume_gives_the_same_weights_as_a_straight_run(
    small_digits: Path, tmp_path: Path
) -> None:
    cfg = _cfg(small_digits)
    _train(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tmp_path / "split", extra_callbacks=[_KillAfterFirstCheckpoint()])
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint_*")) == [
        "checkpoint_epoch0001"
    ]
    report = _train(cfg, tmp_path / "resumed", resume_from=tmp_path / "split")
    assert report["epochs_run"] == 2
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_epoch0002")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_epoch0002")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"][0]["momentum_buffer"].equal(
        b["optimizer"]["state"][0]["momentum_buffer"]
    )
    assert a["loop"] == b["loop"]


def test_run_directory_and_checkpoint_contents(small_digits: Path, tmp_path: Path) -> None:
    cfg = _cfg(small_digits, epochs=1)
    report = _train(cfg, tmp_path)
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "report.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert TrainConfig.load_yaml(tmp_path / "config.yaml") == cfg  # reusable with --config
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["test_top1"] == report["test_top1"] and on_disk["test_samples"] == 80
    state = load_checkpoint(tmp_path / "checkpoint_epoch0001" / "checkpoint.pt")
    assert {
        "model",
        "optimizer",
        "scheduler",
        "loop",
        "config",
        "classes",
        "model_spec",
        "metrics",
        "rng",
        "resolved",
    } <= set(state)
    assert state["classes"] == [str(i) for i in range(10)]
    assert state["model_spec"]["stem"] == "cifar" and state["model_spec"]["num_classes"] == 10
    assert not any(k.startswith("module.") for k in state["model"])  # unwrapped model


def test_early_stopping_stops_after_patience_epochs(small_digits: Path, tmp_path: Path) -> None:
    # Eval-mode "training" with a vanishing lr: the validation top-1 cannot change, so only
    # the first epoch counts as an improvement.
    cfg = _cfg(small_digits, epochs=6, lr=1e-30, min_lr=0.0, patience=2)
    cfg.run.keep_checkpoints = 10
    original = loop_mod.fit

    def fit_frozen(*args, **kwargs):
        return original(*args, **{**kwargs, "set_train_mode": lambda m: m.eval()})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("resnet18_dist.engine.session.fit", fit_frozen)
        report = _train(cfg, tmp_path)
    assert report["stopped_early"] is True
    assert report["epochs_run"] == 3 and report["best_epoch"] == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_checkpoints_for_another_model_are_rejected(small_digits: Path, tmp_path: Path) -> None:
    _train(_cfg(small_digits, epochs=1), tmp_path)
    state = load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    spec = ModelSpec(num_classes=10, stem="cifar")
    check_compatible(state, spec, [str(i) for i in range(10)])
    with pytest.raises(CheckpointError, match="10 classes, the data has 7"):
        check_compatible(state, ModelSpec(num_classes=7, stem="cifar"))
    with pytest.raises(CheckpointError, match="se_reduction"):
        check_compatible(state, ModelSpec(num_classes=10, stem="cifar", se_reduction=8))
    with pytest.raises(CheckpointError, match="class names"):
        check_compatible(state, spec, list("abcdefghij"))
    state["model_spec"]["arch"] = "resnet50"
    with pytest.raises(CheckpointError, match="resnet50"):
        check_compatible(state, spec)


def test_corrupt_and_code_carrying_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")

    torch.save({"model": {}, "model_spec": {}, "x": Payload()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="code.pt"):
        load_checkpoint(tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_spec": {}}, tmp_path)
    real_save = torch.save

    def disk_full(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(WriteError, match="checkpoint.pt: no space left"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_spec": {}}, tmp_path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.ones(3))


def test_a_half_copied_newest_checkpoint_is_skipped_on_resume(tmp_path: Path, caplog) -> None:
    """Ray persists checkpoints by copying in place; a kill mid-copy truncates the newest."""
    for epoch in (1, 2):
        save_checkpoint(
            {"model": {"w": torch.full((3,), float(epoch))}, "model_spec": {}},
            tmp_path / f"checkpoint_epoch{epoch:04d}",
        )
    newest = tmp_path / "checkpoint_epoch0002" / "checkpoint.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        state = load_checkpoint(tmp_path)
    assert state["_path"] == str(tmp_path / "checkpoint_epoch0001" / "checkpoint.pt")
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert f"skipping {newest}: incomplete checkpoint" in caplog.text
    # Named directly, the truncated file is an error that names it, never a silent fallback.
    with pytest.raises(CheckpointError, match="checkpoint_epoch0002"):
        load_checkpoint(newest.parent)
    newest.unlink()
    (tmp_path / "checkpoint_epoch0001" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)
