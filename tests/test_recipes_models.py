"""CIFAR Wide ResNets and model building through morph."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from morph.recipes.config import ModelConfig
from morph.recipes.models import WideResNet, build_model, wrn


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn_28_10_has_the_published_size():
    # 36.5M parameters (Zagoruyko & Komodakis 2016; MixtureGrowth's parameter budget)
    model = WideResNet(28, 10, num_classes=10, norm="preact")
    assert 36.4e6 < _count(model) < 36.6e6
    block = WideResNet(28, 10, num_classes=10, norm="block")
    bn_params = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    block_bn = sum(m.weight.numel() * 2 for m in block.modules() if isinstance(m, nn.BatchNorm2d))
    assert _count(model) - _count(block) == bn_params - block_bn > 0
    # "block": BatchNorm only before each block (12 blocks) and the final one
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 25


@pytest.mark.parametrize("norm", ["preact", "block"])
def test_wrn_forward_and_fx_trace(norm):
    torch.manual_seed(0)
    model = wrn(10, 1, num_classes=7, norm=norm).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fx.symbolic_trace(model)
    assert torch.equal(gm(x), model(x))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)  # any input size (adaptive pooling)


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27)


def test_build_model_records_morph_provenance():
    import morph

    model = build_model(ModelConfig(arch="wrn", depth=10, widen_factor=2, norm="block"), 10, (3, 32, 32))
    info = morph.get_info(model)
    assert info.kind == "plain" and info.width == 1.0 and info.input_size == (3, 32, 32)
    assert info.spec.spec == "morph.recipes.models:wrn"
    assert info.spec.kwargs == {"depth": 10, "widen_factor": 2.0, "norm": "block", "num_classes": 10}
    resnet = build_model(ModelConfig(arch="torchvision/resnet50"), 100, (3, 224, 224))
    assert resnet.fc.out_features == 100 and 23.5e6 < _count(resnet) < 23.8e6
