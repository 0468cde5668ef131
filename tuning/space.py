"""The sweep's options and its search space.

``SweepOptions`` is the ``sweep`` section of :class:`SweepConfig`, whose other sections are the
training run's (every ``launch/train.py`` option, fixed for all trials). The searched values
(learning rate, weight decay, SE reduction, distillation temperature) override the fixed ones
in each trial.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from resnet18_dist.config import (
    SE_REDUCTIONS,
    ClusterConfig,
    DataConfig,
    DeviceConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
    apply_recipe,
    with_split_run_section,
)
from resnet18_dist.options import ConfigError, Options, check, flag, opt
from resnet18_dist.storage import is_remote

SEARCH_ALGORITHMS = ("random", "optuna")
DEFAULT_TEMPERATURE_RANGE = (1.0, 8.0)

# A searched value -> where it lives in the training config.
SEARCHED = {
    "lr": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "se_reduction": ("model", "se_reduction"),
    "temperature": ("distill", "temperature"),
}


def _check_range(name: str, value: tuple[float, float], log: bool) -> None:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(flag(name), f"bounds must be finite numbers (got {low:g},{high:g})")
    if log and low <= 0:
        raise ConfigError(flag(name), f"log-uniform bounds must be > 0 (got {low:g},{high:g})")
    if low >= high:
        raise ConfigError(flag(name), f"LOW must be below HIGH (got {low:g},{high:g})")


@dataclass
class SweepOptions(Options):
    lr_range: tuple[float, float] = opt(
        (1e-3, 0.5), "Peak learning rate: log-uniform in LOW,HIGH.", metavar="LOW,HIGH"
    )
    wd_range: tuple[float, float] = opt(
        (1e-5, 1e-3), "Weight decay: log-uniform in LOW,HIGH.", metavar="LOW,HIGH"
    )
    se_choices: tuple[int, ...] = opt(
        (0, 4, 8, 16),
        "SE reduction ratios to choose from (0 = no SE).",
        choices=SE_REDUCTIONS,
        metavar="A,B,...",
    )
    temperature_range: tuple[float, float] | None = opt(
        None,
        "Distillation temperature: uniform in LOW,HIGH; searched only with --teacher "
        "(then 1,8 by default).",
        metavar="LOW,HIGH",
    )
    search: str = opt(
        "random",
        "Search algorithm: random, or optuna (Tune's OptunaSearch, TPE; pip install '.[optuna]').",
        choices=SEARCH_ALGORITHMS,
    )
    num_samples: int = opt(8, "Number of trials.", ge=1)
    max_concurrent: int = opt(
        0,
        "Most trials at once (0 = as many as the cluster holds: the live nodes, or on a "
        "cluster with autoscaler v2 the largest it can make; with v1, --max-concurrent N runs "
        "N, for it to add nodes for).",
        ge=0,
    )
    max_epochs: int | None = opt(
        None,
        "Epochs of each trial (ASHA's max_t; each trial's cosine schedule spans them). "
        "Default: --epochs.",
        ge=1,
    )
    grace_period: int = opt(1, "ASHA: epochs every trial runs before it can be stopped.", ge=1)
    reduction_factor: float = opt(2.0, "ASHA: keep the best 1/N of the trials at each rung.", gt=1)
    max_int8_drop: float = opt(
        1.0,
        "Export gate of the best trial: the most test top-1 (in points) INT8 may lose "
        "against FP32 ONNX.",
        ge=0,
    )
    # The best trial's export measures briefly by default (a sweep is about the choice; run
    # `export` on best/'s run for the full figures); the same options as the export command's.
    latency_iters: int = opt(50, "Export of the best trial: timed batch-1 runs per artifact.", ge=1)
    throughput_seconds: float = opt(
        1.0, "Export of the best trial: seconds of batch-64 runs per artifact.", gt=0
    )
    publish_best: str | None = opt(
        None,
        "Also publish the best trial's export (best/) to this prefix on object storage "
        "(s3://, gs://), report.json last, as `export --out` does; predict and serve read it "
        "from there.",
        metavar="URI",
    )

    def validate(self) -> None:
        if self.publish_best is not None:
            check(
                is_remote(self.publish_best),
                "publish_best",
                f"must be a prefix on object storage, s3:// or gs:// (got {self.publish_best!r}); "
                "the local export is best/ in the sweep directory",
            )
        _check_range("lr_range", self.lr_range, log=True)
        _check_range("wd_range", self.wd_range, log=True)
        check(len(self.se_choices) > 0, "se_choices", "needs at least one choice")
        if self.temperature_range is not None:
            check(
                self.temperature_range[0] > 0,
                "temperature_range",
                f"temperatures must be > 0 (got {self.temperature_range[0]:g})",
            )
            _check_range("temperature_range", self.temperature_range, log=False)
        if self.max_epochs is not None:
            check(
                self.grace_period <= self.max_epochs,
                "grace_period",
                f"must be at most --max-epochs (got {self.grace_period} > {self.max_epochs})",
            )


@dataclass
class SweepConfig(Options):
    """Every training option (fixed for all trials) plus the ``sweep`` section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepOptions = field(default_factory=SweepOptions)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "--config") -> Any:
        """As TrainConfig.from_dict: ``--recipe``'s presets under the given values. Applied here,
        where the given values are still told apart from the defaults: the fixed training config
        every trial copies has every option set, so a recipe applied later would change nothing.
        An older sweep_config.yaml (cluster, device and logging options under ``run``) is read
        too."""
        if isinstance(raw, dict):
            raw = apply_recipe(with_split_run_section(raw))
        return super().from_dict(raw, where)

    def validate(self) -> None:
        s = self.sweep
        if s.temperature_range is not None:
            check(
                self.distill.teacher is not None,
                "temperature_range",
                "a temperature is searched only when distilling; give --teacher",
            )
        if s.max_epochs is None:
            check(
                s.grace_period <= self.optim.epochs,
                "grace_period",
                f"must be at most the trials' epochs (--max-epochs, default --epochs "
                f"{self.optim.epochs}; got {s.grace_period})",
            )
        check(
            not (self.model.arch == "resnet50" and any(s.se_choices)),
            "se_choices",
            "SE blocks are built for resnet18/resnet34, not resnet50; use --se-choices 0",
        )

    @property
    def epochs(self) -> int:
        return self.sweep.max_epochs or self.optim.epochs

    def train_config(self) -> TrainConfig:
        """The fixed part: the training config every trial starts from."""
        d = self.to_dict()
        d.pop("sweep")
        d["optim"]["epochs"] = self.epochs
        return TrainConfig.from_dict(d)

    def temperature_range(self) -> tuple[float, float] | None:
        if self.distill.teacher is None:
            return None
        return self.sweep.temperature_range or DEFAULT_TEMPERATURE_RANGE


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's search space: the searched values only (the fixed config travels separately)."""
    from ray import tune

    s = cfg.sweep
    space: dict[str, Any] = {
        "lr": tune.loguniform(*s.lr_range),
        "weight_decay": tune.loguniform(*s.wd_range),
        "se_reduction": tune.choice(list(s.se_choices)),
    }
    temps = cfg.temperature_range()
    if temps is not None:
        space["temperature"] = tune.uniform(*temps)
    return space


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> TrainConfig:
    """The fixed training config (a dict) with one trial's sampled values applied."""
    d = copy.deepcopy(base)
    for key, value in sampled.items():
        if key not in SEARCHED:
            continue
        section, name = SEARCHED[key]
        if name == "se_reduction":
            value = int(value)
        elif isinstance(value, (int, float)):
            value = float(value)
        d[section][name] = value
    # the cosine schedule's floor may not exceed a small sampled peak
    d["optim"]["min_lr"] = min(d["optim"]["min_lr"], d["optim"]["lr"])
    return TrainConfig.from_dict(d)


def format_value(key: str, value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.4g}" if key != "temperature" else f"{value:.2f}"
    return str(value)
