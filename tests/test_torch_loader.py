from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet18_dist.config import DataConfig
from resnet18_dist.data.loaders import build_loaders, loader_settings, resolve_backend
from resnet18_dist.data.manifest import DatasetError, Manifest
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD, DataPolicy, resolve_policy
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.data.torch_loader import ShardDataset, TorchvisionLoader, eval_transform
from resnet18_dist.options import ConfigError

from .conftest import corrupt_sample, cpu_settings, make_color_folder, red_to_label

CPU = torch.device("cpu")


def _loader(
    manifest: Manifest,
    split: str,
    rank: int,
    world: int,
    train: bool,
    bs: int = 16,
    policy: DataPolicy | None = None,
    workers: int = 0,
) -> TorchvisionLoader:
    policy = policy or DataPolicy(manifest.native_size or 16, "none")
    settings = cpu_settings(bs, rank=rank, world=world, workers=workers)
    dataset = ShardDataset(manifest, split, eval_transform(policy))
    return TorchvisionLoader(dataset, settings, train=train)


@pytest.fixture(scope="module")
def color_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("color")
    src = make_color_folder(root / "src", num_classes=6, per_class=17)
    out = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(src), out=str(out), quiet=True, min_shards=5))
    return out


def _sample_ids(loader: TorchvisionLoader) -> list[int]:
    sampler = loader.sampler
    return list(iter(sampler))


def test_training_ranks_read_each_sample_once_in_equal_steps(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    n = m.counts["train"]
    world = 7
    assert n % world != 0  # uneven parts: 240 images over 7 ranks
    # 240 = 2 x 35 + 5 x 34: at batch 17 the long parts need 3 batches (17, 17, 1), the short
    # ones 2, so they must pad with an empty third batch to keep DDP's steps in line.
    ranks = [_loader(m, "train", r, world, train=True, bs=17) for r in range(world)]
    ids = [_sample_ids(ld) for ld in ranks]
    sizes = [[len(labels) for _, labels in ld] for ld in ranks]
    assert sorted(map(tuple, sizes)) == [(17, 17, 0)] * 5 + [(17, 17, 1)] * 2
    assert all(len(ld) == 3 for ld in ranks)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert sorted(i for part in ids for i in part) == list(range(n))  # each exactly once
    for ld in ranks:
        ld.set_epoch(1)
    ids1 = [_sample_ids(ld) for ld in ranks]
    assert ids1 != ids  # a new order each epoch
    for ld in ranks:
        ld.set_epoch(0)
    assert [_sample_ids(ld) for ld in ranks] == ids  # and the same order for the same epoch


def test_eval_ranks_cover_every_sample_exactly_once(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    ids = [_sample_ids(_loader(m, "val", r, 3, train=False)) for r in range(3)]
    flat = sorted(i for part in ids for i in part)
    assert flat == list(range(m.counts["val"]))


def test_labels_stay_attached_to_their_images(color_dataset: Path) -> None:
    m = Manifest.load(color_dataset)
    loader = _loader(m, "train", 0, 1, train=True, workers=2)
    seen = 0
    mean, std = IMAGENET_MEAN[0], IMAGENET_STD[0]
    for images, labels in loader:
        red = (images[:, 0] * std + mean).mean(dim=(1, 2)) * 255
        assert [red_to_label(float(r)) for r in red] == labels.tolist()
        seen += len(labels)
    assert seen == loader.num_samples == Manifest.load(color_dataset).counts["train"]


def test_batches_have_the_policy_shape_and_normalisation(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    cfg = DataConfig(data_dir=str(small_digits), batch_size=8, eval_batch_size=32, augment="none")
    policy = resolve_policy(cfg, m)
    assert policy == DataPolicy(8, "none")  # native 8 px
    settings = loader_settings(
        cfg, rank=0, world_size=1, seed=0, device=CPU, channels_last=True, cpus_per_worker=1
    )
    loaders = build_loaders(cfg, m, policy, settings)
    images, labels = next(iter(loaders.train))
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.max() < 10
    # White paper after ImageNet normalisation: (1 - mean) / std per channel.
    top = torch.tensor([(1 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.all(images.amax(dim=(0, 2, 3)) <= top + 1e-4)


def test_auto_policy_by_hint_then_size(small_digits: Path, digits_dataset: Path) -> None:
    # The built-in digits name their policy: digits are not mirror-symmetric.
    assert resolve_policy(DataConfig(), Manifest.load(digits_dataset)) == DataPolicy(8, "none")
    m = Manifest.load(small_digits)  # prepared from a plain folder: no hint
    assert resolve_policy(DataConfig(), m) == DataPolicy(8, "cifar")
    assert resolve_policy(DataConfig(image_size=96), m) == DataPolicy(96, "seed")
    m.native_size, m.max_side = None, 500
    # Photos: not square, or larger than the image size (tests/test_photos.py).
    assert resolve_policy(DataConfig(), m) == DataPolicy(224, "seed", preprocess="photo")


def test_a_corrupt_image_in_a_shard_names_shard_and_key(tmp_path: Path, small_digits: Path) -> None:
    m, shard, first = corrupt_sample(small_digits, tmp_path / "data", "val", 0, 0)
    loader = _loader(m, "val", 0, 1, train=False)
    with pytest.raises(DatasetError, match=rf"{first.name}.*{shard.name}"):
        for _ in loader:
            pass


def test_too_few_images_for_the_batch_size_is_a_clear_error(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    cfg = DataConfig(data_dir=str(small_digits), batch_size=200)
    with pytest.raises(DatasetError, match="--batch-size"):
        settings = loader_settings(
            cfg, rank=0, world_size=2, seed=0, device=CPU, channels_last=False, cpus_per_worker=1
        )
        build_loaders(cfg, m, DataPolicy(8, "none"), settings)


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="manifest.json"):
        Manifest.load(tmp_path)


def test_backend_auto_is_torchvision_without_cuda() -> None:
    assert resolve_backend("auto", CPU) == "torchvision"
    assert resolve_backend("torchvision", CPU) == "torchvision"


def test_dali_request_without_dali_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import resnet18_dist.data.loaders as loaders_mod

    monkeypatch.setattr(loaders_mod, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match="--data-backend"):
        resolve_backend("dali", CPU)
