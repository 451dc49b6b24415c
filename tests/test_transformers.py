"""Attention and token-mixing models through every pass: ViT (heads mode and head_dim mode), MLP-Mixer, ResMLP,
gMLP, on tiny configurations of timm's own classes (float64, 3x32x32).

For each: the channel plan scales heads (or head channels) and never the token count; ``convert`` and the plain
half run; two halves fuse (zero-initialized new tiles) and bake into the stock full-width timm model with
``strict=True`` and its outputs; the fused model is not the ensemble ``(a + b) / 2``: LayerNorm normalizes the
joined channels (ViT, Mixer, gMLP), and a token-mixing Linear is one weight shared by every channel, a's and b's
(Mixer, ResMLP, gMLP), so the error is measured (docs/coverage.md);
every growth method gives a model that loads into the stock model with its outputs, keeps the function where the
method claims it (<= 1e-6 in float64, head_dim mode too: :mod:`morph.growth.logits` scales the queries), and
whose new neurons receive gradient.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import GatedMlp
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from zoo_list import ATTENTION_WIDTH, TIMM_TRANSFORMERS_REFUSED, spec_input_size

import morph
from morph.graph import analyze, attention_width

SIZE = (3, 32, 32)


def _vit4():  # 4 heads of 16 channels: halves to 2 heads, grows back to 4 (heads mode)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=10)


def _vit3():  # 3 heads of 16, layer scale, no class token: head_dim mode (3 heads cannot halve)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2, num_classes=10,
                             init_values=0.1, class_token=False, global_pool="avg")


def _swin():  # windows of 4x4 tokens, shifted windows, relative-position bias tables; 4 and 8 heads of 8
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 1), num_heads=(4, 8),
                           num_classes=10)


def _swin3():  # 3 and 6 heads: head_dim mode
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 1), num_heads=(3, 6),
                           num_classes=10)


def _mixer():
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


def _resmlp():
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=4,
                    block_layer=ResBlock, norm_layer=Affine)


def _gmlp():
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=6,
                    block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)


def _cait():  # class-attention blocks, talking heads (Linears over the heads), layer scale
    from timm.models.cait import Cait

    return Cait(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, depth_token_only=1, num_classes=10,
                init_values=0.1)


def _xcit():  # cross-covariance attention (over channels, q and k L2-normalized over tokens), Fourier positions
    from timm.models.xcit import Xcit

    return Xcit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, cls_attn_layers=1, num_classes=10,
                eta=0.1)


def _pvt():  # spatial-reduction attention (separate q and kv Linears), depthwise-conv MLP, overlapping patches
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(32, 64), num_heads=(4, 8), sr_ratios=(2, 1),
                                      mlp_ratios=(2, 2), num_classes=10)


def _pit():  # pooling stages: a depthwise conv pools the tokens and widens the channels
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer(img_size=32, patch_size=4, stride=2, base_dims=[16, 16], depth=[1, 1],
                                    heads=[4, 8], mlp_ratio=2, num_classes=10)


def _relpos():  # relative-position MLP bias (reads a coordinate grid buffer), 3 heads: head_dim mode
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                                   rel_pos_type="mlp")


def _swinv2(heads: tuple[int, int] = (3, 6), depths: tuple[int, int] = (2, 1)):
    """timm's Swin-V2: F.linear of the qkv Linear's weight with a bias concatenated from q_bias, a zero k_bias buffer
    and v_bias; cosine attention with a learned logit scale; a continuous position-bias MLP; windows of 4x4 tokens,
    shifted in the second block; 3 and 6 heads of 8 (head_dim mode) or 4 and 8 (heads mode)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=8 * heads[0], depths=depths,
                             num_heads=heads, num_classes=10)


def _swinv2_cr():
    """timm's other Swin-V2 (``swin_transformer_v2_cr``): a qkv Linear with its bias, cosine attention, a position-bias
    meta MLP, post-norm residuals, extra stage norms (the ``_ns`` models); 3 and 6 heads of 8: head_dim mode."""
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    return SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=4, embed_dim=24, depths=(2, 1),
                               num_heads=(3, 6), num_classes=10, extra_norm_stage=True)


def _tv_vit():  # torchvision's ViT: nn.MultiheadAttention, 4 heads of 8 (heads mode)
    from torchvision.models import VisionTransformer as TvViT

    return TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)


def _tv_vit2():  # the smallest: 2 heads of 8, which cannot halve: head_dim mode
    from torchvision.models import VisionTransformer as TvViT

    return TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)


