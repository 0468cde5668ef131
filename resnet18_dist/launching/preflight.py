"""What every training launcher decides before a worker starts, in one place.

``preflight`` checks what the options name on disk or in a bucket (the dataset, --resume,
--pretrained, --teacher), that the dataset holds a batch per worker, the W&B mode and what this
launcher refuses, and returns a frozen ``Checked``; ``Checked.planned`` then applies the
run-name rule (it may move a run aside) and returns a frozen ``Launch``: the options the workers
get (a copy, with the dataset version pinned, the run's name and the checkpoint to resume filled
in), the run plan, the W&B mode and the device choice. The caller's configuration is never
changed, and the workers validate only what the options say (``Options.validate`` touches no
file): a relative path, a bucket or a file that only the driver's machine has is checked here,
once.

Every refusal is a ConfigError naming the option (exit code 2, ``commands.run``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from resnet18_dist import storage
from resnet18_dist.config import RESUME_THIS_RUN, TORCHVISION_TEACHERS, TrainConfig
from resnet18_dist.engine.rundir import RunPlan, default_run_name, plan_run
from resnet18_dist.options import ConfigError, check
from resnet18_dist.run_location import RunLocation, unique_name

Launcher = Literal["ray", "accelerate", "sweep"]
# What each launcher is called in its refusals.
LAUNCHER_NAMES = {
    "accelerate": "the accelerate launcher",
    "sweep": "a sweep",
}


@dataclass(frozen=True)
class Checked:
    """What ``preflight`` found usable: the options the workers will get (a copy of the command
    line's, the dataset version pinned and, for a training run, its name) and the W&B mode."""

    config: TrainConfig
    wandb_mode: str

    def planned(self, use_gpu: bool, dry_run: bool = False) -> Launch:
        """Apply the run-name rule (a ConfigError refuses it) and print what it decided;
        ``dry_run`` only checks it (nothing moved, nothing printed)."""
        cfg = copy.deepcopy(self.config)
        try:
            if not cfg.run.name:
                # A timestamp; a second run started in the same second gets a suffix, not a
                # resume.
                base = default_run_name()
                cfg.run.name = unique_name(RunLocation.of(cfg.run.output_dir, base), base)
            plan = plan_run(cfg.run, cfg.optim.epochs, dry_run=dry_run)
        except storage.StorageError as exc:  # a bucket that is not there, no credentials, ...
            raise ConfigError("--output-dir", str(exc)) from exc
        if plan.describe() and not dry_run:
            print(plan.describe(), flush=True)
        if not dry_run and cfg.run.resume not in (None, RESUME_THIS_RUN):
            # --fresh may have moved the typed --resume PATH aside with the run: the workers
            # and config.yaml get the checkpoint the plan resolved.
            cfg.run.resume = None if plan.resume_from is None else str(plan.resume_from)
        return Launch(config=cfg, plan=plan, wandb_mode=self.wandb_mode, use_gpu=use_gpu)


@dataclass(frozen=True)
class Launch:
    """A launcher's decisions, handed to the workers as they are: the options (with the run's
    name and the checkpoint to resume), where the run goes, the W&B mode, the device. The
    options are this launch's own copy, never the command line's; nothing changes them after
    ``planned`` (a frozen dataclass cannot make its fields' own fields read-only)."""

    config: TrainConfig
    plan: RunPlan
    wandb_mode: str
    use_gpu: bool


def preflight(
    cfg: TrainConfig,
    launcher: Launcher,
    *,
    gpu_workers_possible: bool = True,
    world_size: int | None = None,
) -> Checked:
    """Everything a launcher can refuse before Ray, torch or a worker starts; for a training
    run, the run-name rule too, without moving anything (``Checked.planned(dry_run=True)``)."""
    from resnet18_dist.integrations import wandb as wandb_adapter

    wandb_mode = wandb_adapter.launcher_mode(cfg.logging.wandb_mode)
    if launcher != "ray":
        # Object storage is written through Ray Train's storage layer (a sweep's trials write
        # their run directories through the local file layout).
        refuse_remote_output(cfg.run.output_dir, LAUNCHER_NAMES[launcher])
    if launcher == "accelerate" and cfg.cluster.elastic:
        # accelerate's process count is fixed by `accelerate launch`
        raise ConfigError("--num-workers", "MIN:MAX is for the Ray launcher")
    check_paths(cfg)
    pinned = copy.deepcopy(cfg)
    sha256 = check_data(cfg, gpu_workers_possible, world_size)
    if sha256 is not None:
        pinned.data.manifest_sha256 = sha256
    checked = Checked(config=pinned, wandb_mode=wandb_mode)
    if launcher == "sweep":  # each trial applies the rule to its own run
        return checked
    # The name a dry plan gives (a timestamp) is the name the run gets.
    named = checked.planned(use_gpu=False, dry_run=True).config.run.name
    return dataclasses.replace(checked, config=_with_name(pinned, named))


def _with_name(cfg: TrainConfig, name: str | None) -> TrainConfig:
    out = copy.deepcopy(cfg)
    out.run.name = name
    return out


def check_paths(cfg: TrainConfig) -> None:
    """The files the options name exist (on this machine; a bucket's dataset is read by
    ``check_data``). Kept out of ``validate`` so that a worker, which gets the options after
    this check, never looks at its own disk for a path given on the driver's."""
    data_dir = cfg.data.data_dir
    if data_dir is not None and not storage.is_remote(data_dir):
        check(
            os.path.isfile(os.path.join(data_dir, "manifest.json")),
            "data_dir",
            f"{data_dir} is not a prepared dataset (no manifest.json); prepare it with "
            "`python launch/prepare_data.py --source SRC --out DIR`",
        )
    pretrained = cfg.model.pretrained
    if pretrained is not None and pretrained != "torchvision":
        check(
            os.path.exists(pretrained),
            "pretrained",
            f"{pretrained} does not exist (give a weights file, a checkpoint, or `torchvision`)",
        )
    _check_teacher(cfg)
    resume = cfg.run.resume
    if resume not in (None, RESUME_THIS_RUN) and not storage.is_remote(resume):
        check(os.path.exists(resume), "resume", f"{resume} does not exist")


def _check_teacher(cfg: TrainConfig) -> None:
    teacher, weights = cfg.distill.teacher, cfg.distill.teacher_weights
    if teacher is None:
        return  # a --teacher-weights without it is refused by validate()
    if teacher in TORCHVISION_TEACHERS and not os.path.exists(teacher):
        check(
            weights is not None,
            "teacher_weights",
            f"a torchvision teacher ({teacher}) needs its weights: a state-dict file trained on "
            "this data's classes, or `torchvision`",
        )
        if weights != "torchvision":
            check(os.path.exists(weights), "teacher_weights", f"{weights} does not exist")  # type: ignore[arg-type]
        return
    check(
        os.path.exists(teacher),
        "teacher",
        f"{teacher} is neither a checkpoint / run directory nor one of "
        f"{', '.join(TORCHVISION_TEACHERS)}",
    )
    check(
        weights is None,
        "teacher_weights",
        "only for a torchvision teacher; a checkpoint carries its own weights",
    )


def check_data(
    cfg: TrainConfig, gpu_workers_possible: bool, world_size: int | None = None
) -> str | None:
    """The dataset is prepared and readable, holds a full training batch for each of
    ``world_size`` workers (default: --num-workers' MAX), and DALI is present if asked for
    (ConfigError). Returns the sha256 of a bucket's manifest: the version every worker copies
    (pinned here, so a re-upload mid-run cannot split the nodes); None for a local dataset."""
    # Light imports only: a Ray launcher starts Ray before torch has loaded.
    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.data.manifest import DatasetError, Manifest

    # The driver may have no GPU while the workers do; only DALI's presence is checked here.
    if cfg.data.data_backend == "dali":
        import torch

        from resnet18_dist.data.loaders import resolve_backend  # torchvision: only if needed

        device = torch.device("cuda" if gpu_workers_possible else "cpu")
        resolve_backend("dali", device)
    pinned = None
    try:
        if storage.is_remote(cfg.data.data_dir):
            from resnet18_dist.data.remote import manifest_sha256, read_remote_manifest

            # Only the manifest: each node's workers copy the shards into their own cache.
            data, manifest = read_remote_manifest(cfg.data.data_dir)
            pinned = manifest_sha256(data)
        else:
            manifest = Manifest.load(dataset_dir(cfg.data.data_dir))
    except DatasetError as exc:
        raise ConfigError("--data-dir", str(exc)) from exc
    # The workers would find this too, but only after Ray and torch have started, as a
    # traceback per worker. An elastic run's global batch is --batch-size x MAX at any size.
    world = world_size or cfg.cluster.max_workers
    train = manifest.counts.get("train", 0)
    if train // world < cfg.data.batch_size:
        raise ConfigError(
            "--batch-size",
            f"{cfg.data.data_dir or 'the digits'} has {train} training images: "
            f"{train // world} per worker over {world} worker(s), fewer than --batch-size "
            f"{cfg.data.batch_size}; lower --batch-size or --num-workers",
        )
    return pinned


def refuse_remote_output(output_dir: str, launcher: str) -> None:
    """Object storage is written through Ray Train's storage layer; other launchers need a
    local or shared file system."""
    if storage.is_remote(output_dir):
        raise ConfigError(
            "--output-dir",
            f"{output_dir}: object storage is supported by launch/train.py (Ray Train); "
            f"{launcher} needs a local or shared path",
        )
