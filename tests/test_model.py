from __future__ import annotations

import pytest
import torch
import torchvision

from resnet18_dist.models import ModelSpec, build_model, count_parameters, resolve_stem
from resnet18_dist.models.resnet import SEBasicBlock

# Stage widths of ResNet18: two basic blocks each.
STAGES = (64, 128, 256, 512)


def se_params(reduction: int) -> int:
    """Parameters SE adds: per block two 1x1 convs with bias, C -> C/r -> C."""
    total = 0
    for c in STAGES:
        h = c // reduction
        total += 2 * (c * h + h + h * c + c)
    return total


def test_resnet18_has_the_paper_parameter_count() -> None:
    model = build_model(ModelSpec(num_classes=1000))
    assert count_parameters(model) == 11_689_512  # torchvision's resnet18, "about 11.7M"
    assert count_parameters(model) == count_parameters(torchvision.models.resnet18())


def test_resnet18_has_eight_basic_blocks_in_four_stages() -> None:
    model = build_model(ModelSpec(num_classes=10))
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[0].conv1.out_channels for s in stages] == list(STAGES)


def test_cifar_stem_and_class_count_change_only_what_they_should() -> None:
    # 3x3x3x64 stem instead of 7x7x3x64; a 10-way head instead of 1000.
    model = build_model(ModelSpec(num_classes=10, stem="cifar"))
    assert count_parameters(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("reduction", [4, 8, 16, 32])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_se_parameter_count(reduction: int, stem: str) -> None:
    plain = count_parameters(build_model(ModelSpec(num_classes=10, stem=stem)))
    se = count_parameters(build_model(ModelSpec(num_classes=10, stem=stem, se_reduction=reduction)))
    assert se - plain == se_params(reduction)


def test_se_16_literal_count() -> None:
    # Hand-computed: 2 * (580 + 2184 + 8464 + 33312) = 89,080 extra parameters.
    assert count_parameters(build_model(ModelSpec(se_reduction=16))) == 11_689_512 + 89_080


def test_state_dict_keys_match_torchvision_and_weights_load_strictly() -> None:
    tv = torchvision.models.resnet18()
    ours = build_model(ModelSpec(num_classes=1000))
    assert list(ours.state_dict().keys()) == list(tv.state_dict().keys())
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), tv(x))


def test_se_adds_only_se_keys() -> None:
    plain = set(build_model(ModelSpec()).state_dict())
    se = set(build_model(ModelSpec(se_reduction=8)).state_dict())
    extra = se - plain
    assert plain <= se
    assert extra and all(".se." in k for k in extra)
    assert len({k.rsplit(".se.", 1)[0] for k in extra}) == 8  # one SE module per block


def test_se_sits_on_the_residual_branch_before_the_addition() -> None:
    model = build_model(ModelSpec(num_classes=10, stem="cifar", se_reduction=16)).eval()
    block = model.layer2[1]  # no downsample: identity shortcut
    assert isinstance(block, SEBasicBlock)
    x = torch.randn(1, 128, 4, 4)
    with torch.no_grad():
        # A gate of exactly 0 removes the residual branch: the block is relu(identity).
        block.se.fc2.bias.fill_(-1e4)
        torch.testing.assert_close(block(x), torch.relu(x))
        # A gate of 1 makes it a plain basic block.
        block.se.fc2.bias.fill_(1e4)
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        torch.testing.assert_close(block(x), torch.relu(out + x))


def test_stem_auto_follows_image_size() -> None:
    assert resolve_stem("auto", 8) == "cifar"
    assert resolve_stem("auto", 64) == "cifar"
    assert resolve_stem("auto", 65) == "imagenet"
    assert resolve_stem("imagenet", 32) == "imagenet"


def test_dropout_is_active_in_training_and_off_in_eval() -> None:
    model = build_model(ModelSpec(num_classes=10, stem="cifar", dropout=0.5))
    feats = torch.ones(4, 512)
    model.train()
    assert (model.dropout(feats) == 0).any()
    model.eval()
    torch.testing.assert_close(model.dropout(feats), feats)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))  # deterministic in eval
    # Through the whole model: two training forwards of the same batch differ (only dropout is
    # random; train-mode BatchNorm uses the batch's own statistics both times) ...
    model.train()
    assert not torch.allclose(model(x), model(x))
    # ... and without dropout they are equal, so the difference above is dropout's.
    plain = build_model(ModelSpec(num_classes=10, stem="cifar", dropout=0.0)).train()
    torch.testing.assert_close(plain(x), plain(x))


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="se_reduction"):
        build_model(ModelSpec(se_reduction=3))
    with pytest.raises(ValueError, match="stem"):
        build_model(ModelSpec(stem="auto"))
    with pytest.raises(ValueError, match="architecture"):
        build_model(ModelSpec(arch="resnet7"))
    with pytest.raises(ValueError, match="basic-block"):
        build_model(ModelSpec(arch="resnet50", se_reduction=16))
