"""New rows of grown transformers train: cosine attention (Swin-V2), and GradMax behind layer scale (CaiT).

Cosine attention (torchvision's Swin-V2, and timm's, whose query bias is a parameter of the attention module that
its forward concatenates into ``F.linear``) grown in head_dim mode: exact, and every new row trains.

Swin-V2 L2-normalizes each head's queries and keys. Zero new query and key channels (Random, GradMax) kept the
function but never got a gradient (each one's gradient is the other one's value), and replicated ones
(Net2Net) changed the norms (1e-3 on this model, 6e-1 on swin_v2_t). :mod:`morph.growth.cosine` gives them a
rotated copy of the head's old channels, split differently on replicated inputs. The checks: strict loading
into the stock model with its outputs, the grown model's outputs equal the half's in float64, and after 3 SGD
steps no new row of any grown layer is still zero or still equal to an old row, and the new queries are no
longer a linear function of the old ones on the batch (the rotated copy parted).

GradMax on a float32 model whose MLPs feed LayerNorms through a layer scale (CaiT): the gradient matrix of
fc1 -> fc2 is accumulated in float64 from float32 activations; its rank cut at float64's precision took the
all-ones direction (singular value ~1e-7 of the largest: rounding) for a gradient direction, and the neuron
given it never moved (24 of cait_xxs24's 17858 new rows). The cut is at the data's precision now.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_growth_trains import _new_rows, _stuck_rows

import morph
from morph.graph import attention_width

SIZE = (3, 32, 32)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomized(m: nn.Module) -> nn.Module:
    """Norm scales in [0.5, 1.5), every other parameter but the cosine attention's ``logit_scale`` Gaussian
    (fan-in scaled), from a fixed generator: no weight of the stock initialization is zero or shared."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() <= 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("logit_scale"):
                continue
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return m


def _swin_v2(heads=(3, 6)) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    from torchvision.models.swin_transformer import SwinTransformer as TvSwin

    torch.manual_seed(0)
    m = TvSwin(patch_size=[2, 2], embed_dim=8 * heads[0], depths=[2, 1], num_heads=list(heads), window_size=[4, 4],
               num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    m = m.to(torch.float64).eval()
    return _randomized(m)


def _timm_swin_v2(heads=(3, 6)) -> nn.Module:
    """timm's Swin-V2 (its own WindowAttention: F.linear of qkv.weight with q_bias, a zero k_bias, v_bias)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    m = SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=8 * heads[0], depths=(2, 1),
                          num_heads=heads, num_classes=10).to(torch.float64).eval()
    return _randomized(m)


# builder, the first block's qkv Linear
COSINE = {"torchvision": (_swin_v2, "features.1.0.attn.qkv"), "timm": (_timm_swin_v2, "layers.0.blocks.0.attn.qkv")}


def _queries(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The query outputs (tokens x channels) of ``layer`` (a qkv Linear, which its attention module reads as
    weights: hooked there) on ``x``."""
    out = []
    h = model.get_submodule(layer.rpartition(".")[0]).register_forward_hook(lambda m, i, o: out.append(i[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    lin = model.get_submodule(layer)
    n = lin.out_features // 3
    bias = lin.bias if lin.bias is not None else model.get_submodule(layer.rpartition(".")[0]).q_bias  # timm
    with torch.no_grad():
        return F.linear(out[0].flatten(0, -2), lin.weight[:n], bias[:n])


def _linear_residual(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``b`` (tokens x channels) is from the best linear function of ``a`` (relative least squares)."""
    sol = torch.linalg.lstsq(a, b).solution
    return float((a @ sol - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("impl", sorted(COSINE))
@pytest.mark.parametrize("method", ["random", "gradmax", "net2net"])
def test_cosine_attention_head_dim_growth_is_exact_and_trains(method, impl):
    build, layer = COSINE[impl]
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7, 2, 3])
    with attention_width("head_dim"):
        half = morph.scale_width(build(), 0.5, input_size=SIZE).eval()
        grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE).eval()
    stock = build().eval()
    stock.load_state_dict(grown.state_dict(), strict=True)
    with torch.no_grad():
        yg = grown(x)
        assert float((stock(x) - yg).norm() / yg.norm()) <= 1e-12
        assert float((yg - half(x)).norm() / yg.norm()) <= 1e-12
    n = grown.get_submodule(layer).out_features // 3
    new_q = torch.zeros(n, dtype=torch.bool)
    for h in range(3):  # 3 heads of 4 -> 3 heads of 8: each head's last 4 channels are new
        new_q[h * 8 + 4:(h + 1) * 8] = True
    q = _queries(grown, x, layer)
    assert q[:, new_q].norm(dim=0).min() > 0  # nonzero new queries (Random, GradMax: 0 before)
    assert _linear_residual(q[:, ~new_q], q[:, new_q]) <= 1e-10  # at growth: a rotated copy
    rows = _new_rows(grown)
    before = {k: v.detach().clone() for k, v in grown.state_dict().items()}
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    for i in range(3):
        xi = x if i == 0 else torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(100 + i))
        opt.zero_grad()
        F.cross_entropy(grown(xi), y).backward()
        opt.step()
    total, zero, same = _stuck_rows(grown, rows, before)
    assert total > 0 and zero == 0 and same == 0, (total, zero, same)
    grown.eval()
    q = _queries(grown, x, layer)
    assert _linear_residual(q[:, ~new_q], q[:, new_q]) > 1e-6  # the copy parted: new capacity


@pytest.mark.slow
def test_cosine_attention_rows_keep_zero_with_keys_zero():
    """``keys="zero"`` leaves zero new query and key rows as they are (the user's choice)."""
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))
    with attention_width("head_dim"):
        half = morph.scale_width(_swin_v2(), 0.5, input_size=SIZE).eval()
        grown = morph.grow(half, "random", 2.0, data=(x, torch.tensor([1, 7])), seed=0, input_size=SIZE,
                           keys="zero").eval()
    w = grown.get_submodule("features.1.0.attn.qkv").weight.detach()
    assert w[4:8].abs().sum() == 0 and w[24 + 4:24 + 8].abs().sum() == 0


@pytest.mark.slow
def test_gradmax_behind_layer_scale_in_float32_trains():
    """A float32 CaiT (layer scale 1e-5, LayerNorms after every residual add) grown by GradMax: after 3 SGD steps
    no new row is still zero (3 of 736 before: one fc1 row per block, the all-ones outgoing direction)."""
    from timm.models.cait import Cait

    torch.manual_seed(0)
    m = Cait(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, depth_token_only=1, num_classes=10,
             init_values=1e-5).float().eval()
    half = morph.scale_width(m, 0.5, input_size=SIZE).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking norms (timm initializes them to 1 and 0)
        for name, p in half.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else
                        torch.randn(p.shape, generator=g) * 0.1)
    gx = torch.Generator().manual_seed(0)
    x = torch.randn(4, *SIZE, generator=gx, dtype=torch.float32)
    y = torch.randint(0, 10, (4,), generator=gx)
    grown = morph.grow(half, "gradmax", 2.0, data=(x, y), seed=0, input_size=SIZE)
    with torch.no_grad():
        assert float((grown.eval()(x) - half(x)).norm() / half(x).norm()) <= 1e-5
    rows = _new_rows(grown)
    before = {k: v.detach().clone() for k, v in grown.state_dict().items()}
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(grown(x), y).backward()
        opt.step()
    total, zero, same = _stuck_rows(grown, rows, before)
    assert total > 0 and zero == 0 and same == 0, (total, zero, same)
