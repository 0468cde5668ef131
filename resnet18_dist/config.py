"""The training run's options: validated dataclasses in five sections, YAML round trip.

Every option lives in exactly one section dataclass and carries its help text, choices and
bounds in its field metadata (see :mod:`resnet18_dist.options`), so ``--help``, the README table
and validation errors all name the same flag. Nothing here parses ``sys.argv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from resnet18_dist.options import ConfigError, Options, check, flag, opt

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "flag",
    "parse_freeze",
]

AUGMENT_POLICIES = ("auto", "seed", "cifar", "none")
BACKENDS = ("auto", "torchvision", "dali")
STEMS = ("auto", "imagenet", "cifar")
SE_REDUCTIONS = (0, 4, 8, 16, 32)
SMALL_IMAGE_MAX = 64  # images this size or smaller get the CIFAR stem and the `cifar` policy
TRISTATE = ("auto", "on", "off")


@dataclass
class DataConfig(Options):
    data_dir: str | None = opt(
        None,
        "Prepared dataset directory (holds manifest.json; see launch/prepare_data.py). "
        "Default: the built-in scikit-learn digits, prepared into a cache on first use.",
    )
    image_size: int = opt(
        0,
        "Training/eval image size in px. 0 = the data's native size if <= 64 px, else 224.",
        ge=0,
    )
    augment: str = opt(
        "auto",
        "Training augmentation policy: seed (flip, rotate 15, jitter 0.2), cifar (reflect-pad "
        "4 px at 32 px, scaled with size, + random crop + flip), none. auto = the dataset's "
        "hint if it has one (digits: none), else cifar for images <= 64 px, else seed.",
        choices=AUGMENT_POLICIES,
    )
    batch_size: int = opt(
        64, "Training batch size per worker (global batch = this x workers).", ge=2
    )
    eval_batch_size: int = opt(256, "Evaluation batch size per worker.", ge=1)
    loader_workers: int = opt(
        -1, "DataLoader worker processes / DALI threads per training worker. -1 = auto.", ge=-1
    )
    data_backend: str = opt(
        "auto",
        "Data loader: dali (GPU decode + augmentation), torchvision, or auto (DALI when CUDA "
        "and DALI are both present).",
        choices=BACKENDS,
    )
    verify_shards: str = opt(
        "auto",
        "Check shard sha256 against the manifest before DALI reads them (DALI's decoder can "
        "crash on a corrupt image); once per node, remembered until a shard changes. auto = "
        "for splits up to 8 GiB.",
        choices=TRISTATE,
    )

    def validate(self) -> None:
        check(
            self.image_size == 0 or self.image_size >= 8,
            "image_size",
            f"must be 0 (auto) or at least 8 px (got {self.image_size})",
        )
        if self.data_dir is not None and "://" not in self.data_dir:
            check(
                (Path(self.data_dir) / "manifest.json").is_file(),
                "data_dir",
                f"{self.data_dir} is not a prepared dataset (no manifest.json); "
                "prepare it with `python launch/prepare_data.py --source SRC --out DIR`",
            )


ARCH_CHOICES = ("resnet18", "resnet34", "resnet50")
TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def parse_freeze(value: str) -> int:
    """Number of leading parts frozen: 0 none; 1..4 the stem and that many stages; 5 backbone."""
    if value == "none":
        return 0
    if value == "backbone":
        return 5
    if value.startswith("stages:"):
        try:
            n = int(value.split(":", 1)[1])
        except ValueError:
            n = -1
        if 1 <= n <= 4:
            return n
    raise ConfigError(
        "--freeze", f"must be none, backbone or stages:N with N in 1..4 (got {value!r})"
    )


@dataclass
class ModelConfig(Options):
    arch: str = opt(
        "resnet18",
        "Architecture. ResNet18 is the product; resnet34/resnet50 exist to train distillation "
        "teachers with the same launcher.",
        choices=ARCH_CHOICES,
    )
    se_reduction: int = opt(
        0, "Squeeze-and-excitation reduction ratio; 0 turns SE off.", choices=SE_REDUCTIONS
    )
    stem: str = opt(
        "auto",
        "imagenet (7x7/2 conv + max-pool) or cifar (3x3/1 conv, no pool). auto = cifar for "
        "images <= 64 px.",
        choices=STEMS,
    )
    dropout: float = opt(0.0, "Dropout probability before the classifier head.", ge=0, lt=1)
    pretrained: str | None = opt(
        None,
        "Start from these weights: `torchvision` (ImageNet weights, needs the internet), a "
        "torchvision-format state-dict file, or a checkpoint / run directory of this project. "
        "The head is replaced for the data's classes.",
    )
    freeze: str = opt(
        "none",
        "Freeze part of the network: none, backbone (all but the head), or stages:N (the stem "
        "and the first N of 4 stages). Frozen parts get no gradient and keep BatchNorm in eval.",
    )

    def validate(self) -> None:
        check(
            not (self.se_reduction and self.arch == "resnet50"),
            "se_reduction",
            "SE blocks are built for basic-block ResNets (resnet18, resnet34), not resnet50",
        )
        parse_freeze(self.freeze)
        if self.pretrained is not None and self.pretrained != "torchvision":
            check(
                os.path.exists(self.pretrained),
                "pretrained",
                f"{self.pretrained} does not exist (give a weights file, a checkpoint, or "
                "`torchvision`)",
            )


@dataclass
class OptimConfig(Options):
    epochs: int = opt(
        15, "Number of training epochs (the cosine schedule spans all of them).", ge=1
    )
    lr: float = opt(0.1, "Peak SGD learning rate.", gt=0)
    momentum: float = opt(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = opt(1e-4, "Weight decay (not applied to BatchNorm and bias).", ge=0)
    min_lr: float = opt(1e-5, "Learning rate at the end of cosine annealing.", ge=0)
    warmup_epochs: float = opt(
        1.0,
        "Linear warm-up in epochs (fractional allowed, 0 = off; capped at half the run).",
        ge=0,
    )
    label_smoothing: float = opt(0.0, "Label smoothing for the cross-entropy loss.", ge=0, lt=1)
    patience: int = opt(
        5, "Early stopping: stop after this many epochs without a better val top-1. 0 = off.", ge=0
    )
    backbone_lr: float | None = opt(
        None,
        "Learning rate of everything but the head (differential fine-tuning, e.g. 0.001 with "
        "--lr 0.1 for the head). Default: --lr for all.",
        gt=0,
    )

    def validate(self) -> None:
        check(
            self.min_lr <= self.lr,
            "min_lr",
            f"must be in [0, --lr] (got {self.min_lr}, lr {self.lr})",
        )


@dataclass
class DistillConfig(Options):
    teacher: str | None = opt(
        None,
        "Distil from this teacher: a checkpoint or run directory of this project, or a "
        "torchvision ResNet name (resnet34, resnet50, ...) with --teacher-weights.",
    )
    teacher_weights: str | None = opt(
        None,
        "For a torchvision teacher: a state-dict file, or `torchvision` for its ImageNet weights "
        "(needs the internet; only for 1000-class data).",
    )
    temperature: float = opt(4.0, "Distillation temperature T.", gt=0)
    alpha: float = opt(
        0.5,
        "Weight of the distillation term: (1 - alpha) CE + alpha T^2 KL(teacher || student).",
        ge=0,
        le=1,
    )

    def validate(self) -> None:
        if self.teacher is None:
            check(self.teacher_weights is None, "teacher_weights", "given without --teacher")
            return
        if self.teacher in TORCHVISION_TEACHERS and not os.path.exists(self.teacher):
            check(
                self.teacher_weights is not None,
                "teacher_weights",
                f"a torchvision teacher ({self.teacher}) needs its weights: a state-dict file "
                "trained on this data's classes, or `torchvision`",
            )
            if self.teacher_weights != "torchvision":
                check(
                    os.path.exists(self.teacher_weights),  # type: ignore[arg-type]
                    "teacher_weights",
                    f"{self.teacher_weights} does not exist",
                )
            return
        check(
            os.path.exists(self.teacher),
            "teacher",
            f"{self.teacher} is neither a checkpoint / run directory nor one of "
            f"{', '.join(TORCHVISION_TEACHERS)}",
        )
        check(
            self.teacher_weights is None,
            "teacher_weights",
            "only for a torchvision teacher; a checkpoint carries its own weights",
        )


AMP_MODES = ("auto", "bf16", "off")
WANDB_MODES = ("auto", "online", "offline", "disabled")
RESUME_THIS_RUN = "this"  # `--resume` alone: the run named by --output-dir / --name


@dataclass
class RunConfig(Options):
    name: str = opt("", "Run name (directory under --output-dir). Default: a timestamp.")
    output_dir: str = opt("runs", "Where run directories are created (Ray's storage_path).")
    seed: int = opt(0, "Seed for initialisation, shuffling and augmentation.")
    num_workers: int = opt(1, "Number of Ray Train (DDP) workers.", ge=1)
    cpus_per_worker: int | None = opt(
        None,
        "CPUs per training worker: Ray reserves this many for each worker, and a worker on CPU "
        "trains with as many threads. Default: 1 under Ray; without Ray (accelerate, torchrun) "
        "the machine's cores divided among its local processes.",
        ge=1,
    )
    use_gpu: str = opt(
        "auto", "Train on GPUs: on, off, or auto (if the cluster has GPUs).", choices=TRISTATE
    )
    amp: str = opt(
        "auto",
        "Mixed precision: bf16 autocast, off, or auto (bf16 on capable GPUs).",
        choices=AMP_MODES,
    )
    channels_last: str = opt(
        "auto", "channels_last memory format: on, off, auto (on for CUDA).", choices=TRISTATE
    )
    resume: str | None = opt(
        None,
        "Continue from a checkpoint file, a checkpoint directory or a run directory; alone, "
        "extend this run (--output-dir/--name) when it has finished, with a larger --epochs. "
        "An unfinished run of the same name resumes without it.",
        nargs="?",
        const=RESUME_THIS_RUN,
        metavar="PATH",
    )
    fresh: bool = opt(
        False,
        "Start over in a new directory when --output-dir/--name already holds a run (the old "
        "one is kept, renamed to NAME.prev-TIMESTAMP).",
    )
    max_failures: int = opt(
        0, "Ray Train: restart the worker group this many times on failure (-1 = always).", ge=-1
    )
    keep_checkpoints: int = opt(2, "Number of most recent epoch checkpoints to keep.", ge=1)
    address: str | None = opt(
        None, "Ray cluster address. Default: RAY_ADDRESS, a running local cluster, or a new one."
    )
    wandb_mode: str = opt(
        "auto",
        "W&B logging: online, offline, disabled, or auto (online if an API key is configured, "
        "else offline).",
        choices=WANDB_MODES,
    )
    wandb_project: str = opt("resnet18-dist", "W&B project.")
    wandb_group: str = opt("", "W&B group (runs of one sweep or comparison). Default: none.")
    log_every: int = opt(10, "Log per-step loss, lr and throughput every N steps.", ge=1)
    quiet: bool = opt(False, "No progress bars (for logs).")
    verbose: bool = opt(False, "Show Ray's own INFO lines (reports, checkpoints, workers).")

    def validate(self) -> None:
        check(
            "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain directory name (got {self.name!r})",
        )
        if self.resume not in (None, RESUME_THIS_RUN):
            check(os.path.exists(self.resume), "resume", f"{self.resume} does not exist")
        check(
            not (self.fresh and self.resume == RESUME_THIS_RUN),
            "fresh",
            "--fresh starts a new run; it cannot be combined with --resume of this run",
        )


@dataclass
class TrainConfig(Options):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)