def _tv_swin(v2: bool = False, heads: tuple[int, int] = (4, 8)):
    """torchvision's Swin (shifted_window_attention), windows of 4x4 tokens, 4 and 8 heads of 8 (or 3 and 6)."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    from torchvision.models.swin_transformer import SwinTransformer as TvSwin

    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    m = TvSwin(patch_size=[2, 2], embed_dim=8 * heads[0], depths=[2, 1], num_heads=list(heads), window_size=[4, 4],
               num_classes=10, **kw)
    return m.to(torch.get_default_dtype())  # torchvision builds V2's coordinate table in float32


# name -> (builder, attention width mode, fused == ensemble exactly?)
MODELS = {
    "vit4": (_vit4, "heads", False),
    "vit3_head_dim": (_vit3, "head_dim", False),
    "mixer": (_mixer, "heads", False),
    "resmlp": (_resmlp, "heads", False),  # no LayerNorm, but one token-mixing weight serves a's and b's channels
    "gmlp": (_gmlp, "heads", False),
    "swin": (_swin, "heads", False),
    "swin3_head_dim": (_swin3, "head_dim", False),
    "cait": (_cait, "heads", False),
    "xcit": (_xcit, "heads", False),
    "pvt": (_pvt, "heads", False),
    "pit": (_pit, "heads", False),
    "relpos_head_dim": (_relpos, "head_dim", False),
    "swinv2_head_dim": (_swinv2, "head_dim", False),
    "swinv2": (lambda: _swinv2((4, 8)), "heads", False),
    "swinv2_cr_head_dim": (_swinv2_cr, "head_dim", False),
    "tv_vit": (_tv_vit, "heads", False),
    "tv_vit2_head_dim": (_tv_vit2, "head_dim", False),
    "tv_swin": (_tv_swin, "heads", False),
    "tv_swin_v2": (lambda: _tv_swin(v2=True), "heads", False),
    "tv_swin3_head_dim": (lambda: _tv_swin(heads=(3, 6)), "head_dim", False),
}
SLOW = {"swin", "swin3_head_dim", "cait", "xcit", "pvt", "pit", "relpos_head_dim",  # 3-7 s each on one core
        "swinv2", "swinv2_head_dim", "swinv2_cr_head_dim",
        "tv_vit", "tv_vit2_head_dim", "tv_swin", "tv_swin_v2", "tv_swin3_head_dim"}

# the weight of the first attention's query, key and value rows, q, k and v stacked
ATTN = {
    "swin": "layers.0.blocks.0.attn.qkv.weight", "swin3_head_dim": "layers.0.blocks.0.attn.qkv.weight",
    "vit4": "blocks.0.attn.qkv.weight", "vit3_head_dim": "blocks.0.attn.qkv.weight", "cait": "blocks.0.attn.qkv.weight",
    "xcit": "blocks.0.attn.qkv.weight", "pit": "transformers.0.blocks.0.attn.qkv.weight",
    "relpos_head_dim": "blocks.0.attn.qkv.weight",
    "swinv2_head_dim": "layers.0.blocks.0.attn.qkv.weight", "swinv2": "layers.0.blocks.0.attn.qkv.weight",
    "swinv2_cr_head_dim": "stages.0.blocks.0.attn.qkv.weight",
    "tv_vit": "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
    "tv_vit2_head_dim": "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
    "tv_swin": "features.1.0.attn.qkv.weight", "tv_swin_v2": "features.1.0.attn.qkv.weight",
    "tv_swin3_head_dim": "features.1.0.attn.qkv.weight",
}
FC1 = {"swin": "layers.0.blocks.0.mlp.fc1", "swin3_head_dim": "layers.0.blocks.0.mlp.fc1",
       "swinv2_head_dim": "layers.0.blocks.0.mlp.fc1", "swinv2": "layers.0.blocks.0.mlp.fc1",
       "swinv2_cr_head_dim": "stages.0.blocks.0.mlp.fc1",
       "pvt": "stages.0.blocks.0.mlp.fc1", "pit": "transformers.0.blocks.0.mlp.fc1",
       "tv_vit": "encoder.layers.encoder_layer_0.mlp.0", "tv_vit2_head_dim": "encoder.layers.encoder_layer_0.mlp.0",
       "tv_swin": "features.1.0.mlp.0", "tv_swin_v2": "features.1.0.mlp.0", "tv_swin3_head_dim": "features.1.0.mlp.0"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking values everywhere (timm zero-initializes Mixer heads and biases, which would make every
    output the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() <= 1 and ("norm" in name or ".ln" in name or name.endswith("alpha") or "gamma" in name):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return m


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize(MODELS[name][0]().eval())


def _x() -> torch.Tensor:
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def test_vit_plan_grows_heads_and_keeps_tokens():
    """Heads mode: the qkv output is three groups of heads of 16 channels each; the half model is the stock timm
    class with 2 heads of 16 (its own forward, no rewritten graph), and the token count never scales."""
    m = _build("vit4")
    plan = analyze(m, SIZE)
    qkv = plan.layers["blocks.0.attn.qkv"]
    atoms = plan.atoms(qkv.out_dim)
    assert [s.inner for s in atoms] == [16, 16, 16] and len({plan.groups.find(s.group) for s in atoms}) == 1
    assert plan.groups.size[plan.groups.find(atoms[0].group)] == 4
    half = morph.scale_width(m, 0.5, input_size=SIZE)
    assert type(half) is VisionTransformer
    attn = half.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, 16, 32)
    assert tuple(half.blocks[0].attn.qkv.weight.shape) == (96, 32)
    assert tuple(half.pos_embed.shape) == (1, 17, 32) and tuple(half.cls_token.shape) == (1, 1, 32)
    with attention_width("head_dim"):
        hd = morph.scale_width(m, 0.5, input_size=SIZE).blocks[0].attn
    assert (hd.num_heads, hd.head_dim, hd.scale) == (4, 8, 8 ** -0.5)


def test_mixer_token_mlp_keeps_the_token_count():
    half = morph.scale_width(_build("mixer"), 0.5, input_size=SIZE)
    fc1, fc2 = half.blocks[0].mlp_tokens.fc1, half.blocks[0].mlp_tokens.fc2
    assert (fc1.in_features, fc2.out_features) == (16, 16)  # 4x4 patches: 16 tokens in and out
    assert fc1.out_features == 8  # the token MLP's hidden width scales with the model (timm: 0.5 x embed_dim)
    assert half.blocks[0].mlp_channels.fc1.in_features == 16


def test_one_head_left_is_refused():
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(morph.MorphError, match="keeps 1 of its 2 heads"):
        morph.scale_width(m, 0.5, input_size=SIZE)
    with attention_width("head_dim"):
        assert morph.scale_width(m, 0.5, input_size=SIZE).blocks[0].attn.head_dim == 8


def test_swinv2_functional_qkv_plan():
    """timm's Swin-V2 runs its qkv Linear as ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``: the Linear is
    the layer, and q_bias, the zero k_bias buffer and v_bias are free tensors whose channels are q's, k's and v's;
    in head_dim mode the cosine attention's F.normalize over each head's channels is accepted and the head count
    stays; the half is timm's own class with every tensor at half width."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    m = _randomize(_swinv2(depths=(1, 1)).eval())
    with attention_width("head_dim"):
        plan = analyze(m, SIZE)
        qkv = plan.layers["layers.0.blocks.0.attn.qkv"]
        assert (plan.size(qkv.in_dim, 0.5), plan.size(qkv.out_dim, 0.5)) == (12, 36)
        for b in ("q_bias", "k_bias", "v_bias"):
            assert [plan.size(d, 0.5) for d in plan.params[f"layers.0.blocks.0.attn.{b}"]] == [12]
        half = morph.scale_width(m, 0.5, plan=plan).eval()
    attn = half.layers[0].blocks[0].attn
    assert type(half) is SwinTransformerV2 and attn.num_heads == 3
    assert tuple(attn.qkv.weight.shape) == (36, 12) and tuple(attn.q_bias.shape) == tuple(attn.k_bias.shape) == (12,)
    assert not attn.k_bias.any()  # still timm's zero key bias
    with torch.no_grad():
        assert half(_x()).shape == (2, 10)


