from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from resnet18_dist.atomic import WriteError
from resnet18_dist.checkpoint_file import CheckpointError, load_checkpoint, write_checkpoint
from resnet18_dist.config import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
)
from resnet18_dist.engine import loop as loop_mod
from resnet18_dist.engine.callbacks import Callback
from resnet18_dist.engine.checkpoint import check_compatible
from resnet18_dist.engine.epoch_sink import LocalEpochSink
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import run_training
from resnet18_dist.models import ModelSpec

# The loop's bookkeeping (resume, checkpoints, schedules, early stopping), not learning: a
# quarter-width ResNet18, the same layers with 1/16 of the work.
WIDTH = 0.25


def _cfg(data: Path, **optim) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(data_dir=str(data), batch_size=32, augment="cifar"),
        model=ModelConfig(width=WIDTH),
        optim=OptimConfig(**{"epochs": 2, "lr": 0.05, **optim}),
        run=RunDirConfig(seed=7),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )


def _train(cfg: TrainConfig, run_dir: Path, **kw) -> dict:
    return run_training(
        cfg, TorchRuntime(cfg.device), LocalEpochSink(run_dir, keep=5), run_dir, **kw
    )


def _logged_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]


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
    # It really resumed: only epoch 2 was trained (and logged, and checkpointed) here.
    assert _logged_epochs(tmp_path / "resumed") == [1]
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint_*")] == ["checkpoint_epoch0002"]
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


