"""The training run's options: validated dataclasses in eight sections, YAML round trip.

Every option lives in exactly one section dataclass and carries its help text, choices and
bounds in its field metadata (see :mod:`resnet18_dist.options`), so ``--help``, the table in
docs/options.md and validation errors all name the same flag. Nothing here parses ``sys.argv``.

The sections, one concern each: what is trained (``data``, ``model``, ``optim``, ``distill``),
which run it is (``run``: name, directory, resume, seed), where its workers run (``cluster``),
on what they compute (``device``) and what it tells (``logging``). ``--recipe`` stays in
``optim``: a preset of the training recipe, which also sets the data options it cannot do
without (augmentation, random erasing, batch sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from resnet18_dist.options import ConfigError, Options, check, flag, opt

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DeviceConfig",
    "DistillConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunDirConfig",
    "TrainConfig",
    "flag",
    "parse_freeze",
]

AUGMENT_POLICIES = ("auto", "seed", "cifar", "trivialaugment", "autoaugment", "none")
BACKENDS = ("auto", "torchvision", "dali")
PREPROCESS_POLICIES = ("auto", "squash", "photo")
STEMS = ("auto", "imagenet", "cifar")
SE_REDUCTIONS = (0, 4, 8, 16, 32)
WIDTH_MAX = 1.0  # --width narrows the network; 1.0 is the real ResNet
SMALL_IMAGE_MAX = 64  # images this size or smaller get the CIFAR stem and the `cifar` policy
TRISTATE = ("auto", "on", "off")


@dataclass
class DataConfig(Options):
    data_dir: str | None = opt(
        None,
        "Prepared dataset directory (holds manifest.json; see launch/prepare_data.py), or one "
        "uploaded to object storage (s3://bucket/prefix, gs://...), copied once per node into "
        "the cache with every shard's sha256 checked. Default: the built-in scikit-learn "
        "digits, prepared into a cache on first use.",
        path=True,
    )
    manifest_sha256: str | None = opt(
        None,
        "The sha256 of a --data-dir on object storage's manifest.json, pinned by the launcher "
        "so that every node of the run copies the same version.",
        cli=False,
    )
    image_size: int = opt(
        0,
        "Training/eval image size in px. 0 = the data's native size if <= 64 px, else 224.",
        ge=0,
    )
    augment: str = opt(
        "auto",
        "Training augmentation policy: seed (flip, rotate 15, jitter 0.2), cifar (reflect-pad "
        "4 px at 32 px, scaled with size, + random crop + flip), trivialaugment / autoaugment "
        "(cifar's crop + flip for images <= 64 px, else flip; then TrivialAugmentWide, or the "
        "AutoAugment policy: CIFAR-10's for images <= 64 px, else ImageNet's), none. With "
        "--preprocess photo, its random resized crop and flip replace these crops and flips. "
        "auto = the dataset's hint if it has one (digits: none), else cifar for images <= 64 "
        "px, else seed.",
        choices=AUGMENT_POLICIES,
    )
    preprocess: str = opt(
        "auto",
        "How an image becomes the model's square input: squash (resize the whole image to "
        "size x size: CIFAR, digits) or photo (torchvision's ImageNet recipe: in training a "
        "random resized crop, area 8-100% and aspect ratio 3/4-4/3, + flip; in evaluation, "
        "export, predict and serving the shorter side resized to size / 0.875, then the centre "
        "size x size). auto = photo when the dataset's images are not all square or are larger "
        "than the image size (squares of at most 64 px stay squashed), else squash.",
        choices=PREPROCESS_POLICIES,
    )
    random_erasing: float = opt(
        0.0,
        "Probability of erasing a random square of half the image's side (16 px at 32 px: "
        "Cutout) to the mean colour, after the policy, in training. 0 = off.",
        ge=0,
        le=1,
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
    dali_prefetch: int = opt(
        2,
        "DALI: batches the pipeline prepares ahead of the training step (prefetch_queue_depth; "
        "2 is DALI's default: one batch in use, one being made).",
        ge=1,
    )
    hw_decoder_load: float = opt(
        0.65,
        "DALI on a GPU: the share of JPEG decoding given to the hardware decoder (A100, H100, "
        "H200), the rest to CUDA nvJPEG; 0.65 is DALI's default. No effect on CPU or GPUs "
        "without one.",
        ge=0,
        le=1,
    )
    fetch_threads: int = opt(
        8,
        "A dataset on object storage: shards downloaded at once when a node copies it into its "
        "cache (each still checked against the manifest's sha256).",
        ge=1,
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
    width: float = opt(
        1.0,
        "Channel width multiplier: every stage's channel count (64/128/256/512) times this. "
        "1.0 is the real network (ResNet18: 11.7M parameters); 0.25 has 1/16 of the weights "
        "and compute, for trying out a cluster, a sweep or an elastic run in seconds. Stored "
        "in checkpoints and exports, which rebuild the same width.",
        gt=0,
        le=WIDTH_MAX,
    )
    pretrained: str | None = opt(
        None,
        "Start from these weights: `torchvision` (ImageNet weights, needs the internet), a "
        "torchvision-format state-dict file, or a checkpoint / run directory of this project. "
        "The head is replaced for the data's classes.",
        path=("torchvision",),
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


RECIPE_NAMES = ("none", "cifar")
# Each recipe: section -> option -> value, applied under whatever the user gave (from_dict).
RECIPES: dict[str, dict[str, dict[str, object]]] = {
    "cifar": {
        "data": {
            "augment": "trivialaugment",
            "random_erasing": 1.0,
            "batch_size": 512,
            "eval_batch_size": 1024,
        },
        "optim": {
            "epochs": 150,
            "lr": 0.2,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "warmup_epochs": 5.0,
            "min_lr": 0.0,
            "label_smoothing": 0.1,
            "ema_decay": 0.999,
            "patience": 0,
        },
    },
}


def apply_recipe(raw: dict[str, object]) -> dict[str, object]:
    """``raw`` (a TrainConfig mapping) with its recipe's values filled in where it gives none."""
    optim = raw.get("optim")
    name = optim.get("recipe") if isinstance(optim, dict) else None
    preset = RECIPES.get(name) if isinstance(name, str) else None
    if not preset:
        return raw
    out = dict(raw)
    for section, values in preset.items():
        given = out.get(section)
        given = dict(given) if isinstance(given, dict) else {}
        out[section] = {**values, **given}
    return out


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
    ema_decay: float = opt(
        0.0,
        "Keep an exponential moving average of the weights and BatchNorm statistics with this "
        "decay per step (warmed up as min(d, (1 + n) / (10 + n)) after n steps); validation, "
        "the test report, model.pt and the export then use the averaged weights. 0 = off.",
        ge=0,
        lt=1,
    )
    recipe: str = opt(
        "none",
        "A named preset of data and optimisation options (see docs/training.md, Recipes); "
        "options given explicitly (flags or --config) override it. cifar: trivialaugment + "
        "Cutout, batch 512, lr 0.2, 5 warm-up epochs + cosine over 150, weight decay 5e-4, "
        "label smoothing 0.1, EMA 0.999, no early stopping.",
        choices=RECIPE_NAMES,
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
        path=TORCHVISION_TEACHERS,
    )
    teacher_weights: str | None = opt(
        None,
        "For a torchvision teacher: a state-dict file, or `torchvision` for its ImageNet weights "
        "(needs the internet; only for 1000-class data).",
        path=("torchvision",),
    )
    temperature: float = opt(4.0, "Distillation temperature T.", gt=0)
    alpha: float = opt(
        0.5,
        "Weight of the distillation term: (1 - alpha) CE + alpha T^2 KL(teacher || student).",
        ge=0,
        le=1,
    )

    def validate(self) -> None:
        # Whether --teacher names a file or a torchvision architecture is a question for the
        # file system: launching/preflight.check_paths answers it before any worker starts.
        if self.teacher is None:
            check(self.teacher_weights is None, "teacher_weights", "given without --teacher")


