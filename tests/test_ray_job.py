"""The README's main job, and against a real `ray start --head` on loopback: `ray job submit --
python launch/sweep.py` (`ray job submit -- python launch/train.py` runs on the two-node cluster
of tests/test_multinode.py)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, assert_two_rank_console
from .ray_cluster import RAY, LoopbackCluster

TINY = ("--width", "0.25")


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


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_a_small_sweep(
    ray_head: tuple[str, dict], small_digits: Path, tmp_path: Path
) -> None:
    """A sweep as a Ray job on the same one-node cluster (one `ray start` for the module), with
    Optuna's TPE search (the `optuna` extra, which CI installs; skipped, and reported so,
    without it)."""
    from .test_sweep import _rows, _sweep_args

    pytest.importorskip("optuna", reason="the optuna extra: pip install -e '.[optuna]'")

    address, env = ray_head
    runtime_env = {"env_vars": {"RESNET18_DIST_CACHE": os.environ["RESNET18_DIST_CACHE"]}}
    proc = subprocess.run(
        [
            RAY,
            *("job", "submit", "--address", address, "--working-dir", str(REPO)),
            *("--runtime-env-json", json.dumps(runtime_env), "--"),
            "python",
            "launch/sweep.py",
            *_sweep_args(small_digits, tmp_path, "job", "--num-samples", "2", *TINY),
            *("--max-epochs", "1", "--wandb-mode", "disabled", "--max-int8-drop", "100"),
            *("--search", "optuna"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "The cluster has 2 CPU(s): 1 trial(s) fit at once" in log
    rows = _rows(tmp_path / "job")
    assert len(rows) == 2 and all(r["status"] != "error" for r in rows)
    assert (tmp_path / "job" / "best" / "model.int8.onnx").is_file()
    assert "optuna search" in log
    assert len({r["lr"] for r in rows}) == 2  # two samples from TPE's start-up
    # Tune's own record of the searcher that ran (the console above only echoes the option):
    # a Searcher such as OptunaSearch saves searcher-state-*.pkl, the random search
    # (BasicVariantGenerator) basic-variant-state-*.json instead.
    sweep = tmp_path / "job"
    assert list(sweep.glob("searcher-state-*.pkl")), sorted(p.name for p in sweep.iterdir())
    assert not list(sweep.glob("basic-variant-state-*.json"))


def test_ray_workers_import_this_checkout_ahead_of_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A launcher's private Ray or `--address` cluster: the workers import this checkout (a
    fresh clone need not be installed); a `ray job submit --working-dir` job gets its upload
    on the path from Ray instead."""
    from resnet18_dist.integrations.ray_train import _local_runtime_env

    monkeypatch.setenv("PYTHONPATH", "/opt/elsewhere")
    path = _local_runtime_env()["env_vars"]["PYTHONPATH"]
    assert path.split(os.pathsep) == [str(REPO), "/opt/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    assert _local_runtime_env() == {"env_vars": {"PYTHONPATH": str(REPO)}}