class _FreeLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.w)


class _ChannelNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.normalize(self.fc(x), dim=-1)


@pytest.mark.parametrize("model, what", [(_FreeLinear, "expected the weight of a Linear module"),
                                         (_ChannelNorm, "L2 normalization over a channel dim")])
def test_functional_linear_and_channel_normalize_refusals(model, what):
    """F.linear with a weight that is no module's ``weight``, and F.normalize over channels outside attention heads:
    one line naming the op."""
    with pytest.raises(morph.MorphError) as e:
        analyze(model(), (8,))
    assert what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_attention_width_rejects_unknown_mode():
    with pytest.raises(morph.MorphError, match="attention width"):
        attention_width("tokens")


@pytest.mark.parametrize("name", _params(sorted(MODELS)))
def test_convert_fuse_bake_strict(name):
    build, mode, exact = MODELS[name]
    with attention_width(mode):
        m = _build(name)
        x = _x()
        with torch.no_grad():
            y0 = m(x)
        plain = morph.scale_width(m, 0.5, input_size=SIZE).eval()
        a = morph.convert(m, 0.5, seed=1, input_size=SIZE).eval()
        b = morph.convert(m, 0.5, seed=2, input_size=SIZE).eval()
        with torch.no_grad():
            ya, yb = a(x), b(x)
            assert plain(x).shape == ya.shape == y0.shape
            assert _rel(morph.bake(a)(x), ya) <= 1e-12
        f = morph.fuse(a, b, init="zero", seed=0).eval()
        baked = morph.bake(f).eval()
        stock = build().eval()
        stock.load_state_dict(baked.state_dict(), strict=True)
        with torch.no_grad():
            yf = f(x)
            assert _rel(stock(x), yf) <= 1e-12
            ens = _rel(yf, (ya + yb) / 2)
    if exact:
        assert ens <= 1e-12
    else:  # LayerNorm over the joined channels, shared token-mixing weights (docs/coverage.md states the figures)
        assert 1e-3 < ens < 1.0, ens


