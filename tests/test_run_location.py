"""The run directory's one owner (resnet18_dist/run_location.py), on a local disk: what a run
holds, the name a second run gets, keeping an old run aside. The same interface on a bucket is
tested against the S3 server in tests/test_storage_s3.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from resnet18_dist.run_location import LocalRun, RunLocation, unique_name


def _run(root: Path, name: str, epochs: int, finished: bool) -> Path:
    run = root / name
    for e in range(1, epochs + 1):
        (run / f"checkpoint_epoch{e:04d}").mkdir(parents=True)
        (run / f"checkpoint_epoch{e:04d}" / "checkpoint.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text("")
    if finished:
        (run / "report.json").write_text(json.dumps({"epochs_run": epochs}))
    return run


def test_a_local_run_says_what_it_holds(tmp_path: Path) -> None:
    _run(tmp_path, "done", 3, finished=True)
    _run(tmp_path, "open", 2, finished=False)
    done, open_, none = (RunLocation.of(tmp_path, n) for n in ("done", "open", "none"))
    assert isinstance(done, LocalRun) and done.path == tmp_path.resolve() / "done"
    assert done.finished_epochs() == 3 and open_.finished_epochs() is None
    assert done.checkpoint_names() == [f"checkpoint_epoch000{e}" for e in (1, 2, 3)]
    assert not none.holds_a_run() and none.finished_epochs() is None
    assert none.newest_checkpoint() is None
    assert done.relative(tmp_path / "done" / "checkpoint_epoch0002") == "checkpoint_epoch0002"
    assert done.relative(tmp_path / "done") == "" and done.relative(tmp_path / "open") is None
    assert done.relative("s3://bucket/done") is None
    done.delete_entry("checkpoint_epoch0001")
    assert done.checkpoint_names() == ["checkpoint_epoch0002", "checkpoint_epoch0003"]


def test_a_second_default_name_gets_a_suffix(tmp_path: Path) -> None:
    first = RunLocation.of(tmp_path, "train-x")
    assert unique_name(first, "train-x") == "train-x"
    (tmp_path / "train-x").mkdir()  # even an empty directory is taken
    (tmp_path / "train-x-2").write_text("a file")
    assert unique_name(first, "train-x") == "train-x-3"


def test_moving_aside_twice_in_one_second_keeps_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the module's clock only: botocore signs requests with time.strftime)
    monkeypatch.setattr(
        "resnet18_dist.run_location.time", SimpleNamespace(strftime=lambda fmt: "20260101-000000")
    )
    loc = RunLocation.of(tmp_path, "r")
    kept = []
    for n in (1, 2):
        _run(tmp_path, "r", n, finished=True)
        planned = loc.aside()
        kept.append(loc.move_aside(planned))
        assert kept[-1].path == planned.path and not loc.exists()
    assert [k.name for k in kept] == ["r.prev-20260101-000000", "r.prev-20260101-000000-2"]
    assert [k.finished_epochs() for k in kept] == [1, 2]


def test_an_unlistable_bucket_is_an_output_dir_error_with_or_without_a_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding: without --name, naming the run listed the bucket outside the conversion
    of storage errors, so it exited 1 instead of 2 naming --output-dir."""
    from resnet18_dist import storage
    from resnet18_dist.config import RunDirConfig, TrainConfig
    from resnet18_dist.launching.preflight import Checked
    from resnet18_dist.options import ConfigError

    def denied(uri: str) -> list[str]:  # a fault injected where the bucket would refuse
        raise storage.StorageError(f"{uri}: access denied")

    monkeypatch.setattr(storage, "list_files", denied)
    monkeypatch.setattr(storage, "require_bucket", lambda uri: None)
    for name in ("", "r1"):
        cfg = TrainConfig(run=RunDirConfig(output_dir="s3://bucket/runs", name=name))
        with pytest.raises(ConfigError) as err:
            Checked(cfg, wandb_mode="disabled").planned(use_gpu=False)
        assert err.value.option == "--output-dir" and "access denied" in str(err.value)
