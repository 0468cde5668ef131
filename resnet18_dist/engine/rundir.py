"""The run-name rule: what the same ``--name`` and ``--output-dir`` mean a second time.

- no such run directory: a new run (``--resume PATH`` starts it from another run's checkpoint);
- an unfinished run there (checkpoints, no ``report.json``): it resumes from its newest complete
  checkpoint, with no flag needed (a lost driver, a killed job: run the same command again); one
  that died before its first checkpoint starts again from epoch 1, with or without ``--resume``;
- a finished run there: refused (exit code 2) unless ``--resume`` extends it with a larger
  ``--epochs`` than it ran;
- ``--fresh``: the old directory is kept, renamed to ``NAME.prev-TIMESTAMP``, and the run starts
  over in a new, empty ``NAME``; a ``--resume PATH`` inside the old directory is read where the
  move put it.

Launchers call ``plan_run`` before any worker starts, and print its ``describe()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from resnet18_dist import storage
from resnet18_dist.checkpoint_file import checkpoint_epoch
from resnet18_dist.config import RESUME_THIS_RUN, RunDirConfig
from resnet18_dist.options import ConfigError
from resnet18_dist.run_files import (  # noqa: F401  (the run files' names, also read from here)
    BEST_MODEL_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_INFO_FILE,
)
from resnet18_dist.run_location import LocalRun, RunLocation


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path | str  # a str for a run on object storage (s3://...)
    action: str  # "new" | "restart" (an unfinished run with no checkpoint) | "resume" | "extend"
    resume_from: Path | str | None = None  # the checkpoint to continue from
    start_epoch: int = 0  # epochs already done
    epochs: int = 0
    moved_aside: Path | str | None = None

    def describe(self) -> str:
        lines = []
        if self.moved_aside is not None:
            lines.append(f"--fresh: the previous run is kept in {self.moved_aside}")
        if self.action == "resume":
            lines.append(
                f"resuming unfinished run {self.run_dir} at epoch {self.start_epoch + 1} of "
                f"{self.epochs} (checkpoint {self.resume_from})"
            )
        elif self.action == "restart":
            lines.append(
                f"restarting unfinished run {self.run_dir} from epoch 1 of {self.epochs}: it "
                "stopped before its first checkpoint"
            )
        elif self.action == "extend":
            lines.append(
                f"extending finished run {self.run_dir} from {self.start_epoch} to "
                f"{self.epochs} epochs (checkpoint {self.resume_from})"
            )
        elif self.resume_from is not None:
            lines.append(f"new run {self.run_dir}, starting from checkpoint {self.resume_from}")
        return "\n".join(lines)


def default_run_name() -> str:
    return time.strftime("train-%Y%m%d-%H%M%S")


def finished_epochs(run_dir: Path | str) -> int | None:
    """Epochs a finished run trained (from its report), or None if it has not finished."""
    return RunLocation.at(run_dir).finished_epochs()


def plan_run(run: RunDirConfig, epochs: int, dry_run: bool = False) -> RunPlan:
    """Apply the rule to ``run.output_dir/run.name`` (the name must be set), local or on a
    bucket alike. Moves the old directory aside for ``--fresh`` (unless ``dry_run``: a launcher
    checks the rule before Ray starts and applies it once the cluster has accepted the run);
    raises ConfigError (exit code 2) to refuse."""
    if storage.is_remote(run.output_dir):
        storage.require_bucket(run.output_dir)
    loc = RunLocation.of(run.output_dir, run.name)
    resume = run.resume
    other: Path | str | None = None
    if resume not in (None, RESUME_THIS_RUN):
        other = resume if storage.is_remote(resume) else Path(resume)  # type: ignore[arg-type]
        check_remote_resume(other)
    inner = None if other is None else loc.relative(other)
    fresh = run.fresh and loc.holds_a_run()
    if inner == "" and not fresh:
        resume, other = RESUME_THIS_RUN, None
    moved = None
    if fresh:
        aside = loc.aside()
        if inner is not None:
            # `--fresh --resume NAME/checkpoint_...`: the checkpoint moves with its run; it is
            # read from there.
            other = _moved_checkpoint(loc, aside, other, inner)  # type: ignore[arg-type]
        if dry_run:
            return RunPlan(
                loc.path, "new", resume_from=other, epochs=epochs, moved_aside=aside.path
            )
        moved = loc.move_aside(aside).path

    if not loc.holds_a_run():
        if resume == RESUME_THIS_RUN:
            raise ConfigError("--resume", f"{loc.path} holds no run to resume")
        return RunPlan(loc.path, "new", resume_from=other, epochs=epochs, moved_aside=moved)
    done = loc.finished_epochs()
    return _decide(loc.path, resume, other, done, loc.newest_checkpoint(), epochs, moved)


def _decide(
    run_dir: Path | str,
    resume: str | None,
    other: Path | str | None,
    done: int | None,
    latest: Path | str | None,
    epochs: int,
    moved: Path | str | None,
) -> RunPlan:
    """The rule for a directory (local or on a bucket) that holds a run: ``done`` is the epochs
    of a finished one (None when unfinished), ``latest`` its newest complete checkpoint."""
    if done is not None:
        hint = (
            f"pass --resume with --epochs larger than {done} to extend it, --fresh to start "
            "over (the old run is kept), or another --name"
        )
        if resume != RESUME_THIS_RUN:
            raise ConfigError(
                "--name",
                f"{run_dir} already finished ({done} epochs, {REPORT_FILE} written); {hint}",
            )
        if epochs <= done:
            raise ConfigError("--epochs", f"{run_dir} already ran {done} epochs; {hint}")
        if latest is None:
            raise ConfigError("--resume", f"{run_dir} finished but holds no checkpoint to extend")
        return RunPlan(run_dir, "extend", latest, checkpoint_epoch(Path(latest).parent), epochs)
    if other is not None:
        raise ConfigError(
            "--resume",
            f"{run_dir} already holds an unfinished run; run the same command without --resume "
            f"to continue it, or use --fresh or another --name to start from {other}",
        )
    if latest is None:
        # Died before its first checkpoint: nothing to resume, with or without --resume; it
        # starts again from epoch 1 (the launchers hand the workers no checkpoint).
        return RunPlan(run_dir, "restart", epochs=epochs, moved_aside=moved)
    return RunPlan(run_dir, "resume", latest, checkpoint_epoch(Path(latest).parent), epochs)


def _moved_checkpoint(
    loc: RunLocation, aside: RunLocation, other: Path | str, inner: str
) -> Path | str:
    """Where the checkpoint that ``--resume other`` names inside ``loc`` will be once ``loc`` is
    kept as ``aside``. On a bucket the same relative key; locally the file itself (a run or
    checkpoint directory is resolved to its newest checkpoint file now, while it is still where
    the user named it, so the plan prints exactly what it loads)."""
    if not isinstance(loc, LocalRun):
        return aside.join(inner)
    from resnet18_dist.checkpoint_file import CheckpointError, resolve_checkpoint_path

    try:
        found = resolve_checkpoint_path(other)
    except CheckpointError as exc:
        raise ConfigError("--resume", str(exc)) from exc
    rel = loc.relative(found)
    if rel is None:  # a link inside the run to a file elsewhere: that file does not move
        return found.resolve()
    return aside.join(rel)


def newest_checkpoint(run_dir: Path | str) -> Path | str | None:
    """The newest complete checkpoint of a local or remote run directory, or None."""
    return RunLocation.at(run_dir).newest_checkpoint()


def read_run_file(run_dir: Path | str, name: str) -> str:
    return RunLocation.at(run_dir).read_text(name)


def check_remote_resume(other: Path | str | None) -> None:
    """A remote --resume is looked up now, so a mistyped URI is an option error before Ray
    starts, not a worker failure after."""
    if isinstance(other, str) and storage.is_remote(other):
        from resnet18_dist.checkpoint_file import CheckpointError, fetch_remote_checkpoint

        try:
            fetch_remote_checkpoint(other)
        except CheckpointError as exc:
            raise ConfigError("--resume", str(exc)) from exc


def prune_untracked_checkpoints(run_dir: Path | str, tracked: set[str]) -> list[str]:
    """Delete the run's ``checkpoint_*`` directories that are older than the newest one Ray
    Train keeps and not among those it keeps (``tracked``: directory names); the names deleted.

    Ray Train deletes what falls out of ``num_to_keep`` only among the checkpoints it has
    registered. A driver killed after a checkpoint was written but before Ray registered it
    leaves one that the rerun resumes from (``_decide`` above) yet Ray never tracks, so it
    would stay forever: this is the one place that knows both sides.
    """
    if not tracked:
        return []
    newest = max(checkpoint_epoch(Path(name)) for name in tracked)
    loc = RunLocation.at(run_dir)
    stale = [
        n
        for n in loc.checkpoint_names()
        if n not in tracked and 0 <= checkpoint_epoch(Path(n)) < newest
    ]
    for name in stale:
        loc.delete_entry(name)
    return stale
