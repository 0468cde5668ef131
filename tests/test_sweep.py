"""Sweeps (issue 11): option checks before Ray starts; real ASHA sweeps on the small digits."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, launch, user_env
from .s3_server import BUCKET, objects

# Sweeps' orchestration (trials, ASHA, resume, export of the best), not learning: a ResNet18 at
# a quarter of the width (1/16 of the compute) trains a trial's epoch in about a second.
TINY = ("--width", "0.25")


# ------------------------------------------------------------------------------ bad input
def test_asha_rungs_end_before_the_last_epoch() -> None:
    """A rung at the last epoch would stop a trial that trained every epoch before its test
    report; with the grace period at the last epoch there is nothing to stop."""
    from ray.tune.schedulers import FIFOScheduler

    from resnet18_dist.tuning.sweep import asha_scheduler

    for epochs, grace, rf in ((2, 1, 2), (3, 1, 2), (4, 1, 2), (16, 1, 2), (9, 1, 3), (8, 2, 2)):
        rungs = [r[0] for r in asha_scheduler(epochs, grace, rf)._brackets[0]._rungs]
        assert rungs and max(rungs) < epochs and min(rungs) == grace, (epochs, rungs)
    assert isinstance(asha_scheduler(2, 2, 2), FIFOScheduler)


def test_the_best_trial_is_chosen_by_validation_never_by_test(tmp_path: Path) -> None:
    from resnet18_dist.tuning.sweep import TrialRow, pick_best

    def row(name: str, val: float, test: float | None, status: str = "finished") -> TrialRow:
        return TrialRow(name, name, {}, val, 3, False, status, test, 1.0, tmp_path, [val])

    rows = [
        row("a", 0.90, 0.99),  # best on test, not on validation
        row("b", 0.95, 0.80),  # best on validation
        row("c", 0.97, None, status="error"),  # errored: never chosen
        row("d", float("nan"), None, status="stopped"),
    ]
    assert pick_best(rows).trial == "b"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lr-range", "0.5,0.1"], "--lr-range"),
        (["--lr-range", "0.1,0.1"], "--lr-range"),
        (["--lr-range", "0,0.1"], "--lr-range"),
        (["--lr-range", "0.001,inf"], "--lr-range"),
        (["--wd-range=-1e-4,1e-3"], "--wd-range"),
        (["--lr-range", "0.1"], "--lr-range"),
        (["--se-choices", ""], "--se-choices"),
        (["--se-choices", "3"], "--se-choices"),
        (["--temperature-range", "1,4"], "--temperature-range"),
        (["--num-samples", "0"], "--num-samples"),
        (["--grace-period", "4", "--max-epochs", "3"], "--grace-period"),
        (["--grace-period", "16"], "--grace-period"),  # above the default --epochs 15
        (["--reduction-factor", "1"], "--reduction-factor"),
    ],
)
def test_bad_sweep_options_exit_2_naming_the_option_before_ray(
    args: list[str], option: str, tmp_path: Path
) -> None:
    proc = launch("sweep", *args, "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {option}:" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    assert "Ray" not in proc.stdout  # refused before Ray started


def test_sweep_config_overrides_and_trial_values() -> None:
    from resnet18_dist.tuning.space import SweepConfig, trial_config

    cfg = SweepConfig.from_dict(
        {"optim": {"epochs": 5, "lr": 0.1}, "sweep": {"lr_range": "0.01,1", "max_epochs": 3}}
    )
    assert cfg.sweep.lr_range == (0.01, 1.0) and cfg.epochs == 3
    base = cfg.train_config().to_dict()
    assert base["optim"]["epochs"] == 3
    t = trial_config(base, {"lr": 5e-6, "weight_decay": 1e-5, "se_reduction": 8})
    assert t.optim.lr == 5e-6 and t.optim.min_lr == 5e-6  # the floor follows a small peak
    assert t.model.se_reduction == 8 and t.optim.weight_decay == 1e-5
    assert cfg.temperature_range() is None  # no teacher: no temperature searched


# ------------------------------------------------------------------------------ real sweeps
def _sweep_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A sweep's options for a run into ``out/name`` (tests/test_multinode.py's Ray-job sweep)."""
    return [
        *("--data-dir", str(data), "--batch-size", "32", "--warmup-epochs", "0"),
        *("--output-dir", str(out), "--name", name, "--quiet"),
        # The best trial's export measures briefly: its files and checks are what is tested.
        *("--latency-iters", "2", "--throughput-seconds", "0.1"),
        *extra,
    ]


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


