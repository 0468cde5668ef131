"""The CIFAR recipe's parts: trivialaugment / autoaugment and random erasing in both backends,
the weight average (--ema-decay) as what is evaluated and exported, and the --recipe preset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from resnet18_dist.checkpoint_file import best_model_state, load_checkpoint, write_checkpoint
from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.config import (
    RECIPES,
    DataConfig,
    DeviceConfig,
    LoggingConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
)
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy, crop_padding, erase_side
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.engine.checkpoint import TrainState
from resnet18_dist.engine.ema import ModelEma
from resnet18_dist.engine.epoch_sink import LocalEpochSink
from resnet18_dist.engine.loop import evaluate
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import run_training
from resnet18_dist.export.artifact import model_from_checkpoint
from resnet18_dist.models import ModelSpec, build_model
from resnet18_dist.models.model_file import load_model_pt

from .conftest import cpu_settings, make_color_folder
from .test_augment import pixels, torchvision_loader

SIZE = 32
BACKENDS = ["torchvision", "dali"]


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 random-texture 32-px JPEGs: every operation of a policy changes their pixels."""
    root = tmp_path_factory.mktemp("textured")
    make_color_folder(root / "src", num_classes=2, per_class=40, size=SIZE)
    out = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(root / "src"), out=str(out), quiet=True))
    return out


def _batch(manifest: Manifest, policy: DataPolicy, backend: str, bs: int = 48) -> torch.Tensor:
    if backend == "torchvision":
        loader = torchvision_loader(manifest, "train", policy, train=True, bs=bs)
    else:
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        from resnet18_dist.data.dali import DaliLoader

        loader = DaliLoader(manifest, "train", policy, cpu_settings(bs, workers=2), train=True)
    images, _ = next(iter(loader))
    loader.close()
    return images


def _base_variants(manifest: Manifest) -> torch.Tensor:
    """Every training image under every pad-crop shift and flip: the outputs of the policies'
    base geometry when their own operation is the identity."""
    ((ref, _),) = list(
        torchvision_loader(manifest, "train", DataPolicy(SIZE, "none"), train=False, bs=1000)
    )
    pad = crop_padding(SIZE)
    padded = torch.nn.functional.pad(ref, (pad, pad, pad, pad), mode="reflect")
    variants = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, :, dy : dy + SIZE, dx : dx + SIZE]
            variants += [window, window.flip(-1)]
    return torch.cat(variants).flatten(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["trivialaugment", "autoaugment"])
def test_searched_policies_transform_within_range_and_reach_the_identity(
    textured: Path, backend: str, policy: str
) -> None:
    m = Manifest.load(textured)
    images = _batch(m, DataPolicy(SIZE, policy), backend)
    assert images.shape == (48, 3, SIZE, SIZE) and images.dtype == torch.float32
    px = pixels(images)
    assert torch.isfinite(px).all()
    assert px.min() >= -0.5 and px.max() <= 255.5  # still 8-bit pixels, normalised
    # Nearest base variant (crop shift + flip) of each output: ~0 where the policy drew its
    # identity (or a zero magnitude), far where it changed the pixels.
    nearest = torch.cdist(images.float().flatten(1), _base_variants(m)).min(dim=1).values
    identity = nearest < 0.1
    assert identity.any(), f"{policy} on {backend}: no output is an unchanged crop"
    assert (~identity).float().mean() > 0.5, f"{policy} on {backend}: the policy rarely acts"
    # ...and most of what it changed, it changed by far more than decoding differences.
    assert (nearest[~identity] > 1.0).float().mean() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_erasing_blanks_one_square_of_half_the_side(textured: Path, backend: str) -> None:
    m = Manifest.load(textured)
    images = _batch(m, DataPolicy(SIZE, "none", random_erasing=1.0), backend)
    ((ref, _),) = list(
        torchvision_loader(m, "train", DataPolicy(SIZE, "none"), train=False, bs=1000)
    )
    side = erase_side(SIZE)
    # 0 after normalisation is the mean colour, which no 8-bit pixel hits exactly (123.675...)
    erased = (images == 0).all(dim=1)
    assert (erased.sum(dim=(1, 2)) == side * side).all()
    for mask in erased:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert int(rows.max() - rows.min()) + 1 == side == int(cols.max() - cols.min()) + 1
    # Everything else is an untouched training image (order aside; augment none).
    kept = images.masked_fill(erased[:, None], 0).flatten(1)
    refs = ref.flatten(1)
    for img, mask in zip(kept, erased, strict=True):
        candidates = refs.masked_fill(mask.flatten().repeat(3)[None], 0)
        assert (candidates - img).abs().max(dim=1).values.min() < 1e-4
    # p = 0.5 erases some images and not others
    half = _batch(m, DataPolicy(SIZE, "none", random_erasing=0.5), backend)
    n_erased = int((half == 0).all(dim=1).flatten(1).any(dim=1).sum())
    assert 8 <= n_erased <= 40


