"""Growth of attention heads whose size grows (``head_dim`` mode): the function is kept exactly (float64) and
every new row trains.

- A half built from a spec (``morph.build_model``) in head_dim mode grows in that mode: the rebuilt base model
  is analyzed in the half's recorded mode (before: in the current default, heads mode, so the new channels of
  q, k and v were laid out as whole new heads while the grown modules kept their head count: old heads merged).
- Queries are scaled by ``sqrt(d'/d) x share`` (:mod:`morph.growth.logits`): the scale ``head_dim ** -0.5``
  and the products of replicated channels no longer change the logits, and uneven shares part replicated
  query/key channels (Net2Net; PVT-v2, whose attention channels share the LayerNorm-normalized residual group
  and replicate under every method).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_growth_trains import _new_rows, _stuck_rows
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.vision_transformer import VisionTransformer

import morph
from morph.graph import attention_width

SIZE = (3, 32, 32)


def _vit3():  # 3 heads of 16: head_dim mode (3 heads cannot halve)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2,
                             num_classes=10)


def _pvt():  # 1 and 2 heads (PVT-v2 b0's first stages): the q/kv channels couple with the residual stream
    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1),
                                      mlp_ratios=(2, 2), num_classes=10)


MODELS = {"vit3": _vit3, "pvt": _pvt}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
    return m


def _half(build) -> torch.nn.Module:
    torch.manual_seed(0)
    with attention_width("head_dim"):
        return _randomize(morph.scale_width(build().double().eval(), 0.5, input_size=SIZE).eval())


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn((n, *SIZE), generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


CASES = [(n, m) for n in sorted(MODELS) for m in ("net2net", "random", "gradmax")]
SLOW = {("pvt", "random"), ("pvt", "gradmax")}  # 3-5 s each on a loaded core


@pytest.mark.parametrize(("name", "method"),
                         [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_head_dim_growth_keeps_the_function_and_new_rows_train(name, method):
    half = _half(MODELS[name])
    x, y = _data()
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE).eval()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-9
    stock = MODELS[name]().double()
    stock.load_state_dict(grown.state_dict(), strict=True)
    rows = _new_rows(grown)
    before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in rows}
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(grown(x), y).backward()
        opt.step()
    total, zero, same = _stuck_rows(grown, rows, before)
    assert total > 0 and zero == 0 and same == 0, (total, zero, same)


def test_replicated_queries_split_unevenly_keys_copy():
    """Net2Net (cycle map: channel ``j`` of a head copies ``j mod d``): a channel and its replica have equal key
    rows and query rows in the ratio of their shares (1/4 and 3/4: 1 to 3), which parts them when trained."""
    half = _half(_vit3)
    grown = morph.grow(half, "net2net", 2.0, seed=0, input_size=SIZE, mapping="cycle")
    w = grown.blocks[0].attn.qkv.weight.detach()
    h, d = 3, 8
    q, k = w[:h * 2 * d].view(h, 2, d, -1), w[h * 2 * d:2 * h * 2 * d].view(h, 2, d, -1)
    assert torch.equal(k[:, 0], k[:, 1])
    ratio = q[:, 1].norm(dim=-1) / q[:, 0].norm(dim=-1)
    assert torch.allclose(torch.maximum(ratio, 1 / ratio), torch.full((h, d), 3.0, dtype=torch.float64))
    cos = F.cosine_similarity(q[:, 0], q[:, 1], dim=-1)
    assert torch.allclose(cos, torch.ones(h, d, dtype=torch.float64))


@pytest.mark.slow
def test_a_spec_built_half_grows_in_its_recorded_mode():
    """``morph.build_model`` records the spec, so growth rebuilds the base model to lay the channels out: in the
    half's head_dim mode, not the caller's default (before: new channels formed whole new heads, 3e-3 error)."""
    with attention_width("head_dim"):
        half = morph.scale_width(morph.build_model("timm/test_vit"), 0.5, input_size=(3, 160, 160)).double().eval()
    _randomize(half)
    x = torch.randn((1, 3, 160, 160), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grown = morph.grow(half, "random", 2.0, seed=0, input_size=(3, 160, 160), keys="zero").eval()
    a0, a1 = half.blocks[0].attn, grown.blocks[0].attn
    assert (a1.num_heads, a1.head_dim) == (a0.num_heads, 2 * a0.head_dim)
    w = grown.blocks[0].attn.qkv.weight.detach().view(3, a1.num_heads, a1.head_dim, -1)
    nonzero = w.norm(dim=-1) > 0  # per part and head: the old channels first, then the new (zero) ones
    assert nonzero[:, :, :a0.head_dim].all() and not nonzero[:, :, a0.head_dim:].any()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradmax_leaves_out_directions_the_loss_does_not_see(dtype):
    """GradMax's outgoing directions stop at the gradient matrix's numerical rank at its own precision: rows
    summing to 0 (a layer feeding LayerNorms, CaiT's fc2) leave the all-ones direction with a singular value of
    rounding size (1e-7 in float32), which a fixed 1e-10 cut took for a direction: that neuron got no gradient."""
    from morph.growth.gradmax import growth_directions

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 96, generator=g, dtype=dtype)
    a = a - a.mean(1, keepdim=True)
    v = growth_directions(a, 384, g)
    ones = torch.ones(96, dtype=v.dtype) / 96 ** 0.5
    assert v.shape == (384, 96) and float((v @ ones).abs().max()) < 0.9


def _coatnet():  # timm's test_coatnet config at 64x64: conv stages, then transformer stages of 1, 2, 3 and 4 heads
    from timm.models.maxxvit import MaxxVit, model_cfgs

    return MaxxVit(model_cfgs["test_coatnet"], img_size=64, num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["net2net", "random", "gradmax"])
def test_maxxvit_head_dim_growth_is_exact(method):
    """timm's maxxvit attention calls ``F.scaled_dot_product_attention``; a rewritten half's GraphModule code calls
    it as ``torch._C._nn.scaled_dot_product_attention``, which the logit watcher now sees too (before: net2net
    1.1e-2, random and gradmax 3.6e-3 at this size)."""
    size = (3, 64, 64)
    torch.manual_seed(0)
    with attention_width("head_dim"):
        half = _randomize(morph.scale_width(_coatnet().double().eval(), 0.5, input_size=size).eval())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((2, *size), generator=g, dtype=torch.float64), torch.randint(0, 10, (2,), generator=g)
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=size).eval()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-6
    _coatnet().double().load_state_dict(grown.state_dict(), strict=True)


def _tv_swin3():  # torchvision's Swin, 3 and 6 heads of 8: head_dim mode
    from torchvision.models.swin_transformer import SwinTransformer as TvSwin

    return TvSwin(patch_size=[2, 2], embed_dim=24, depths=[2, 1], num_heads=[3, 6], window_size=[4, 4],
                  num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["net2net", "random", "gradmax"])
def test_torchvision_swin_head_dim_growth_is_exact(method):
    """The query scale ``(C // num_heads) ** -0.5`` lives inside torchvision's ``shifted_window_attention`` (an fx
    leaf), whose logits are ``q.matmul(k^T)``: ``Tensor.matmul`` is watched now (before: net2net 2.9e-2, random
    and gradmax 1.4e-2), and the grown model's ReLU-gradient TorchFunctionMode does not record a call twice."""
    half = _half(_tv_swin3)
    x, y = _data(2)
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE).eval()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-6
    _tv_swin3().double().load_state_dict(grown.state_dict(), strict=True)