def _tune_results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Tune's own per-trial results (result.json in each of its trial directories)."""
    out = {}
    for f in sweep_dir.glob("run_trial_*/result.json"):
        results = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[results[0]["trial_id"]] = results
    return out


# The README's sweep (README.md and docs/sweeps.md), which tests/test_readme.py leaves to this
# test: typed as written in a user's working directory, with these options appended (argparse
# keeps the last of a repeated option). With the default --seed the first trial samples lr ~
# 0.1, the second 1.2e-4 from 1e-4..5: after one epoch the first leads (val top-1 ~0.5) and the
# second has barely moved (~0.18), so ASHA's rung at epoch 1 (the README's --grace-period 1)
# stops it. Two trials show it (a third, lr 2.0, only repeated the stop at 14 s a trial).
README_SWEEP = (
    "python launch/sweep.py --num-samples 4 --max-epochs 3 --grace-period 1 --lr-range 0.001,5 "
    "--name s1 --output-dir sweeps"
)
README_SWEEP_OPTIONS = (
    *("--num-samples", "2", "--max-epochs", "2", "--lr-range", "1e-4,5"),
    *("--batch-size", "32", "--warmup-epochs", "0", *TINY),
    # SE blocks in every trial (the searched choice, one value here): trials build them.
    *("--se-choices", "4"),
    # One trial at a time on any machine, so that the leader reaches the rung first: ASHA never
    # stops the first trial to report at a rung.
    *("--max-concurrent", "1"),
    # Two epochs leave a weak model whose INT8 copy can lose much (the gate is tested in
    # tests/test_export.py); the best trial's export measures briefly.
    *("--max-int8-drop", "100", "--latency-iters", "2", "--throughput-seconds", "0.1"),
    *("--wandb-mode", "offline"),
)
README_SWEEP_WHY = (
    "run by tests/test_sweep.py as written (its search and ASHA options overridden by those "
    "appended), in a user's working directory, with "
    f"`{' '.join(README_SWEEP_OPTIONS)} --publish-best s3://...` appended (two trials of the "
    "default digits, of which ASHA stops the hopeless one; W&B offline; the best trial's export "
    "also published to a bucket on loopback); its console is checked against docs/sweeps.md's "
    "sample there"
)