AMP_MODES = ("auto", "bf16", "fp16", "off")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PLACEMENTS = ("pack", "spread")
RESUME_THIS_RUN = "this"  # `--resume` alone: the run named by --output-dir / --name
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what --name may hold (run and sweep names)


@dataclass
class RunDirConfig(Options):
    """Which run: its directory (name, where, resume or start afresh, checkpoints kept) and
    its seed."""

    name: str = opt("", "Run name (directory under --output-dir). Default: a timestamp.")
    output_dir: str = opt(
        "runs",
        "Where run directories are created (Ray's storage_path): a local or shared path, or "
        "object storage, s3://bucket/prefix or gs://bucket/prefix (Ray launcher only; "
        "AWS_ENDPOINT_URL for an S3-compatible store).",
        path=True,
    )
    seed: int = opt(0, "Seed for initialisation, shuffling and augmentation.")
    resume: str | None = opt(
        None,
        "Continue from a checkpoint file, a checkpoint directory or a run directory; alone, "
        "extend this run (--output-dir/--name) when it has finished, with a larger --epochs. "
        "An unfinished run of the same name resumes without it.",
        nargs="?",
        const=RESUME_THIS_RUN,
        metavar="PATH",
        path=(RESUME_THIS_RUN,),
    )
    fresh: bool = opt(
        False,
        "Start over in a new directory when --output-dir/--name already holds a run (the old "
        "one is kept, renamed to NAME.prev-TIMESTAMP).",
    )
    keep_checkpoints: int = opt(2, "Number of most recent epoch checkpoints to keep.", ge=1)

    def validate(self) -> None:
        # One path component that means the same on a disk and in an s3:// / gs:// URI: a '#',
        # '?' or '%' there would start a fragment or query (dropping ?endpoint_override=...) or
        # be decoded into another prefix.
        check(
            not self.name or bool(RUN_NAME.fullmatch(self.name) and self.name not in (".", "..")),
            "name",
            f"must be ASCII letters, digits, '.', '_' and '-' only ([A-Za-z0-9._-]), and not '.' "
            f"or '..' (got {self.name!r})",
        )
        check(
            not (self.fresh and self.resume == RESUME_THIS_RUN),
            "fresh",
            "--fresh starts a new run; it cannot be combined with --resume of this run",
        )


