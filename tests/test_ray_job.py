"""The README's main job, and the Ray workers' import path. (`ray job submit -- python
launch/train.py` and `ray job submit -- python launch/sweep.py` run on the loopback cluster of
tests/test_multinode.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import REPO, assert_two_rank_console


@pytest.mark.slow
@pytest.mark.ray
def test_the_main_job_trains_digits_with_two_ddp_workers_to_the_bar(
    digits_run: tuple[Path, str], digits_export: tuple[Path, dict]
) -> None:
    """The README's main job (`python launch/train.py --num-workers 2`, run once per session in
    tests/conftest.py): its console, its report, and the export the README does next."""
    run_dir, log = digits_run
    # Two DDP ranks, a readable console, and the default 15 epochs reach the digits bar below.
    assert_two_rank_console(log, epochs=15)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2
    assert report["test_top1"] >= 0.95, report["test_top1"]
    assert report["test_samples"] == 360
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_epoch*"))
    assert len(checkpoints) == 2  # --keep-checkpoints 2: Ray deleted the older ones
    # The README's next step on the main job's run: the export passes its checks (what makes
    # launch/export.py exit 0; the exit codes are tested in test_export.py).
    checks = digits_export[1]["checks"]
    assert checks["int8_ok"] and checks["int8_top1_drop"] <= 1.0


def test_ray_workers_import_this_checkout_ahead_of_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A launcher's private Ray or `--address` cluster: the workers import this checkout (a
    fresh clone need not be installed); a `ray job submit --working-dir` job gets its upload
    on the path from Ray instead."""
    from resnet18_dist.launching.ray_cluster import local_runtime_env

    monkeypatch.setenv("PYTHONPATH", "/opt/elsewhere")
    path = local_runtime_env()["env_vars"]["PYTHONPATH"]
    assert path.split(os.pathsep) == [str(REPO), "/opt/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    assert local_runtime_env() == {"env_vars": {"PYTHONPATH": str(REPO)}}


def test_a_private_ray_is_told_apart_from_joining_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a Ray that ray.init would start gets its own State API address: not a cluster named
    by --address or RAY_ADDRESS, nor a Ray Client address (which Ray's parser refuses)."""
    from resnet18_dist.launching.ray_cluster import _starts_private_ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert _starts_private_ray(None)
    assert not _starts_private_ray("ray://head.example:10001")
    assert not _starts_private_ray("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    assert not _starts_private_ray(None)