GROWTH = ("net2net", "random", "gradmax", "firefly")


def _grow(name: str, method: str):
    m = _build(name)
    half = _randomize(morph.scale_width(m, 0.5, input_size=SIZE).eval(), seed=3)
    x = _x()
    y = torch.tensor([1, 7])
    opts = {"steps": 3} if method == "firefly" else {}
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE, **opts).eval()
    return half, grown, x, y


# head_dim-mode growth that morph.growth.logits cannot make exact (name -> bound on the error): none now. torchvision's
# Swin, which scales its queries inside shifted_window_attention (q.matmul(k^T), watched since; before: net2net
# 2.9e-2, random and gradmax 1.4e-2), is exact. The bound catches a regression; the lower bound, a fix that should
# move the model out of here.
HEAD_DIM_NOT_EXACT: dict[str, float] = {}


@pytest.mark.parametrize("method", GROWTH)
@pytest.mark.parametrize("name", _params(sorted(MODELS)))
def test_growth_strict_function_and_gradient(name, method):
    build, mode, _ = MODELS[name]
    with attention_width(mode):
        half, grown, x, y = _grow(name, method)
        stock = build().eval()
        stock.load_state_dict(grown.state_dict(), strict=True)
        with torch.no_grad():
            yh, yg = half(x), grown(x)
            assert _rel(stock(x), yg) <= 1e-12
        err = _rel(yg, yh)
        if method == "firefly" and len(grown.growth_losses) > 1:
            assert grown.growth_losses[-1] < grown.growth_losses[0]
        elif method == "firefly":  # gMLP: every new channel is a replica (LayerNorm, token-mixing bias): no step
            assert name == "gmlp" and len(grown.growth_losses) == 1 and err <= 1e-6, (grown.growth_losses, err)
        elif name in HEAD_DIM_NOT_EXACT:  # the known gap, measured (docs/coverage.md): bounded, not exact
            assert 1e-6 < err <= HEAD_DIM_NOT_EXACT[name], err
        else:  # ResMLP too: its residual channels replicate (token-mixing bias), Affine's beta; head_dim mode: the
            # queries carry sqrt(d'/d) and the replicas' shares (morph.growth.logits)
            assert err <= 1e-6, err
        # new neurons train: the fresh or replicated rows of every grown hidden layer get gradient
        grown.train()
        loss = nn.functional.cross_entropy(grown(x), y)
        loss.backward()
        fc1 = grown.get_submodule(fc1_name(name, grown))
        n_old = half.get_submodule(fc1_name(name, grown)).out_features
        assert fc1.weight.grad[n_old:].abs().sum() > 0
        if name == "pvt":  # separate q and kv Linears: new value rows get gradient
            kv, hk = grown.get_submodule("stages.0.blocks.0.attn.kv"), half.stages[0].blocks[0].attn.kv.out_features
            assert kv.weight.grad[kv.out_features // 2 + hk // 2:].abs().sum() > 0
        if name in ATTN:
            qkv, hq = grown.get_parameter(ATTN[name]), half.get_parameter(ATTN[name]).shape[0] // 3
            n = qkv.shape[0] // 3
            v_new = qkv.grad[2 * n + hq:]  # the new heads' (or channels') value rows
            assert v_new.abs().sum() > 0
            if mode == "heads" and method in ("random", "gradmax"):
                # new heads: query and key rows random, value rows 0 (the head outputs 0: exact; or whole heads
                # replicated, where a group rule says so: XCiT, CaiT); once the values moved, q and k get gradient
                assert qkv.detach()[n + hq:2 * n].norm(dim=1).min() > 0
                assert qkv.detach()[hq:n].norm(dim=1).min() > 0
                before = qkv.detach().clone()
                opt = torch.optim.SGD(grown.parameters(), lr=0.1)
                for _ in range(2):
                    opt.step()
                    opt.zero_grad()
                    nn.functional.cross_entropy(grown(x), y).backward()
                assert qkv.grad[hq:n].norm(dim=1).min() > 0  # every new query row gets gradient
                assert qkv.grad[n + hq:2 * n].norm(dim=1).min() > 0  # and every new key row
                assert (qkv.detach() - before)[2 * n + hq:].norm(dim=1).min() > 0  # the new value rows moved


def fc1_name(name: str, model: nn.Module) -> str:
    if name in FC1:
        return FC1[name]
    return "blocks.0.mlp_channels.fc1" if hasattr(model.blocks[0], "mlp_channels") else "blocks.0.mlp.fc1"


_ZOO_NEW = ("test_vit_relpos", "deit_tiny_distilled_patch16_224", "cait_xxs24_224", "pit_ti_224", "pvt_v2_b0",
            "xcit_nano_12_p16_224", "visformer_tiny", "efficientformer_l1", "maxvit_nano_rw_256")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["test_vit3", "test_vit2", "test_vit", "levit_128s", *_ZOO_NEW])
