"""The ViT recipe (issue 23, item 4): the ``arch: vit`` model (timm's VisionTransformer), its attention width mode,
AdamW, FLOPs that count attention, the CPU and DeiT configs, and ``morph train`` of every row on a tiny ViT.

Fast tier: the model, its passes (half, convert, fuse, bake into the stock timm class with ``strict=True``), the
FLOPs of ``scaled_dot_product_attention`` against a hand count, the optimizer and its checkpoint, the configs.
Slow tier: every row of the recipe trained on synthetic data, a rerun that trains nothing, a crash and resume that
is bit-exact, and the DeiT config's tiny override end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from morph.recipes import run
from morph.recipes.checkpoint import optimizer_state, restore_optimizer
from morph.recipes.config import METHODS, ModelConfig, OptimConfig, load_config
from morph.recipes.errors import RecipeError
from morph.recipes.metrics import read_metrics
from morph.recipes.models import build_model, vit
from morph.recipes.trainer import Trainer, build_optimizer
from timm.models.vision_transformer import VisionTransformer

import morph
from morph.graph import attention_width
from morph.zoo import TRUSTED_FACTORIES, get_spec

SIZE = (3, 32, 32)
TINY = dict(arch="vit", depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0, patch_size=8)


def _stock(**over) -> VisionTransformer:
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    return VisionTransformer(**{**kw, **over})


def _x(n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------------
# the model


def test_vit_model_is_the_stock_timm_class_and_reloads(tmp_path):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**TINY), 10, SIZE)
    assert type(m) is VisionTransformer
    attn = m.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, m.num_prefix_tokens, tuple(m.pos_embed.shape)) == (4, 8, 1, (1, 17, 32))
    spec = get_spec(m)
    assert spec.name in TRUSTED_FACTORIES and spec.name.endswith("recipes.models:vit")
    assert morph.get_info(m).extra == {"attention_width": "heads"}
    stock = _stock().eval()
    stock.load_state_dict(m.state_dict(), strict=True)
    morph.save(m, tmp_path / "vit.safetensors")
    back = morph.load(tmp_path / "vit.safetensors").eval()  # rebuilt from the trusted factory: no trust_code
    assert type(back) is VisionTransformer
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(_x()), stock(_x()))


def test_vit_factory_refuses_shapes_that_do_not_fit():
    with pytest.raises(RecipeError, match="does not split into num_heads=3"):
        vit(embed_dim=32, num_heads=3)
    with pytest.raises(RecipeError, match="not a multiple of patch_size=5"):
        vit(img_size=32, patch_size=5)


@pytest.mark.parametrize("mode,half_heads,half_head_dim", [("heads", 2, 8), ("head_dim", 4, 4)])
def test_half_convert_fuse_bake_strict(mode, half_heads, half_head_dim):
    """Both attention width modes: the half keeps (heads mode) the head size and halves the heads, or (head_dim)
    the reverse, and records its mode; two converted halves fuse and bake into the stock full ViT (strict=True,
    its outputs, float64); the half baked from a converted net is the stock half-width class."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        m = build_model(ModelConfig(**TINY, attention=mode), 10, SIZE).eval()
        with attention_width(mode):
            half = morph.scale_width(m, 0.5, input_size=SIZE)
            a = morph.convert(m, 0.5, seed=1, input_size=SIZE).eval()
            b = morph.convert(m, 0.5, seed=2, input_size=SIZE).eval()
        for net in (half, a, b):
            assert (net.blocks[0].attn.num_heads, net.blocks[0].attn.head_dim) == (half_heads, half_head_dim)
            assert morph.get_info(net).extra["attention_width"] == mode
        assert tuple(half.blocks[0].attn.qkv.weight.shape) == (48, 16) and tuple(half.cls_token.shape) == (1, 1, 16)
        # outside any block: the mode the model records (build_model) is the one its half is made and recorded in
        bare = morph.scale_width(m, 0.5, input_size=SIZE)
        assert bare.blocks[0].attn.num_heads == half_heads and morph.get_info(bare).extra["attention_width"] == mode
        baked_a = morph.bake(a).eval()
        stock_half = _stock(embed_dim=16, num_heads=half_heads).eval()
        stock_half.load_state_dict(baked_a.state_dict(), strict=True)
        x = _x(dtype=torch.float64)
        f = morph.fuse(a, b, init="zero", seed=0).eval()  # outside the block: the halves' recorded mode is used
        stock = _stock().eval()
        stock.load_state_dict(morph.bake(f).state_dict(), strict=True)
        with torch.no_grad():
            assert _rel(stock_half(x), a(x)) <= 1e-12
            assert _rel(stock(x), f(x)) <= 1e-12
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("method", ["random", "net2net", "gradmax", "firefly"])
def test_grown_half_loads_into_the_stock_vit(method):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**TINY), 10, SIZE).eval()
    half = morph.scale_width(m, 0.5, input_size=SIZE)
    x, y = _x(8), torch.arange(8) % 10
    opts = {"steps": 2} if method == "firefly" else {}
    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, **opts).eval()
    stock = _stock().eval()
    stock.load_state_dict(grown.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(stock(x), grown(x)) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# FLOPs of attention


class _Attend(nn.Module):
    """``scaled_dot_product_attention(x, k, v)`` with fixed keys and values of other lengths and widths."""

    def __init__(self, heads: int, s: int, e: int, ev: int, fused: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = nn.Parameter(torch.randn(1, heads, s, e, generator=g))
        self.v = nn.Parameter(torch.randn(1, heads, s, ev, generator=g))
        self.fused = fused

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.scaled_dot_product_attention(q, self.k, self.v)
        return (q @ self.k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ self.v


def _fvcore():
    import warnings

    with warnings.catch_warnings():  # fvcore scripts helpers with torch.jit.script at import (deprecated)
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def test_sdpa_flops_are_the_hand_count():
    """``q k^T`` and ``attn v``: heads x L x S x (E + Ev) multiply-adds, as fvcore counts the same products written
    with ``@`` (fvcore alone counts nothing for the fused op)."""
    FlopCountAnalysis = _fvcore()  # noqa: N806

    heads, length, s, e, ev = 3, 5, 7, 8, 4
    hand = heads * length * s * (e + ev)
    fused = morph.flops(_Attend(heads, s, e, ev, fused=True), input_size=(heads, length, e))
    explicit = morph.flops(_Attend(heads, s, e, ev, fused=False), input_size=(heads, length, e))
    assert fused.total == explicit.total == hand
    assert "aten::scaled_dot_product_attention" not in fused.unsupported
    bare = FlopCountAnalysis(_Attend(heads, s, e, ev, fused=True), torch.zeros(1, heads, length, e))
    bare.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert bare.total() == 0  # what the budget missed before


def test_vit_flops_count_every_attention_product():
    """A ViT's count with timm's fused attention equals the one with its explicit matmuls, and exceeds fvcore's
    own count by exactly depth x tokens^2 x 2 x embed_dim (the q k^T and attn v products of every head)."""
    from morph.flops import sdpa_flops

    FlopCountAnalysis = _fvcore()  # noqa: N806

    torch.manual_seed(0)
    m = _stock().eval()
    assert m.blocks[0].attn.fused_attn
    fused = morph.flops(m, input_size=SIZE).total
    bare = FlopCountAnalysis(m, torch.zeros(1, *SIZE))
    bare.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    tokens, depth, dim = 17, 2, 32
    assert fused - bare.total() == depth * tokens * tokens * 2 * dim
    for blk in m.blocks:
        blk.attn.fused_attn = False
    assert morph.flops(m, input_size=SIZE).total == fused
    assert sdpa_flops((2, 4, 17, 8), (2, 4, 17, 8), (2, 4, 17, 8)) == 2 * 4 * 17 * 17 * 16
    assert sdpa_flops((4, 5, 8), (1, 7, 8), (1, 7, 2)) == 4 * 5 * 7 * 10  # broadcast leading dims


# ----------------------------------------------------------------------------------------------------------------
# optimizer and configs


def test_adamw_is_built_and_its_checkpoint_restores():
    torch.manual_seed(0)
    m = _stock()
    assert isinstance(build_optimizer(m, OptimConfig()), torch.optim.SGD)  # the CNN default is unchanged
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95], eps=1e-7)
    opt = build_optimizer(m, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.05
    F.cross_entropy(m(_x()), torch.tensor([1, 2])).backward()
    opt.step()
    tensors, meta = optimizer_state(opt)
    meta = json.loads(json.dumps(meta))  # as the checkpoint stores it: betas become a list
    fresh = build_optimizer(m, cfg)
    restore_optimizer(fresh, tensors, meta)
    for p in m.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(fresh.state[p][k], v), k
    other = build_optimizer(m, OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.999]))
    with pytest.raises(morph.CheckpointError, match="betas"):
        restore_optimizer(other, tensors, meta)
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith(".step"))
    bad[key] = torch.tensor(float("nan"))
    with pytest.raises(morph.CheckpointError, match="step count"):
        restore_optimizer(fresh, bad, meta)
    sgd = build_optimizer(m, OptimConfig())  # a 0-d step count is Adam's: in an SGD state it is refused
    sgd.step()
    sgd_tensors, sgd_meta = optimizer_state(sgd)
    with pytest.raises(morph.CheckpointError, match="0.step"):
        restore_optimizer(build_optimizer(m, OptimConfig()), {**sgd_tensors, "0.step": torch.tensor(1.0)},
                          json.loads(json.dumps(sgd_meta)))