@dataclass
class ClusterConfig(Options):
    """Where the workers run: how many, how placed, on which Ray cluster, restarted how often."""

    num_workers: str = opt(
        "1",
        "Ray Train (DDP) workers: N, or MIN:MAX for an elastic run, which starts once MIN fit, "
        "continues with fewer after a lost worker (from the last checkpoint) and grows back "
        "towards MAX as capacity returns. The global batch stays --batch-size x MAX: each "
        "worker's batch is that divided by the current worker count, so the lr and its "
        "schedule hold.",
        metavar="N|MIN:MAX",
    )
    resize_interval_s: float = opt(
        60.0,
        "Elastic runs: how often Ray Train checks whether more workers fit (a resize restarts "
        "the group from the last checkpoint).",
        gt=0,
    )
    placement: str = opt(
        "pack",
        "Ray Train placement of the workers: pack (as few nodes as possible: DDP traffic stays "
        "on a node) or spread (one per node where possible: a lost node takes fewer workers).",
        choices=PLACEMENTS,
    )
    cpus_per_worker: int | None = opt(
        None,
        "CPUs per training worker: Ray reserves this many for each worker, and a worker on CPU "
        "trains with as many threads. Default: 1 under Ray; without Ray (accelerate, torchrun) "
        "the machine's cores divided among its local processes.",
        ge=1,
    )
    max_failures: int = opt(
        0, "Ray Train: restart the worker group this many times on failure (-1 = always).", ge=-1
    )
    address: str | None = opt(
        None, "Ray cluster address. Default: RAY_ADDRESS, a running local cluster, or a new one."
    )
    wait_for_resources: float = opt(
        600.0,
        "On a cluster with an autoscaler: how long to wait (seconds) for it to add the nodes "
        "that the workers (a sweep: one trial) need, when the live nodes cannot hold them. A "
        "request that no node type can hold (reported by autoscaler v2) is refused at once; 0 "
        "refuses at once whatever the autoscaler could add. Without an autoscaler, unused.",
        ge=0,
        metavar="S",
    )

    def worker_range(self) -> tuple[int, int]:
        """(MIN, MAX) workers; MIN == MAX for a fixed-size run."""
        text = str(self.num_workers).strip()
        try:
            parts = [int(x) for x in text.split(":")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
            raise ConfigError(
                "--num-workers", f"expected N or MIN:MAX with 1 <= MIN <= MAX (got {text!r})"
            )
        return parts[0], parts[1]

    @property
    def min_workers(self) -> int:
        return self.worker_range()[0]

    @property
    def max_workers(self) -> int:
        return self.worker_range()[1]

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range()
        return low < high

    def validate(self) -> None:
        self.worker_range()  # raises naming --num-workers


@dataclass
class DeviceConfig(Options):
    """What each worker computes on and how: GPU or CPU, precision, memory format, compiling."""

    use_gpu: str = opt(
        "auto", "Train on GPUs: on, off, or auto (if the cluster has GPUs).", choices=TRISTATE
    )
    amp: str = opt(
        "auto",
        "Mixed precision: bf16 autocast, fp16 autocast with a gradient scaler (CUDA only), "
        "off, or auto: bf16 on GPUs with native bf16, fp16 on older GPUs, off on CPU; under "
        "`accelerate launch --mixed_precision X`, X.",
        choices=AMP_MODES,
    )
    channels_last: str = opt(
        "auto", "channels_last memory format: on, off, auto (on for CUDA).", choices=TRISTATE
    )
    compile: bool = opt(
        False,
        "torch.compile the model's training step (and the teacher's forward when distilling). "
        "Where compiling fails (no C++ compiler, an unsupported platform) it warns once and "
        "trains eagerly.",
    )


@dataclass
class LoggingConfig(Options):
    """What a run tells: W&B, step logs, progress bars, Ray's own lines."""

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


@dataclass
class TrainConfig(Options):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "--config") -> Any:
        """As Options.from_dict, with ``--recipe``'s presets under the given values; a file in
        the older layout (cluster, device and logging options under ``run``) is read too."""
        if isinstance(raw, dict):
            raw = apply_recipe(with_split_run_section(raw))
        return super().from_dict(raw, where)


# Until the run section was split by concern, config.yaml, sweep_config.yaml and --config files
# held these options under `run:`; such files must still be read (a --config file, a sweep
# continued, a run compared).
_SPLIT_FROM_RUN = {
    name: section
    for section, cls in (
        ("cluster", ClusterConfig),
        ("device", DeviceConfig),
        ("logging", LoggingConfig),
    )
    for name in (f.name for f in fields(cls))
}


def with_split_run_section(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with any cluster, device or logging option found under ``run`` moved to its own
    section (a value given in the new section wins)."""
    run = raw.get("run")
    if not isinstance(run, dict) or not any(k in _SPLIT_FROM_RUN for k in run):
        return raw
    out = dict(raw)
    out["run"] = {k: v for k, v in run.items() if k not in _SPLIT_FROM_RUN}
    for key, value in run.items():
        section = _SPLIT_FROM_RUN.get(key)
        if section is None:
            continue
        given = out.get(section)
        if given is not None and not isinstance(given, dict):
            continue  # not a mapping: from_dict refuses it, naming the section
        given = dict(given or {})
        given.setdefault(key, value)
        out[section] = given
    return out