def test_timm_transformers_zoo_check(spec, tmp_path):
    """timm's own debug ViTs (register tokens, q/k norm, layer scale, latent attention pooling, dynamic image
    size, relative-position MLP) at 3x160x160, LeViT-128S (BatchNorm, per-head attention bias tables read through
    an index buffer) and the other families of the coverage table (distillation token, class attention with
    talking heads, pooling stages, spatial-reduction attention, cross-covariance attention with Fourier positions,
    conv attention, pooling mixers, MaxViT at 256) at their own input size, through the zoo check in their
    attention width mode (tests/zoo_list.py ATTENTION_WIDTH): convert, fuse, bake, strict load into the model built
    directly, save/load, parameter counts predicted; the fusion is the ensemble exactly where the model is not in
    NOT_BLOCKWISE (LeViT), and measurably not where it is (LayerNorm over the joined channels)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from zoo_check import check_model
    from zoo_list import NOT_BLOCKWISE

    name = f"timm/{spec}"
    with attention_width(ATTENTION_WIDTH.get(name, "heads")):
        r = check_model(name, spec_input_size(name), tmpdir=tmp_path, direct=True, full=False)
    assert r.status == "ok", f"{r.stage}: {r.error}"
    assert r.strict_load and r.stock_relerr <= 1e-10 and r.bake_relerr <= 1e-10 and r.save_load_exact
    assert r.params_half == r.params_half_predicted and r.params_fused == r.params_fused_predicted
    if name in NOT_BLOCKWISE:
        assert r.ensemble_relerr > 1e-6
    else:
        assert r.ensemble_relerr <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["torchvision/vit_b_16", "torchvision/swin_t", "torchvision/swin_v2_t"])
def test_torchvision_transformers_zoo_check(spec, tmp_path):
    """torchvision's own ViT-B/16 (nn.MultiheadAttention, 12 -> 6 heads) and Swin-T / Swin-V2-T (window attention,
    head_dim mode) built by torchvision (weights=None) through the zoo check: convert, fuse, bake, strict load into
    the model torchvision builds, save/load, parameter counts predicted; the fusion is measurably not the ensemble
    (LayerNorm over the joined channels). Swin-V2 in float32: torchvision builds its coordinate table in float32."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from zoo_check import check_model

    dtype = torch.float32 if spec.endswith("_v2_t") else torch.float64
    with attention_width(ATTENTION_WIDTH.get(spec, "heads")):
        r = check_model(spec, spec_input_size(spec), dtype=dtype, tmpdir=tmp_path, direct=True, full=False)
    assert r.status == "ok", f"{r.stage}: {r.error}"
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert r.strict_load and r.stock_relerr <= tol and r.bake_relerr <= tol and r.save_load_exact
    assert r.params_half == r.params_half_predicted and r.params_fused == r.params_fused_predicted
    assert r.ensemble_relerr > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(TIMM_TRANSFORMERS_REFUSED))
def test_refused_transformers_say_why(spec):
    """Attention families morph cannot analyze yet keep one clear error naming the op (tests/zoo_list.py)."""
    m = timm.create_model(spec.split("/", 1)[1]).eval()
    size = spec_input_size(spec)
    with pytest.raises(morph.MorphError) as e, attention_width(ATTENTION_WIDTH.get(spec, "heads")):
        morph.scale_width(m, 0.5, input_size=size)
        a = morph.convert(m, 0.5, seed=1, input_size=size)
        b = morph.convert(m, 0.5, seed=2, input_size=size)
        morph.bake(morph.fuse(a, b, init="zero", seed=0))
    msg = str(e.value)
    assert TIMM_TRANSFORMERS_REFUSED[spec] in msg and "\n" not in msg, msg


