"""Conv-attention hybrids whose attention timm keeps out of fx, and EdgeNeXt, on tiny configurations of timm's own
classes (float64): MobileViT (its block unfolds patches into sequences: traced through morph's stand-in forward),
EfficientViT-MIT (LiteMLA: multi-scale ReLU linear attention, the same), EdgeNeXt (a residual split 30/30/28-like
into uneven chunks read back by 4 heads: its halves tile now).

For each: the stand-in computes the module's own function; half, convert, fuse and bake run, the baked fused model
loads ``strict=True`` into the stock model and computes its outputs; every growth method keeps the function
(heads mode, <= 1e-6) and loads into the stock model, and its new rows get gradient. Also: a derived model's
``num_features`` / ``head_hidden_size`` / ``embed_dim`` describe its real width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import morph
from morph.graph import attention_width
from morph.graph.forwards import traceable_forward
from morph.graph.trace import trace

timm = pytest.importorskip("timm")


def _mobilevit():  # an inverted-residual stage and one MobileViT block: transformer of 32 channels, 4 heads of 8
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    cfg = ByoModelCfg(
        blocks=(_inverted_residual_block(d=1, c=16, s=1, br=2.0),
                _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0)),
        stem_chs=16, stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=64)
    return ByobNet(cfg, num_classes=10)


def _efficientvit():  # the last stage runs LiteMLA: 32 channels, 4 heads of 8, scales (5,)
    from timm.models.efficientvit_mit import EfficientVit

    return EfficientVit(widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), head_dim=8, head_widths=(64, 80), num_classes=10)


def _edgenext():  # stage 2: 88 channels chunked 30/30/28 by the split-transpose block, 4 heads of 22
    from timm.models.edgenext import EdgeNeXt

    return EdgeNeXt(dims=(16, 32, 88, 64), depths=(1, 1, 1, 1), heads=(4, 4, 4, 4), num_classes=10)


# name -> (builder, input size)
MODELS = {
    "mobilevit": (_mobilevit, (3, 32, 32)),
    "mobilevit_interpolated": (_mobilevit, (3, 36, 36)),  # 9x9 map: the block interpolates to 10x10 and back
    "efficientvit": (_efficientvit, (3, 32, 32)),
    "edgenext": (_edgenext, (3, 64, 64)),
}
# a layer whose output rows grow (new heads' q|k|v rows, or a grown MLP)
GROWN = {"mobilevit": "stages.1.1.transformer.0.attn.qkv", "mobilevit_interpolated": "stages.1.1.transformer.0.attn.qkv",
         "efficientvit": "stages.2.blocks.1.context_module.main.qkv.conv",
         "edgenext": "stages.2.blocks.0.xca.qkv"}
GROWTH = ("net2net", "random", "gradmax", "firefly")


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking norms (fresh ones are 0/1 everywhere) and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        for name, p in m.named_parameters():
            if p.dim() <= 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") or "gamma" in name
                        else torch.randn(p.shape, generator=g) * 0.1)
    return m


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize(MODELS[name][0]().eval())


def _bn_train(m: nn.Module) -> nn.Module:
    """A copy in eval mode but for its BatchNorms, which use batch statistics."""
    import copy

    m = copy.deepcopy(m).eval()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
    return m


def _x(name: str) -> torch.Tensor:
    return torch.randn(2, *MODELS[name][1], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["mobilevit", "mobilevit_interpolated", "efficientvit"])
def test_stand_in_forward_is_the_modules_function(name):
    m = _build(name)
    x = _x(name)
    stand_ins = [n for n, mod in m.named_modules() if traceable_forward(mod) is not None]
    assert stand_ins  # the model has a timm fx leaf that morph traces through
    gm = trace(m, x)
    traced = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for n in stand_ins:  # the block itself is no leaf: its convs and linears are in the graph
        assert n not in traced and any(t.startswith(n + ".") for t in traced)
    with torch.no_grad():
        err = _rel(gm(x), m(x))
    # MobileViT: the same permutation of positions; LiteMLA: timm computes the attention in float32
    assert err <= (1e-15 if name.startswith("mobilevit") else 1e-6), err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_fuse_bake_strict(name):
    m = _build(name)
    size, x = MODELS[name][1], _x(name)
    with torch.no_grad():
        y0 = m(x)
    plain = morph.scale_width(m, 0.5, input_size=size).eval()
    a = morph.convert(m, 0.5, seed=1, input_size=size).eval()
    b = morph.convert(m, 0.5, seed=2, input_size=size).eval()
    with torch.no_grad():
        ya = a(x)
        assert plain(x).shape == ya.shape == y0.shape
        assert _rel(morph.bake(a)(x), ya) <= 1e-12
    f = morph.fuse(a, b, init="zero", seed=0).eval()
    stock = MODELS[name][0]().eval()
    stock.load_state_dict(morph.bake(f).state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(stock(x), f(x)) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("method", GROWTH)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_growth_strict_function_and_gradient(name, method):
    size, x = MODELS[name][1], _x(name)
    half = _randomize(morph.scale_width(_build(name), 0.5, input_size=size).eval(), seed=3)
    y = torch.tensor([1, 7])
    opts = {"steps": 3} if method == "firefly" else {}
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=size, **opts).eval()
    stock = MODELS[name][0]().eval()
    stock.load_state_dict(grown.state_dict(), strict=True)
    with torch.no_grad():
        yh, yg = half(x), grown(x)
        assert _rel(stock(x), yg) <= 1e-12
    if method == "firefly":  # Firefly trains its new neurons a few steps: the loss falls instead
        assert grown.growth_losses[-1] < grown.growth_losses[0], grown.growth_losses
    else:
        assert _rel(yg, yh) <= 1e-6, _rel(yg, yh)
        # and with BatchNorms on batch statistics (copies: their running statistics move)
        h2, g2 = _bn_train(half), _bn_train(grown)
        with torch.no_grad():
            assert _rel(g2(x), h2(x)) <= 1e-6, _rel(g2(x), h2(x))
    if name == "efficientvit" and method in ("random", "gradmax"):
        # LiteMLA's new heads (blocks of [q | k | v] rows of 8): queries and keys random, values 0
        w = grown.get_submodule(GROWN[name]).weight.detach().flatten(1)
        new_heads = w[half.get_submodule(GROWN[name]).weight.shape[0]:].reshape(-1, 3, 8, w.shape[1])
        assert new_heads[:, :2].norm(dim=-1).min() > 0 and not new_heads[:, 2].any()
    # new rows train: after a few SGD steps the grown layer's new rows have moved
    layer = grown.get_submodule(GROWN[name])
    n_old = half.get_submodule(GROWN[name]).weight.shape[0]
    before = layer.weight.detach().clone()
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(grown(x), y).backward()
        opt.step()
    moved = (layer.weight.detach() - before)[n_old:].flatten(1).norm(dim=1)
    assert moved.min() > 0, (moved == 0).sum()


@pytest.mark.slow
def test_model_width_attributes_follow_the_width():
    """timm's VisionTransformer keeps ``embed_dim``, ``num_features`` and ``head_hidden_size``; the half, fused and
    grown models' describe their own width (a model built with that width has the same values)."""
    from timm.models.vision_transformer import VisionTransformer

    def vit(dim):
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=1, num_heads=4, mlp_ratio=2,
                                 num_classes=10)

    size = (3, 32, 32)
    m, ref_half = vit(64), vit(32)
    attrs = ("embed_dim", "num_features", "head_hidden_size")
    half = morph.scale_width(m, 0.5, input_size=size)
    assert {a: getattr(half, a) for a in attrs} == {a: getattr(ref_half, a) for a in attrs} == dict.fromkeys(attrs, 32)
    a = morph.convert(m, 0.5, seed=1, input_size=size)
    b = morph.convert(m, 0.5, seed=2, input_size=size)
    assert a.embed_dim == 32
    for derived in (morph.fuse(a, b, init="zero", seed=0), morph.grow(half, "net2net", 2.0, seed=0, input_size=size)):
        assert {n: getattr(derived, n) for n in attrs} == dict.fromkeys(attrs, 64)
    # a CNN: timm's ResNet keeps num_features (the pooled channels) too
    r = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    assert morph.scale_width(r, 0.5, input_size=(3, 32, 32)).num_features == r.num_features // 2 == 256