@contextlib.contextmanager
def _frozen_training() -> Iterator[None]:
    """Training steps in eval mode: with a vanishing lr nothing changes, so validation top-1
    stays put and early stopping is what ends the run."""
    original = loop_mod.fit

    def fit_frozen(setup, *args, **kwargs):
        setup.set_train_mode = lambda m: m.eval()
        return original(setup, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("resnet18_dist.engine.session.fit", fit_frozen)
        yield


def test_early_stopping_stops_after_patience_epochs(small_digits: Path, tmp_path: Path) -> None:
    # Eval-mode "training" with a vanishing lr: the validation top-1 cannot change, so only
    # the first epoch counts as an improvement.
    cfg = _cfg(small_digits, epochs=6, lr=1e-30, min_lr=0.0, patience=2)
    cfg.run.keep_checkpoints = 10
    with _frozen_training():
        report = _train(cfg, tmp_path)
    assert report["stopped_early"] is True
    assert report["epochs_run"] == 3 and report["best_epoch"] == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # Patience that runs out at the last epoch stopped nothing: the run trained all it was asked
    # (its last metrics line says so too) ...
    cfg.optim.epochs, cfg.run.name = 3, "full"
    with _frozen_training():
        report = _train(cfg, tmp_path / "full")
    assert report["epochs_run"] == 3 and report["stopped_early"] is False
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["stopped_early"] is False
    # ... and extended with more epochs, it gets its whole patience again, as a stopped run does.
    cfg.optim.epochs = 6
    with _frozen_training():
        more = _train(cfg, tmp_path / "more", resume_from=tmp_path / "full")
    assert more["epochs_run"] == 5 and more["stopped_early"] is True


def test_checkpoints_for_another_model_are_rejected(small_digits: Path, tmp_path: Path) -> None:
    _train(_cfg(small_digits, epochs=1), tmp_path)
    state = load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    spec = ModelSpec(num_classes=10, stem="cifar", width=WIDTH)
    check_compatible(state, spec, [str(i) for i in range(10)])
    with pytest.raises(CheckpointError, match="10 classes, the data has 7"):
        check_compatible(state, ModelSpec(num_classes=7, stem="cifar", width=WIDTH))
    with pytest.raises(CheckpointError, match="se_reduction"):
        check_compatible(
            state, ModelSpec(num_classes=10, stem="cifar", se_reduction=8, width=WIDTH)
        )
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
    write_checkpoint({"model": {"w": torch.ones(3)}, "model_spec": {}}, tmp_path)
    real_save = torch.save

    def disk_full(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError, match="checkpoint.pt: no space left"):
        write_checkpoint({"model": {"w": torch.zeros(3)}, "model_spec": {}}, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.ones(3))


def test_a_half_copied_newest_checkpoint_is_skipped_on_resume(tmp_path: Path, caplog) -> None:
    """Ray persists checkpoints by copying in place; a kill mid-copy truncates the newest."""
    for epoch in (1, 2):
        write_checkpoint(
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


def _train_two_ranks_recording_eval_buffers(rank: int, world: int, data: str, out: str) -> None:
    """One rank of a 2-rank gloo run that records its BatchNorm buffers at every evaluation."""
    records = []
    real = loop_mod.evaluate

    def recording_evaluate(model, *args, **kwargs):
        records.append({k: v.clone() for k, v in model.named_buffers()})
        return real(model, *args, **kwargs)

    loop_mod.evaluate = recording_evaluate
    import resnet18_dist.engine.session as session_mod

    session_mod.evaluate = recording_evaluate
    cfg = _cfg(Path(data), epochs=2)
    runtime = TorchRuntime(cfg.device)
    run_dir = Path(out) / "run"
    run_training(cfg, runtime, LocalEpochSink(run_dir, is_main=runtime.is_main), run_dir)
    torch.save(records, Path(out) / f"buffers{rank}.pt")


@pytest.mark.slow
def test_every_rank_evaluates_with_the_same_batchnorm_statistics(
    small_digits: Path, tmp_path: Path
) -> None:
    """Defect 3: after training, each rank's BatchNorm running statistics include its own last
    batch (DDP broadcasts rank 0's buffers only at the start of a training forward), so the
    ranks evaluated slightly different models."""
    from .conftest import run_ranks

    run_ranks(_train_two_ranks_recording_eval_buffers, 2, str(small_digits), str(tmp_path))
    a = torch.load(tmp_path / "buffers0.pt", weights_only=True)
    b = torch.load(tmp_path / "buffers1.pt", weights_only=True)
    assert len(a) == len(b) == 3  # validation after each of 2 epochs, then the test split
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        for k in ra:
            assert torch.equal(ra[k], rb[k]), (i, k)
    saved = load_checkpoint(tmp_path / "run")["model"]
    assert torch.equal(saved["bn1.running_mean"], a[1]["bn1.running_mean"])


def test_lr_schedule_keeps_its_place_when_steps_per_epoch_change(
    small_digits: Path, tmp_path: Path
) -> None:
    """Defect 4: the schedule's position was a step count, so resuming with another batch size
    or worker count (e.g. 2 Ray workers, then 1 accelerate process) jumped the lr. It is kept in
    epochs: a resumed run follows the same lr as a straight run with the new settings."""
    cfg = _cfg(small_digits, epochs=3)
    cfg.data.batch_size = 48  # 240 images: 5 steps per epoch
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tmp_path / "first", extra_callbacks=[_KillAfterFirstCheckpoint()])
    cfg.data.batch_size = 16  # 15 steps per epoch from here on
    _train(cfg, tmp_path / "resumed", resume_from=tmp_path / "first")
    _train(cfg, tmp_path / "straight")
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").open()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert [e["epoch"] for e in resumed] == [1, 2]
    for r, s in zip(resumed, straight[1:], strict=True):
        assert r["lr"] == pytest.approx(s["lr"], rel=1e-9), (r["epoch"], r["lr"], s["lr"])
        assert r["step"] == s["step"]


def test_a_run_that_stopped_early_continues_with_more_epochs(
    small_digits: Path, tmp_path: Path, caplog
) -> None:
    """Defect 9: `stopped_early` was restored on resume, so a larger --epochs trained nothing
    and said nothing. Resuming continues, with patience restarted, and says so."""
    cfg = _cfg(small_digits, epochs=6, lr=1e-30, min_lr=0.0, patience=2)
    cfg.run.keep_checkpoints = 10
    with _frozen_training():
        first = _train(cfg, tmp_path / "a")
        assert first["stopped_early"] and first["epochs_run"] == 3
        cfg.optim.epochs = 8
        with caplog.at_level("INFO", logger="resnet18_dist"):
            second = _train(cfg, tmp_path / "b", resume_from=tmp_path / "a")
    assert "patience restarts" in caplog.text
    # Patience 2 again from epoch 4: nothing improves, so it stops after epochs 4 and 5.
    assert second["epochs_run"] == 5 and second["stopped_early"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b" / "metrics.jsonl").open()]
    assert epochs == [3, 4]


def test_a_checkpoint_of_an_unknown_format_version_is_refused_by_name(tmp_path: Path) -> None:
    write_checkpoint({"format_version": 99, "model": {}, "model_spec": {}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*format.*99"):
        load_checkpoint(tmp_path)
