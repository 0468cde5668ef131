"""Elastic runs (`--num-workers MIN:MAX`): the option, the global batch policy, and the data
each epoch reads whatever the world size after a resize. The resize itself, on a real
multi-node cluster, is in tests/test_multinode.py."""

from __future__ import annotations

import pytest

from resnet18_dist.config import ClusterConfig, TrainConfig
from resnet18_dist.data.torch_loader import EpochPartSampler
from resnet18_dist.engine.session import worker_batch_size
from resnet18_dist.options import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"), [("3", (3, 3)), ("1:4", (1, 4)), ("2:2", (2, 2)), (2, (2, 2))]
)
def test_worker_range(text: str | int, expected: tuple[int, int]) -> None:
    run = ClusterConfig.from_dict({"num_workers": text})  # YAML gives 2 as an int
    assert run.worker_range() == expected
    assert run.elastic == (expected[0] < expected[1])


@pytest.mark.parametrize("text", ["0", "4:2", "0:2", "a:b", "1:2:3", ""])
def test_impossible_worker_ranges_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--num-workers"):
        ClusterConfig(num_workers=text)


def test_an_elastic_run_keeps_its_global_batch_at_every_size() -> None:
    cfg = TrainConfig.from_dict({"data": {"batch_size": 32}, "cluster": {"num_workers": "1:4"}})
    assert [worker_batch_size(cfg, w) for w in (4, 2, 1)] == [32, 64, 128]
    assert [worker_batch_size(cfg, w) * w for w in (4, 2, 1)] == [128, 128, 128]
    assert worker_batch_size(cfg, 3) * 3 == 129  # rounded up to whole samples per worker
    fixed = TrainConfig.from_dict({"data": {"batch_size": 32}, "cluster": {"num_workers": "4"}})
    assert worker_batch_size(fixed, 2) == 32  # a fixed-size run keeps --batch-size per worker


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_epoch_reads_every_sample_once_at_any_world_size(world: int) -> None:
    """After a resize the new group's ranks split the epoch anew: still every sample once."""
    n = 1077
    for epoch in (0, 5):
        seen: list[int] = []
        for rank in range(world):
            sampler = EpochPartSampler(n, rank, world, seed=0, shuffle=True)
            sampler.set_epoch(epoch)
            part = list(sampler)
            assert len(part) == len(sampler)
            seen += part
        assert sorted(seen) == list(range(n))
