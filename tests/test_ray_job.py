"""Against a real `ray start --head` on loopback: `ray job submit -- python launch/train.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, launch, train_args
from .ray_cluster import RAY, LoopbackCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    """A one-node cluster with 2 CPUs and the job server, token auth on (Ray's default):
    (the job server's address, the environment that carries the token)."""
    cluster = LoopbackCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start_head(cpus=2)
        yield cluster.dashboard, cluster.env
    finally:
        cluster.shutdown()


def test_ray_job_submit_trains_digits_with_two_ddp_workers(
    ray_head: tuple[str, dict], tmp_path: Path
) -> None:
    address, env = ray_head
    runtime_env = {"env_vars": {"RESNET18_DIST_CACHE": os.environ["RESNET18_DIST_CACHE"]}}
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "launch/train.py",
            *train_args(tmp_path, "job", quiet=False),  # the console a user sees
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    # Two DDP workers, one per rank, in one gloo process group.
    assert re.search(r"DDP worker rank 0/2 .* process group gloo", log)
    assert re.search(r"DDP worker rank 1/2 .* process group gloo", log)
    # A readable console: one line per epoch from rank 0, none of Ray Train's per-rank
    # `TrainingReport(...)` dicts or checkpoint lines (they come back with --verbose, see
    # test_dali.py's Ray run).
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log
    for epoch in range(1, 16):
        assert len(re.findall(rf"epoch {epoch}/15: train loss", log)) == 1, epoch
    # The main job's default epochs reach the digits accuracy bar, and the report is printed.
    assert "test report (360 images" in log
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2
    assert report["test_top1"] >= 0.95, report["test_top1"]
    assert report["test_samples"] == 360
    checkpoints = sorted(p.name for p in (tmp_path / "job").glob("checkpoint_epoch*"))
    assert len(checkpoints) == 2  # --keep-checkpoints 2: Ray deleted the older ones

    # The README's next step on the main job's run: the export passes its checks (exit 0).
    export = launch(
        "export",
        *("--checkpoint", str(tmp_path / "job"), "--out", str(tmp_path / "export")),
        *("--latency-iters", "20", "--throughput-seconds", "0.5", "--wandb-mode", "disabled"),
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    checks = json.loads((tmp_path / "export" / "report.json").read_text())["checks"]
    assert checks["int8_ok"] and checks["int8_top1_drop"] <= 1.0