def test_ema_follows_the_weights_and_buffers_without_host_reads() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=3, stem="cifar"))
    ema = ModelEma(model, decay=0.9)
    x = torch.randn(8, 3, 8, 8)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        live = {k: v.clone() for k, v in model.state_dict().items()}
        prev = {k: v.clone() for k, v in ema.module.state_dict().items()}
        d = ema.decay_at(step)
        ema.update()
        for k, v in ema.module.state_dict().items():
            if v.is_floating_point():  # weights and BatchNorm statistics alike
                assert torch.allclose(v, d * prev[k] + (1 - d) * live[k], atol=1e-6), k
            else:
                assert torch.equal(v, live[k]), k
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9
    assert not torch.equal(before["conv1.weight"], ema.module.state_dict()["conv1.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def _ema_cfg(data: Path, epochs: int = 2) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(data_dir=str(data), batch_size=32, augment="trivialaugment"),
        optim=OptimConfig(epochs=epochs, lr=0.05, ema_decay=0.9, patience=0),
        run=RunDirConfig(seed=3, keep_checkpoints=5),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )


@pytest.fixture(scope="module")
def ema_run(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    cfg = _ema_cfg(small_digits)
    report = run_training(cfg, TorchRuntime(cfg.device), LocalEpochSink(run_dir, keep=5), run_dir)
    return run_dir, report


def _model_with(state_dict: dict, num_classes: int = 10) -> torch.nn.Module:
    model = build_model(ModelSpec(num_classes=num_classes, stem="cifar"))
    model.load_state_dict(state_dict)
    return model.eval()


def test_the_average_is_what_is_validated_tested_and_exported(
    ema_run: tuple[Path, dict], small_digits: Path
) -> None:
    run_dir, report = ema_run
    m = Manifest.load(small_digits)
    runtime = TorchRuntime(DeviceConfig(), threads=2)
    from resnet18_dist.data.torch_loader import build_torchvision_loaders

    loaders = build_torchvision_loaders(m, DataPolicy(8, "none"), cpu_settings(64))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    for epoch, line in enumerate(logged):
        ckpt = load_checkpoint(run_dir / f"checkpoint_epoch{epoch + 1:04d}")
        assert ckpt["ema"] is not None and ckpt["ema"]["updates"] == 8 * (epoch + 1)
        raw, avg = ckpt["model"], ckpt["ema"]["model"]
        assert not torch.equal(raw["fc.weight"], avg["fc.weight"])  # two different models
        # The logged validation figures are the average's, not the live weights'.
        val = evaluate(_model_with(avg), loaders["val"], runtime, 10)
        assert val["top1"] == pytest.approx(line["val_top1"])
        assert val["loss"] == pytest.approx(line["val_loss"], rel=1e-4)
        live = evaluate(_model_with(raw), loaders["val"], runtime, 10)
        assert live["loss"] != pytest.approx(line["val_loss"], rel=1e-4)
    best = report["best_epoch"]
    ckpt = load_checkpoint(run_dir / f"checkpoint_epoch{best + 1:04d}")
    best_avg = ckpt["ema"]["model"]
    final = load_checkpoint(run_dir / f"checkpoint_epoch{len(logged):04d}")
    # Export (and teachers, fine-tuning) read the best average from the newest checkpoint.
    for k, v in best_model_state(final).items():
        assert torch.equal(v, best_avg[k]), k
    exported, _, _ = model_from_checkpoint(run_dir)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, best_avg[k]), k
    # model.pt and the test report are the best average's.
    model_pt, _ = load_model_pt(run_dir / "model.pt")
    for k, v in model_pt.state_dict().items():
        assert torch.equal(v, best_avg[k]), k
    test = evaluate(model_pt, loaders["test"], runtime, 10)
    assert test["top1"] == pytest.approx(report["test_top1"])
    assert report["resolved"]["ema_decay"] == 0.9


def test_a_checkpoint_without_an_average_still_loads_and_resumes(
    ema_run: tuple[Path, dict], small_digits: Path, tmp_path: Path
) -> None:
    run_dir, _ = ema_run
    old = load_checkpoint(run_dir / "checkpoint_epoch0001")
    old.pop("ema")
    old.pop("_path", None)
    old["best_model"] = None
    old_dir = write_checkpoint(old, tmp_path / "old" / "checkpoint_epoch0001").parent
    state = TrainState.load(old_dir)
    assert state.ema is None
    assert torch.equal(state.loop.best_model["fc.weight"], old["model"]["fc.weight"])
    # ...and a run with --ema-decay resumes from it, starting its average there.
    cfg = _ema_cfg(small_digits)
    out = tmp_path / "resumed"
    report = run_training(
        cfg, TorchRuntime(cfg.device), LocalEpochSink(out, keep=5), out, resume_from=old_dir
    )
    assert report["epochs_run"] == 2
    assert load_checkpoint(out / "checkpoint_epoch0002")["ema"]["updates"] == 8


def test_recipe_sets_its_values_and_explicit_options_win(tmp_path: Path) -> None:
    parser = build_parser(TrainConfig, "t")
    cfg = parse_options(TrainConfig, parser, ["--recipe", "cifar"])
    preset = RECIPES["cifar"]
    for section, values in preset.items():
        for name, value in values.items():
            assert getattr(getattr(cfg, section), name) == value, name
    assert cfg.optim.ema_decay > 0 and cfg.data.augment == "trivialaugment"
    cfg = parse_options(TrainConfig, parser, ["--recipe", "cifar", "--lr", "0.05", "--epochs", "3"])
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 3
    assert cfg.optim.weight_decay == preset["optim"]["weight_decay"]
    # In a YAML file too, and a run's config.yaml (every value explicit) reloads unchanged.
    (tmp_path / "c.yaml").write_text("optim:\n  recipe: cifar\n  label_smoothing: 0.0\n")
    cfg = parse_options(TrainConfig, parser, ["--config", str(tmp_path / "c.yaml")])
    assert cfg.optim.label_smoothing == 0.0 and cfg.data.batch_size == 512
    cfg.dump_yaml(tmp_path / "run.yaml")
    assert TrainConfig.load_yaml(tmp_path / "run.yaml") == cfg
    # Without --recipe nothing changes (but the default --output-dir, resolved once here).
    expected = TrainConfig()
    expected.run.output_dir = os.path.abspath("runs")
    assert parse_options(TrainConfig, parser, []) == expected
