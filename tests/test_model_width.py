"""`--width`: a narrower ResNet18 (every stage's channels times the multiplier) on the same code
path, recorded in checkpoints and model.pt so that they rebuild the same network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet18_dist.checkpoint_file import CheckpointError, load_checkpoint
from resnet18_dist.config import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
)
from resnet18_dist.engine.checkpoint import check_compatible
from resnet18_dist.engine.epoch_sink import LocalEpochSink
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import run_training
from resnet18_dist.export.artifact import model_from_checkpoint
from resnet18_dist.models.model_file import load_model_pt
from resnet18_dist.models.resnet import ModelSpec, build_model, count_parameters
from resnet18_dist.options import ConfigError


def _widths(model: torch.nn.Module) -> list[int]:
    """The stem's and each stage's output channels, and the head's input."""
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    inner = [s[-1].bn2.num_features for s in stages]
    return [model.conv1.out_channels, *inner, model.fc.in_features]


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_width_scales_every_stage_and_one_is_the_real_resnet18(stem: str) -> None:
    full = build_model(ModelSpec(num_classes=10, stem=stem))
    narrow = build_model(ModelSpec(num_classes=10, stem=stem, width=0.25, se_reduction=16))
    assert _widths(full) == [64, 64, 128, 256, 512, 512]
    assert _widths(narrow) == [16, 16, 32, 64, 128, 128]
    assert narrow.bn1.num_features == 16 and narrow.layer2[0].downsample[0].in_channels == 16
    # About 1/16 of the weights: the compute of a test that checks orchestration, not learning.
    assert count_parameters(narrow) < count_parameters(full) / 12
    x = torch.randn(2, 3, 32, 32)
    assert narrow.eval()(x).shape == (2, 10)
    assert count_parameters(build_model(ModelSpec())) == 11_689_512  # width 1.0 by default


@pytest.mark.parametrize("width", [0, -0.5, 1.5])
def test_a_width_outside_0_to_1_exits_naming_the_option(width: float) -> None:
    with pytest.raises(ConfigError, match="--width"):
        ModelConfig(width=width)
    with pytest.raises(ValueError, match="width"):
        build_model(ModelSpec(width=width))


def test_a_narrow_run_is_rebuilt_at_its_width_from_the_checkpoint_and_model_pt(
    small_digits: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        data=DataConfig(data_dir=str(small_digits), batch_size=32),
        model=ModelConfig(width=0.25),
        optim=OptimConfig(epochs=1, lr=0.05),
        run=RunDirConfig(seed=1),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )
    run_training(cfg, TorchRuntime(cfg.device), LocalEpochSink(tmp_path), tmp_path)
    state = load_checkpoint(tmp_path)
    assert state["model_spec"]["width"] == 0.25
    # The export's model and its metadata, and model.pt, rebuild the narrow network.
    model, _, meta = model_from_checkpoint(tmp_path)
    assert _widths(model)[0] == 16 and meta.model_spec["width"] == 0.25
    loaded, loaded_meta = load_model_pt(tmp_path / "model.pt")
    assert _widths(loaded) == _widths(model) and loaded_meta.model_spec["width"] == 0.25
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # Resuming it as a full-width run is refused, naming the option.
    with pytest.raises(CheckpointError, match=r"width=0.25, this run uses 1.0 \(--width\)"):
        check_compatible(state, ModelSpec(num_classes=10, stem="cifar"))