def _maxvit_tiny():  # timm's MaxxVit (channels-last window and grid attention), one stage of 2 heads of 8, windows 2x2
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(embed_dim=(16,), depths=(1,), block_type=("M",), stem_width=(8, 16),
                     conv_cfg=MaxxVitConvCfg(expand_ratio=2.0, attn_ratio=0.25),
                     transformer_cfg=MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), grid_size=(2, 2),
                                                           expand_ratio=2.0))
    return MaxxVit(cfg, img_size=16, num_classes=10)


def _test_maxvit_64():  # timm's test_maxvit config built directly at 64x64: 1, 2, 3 and 4 heads of 32
    from timm.models.maxxvit import MaxxVit, model_cfgs

    return MaxxVit(model_cfgs["test_maxvit"], img_size=64, num_classes=10)


_HALVES: dict = {}


def _graph_half(build, size):
    """A head_dim-mode half whose forward morph rewrote (a GraphModule: AttentionCl's ``view(B, -1, num_heads,
    dim_head * 3)`` hard-codes ``3 x head_dim``, which no attribute holds), built once per model."""
    if build not in _HALVES:
        torch.manual_seed(0)
        with attention_width("head_dim"):
            half = _randomize(morph.scale_width(build().double().eval(), 0.5, input_size=size).eval())
        assert isinstance(half, torch.fx.GraphModule) and half.meta["morph_heads"]
        _HALVES[build] = half
    return _HALVES[build]


def _maxvit_grows_exactly(build, size, method):
    half = _graph_half(build, size)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((2, *size), generator=g, dtype=torch.float64), torch.randint(0, 10, (2,), generator=g)
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=size).eval()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-6
    build().double().load_state_dict(grown.state_dict(), strict=True)


@pytest.mark.parametrize("method", ["net2net", "random", "gradmax"])
def test_rewritten_maxvit_half_grows_exactly(method):
    """A half whose forward morph rewrote is a GraphModule: it keeps no attention modules, and its retrace had
    lost the module path of every reshape, so the analysis did not know the head count and read head-first qkv
    (``view(B, -1, heads, 3 * head_dim).transpose(1, 2)``) as a channel shuffle: each head's q, k and v grew as
    one block (before: net2net 1.1, random and gradmax 1.0). The half records its head counts and the retrace
    keeps the paths (:func:`morph.graph.trace`)."""
    _maxvit_grows_exactly(_maxvit_tiny, (3, 16, 16), method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["net2net", "random", "gradmax"])
def test_timm_test_maxvit_built_directly_grows_exactly(method):
    """timm's test_maxvit config built directly (not from its spec: no base model to rebuild, the half itself
    is analyzed) at 64x64 (before: net2net 0.63, random and gradmax 0.57; at 128x128 and 160x160 too)."""
    _maxvit_grows_exactly(_test_maxvit_64, (3, 64, 64), method)