@pytest.mark.slow
@pytest.mark.ray
def test_the_readmes_asha_sweep_stops_a_hopeless_trial_and_exports_the_best(
    digits_folder: Path, tmp_path: Path, s3: dict[str, str]
) -> None:
    from .test_readme import missing_lines, page_commands, read_pages, sample_output

    pages = read_pages()
    assert README_SWEEP in {c.text for c in page_commands(pages)}, "the README's sweep changed"
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "launch").symlink_to(REPO / "launch")  # a checkout's launch/, and nothing else
    # The bucket (moto on loopback) the best trial's export is also published to.
    published = f"s3://{BUCKET}/sweeps/s1/best"
    env = {**user_env(), **s3, "WANDB_MODE": "offline"}
    typed = f"{README_SWEEP} {shlex.join(README_SWEEP_OPTIONS)} --publish-best {published}"
    proc = subprocess.run(
        ["bash", "-c", typed], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    sweep = cwd / "sweeps" / "s1"
    assert "Each trial needs 2 CPU(s): 1 CPU for its Train driver" in proc.stdout
    # The console has the shape of docs/sweeps.md's sample: every line of it (the finished
    # trials' rows that are not the best aside: here every trial but the best was stopped).
    sample = sample_output(pages["docs/sweeps.md"], "Sweeps")
    missing = missing_lines(sample, console, r"^trial-\d+ (?!\*).* finished |^-+ ")
    assert missing == [], f"the console has no line like these: {missing}\n{console}"
    rows = _rows(sweep)
    assert len(rows) == 2 and {r["se_reduction"] for r in rows} == {"4"}, rows

    # ASHA stopped the hopeless trial early, as Tune's own results show.
    results = _tune_results(sweep)
    assert len(results) == 2
    stopped = [t for t, rs in results.items() if not any(r.get("final") for r in rs)]
    early = [t for t in stopped if max(r["epochs_done"] for r in results[t]) < 2]
    assert early, results
    assert {r["trial"] for r in rows if r["stopped_by_asha"] == "True"} == {
        f"trial-{t.rsplit('_', 1)[-1]}" for t in stopped
    }
    (hopeless,) = [r for r in rows if r["stopped_by_asha"] == "True"]
    assert float(hopeless["lr"]) == min(float(r["lr"]) for r in rows)  # the one that barely moved

    # The best trial is the one with the highest validation top-1 (never test).
    best_val = {t: max(r["val_top1"] for r in rs if "epoch" in r) for t, rs in results.items()}
    best_id = max(best_val, key=best_val.get)
    info = json.loads((sweep / "best" / "trial.json").read_text())
    assert info["trial_id"] == best_id
    assert info["best_val_top1"] == pytest.approx(best_val[best_id])
    # Its test figures and the exported files are in best/.
    assert info["test"]["test_samples"] == 360 and info["test"]["test_top1"] > 0.3
    for f in ("model.onnx", "model.int8.onnx", "report.json", "report.md", "trial_config.yaml"):
        assert (sweep / "best" / f).is_file(), f
    assert (
        yaml.safe_load((sweep / "best" / "trial_config.yaml").read_text())["model"]["se_reduction"]
        == 4
    )
    export = json.loads((sweep / "best" / "report.json").read_text())
    assert export["checks"]["fp32_ok"] and "int8_top1_drop" in export["checks"]
    assert {r["latency_runs"] for r in export["rows"]} == {2}  # --latency-iters reached it
    assert (sweep / "sweep.png").stat().st_size > 10_000

    # best/ was published to the bucket whole (report last, with every file's hash): predict
    # reads it from there and answers as it does from the local best/.
    assert f"best trial's export published to {published}" in proc.stdout
    keys = objects(s3, "sweeps/s1/best/")
    assert "sweeps/s1/best/report.json" in keys and "sweeps/s1/best/trial.json" in keys, keys
    image = str(sorted((digits_folder / "3").iterdir())[0])
    cache = {**env, "RESNET18_DIST_CACHE": str(tmp_path / "cache")}
    answers = [
        launch("predict", "--model", model, image, env=cache)
        for model in (published, str(sweep / "best"))
    ]
    assert [a.returncode for a in answers] == [0, 0], [a.stderr for a in answers]
    assert answers[0].stdout == answers[1].stdout, [a.stdout for a in answers]

    # W&B offline: one run per trial, in the sweep's group, job type "trial". Known gap: a
    # trial ASHA stops is killed before W&B's service writes its buffered records, so only
    # the finished trials' runs can be read back.
    for t in results:
        trial_dir = sweep / f"trial-{t.rsplit('_', 1)[-1]}"
        runs = list((trial_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, trial_dir
        if t in stopped:
            continue
        text = _leet("--json", str(runs[0]))
        assert '"s1"' in text and '"trial"' in text  # the group and the job type
        summary = json.loads(_leet("--summary", "--json", str(runs[0])))
        row = next(r for r in rows if r["trial"] == trial_dir.name)
        assert summary["config"]["optim"]["lr"] == pytest.approx(float(row["lr"]))  # sampled
    assert list((sweep / "best" / "wandb").glob("offline-run-*"))  # the export, same group


def _leet(*args: str) -> str:
    wandb_cli = str(Path(sys.executable).with_name("wandb"))
    proc = subprocess.run(
        [wandb_cli, "leet", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# Optuna's search and a killed sweep continued: tests/test_multinode.py runs them as one sweep
# submitted with `ray job submit`.