def test_torchvision_vit_heads_and_stock_halves():
    """nn.MultiheadAttention: the packed in_proj rows are q, k and v, each a group of heads of 8 channels (heads
    mode); the half is torchvision's own ViT (nn.MultiheadAttention with in_proj_weight, 2 heads) that loads into
    the ViT torchvision builds at that width, and the model given is left as it was."""
    from torchvision.models import VisionTransformer as TvViT

    m = _randomize(TvViT(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=32,
                         num_classes=10).eval())
    keys = list(m.state_dict())
    plan = analyze(m, SIZE)
    atoms = plan.atoms(plan.layers["encoder.layers.encoder_layer_0.self_attention.in_proj"].out_dim)
    assert [s.inner for s in atoms] == [8, 8, 8] and len({plan.groups.find(s.group) for s in atoms}) == 1
    assert plan.groups.size[plan.groups.find(atoms[0].group)] == 4
    half = morph.scale_width(m, 0.5, input_size=SIZE).eval()
    attn = half.encoder.layers[0].self_attention
    assert type(half) is TvViT and type(attn) is nn.MultiheadAttention
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, tuple(attn.in_proj_weight.shape)) == (2, 8, 16, (48, 16))
    assert half.hidden_dim == 16 and half.encoder.layers[0].num_heads == 2
    stock = TvViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16, num_classes=10)
    stock.load_state_dict(half.state_dict(), strict=True)
    x = _x()
    with torch.no_grad():
        assert _rel(stock.eval()(x), half(x)) <= 1e-12
    assert type(m.encoder.layers[0].self_attention) is nn.MultiheadAttention and list(m.state_dict()) == keys
    assert "in_proj_weight" in dict(m.encoder.layers[0].self_attention.named_parameters())


def test_traced_multihead_attention_is_the_stock_module():
    """The rewritten forward (in_proj, heads, scaled dot-product attention, out_proj) computes what
    nn.MultiheadAttention computes, batch first or not, and keeps its state_dict keys both ways."""
    from morph.graph.mha import TracedMultiheadAttention, stock, traceable

    for batch_first in (True, False):
        torch.manual_seed(0)
        ref = nn.Sequential(nn.MultiheadAttention(24, 3, batch_first=batch_first)).eval()
        new = traceable(ref)
        assert type(new[0]) is TracedMultiheadAttention and type(ref[0]) is nn.MultiheadAttention
        assert list(new.state_dict()) == list(ref.state_dict())
        x = torch.randn(5, 7, 24)
        with torch.no_grad():
            y0 = ref[0](x, x, x, need_weights=False)[0]
            assert _rel(new[0](x, x, x, need_weights=False)[0], y0) <= 1e-12
            assert _rel(new[0](x, x, x)[0], y0) <= 1e-12  # need_weights: the stock forward
        back = traceable(ref)
        back.load_state_dict(ref.state_dict(), strict=True)
        assert stock(back) == ["0"] and type(back[0]) is nn.MultiheadAttention
        assert list(back.state_dict()) == list(ref.state_dict())


def test_flops_count_multihead_attention():
    """fvcore has no handle for nn.MultiheadAttention's fused kernel: morph.flops counts its traceable form, so the
    stock model's attention products are counted (as the template models', which run that form)."""
    from morph.graph.mha import traceable

    m = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = m[0]

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)
            return self.attn(t, t, t, need_weights=False)[0]

    model = Self().eval()
    n, e = 9, 16
    want = n * e * 3 * e + 2 * n * n * e + n * e * e  # in_proj, q k^T and attn v, out_proj (multiply-adds)
    assert morph.flops(model, (16, 3, 3)).per_image == want
    assert type(model.attn) is nn.MultiheadAttention and traceable(model) is not model


def test_multihead_attention_with_other_key_sizes_is_refused():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 16)
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            t = self.proj(x.flatten(2).transpose(1, 2))
            return self.head(self.attn(t, t[..., :8], t[..., 8:], need_weights=False)[0].mean(1))

    with pytest.raises(morph.UnsupportedOpError, match="separate key/value sizes") as e:
        morph.scale_width(Cross(), 0.5, input_size=(3, 8, 8))
    assert "\n" not in str(e.value)


