"""Run configuration: validated dataclasses, YAML round trip, and the flag table the launchers use.

Every option lives in exactly one section dataclass. Each field carries its help text in
``metadata["help"]`` so that ``--help``, the README table and validation errors all name the same
flag. ``__post_init__`` validates each section and raises :class:`ConfigError` naming the flag.
Nothing here parses ``sys.argv``; see :mod:`resnet18_dist.cli`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid option. ``option`` is the flag name (``--lr``) so messages can point at it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field with CLI metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(flag(name), message)


def _check_choice(obj: Any, name: str) -> None:
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    value = getattr(obj, name)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            flag(name), f"must be one of {', '.join(map(str, choices))} (got {value!r})"
        )


AUGMENT_POLICIES = ("auto", "seed", "cifar", "none")
BACKENDS = ("auto", "torchvision", "dali")
STEMS = ("auto", "imagenet", "cifar")
SE_REDUCTIONS = (0, 4, 8, 16, 32)
SMALL_IMAGE_MAX = 64  # images this size or smaller get the CIFAR stem and the `cifar` policy


@dataclass
class DataConfig:
    data_dir: str | None = opt(
        None,
        "Prepared dataset directory (holds manifest.json; see launch/prepare_data.py). "
        "Default: the built-in scikit-learn digits, prepared into a cache on first use.",
    )
    image_size: int = opt(
        0, "Training/eval image size in px. 0 = the data's native size if <= 64 px, else 224."
    )
    augment: str = opt(
        "auto",
        "Training augmentation policy: seed (flip, rotate 15, jitter 0.2), cifar (reflect-pad "
        "4 px at 32 px, scaled with size, + random crop + flip), none. auto = the dataset's "
        "hint if it has one (digits: none), else cifar for images <= 64 px, else seed.",
        choices=AUGMENT_POLICIES,
    )
    batch_size: int = opt(64, "Training batch size per worker (global batch = this x workers).")
    eval_batch_size: int = opt(256, "Evaluation batch size per worker.")
    loader_workers: int = opt(
        -1, "DataLoader worker processes / DALI threads per training worker. -1 = auto."
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
        "crash on a corrupt image). auto = for splits up to 8 GiB.",
        choices=("auto", "on", "off"),
    )

    def __post_init__(self) -> None:
        _check_choice(self, "augment")
        _check_choice(self, "data_backend")
        _check_choice(self, "verify_shards")
        _check(self.image_size >= 0, "image_size", f"must be >= 0 (got {self.image_size})")
        _check(
            self.image_size == 0 or self.image_size >= 8,
            "image_size",
            f"must be 0 (auto) or at least 8 px (got {self.image_size})",
        )
        _check(self.batch_size >= 2, "batch_size", f"must be >= 2 (got {self.batch_size})")
        _check(
            self.eval_batch_size >= 1,
            "eval_batch_size",
            f"must be >= 1 (got {self.eval_batch_size})",
        )
        _check(
            self.loader_workers >= -1,
            "loader_workers",
            f"must be >= 0, or -1 for auto (got {self.loader_workers})",
        )
        if self.data_dir is not None:
            manifest = Path(self.data_dir) / "manifest.json"
            _check(
                manifest.is_file(),
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
class ModelConfig:
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
    dropout: float = opt(0.0, "Dropout probability before the classifier head.")
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

    def __post_init__(self) -> None:
        _check_choice(self, "arch")
        _check_choice(self, "se_reduction")
        _check_choice(self, "stem")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1) (got {self.dropout})")
        _check(
            not (self.se_reduction and self.arch == "resnet50"),
            "se_reduction",
            "SE blocks are built for basic-block ResNets (resnet18, resnet34), not resnet50",
        )
        parse_freeze(self.freeze)
        if self.pretrained is not None and self.pretrained != "torchvision":
            _check(
                os.path.exists(self.pretrained),
                "pretrained",
                f"{self.pretrained} does not exist (give a weights file, a checkpoint, or "
                "`torchvision`)",
            )


@dataclass
class OptimConfig:
    epochs: int = opt(15, "Number of training epochs (the cosine schedule spans all of them).")
    lr: float = opt(0.1, "Peak SGD learning rate.")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(1e-4, "Weight decay (not applied to BatchNorm and bias).")
    min_lr: float = opt(1e-5, "Learning rate at the end of cosine annealing.")
    warmup_epochs: float = opt(
        1.0, "Linear warm-up in epochs (fractional allowed, 0 = off; capped at half the run)."
    )
    label_smoothing: float = opt(0.0, "Label smoothing for the cross-entropy loss.")
    patience: int = opt(
        5, "Early stopping: stop after this many epochs without a better val top-1. 0 = off."
    )
    backbone_lr: float | None = opt(
        None,
        "Learning rate of everything but the head (differential fine-tuning, e.g. 0.001 with "
        "--lr 0.1 for the head). Default: --lr for all.",
    )

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1 (got {self.epochs})")
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1) (got {self.momentum})")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _check(
            0 <= self.min_lr <= self.lr,
            "min_lr",
            f"must be in [0, --lr] (got {self.min_lr}, lr {self.lr})",
        )
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0 (got {self.warmup_epochs})")
        _check(
            0 <= self.label_smoothing < 1,
            "label_smoothing",
            f"must be in [0, 1) (got {self.label_smoothing})",
        )
        _check(self.patience >= 0, "patience", f"must be >= 0 (got {self.patience})")
        if self.backbone_lr is not None:
            _check(self.backbone_lr > 0, "backbone_lr", f"must be > 0 (got {self.backbone_lr})")


@dataclass
class DistillConfig:
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
    temperature: float = opt(4.0, "Distillation temperature T (> 0).")
    alpha: float = opt(
        0.5, "Weight of the distillation term: (1 - alpha) CE + alpha T^2 KL(teacher || student)."
    )

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        _check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1] (got {self.alpha})")
        if self.teacher is None:
            _check(
                self.teacher_weights is None,
                "teacher_weights",
                "given without --teacher",
            )
            return
        if self.teacher in TORCHVISION_TEACHERS and not os.path.exists(self.teacher):
            _check(
                self.teacher_weights is not None,
                "teacher_weights",
                f"a torchvision teacher ({self.teacher}) needs its weights: a state-dict file "
                "trained on this data's classes, or `torchvision`",
            )
            if self.teacher_weights != "torchvision":
                _check(
                    os.path.exists(self.teacher_weights),  # type: ignore[arg-type]
                    "teacher_weights",
                    f"{self.teacher_weights} does not exist",
                )
            return
        _check(
            os.path.exists(self.teacher),
            "teacher",
            f"{self.teacher} is neither a checkpoint / run directory nor one of "
            f"{', '.join(TORCHVISION_TEACHERS)}",
        )
        _check(
            self.teacher_weights is None,
            "teacher_weights",
            "only for a torchvision teacher; a checkpoint carries its own weights",
        )


AMP_MODES = ("auto", "bf16", "off")
TRISTATE = ("auto", "on", "off")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class RunConfig:
    name: str = opt("", "Run name (directory under --output-dir). Default: a timestamp.")
    output_dir: str = opt("runs", "Where run directories are created (Ray's storage_path).")
    seed: int = opt(0, "Seed for initialisation, shuffling and augmentation.")
    num_workers: int = opt(1, "Number of Ray Train (DDP) workers.")
    cpus_per_worker: int = opt(1, "CPUs reserved per training worker.")
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
        None, "Resume from a checkpoint file, a checkpoint directory or a run directory."
    )
    max_failures: int = opt(0, "Ray Train: restart the worker group this many times on failure.")
    keep_checkpoints: int = opt(2, "Number of most recent epoch checkpoints to keep.")
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
    log_every: int = opt(10, "Log per-step loss, lr and throughput every N steps.")
    quiet: bool = opt(False, "No progress bars (for logs).")

    def __post_init__(self) -> None:
        _check_choice(self, "use_gpu")
        _check_choice(self, "amp")
        _check_choice(self, "channels_last")
        _check_choice(self, "wandb_mode")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1 (got {self.num_workers})")
        _check(
            self.cpus_per_worker >= 1,
            "cpus_per_worker",
            f"must be >= 1 (got {self.cpus_per_worker})",
        )
        _check(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.log_every >= 1, "log_every", f"must be >= 1 (got {self.log_every})")
        _check(
            "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain directory name (got {self.name!r})",
        )
        if self.resume is not None:
            _check(
                os.path.exists(self.resume),
                "resume",
                f"{self.resume} does not exist",
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "distill": DistillConfig,
    "run": RunConfig,
}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict such as YAML; unknown sections or keys are errors."""
        if not isinstance(raw, dict):
            raise ConfigError(
                "--config", f"expected a mapping of sections, got {type(raw).__name__}"
            )
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                "--config",
                f"unknown section(s) {sorted(unknown)}; expected {sorted(SECTIONS)}",
            )
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(
                    "--config", f"unknown option(s) in section {name!r}: {sorted(bad)}"
                )
            types_ = {f.name: base_type(f.type) for f in dataclasses.fields(section_cls)}
            coerced = {k: coerce(v, types_[k], flag(k)) for k, v in values.items()}
            sections[name] = section_cls(**coerced)
        return cls(**sections)

    def dump_yaml(self, path: str | os.PathLike[str]) -> None:
        from resnet18_dist.atomic import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        return cls.from_dict(read_yaml(path))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"{p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{p} must hold a mapping of sections")
    return raw


def base_type(annotation: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` from a (possibly optional) field annotation."""
    if isinstance(annotation, str):  # `from __future__ import annotations` keeps them as text
        annotation = eval(annotation, {"typing": typing}, {})
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def coerce(value: Any, kind: type, option: str) -> Any:
    """Coerce a YAML scalar to the option's type (PyYAML reads `1e-3` as a string)."""
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(option, f"expected true or false (got {value!r})")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)):
        return str(value)
    raise ConfigError(option, f"expected {kind.__name__} (got {value!r})")


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) for every option, in declaration order."""
    return [(s, f) for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