@pytest.mark.parametrize("override,message", [
    ("model.attention=tokens", "model.attention='tokens' is not one of: heads, head_dim"),
    ("optim.optimizer=adam", "optim.optimizer='adam' is not one of: sgd, adamw"),
    ("model.num_heads=3", "model.embed_dim=128 does not split into model.num_heads=3 heads"),
    ("model.patch_size=5", "model.patch_size=5 does not tile 32x32 images"),
    ("model.embed_dim=0", "model.embed_dim must be in"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate must be in"),
])
def test_vit_config_errors_name_the_key(override, message):
    with pytest.raises(RecipeError) as e:
        load_config("cifar10-vit-cpu", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cpu_config_is_every_row_with_three_seeds():
    cfg = load_config("cifar10-vit-cpu")
    assert cfg.model.arch == "vit" and (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.patch_size) == (128, 4, 4)
    assert set(cfg.growth.methods) == set(METHODS) and cfg.run.seeds == [0, 1, 2]
    assert cfg.optim.optimizer == "adamw" and cfg.model.attention == "heads"
    assert load_config("cifar10-wrn10-1-cpu").optim.optimizer == "sgd"


def test_deit_config_has_the_deit_settings_and_the_deit_sizes():
    cfg = load_config("imagenet-deit-tiny-small")
    o, m = cfg.optim, cfg.model
    assert (o.optimizer, o.weight_decay, o.warmup_epochs, o.label_smoothing, o.schedule) == ("adamw", 0.05, 5, 0.1,
                                                                                             "cosine")
    assert o.lr == pytest.approx(5e-4 * o.batch_size / 512)
    assert (m.embed_dim, m.num_heads, m.depth, m.patch_size, m.mlp_ratio, m.drop_path_rate) == (384, 6, 12, 16, 4.0,
                                                                                                 0.1)
    assert set(cfg.growth.methods) == set(METHODS) and cfg.growth.epochs == 300
    # the target has deit_small_patch16_224's tensors (built on the meta device: no memory)
    import timm

    with torch.device("meta"):
        target = build_model(m, 1000, (3, 224, 224))
        deit_s = timm.create_model("deit_small_patch16_224")
    assert {k: v.shape for k, v in target.state_dict().items()} == {k: v.shape for k, v in deit_s.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# morph train on a tiny ViT (slow tier)

# cifar10-vit-cpu on a 2-block 32-wide ViT with 8x8 patches, 128 synthetic images, 4 epochs
SMALL = ["data.synthetic=true", "data.train_subset=128", "data.test_subset=64", "model.depth=2",
         "model.embed_dim=32", "model.patch_size=8", "growth.epochs=4", "growth.net1_epochs=2",
         "growth.net2_epochs=2", "growth.firefly_steps=1", "growth.budget=0.8", "run.seeds=[0]",
         "optim.batch_size=32", "run.eval_every=1"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    assert run.main("cifar10-vit-cpu", out_dir=out, overrides=SMALL) == out
    return out


def _results(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("seed0/*/result.json")}


@pytest.mark.slow
def test_every_row_trains_a_vit(vit_run):
    results = _results(vit_run)
    assert set(results) == set(METHODS)
    assert results["large"]["flops_norm"] == pytest.approx(1.0)
    for m, r in results.items():
        if m not in ("large", "small"):
            assert 0.5 < r["flops_norm"] <= 0.8 + 1e-9, (m, r["flops_norm"])
        assert 0.0 <= r["top1"] <= 100.0
    assert results["mixturegrowth"]["stages"][0]["flops"] == 0.0  # net 1 not counted
    x = _x()
    for m in ("large", "random", "net2net", "gradmax", "firefly", "mixturegrowth"):
        model = morph.load(vit_run / "seed0" / m / "model.safetensors").eval()
        stock = _stock().eval()
        plain = morph.bake(model) if morph.get_info(model).templates else model  # MixtureGrowth: templates
        stock.load_state_dict(plain.state_dict(), strict=True)
        with torch.no_grad():
            assert _rel(stock(x), model(x)) <= 1e-5, m
    small = morph.load(vit_run / "seed0" / "small" / "model.safetensors")
    assert (small.blocks[0].attn.num_heads, small.cls_token.shape[-1]) == (2, 16)
    starts = [r for r in read_metrics(vit_run / "metrics.jsonl") if r["kind"] == "start"]
    assert {r["method"] for r in starts} == {"random", "net2net", "gradmax", "firefly", "mixturegrowth",
                                             "mixturegrowth-nofusion"}
    assert all("test_top1_bn" not in r for r in starts)  # no BatchNorm: nothing re-estimated, nothing crashed


@pytest.mark.slow
def test_rerun_of_a_finished_vit_run_trains_nothing(vit_run, monkeypatch):
    before = _results(vit_run)
    lines = len(read_metrics(vit_run / "metrics.jsonl"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(Trainer, "_step", no_training)
    run.main("cifar10-vit-cpu", out_dir=vit_run, overrides=SMALL)
    assert _results(vit_run) == before
    assert len(read_metrics(vit_run / "metrics.jsonl")) == lines


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_vit_run_resumes_bit_exact_after_a_crash(tmp_path, monkeypatch):
    """A crash in MixtureGrowth's grown stage (AdamW state, after its first epoch's checkpoint) and a rerun give
    the uninterrupted run's model and metrics exactly."""
    over = [*SMALL, "growth.methods=[mixturegrowth]"]
    ref = tmp_path / "ref"
    run.main("cifar10-vit-cpu", out_dir=ref, overrides=over)
    real = Trainer._step
    calls = {"n": 0}
    # net 1 and net 2: 2 epochs of 4 steps each; the grown stage's 6th step is in its second epoch
    crash_at = 8 + 8 + 6

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise _Crash
        return real(self, *args)

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_step", crashing)
    with pytest.raises(_Crash):
        run.main("cifar10-vit-cpu", out_dir=out, overrides=over)
    monkeypatch.setattr(Trainer, "_step", real)
    ckpt = out / "seed0" / "mixturegrowth" / "grown" / "checkpoint.safetensors"
    from morph.recipes.checkpoint import load_checkpoint

    _, meta = load_checkpoint(ckpt)
    assert not meta["done"] and meta["progress"]["epoch"] == 1
    run.main("cifar10-vit-cpu", out_dir=out, overrides=over)
    a = json.loads((ref / "seed0/mixturegrowth/result.json").read_text())
    b = json.loads((out / "seed0/mixturegrowth/result.json").read_text())
    assert (a["top1"], a["test_loss"], a["flops"]) == (b["top1"], b["test_loss"], b["flops"])
    ma = morph.load(ref / "seed0/mixturegrowth/model.safetensors").state_dict()
    mb = morph.load(out / "seed0/mixturegrowth/model.safetensors").state_dict()
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    la = [(r["stage_key"], r["epoch"], r["loss"]) for r in read_metrics(ref / "metrics.jsonl") if r["kind"] == "epoch"]
    lb = [(r["stage_key"], r["epoch"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert la == lb


@pytest.mark.slow
def test_deit_config_tiny_override_runs_end_to_end(tmp_path):
    """imagenet-deit-tiny-small as it ships, shrunk: synthetic 32x32 images (4 patches of 16), 2 blocks of
    DeiT-Small's width and heads (half: DeiT-Tiny's 192 dims, 3 heads), a few steps of every row on the CPU."""
    over = ["data.synthetic=true", "data.image_size=32", "data.train_subset=64", "data.test_subset=32",
            "data.num_workers=0", "model.depth=2", "optim.batch_size=16", "optim.warmup_epochs=1",
            "growth.epochs=2", "growth.net1_epochs=1", "growth.net2_epochs=1", "growth.firefly_steps=1",
            "growth.budget=0.9", "run.seeds=[0]", "run.device=cpu", "run.progress=false"]
    out = run.main("imagenet-deit-tiny-small", out_dir=tmp_path / "deit", overrides=over)
    results = _results(out)
    assert set(results) == set(METHODS)
    small = morph.load(out / "seed0" / "small" / "model.safetensors")
    assert (small.cls_token.shape[-1], small.blocks[0].attn.num_heads, small.blocks[0].attn.head_dim) == (192, 3, 64)
    grown = morph.load(out / "seed0" / "mixturegrowth" / "model.safetensors")
    assert (grown.blocks[0].attn.num_heads, grown.blocks[0].attn.head_dim) == (6, 64)
