"""Knowledge distillation, fine-tuning (pretrained starts, freezing, differential lrs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from resnet18_dist.checkpoint_file import CheckpointError, best_model_state, load_checkpoint
from resnet18_dist.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunDirConfig,
    TrainConfig,
)
from resnet18_dist.engine.epoch_sink import LocalEpochSink
from resnet18_dist.engine.optim import build_optimizer
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.session import run_training
from resnet18_dist.engine.tasks import DistillationTask, distillation_loss
from resnet18_dist.models import ModelSpec, build_model
from resnet18_dist.models.finetune import apply_freeze, load_pretrained
from resnet18_dist.models.teacher import load_teacher

CLASSES = [str(i) for i in range(10)]


def test_distillation_loss_matches_a_hand_computed_value() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.25
    # By hand: softmax over the logits / T, KL summed over classes, batch of one.
    ps = [math.exp(v / T) for v in (2.0, 0.0, -1.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [math.exp(v / T) for v in (1.0, 1.0, 0.0)]
    pt = [p / sum(pt) for p in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = distillation_loss(s, t, y, T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # batchmean, not the mean over classes of KLDivLoss()'s default: a batch of two identical
    # rows gives the same loss, and the KL term is not divided by the class count.
    got2 = distillation_loss(s.repeat(2, 1), t.repeat(2, 1), y.repeat(2), T, alpha)
    assert got2.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(s, t, y, T, 1.0).item() == pytest.approx(T * T * kl, rel=1e-6)


def test_teacher_gets_no_gradient_and_no_optimizer_state() -> None:
    torch.manual_seed(0)
    # Handed over as a freshly built model is: train mode, gradients on. Freezing it is the
    # task's job.
    teacher = build_model(ModelSpec(num_classes=10, stem="cifar")).train()
    assert all(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model(ModelSpec(num_classes=10, stem="cifar"))
    opt = build_optimizer(student, OptimConfig())
    task = DistillationTask(teacher, temperature=4.0, alpha=0.7)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    student.train()
    loss, _ = task.loss(student, x, y)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not teacher_ids & {id(p) for p in opt.state}
    assert task.teacher is teacher and not teacher.training
    # BN statistics of the teacher did not move either (a train-mode forward would move them).
    assert before["bn1.running_mean"].abs().sum() == 0  # fresh: zeros, so a move would show
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def _cfg(data: Path, **sections) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(data_dir=str(data), batch_size=32, augment="none"),
        model=sections.get("model", ModelConfig()),
        optim=sections.get("optim", OptimConfig(epochs=1, lr=0.05)),
        distill=sections.get("distill", DistillConfig()),
        run=RunDirConfig(seed=1),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )


def _train(cfg: TrainConfig, run_dir: Path) -> dict:
    return run_training(cfg, TorchRuntime(cfg.device), LocalEpochSink(run_dir), run_dir)


@pytest.fixture(scope="module")
def teacher_run(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    _train(_cfg(small_digits, optim=OptimConfig(epochs=2, lr=0.05)), run_dir)
    return run_dir


def test_distilled_training_keeps_the_teacher_out_of_the_checkpoint(
    small_digits: Path, teacher_run: Path, tmp_path: Path
) -> None:
    cfg = _cfg(small_digits, distill=DistillConfig(teacher=str(teacher_run), alpha=0.5))
    report = _train(cfg, tmp_path)
    assert report["resolved"]["task"] == "distillation"
    assert report["resolved"]["teacher"]["kind"] == "checkpoint"
    state = load_checkpoint(tmp_path)
    student_keys = set(build_model(ModelSpec(num_classes=10, stem="cifar")).state_dict())
    assert set(state["model"]) == student_keys  # no teacher.* keys, nothing extra
    assert state["config"]["distill"]["teacher"] == str(teacher_run)
    n_params = sum(v.numel() for v in state["model"].values())
    assert n_params < 12_000_000  # one ResNet18, not two


def test_a_teacher_for_other_classes_is_an_error(teacher_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="predicts 10 classes, the data has 3"):
        load_teacher(DistillConfig(teacher=str(teacher_run)), ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="trained on classes"):
        load_teacher(DistillConfig(teacher=str(teacher_run)), list("abcdefghij"))
    weights = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(num_classes=7).state_dict(), weights)
    with pytest.raises(CheckpointError, match="predicts 7 classes"):
        load_teacher(DistillConfig(teacher="resnet34", teacher_weights=str(weights)), CLASSES)


def test_torchvision_teacher_from_a_local_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "r34.pt"
    torch.manual_seed(3)
    reference = torchvision.models.resnet34(num_classes=10).eval()
    torch.save(reference.state_dict(), weights)
    teacher, info = load_teacher(
        DistillConfig(teacher="resnet34", teacher_weights=str(weights)), CLASSES
    )
    assert info["kind"] == "torchvision" and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), reference(x))


def test_distill_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="--temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="--alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="--teacher-weights"):
        DistillConfig(teacher_weights="w.pt")  # without --teacher
    # What --teacher names is looked up by the launcher's preflight, not on every worker.
    from resnet18_dist.config import TrainConfig
    from resnet18_dist.launching.preflight import check_paths

    with pytest.raises(ConfigError, match="--teacher-weights"):
        check_paths(TrainConfig(distill=DistillConfig(teacher="resnet50")))
    with pytest.raises(ConfigError, match="--teacher"):
        check_paths(TrainConfig(distill=DistillConfig(teacher="/no/such/run")))


def test_torchvision_resnet18_weights_load_as_a_pretrained_start(tmp_path: Path) -> None:
    torch.manual_seed(5)
    tv = torchvision.models.resnet18()  # 1000 ImageNet classes, as torchvision saves it
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(ModelSpec(num_classes=10, stem="imagenet"))
    fresh = load_pretrained(model, str(path))
    assert fresh == ["fc.bias", "fc.weight"]  # the head is replaced for 10 classes
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    # With the CIFAR stem the 7x7 conv1 does not fit and stays fresh; the rest still loads.
    small = build_model(ModelSpec(num_classes=10, stem="cifar"))
    assert load_pretrained(small, str(path)) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert torch.equal(small.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_pretrained_weights_that_do_not_fit_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        load_pretrained(build_model(ModelSpec(num_classes=10)), str(path))
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_pretrained(build_model(ModelSpec(num_classes=10)), str(tmp_path / "bad.pth"))


def test_optimizer_groups_carry_the_stated_lrs_and_weight_decays() -> None:
    model = build_model(ModelSpec(num_classes=10, stem="cifar"))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=1e-4), backbone_lr=0.001)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["backbone"]["lr"] == groups["backbone/no_decay"]["lr"] == 0.001
    assert groups["head"]["lr"] == groups["head/no_decay"]["lr"] == 0.1
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 1e-4
    assert (
        groups["backbone/no_decay"]["weight_decay"] == groups["head/no_decay"]["weight_decay"] == 0
    )
    assert [p.shape for p in groups["head"]["params"]] == [torch.Size([10, 512])]
    assert [p.shape for p in groups["head/no_decay"]["params"]] == [torch.Size([10])]
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("freeze", "trainable_prefixes"),
    [
        ("backbone", ("fc.",)),
        ("stages:2", ("layer3.", "layer4.", "fc.")),
    ],
)
def test_frozen_parts_and_their_bn_statistics_do_not_change(
    freeze: str, trainable_prefixes: tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=10, stem="cifar"))
    set_train_mode = apply_freeze(model, freeze)
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        set_train_mode(model)
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for k, v in after.items():
        trainable = k.startswith(trainable_prefixes)
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, before[k]) != trainable, k
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.fc.weight.requires_grad and not model.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.layer1.parameters())


def test_finetuning_a_checkpoint_with_frozen_backbone_trains_only_the_head(
    small_digits: Path, teacher_run: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        small_digits,
        model=ModelConfig(pretrained=str(teacher_run), freeze="backbone"),
        optim=OptimConfig(epochs=1, lr=0.05),
    )
    report = _train(cfg, tmp_path)
    assert report["resolved"]["trainable_parameters"] == 512 * 10 + 10
    start = best_model_state(load_checkpoint(teacher_run))  # what --pretrained loads
    end = load_checkpoint(tmp_path)["model"]
    changed = {k for k in end if not torch.equal(end[k], start[k])}
    assert changed == {"fc.weight", "fc.bias"}
