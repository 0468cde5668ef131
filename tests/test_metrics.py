from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import confusion_matrix, f1_score

from resnet18_dist.config import RunConfig
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy
from resnet18_dist.data.torch_loader import ShardDataset, TorchvisionLoader, eval_transform
from resnet18_dist.engine.loop import evaluate
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.metrics import ClassificationMetrics
from resnet18_dist.models import ModelSpec, build_model

SPEC = ModelSpec(num_classes=10, stem="cifar")


def test_metrics_match_sklearn_on_fixed_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 10, generator=gen)
    labels = torch.randint(0, 10, (257,), generator=gen)
    m = ClassificationMetrics(10, torch.device("cpu"))
    for sl in (slice(0, 100), slice(100, 257)):  # two batches
        m.update(logits[sl], labels[sl], torch.nn.functional.cross_entropy(logits[sl], labels[sl]))
    out = m.compute()
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    assert out["samples"] == 257
    assert out["top1"] == pytest.approx(float((pred == y).mean()), abs=1e-6)
    top5 = logits.topk(5, dim=1).indices.numpy()
    assert out["top5"] == pytest.approx(float((top5 == y[:, None]).any(1).mean()), abs=1e-6)
    assert out["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    cm = confusion_matrix(y, pred, labels=list(range(10)))
    assert out["confusion"] == cm.tolist()
    per_class = cm.diagonal() / cm.sum(1)
    np.testing.assert_allclose(out["per_class_acc"], per_class, atol=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


def _eval(rank: int, world: int, data: str, weights: str, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    runtime = TorchRuntime(RunConfig())
    manifest = Manifest.load(data)
    model = build_model(SPEC)
    model.load_state_dict(torch.load(weights, weights_only=True))
    # The 1,077-image training split as an evaluation set: it does not divide by 2, so the
    # ranks see 539 and 538 images (and a different number of batches of 64).
    loader = TorchvisionLoader(
        ShardDataset(manifest, "train", eval_transform(DataPolicy(8, "none"))),
        train=False,
        batch_size=64,
        rank=rank,
        world_size=world,
        seed=0,
        workers=0,
        device=torch.device("cpu"),
        channels_last=False,
    )
    result = evaluate(model, loader, runtime, 10)
    result["rank_samples"] = loader.num_samples
    if rank == 0:
        torch.save(result, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_metrics_equal_one_rank_metrics(digits_dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    # A few SGD steps so predictions are spread over the classes rather than constant.
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    manifest = Manifest.load(digits_dataset)
    ds = ShardDataset(manifest, "val", eval_transform(DataPolicy(8, "none")))
    loader = torch.utils.data.DataLoader(ds, batch_size=60, shuffle=True)
    for images, labels in [batch for _ in range(4) for batch in loader]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)

    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    ctx = mp.get_context("spawn")
    for world, out in ((1, one), (2, two)):
        port = _free_port()
        procs = [
            ctx.Process(
                target=_eval, args=(r, world, str(digits_dataset), str(weights), port, str(out))
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            assert p.exitcode == 0
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a["samples"] == b["samples"] == 1077
    assert b["rank_samples"] == 539  # rank 0's share; rank 1 had 538
    assert len(set(np.array(a["confusion"]).argmax(1))) > 1  # a non-trivial model
    for key in ("top1", "top5", "f1_macro", "per_class_acc", "confusion"):
        assert a[key] == b[key], key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