def test_refused_mobilevit_v2_says_why():
    """MobileViT v2's block has no stand-in yet: one line naming it."""
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevitv2_block

    cfg = ByoModelCfg(blocks=(_inverted_residual_block(d=1, c=16, s=1, br=2.0),
                              _mobilevitv2_block(d=1, c=32, s=2, transformer_depth=1)),
                      stem_chs=16, stem_type="3x3", stem_pool="", downsample="", act_layer="silu")
    with pytest.raises(morph.MorphError, match="MobileVitV2Block") as e:
        morph.analyze(ByobNet(cfg, num_classes=10), (3, 32, 32))
    assert "\n" not in str(e.value)


def test_head_dim_mode_refuses_lite_mla():
    """In head_dim mode LiteMLA's head channels would scale, and its values' constant-1 channel (the padding that
    computes the normalizer) would pad a channel dim: one line naming it."""
    with attention_width("head_dim"), pytest.raises(morph.MorphError, match="padding a channel dim") as e:
        morph.analyze(_efficientvit(), (3, 32, 32))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_edgenext_split_residual_grows_back():
    """EdgeNeXt's stage of 88 channels is chunked 30/30/28 and read back by 4 heads of 22: the half's residual
    (15/15/14) must grow back to 88, not stay in 44 groups of one channel (the fuse refusal before)."""
    m = _edgenext()
    half = morph.scale_width(m, 0.5, input_size=(3, 64, 64))
    plan = morph.analyze(half, (3, 64, 64))
    out = plan.layers["stages.2.downsample.1"].out_dim
    assert plan.size(out) == 44 and plan.size(out, 2.0) == 88
    assert sorted(plan.groups.size[plan.groups.find(s.group)] for s in plan.atoms(out)) == [14, 15, 15]