def test_the_attention_mode_sticks_to_the_model():
    """A half made in head_dim mode records it: fusing and growing it later, in the default heads mode, analyze
    its heads the same way (a 4-head model whose halves have 4 heads of 8 must not fuse into 8 heads of 8)."""
    def build():
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=10)

    torch.manual_seed(0)
    m = _randomize(build().eval())
    with attention_width("head_dim"):
        a = morph.convert(m, 0.5, seed=1, input_size=SIZE).eval()
        b = morph.convert(m, 0.5, seed=2, input_size=SIZE).eval()
        plain = morph.scale_width(m, 0.5, input_size=SIZE).eval()
    assert morph.get_info(a).extra["attention_width"] == "head_dim"
    assert (a.blocks[0].attn.num_heads, a.blocks[0].attn.head_dim) == (4, 8)
    f = morph.fuse(a, b, init="zero", seed=0).eval()  # default (heads) mode around it
    stock = build().eval()
    stock.load_state_dict(morph.bake(f).state_dict(), strict=True)
    grown = morph.grow(plain, "net2net", 2.0, seed=0, input_size=SIZE).eval()
    x = _x()
    with torch.no_grad():
        assert (f.blocks[0].attn.num_heads, f.blocks[0].attn.head_dim) == (4, 16)
        assert _rel(stock(x), f(x)) <= 1e-12
        assert (grown.blocks[0].attn.num_heads, grown.blocks[0].attn.head_dim) == (4, 16)
    assert morph.get_info(morph.scale_width(m, 0.5, input_size=SIZE)).extra["attention_width"] == "heads"


def cli_vit(num_classes: int = 10) -> nn.Module:
    """The CLI test's model (``test_transformers:cli_vit``): 4 heads of 16 channels at 3x32x32."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, mlp_ratio=2,
                             num_classes=num_classes)


def test_cli_attention_help_and_bad_mode(tmp_path):
    from morph.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    for cmd in ("convert", "fuse", "grow"):
        r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "--attention" in r.stdout and "head_dim" in r.stdout, r.stdout
    bad = tmp_path / "bad.safetensors"
    r = runner.invoke(app, ["convert", "test_transformers:cli_vit", "--half", "--attention", "tokens", "-o", str(bad)])
    assert r.exit_code == 2 and not bad.exists() and "--attention" in r.stderr


@pytest.mark.slow
def test_cli_attention_option(tmp_path):
    """``--attention heads|head_dim`` on convert, fuse and grow: the mode cuts the heads (4 heads of 16 -> 2 heads
    of 16, or 4 heads of 8), the checkpoint records it, fuse and grow follow it, and a contrary --attention on a
    checkpoint is one error line with exit code 2 and no output."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    spec = "test_transformers:cli_vit"
    paths = {}
    for mode, seed in (("head_dim", 1), ("head_dim", 2), ("heads", 1)):
        p = tmp_path / f"{mode}-{seed}.safetensors"
        r = run("convert", spec, "--half", "--seed", seed, "--input-size", "3,32,32", "--attention", mode, "-o", p)
        assert r.exit_code == 0, r.output
        paths[mode, seed] = p
    plain = tmp_path / "plain.safetensors"
    assert run("convert", spec, "--half", "--plain", "--input-size", "3,32,32", "-o", plain).exit_code == 0

    def heads(path):
        attn = morph.load(path, trust_code=True).blocks[0].attn
        return attn.num_heads, attn.head_dim

    assert heads(paths["head_dim", 1]) == (4, 8) and heads(paths["heads", 1]) == (2, 16) and heads(plain) == (2, 16)
    fused = tmp_path / "fused.safetensors"
    r = run("fuse", paths["head_dim", 1], paths["head_dim", 2], "-o", fused, "--attention", "head_dim", "--trust-code")
    assert r.exit_code == 0, r.output
    assert heads(fused) == (4, 16)
    grown = tmp_path / "grown.safetensors"  # a plain half of a recorded callable: widths stay absolute (1.0)
    r = run("grow", plain, "--method", "random", "--attention", "heads", "-o", grown, "--trust-code")
    assert r.exit_code == 0, r.output
    assert heads(grown) == (4, 16) and morph.read_info(grown)[0].width == 1.0
    grown_t = tmp_path / "grown-template.safetensors"
    r = run("grow", paths["head_dim", 1], "--init", "zero", "-o", grown_t, "--trust-code")
    assert r.exit_code == 0, r.output
    assert heads(grown_t) == (4, 16)  # grown in the half's recorded head_dim mode, without --attention
    bad = tmp_path / "bad.safetensors"
    r = run("grow", paths["head_dim", 1], "--attention", "heads", "-o", bad, "--trust-code")
    assert r.exit_code == 2 and not bad.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --attention heads") and "'head_dim'" in lines[0], r.stderr


