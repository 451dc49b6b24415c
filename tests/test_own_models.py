"""Models users build themselves (not through ``morph.build_model``): save, load and the recorded spec."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from motifs import Residual

import morph
from morph.zoo import infer_spec

SIZE = (3, 16, 16)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("build, spec", [
    (lambda: timm.create_model("test_resnet", num_classes=7), ("timm", "test_resnet", {"num_classes": 7})),
    (lambda: torchvision.models.resnet18(num_classes=5), ("torchvision", "resnet18", {"num_classes": 5})),
    (lambda: torchvision.models.mobilenet_v3_small(), ("torchvision", "mobilenet_v3_small", {})),
])
def test_library_models_built_directly_record_their_spec(tmp_path, build, spec):
    model = build()
    s = infer_spec(model)
    assert (s.source, s.name, s.kwargs) == spec
    half = morph.convert(model, 0.5, seed=1, input_size=(3, 32, 32))
    r = morph.load(morph.save(half, tmp_path / "h.safetensors"))  # no factory needed: a library model by name
    assert _same(r, half)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(r.eval()(x), half.eval()(x))


def test_spec_is_not_guessed_when_uncertain():
    # googlenet without its auxiliary heads is not what get_model("googlenet") builds: no spec rather than a wrong one
    assert infer_spec(torchvision.models.googlenet(aux_logits=False, init_weights=False)) is None
    assert infer_spec(Residual(num_classes=3)) is None
    tweaked = timm.create_model("test_resnet", num_classes=7)
    tweaked.fc = torch.nn.Linear(tweaked.fc.in_features, 9)
    assert infer_spec(tweaked) is None


@pytest.mark.parametrize("kind", ["plain", "half", "fused"])
def test_own_model_without_spec_round_trips_with_model_fn(tmp_path, kind):
    torch.manual_seed(0)
    base = Residual(num_classes=3)
    model = base
    if kind != "plain":
        a = morph.convert(base, 0.5, seed=1, input_size=SIZE)
        model = a if kind == "half" else morph.fuse(a, morph.convert(base, 0.5, seed=2, input_size=SIZE), seed=0)
    path = morph.save(model, tmp_path / "own.safetensors")
    assert morph.read_info(path)[0].spec is None
    with pytest.raises(morph.CheckpointError, match=r"records no spec .* morph.load\(path, model_fn="):
        morph.load(path)
    r = morph.load(path, model_fn=lambda: Residual(num_classes=3))
    assert _same(r, model)
    x = torch.randn(2, *SIZE)
    assert torch.equal(r.eval()(x), model.eval()(x))


def test_convnextv2_global_response_norm_grows_to_the_stock_model():
    """GRN: an L2 norm over the spatial dims (a reduction rule) and addcmul (elementwise). It normalizes by
    the mean over channels, so a zero-init fusion is not an ensemble (like LayerNorm over channels), but
    it fuses and bakes to exactly the stock layout."""
    torch.manual_seed(0)
    size = (3, 64, 64)
    base = timm.create_model("convnextv2_atto", num_classes=10)  # built directly: the spec is inferred
    a = morph.convert(base, 0.5, seed=1, input_size=size)
    b = morph.convert(base, 0.5, seed=2, input_size=size)
    fused = morph.fuse(a, b, init="zero", seed=0).eval()
    baked = morph.bake(fused)
    stock = timm.create_model("convnextv2_atto", num_classes=10)
    stock.load_state_dict(baked.state_dict(), strict=True)
    x = torch.randn(2, *size)
    torch.testing.assert_close(stock.eval()(x), fused(x), rtol=1e-5, atol=1e-5)


def test_condconv_is_refused_with_the_reason():
    with pytest.raises(morph.UnsupportedOpError, match=r"blocks\.\d\.0\.conv_pw.*CondConv2d .*cannot be converted or "
                       r"grown; use the family's plain variant"):
        morph.convert(timm.create_model("efficientnet_cc_b0_4e", num_classes=10), 0.5, input_size=(3, 64, 64))


class _Grouped(torch.nn.Module):
    """Group width 8 does not divide the half width 12: the half has 3 groups of 4 channels."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(24)
        self.grouped = torch.nn.Conv2d(24, 24, 3, padding=1, groups=3)
        self.gn = torch.nn.GroupNorm(3, 24)
        self.fc = torch.nn.Linear(24, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.gn(self.grouped(x)))
        return self.fc(x.mean((2, 3)))


def test_own_model_fuses_back_to_its_recorded_layout(tmp_path):
    """No spec to rebuild the original from: convert records its layout, and fusion tiles back to it
    (3 groups, not the 6 that re-deriving from the half's 4-channel groups would give)."""
    torch.manual_seed(0)
    base = _Grouped()
    a = morph.convert(base, 0.5, seed=1, input_size=SIZE)
    b = morph.convert(base, 0.5, seed=2, input_size=SIZE)
    assert a.grouped.groups == 3 and morph.get_info(a).original["groups"] == {"grouped": 3, "gn": 3}
    fused = morph.fuse(a, b, init="zero", seed=0).eval()
    assert fused.grouped.groups == 3 and fused.gn.num_groups == 3
    mine = _Grouped()
    mine.load_state_dict(morph.bake(fused).state_dict(), strict=True)
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(mine.eval()(x), fused(x), rtol=1e-5, atol=1e-5)
    # and the fused model round-trips through a file with the caller's factory
    r = morph.load(morph.save(fused, tmp_path / "f.safetensors"), model_fn=_Grouped)
    assert _same(r, fused) and torch.equal(r.eval()(x), fused(x))