class _PosNoNorm(nn.Module):
    """Patch embedding plus a free position table and an affine layer of free tensors, no LayerNorm: the
    channels are fresh under random growth, so the new entries of the summands (``pos``, ``beta``) must be 0,
    those of the factor (``gain``) are gathered (they pass the gradient to the new channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.pos = nn.Parameter(torch.randn(1, 16, 16))
        self.gain = nn.Parameter(torch.rand(1, 1, 16) + 0.5)
        self.beta = nn.Parameter(torch.randn(16))
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, 16 tokens, 16 channels]
        t = torch.addcmul(self.beta, self.gain, t)  # ResMLP's Affine
        return self.head(torch.relu(self.fc(t)).mean(1))


@pytest.mark.parametrize("method", ["random", "gradmax"])
def test_added_free_tensors_of_fresh_channels_are_zero(method):
    torch.manual_seed(0)
    m = _randomize(_PosNoNorm().eval())
    half = _randomize(morph.scale_width(m, 0.5, input_size=SIZE).eval(), seed=3)
    x, y = _x(), torch.tensor([1, 7])
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE).eval()
    with torch.no_grad():
        assert _rel(grown(x), half(x)) <= 1e-12
    assert not grown.pos.detach()[..., 8:].any() and not grown.beta.detach()[8:].any()
    assert torch.equal(grown.gain.detach()[..., 8:], half.gain.detach())  # gathered (cycle: j copies j - 8)


def test_keys_option_zero_leaves_new_queries_and_keys_at_zero():
    half = _randomize(morph.scale_width(_build("vit4"), 0.5, input_size=SIZE).eval(), seed=3)
    x = _x()
    for keys, nonzero in (("random", True), ("zero", False)):
        g = morph.grow(half, "random", 2.0, seed=0, input_size=SIZE, keys=keys).eval()
        qkv = g.blocks[0].attn.qkv.weight.detach()  # [q | k | v] of 4 heads of 16: rows 32-63 of each are new
        assert bool(qkv[64 + 32:128].any()) is nonzero and bool(qkv[32:64].any()) is nonzero
        assert not qkv[128 + 32:].any()
        with torch.no_grad():
            assert _rel(g(x), half(x)) <= 1e-12
    with pytest.raises(morph.MorphError, match="keys must be"):
        morph.grow(half, "random", 2.0, seed=0, input_size=SIZE, keys="both")


@pytest.mark.slow
def test_torchvision_vit_save_load_and_optimizer_state(tmp_path):
    """Template models keep the rewritten attention (in_proj template-mixed), plain ones are stock again; every
    kind saves and loads bit-exactly, and a plain growth's record names the stock in_proj_weight, so an
    optimizer's state carries over to the new heads' rows."""
    from morph.graph.mha import TracedMultiheadAttention

    def build():
        return _tv_vit()

    m = _randomize(build().eval())
    a, b = (morph.convert(m, 0.5, seed=s, input_size=SIZE) for s in (1, 2))
    half = morph.scale_width(m, 0.5, input_size=SIZE)
    opt = torch.optim.SGD(half.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(half(_x()), torch.tensor([1, 7])).backward()
    opt.step()
    grown = morph.grow(half, "random", 2.0, seed=0, input_size=SIZE)
    x = _x()
    for kind, model in (("fused", morph.fuse(a, b, init="zero", seed=0)), ("half", a), ("plain", half),
                        ("grown", grown)):
        path = tmp_path / f"{kind}.safetensors"
        morph.save(model, path)
        back = morph.load(path, model_fn=build)
        attn = back.encoder.layers[0].self_attention
        assert (type(attn) is TracedMultiheadAttention) == (kind in ("fused", "half")), kind
        with torch.no_grad():
            assert torch.equal(back.eval()(x), model.eval()(x)), kind
    new_opt = morph.carry_optimizer_state(opt, half, grown)
    w_old = half.encoder.layers[0].self_attention.in_proj_weight
    w_new = grown.encoder.layers[0].self_attention.in_proj_weight
    buf_old, buf_new = opt.state[w_old]["momentum_buffer"], new_opt.state[w_new]["momentum_buffer"]
    n_old, n_new = w_old.shape[0] // 3, w_new.shape[0] // 3
    for part in range(3):  # q, k, v: the old heads' momentum first, zero on the new heads' rows
        assert torch.equal(buf_new[part * n_new: part * n_new + n_old, :16], buf_old[part * n_old:(part + 1) * n_old])
        assert not buf_new[part * n_new + n_old:(part + 1) * n_new].any()
