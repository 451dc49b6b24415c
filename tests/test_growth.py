"""Growth methods (morph.growth): one seam, every method on plain models of many architectures.

- function preservation (float64, relative error <= 1e-6, eval mode and train mode for BatchNorm models) of
  ``net2net`` and of ``random`` and ``gradmax`` with epsilon = 0, on 12 small architectures: residual,
  concatenation (DenseNet and a cat/chunk motif), depthwise + squeeze-excitation, grouped (ResNeXt),
  flattened-spatial classifier, GroupNorm, LayerNorm (ConvNeXt), hard-coded reshape, MobileNetV3, WRN;
- a grown half loads strictly into the stock timm model and through ``morph.load`` (no per-method branch);
- GradMax's new outgoing weights are the top singular vectors of the matrix from its definition (MLP and
  conv-BN-ReLU-conv), and beat random's gradient norm at equal outgoing norm;
- Firefly changes only new weights and lowers the loss on its batch; the optimizer-state carry; the CLI.
"""

from __future__ import annotations

import motifs  # tests/motifs.py: tiny models
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from morph.cli.main import app
from morph.recipes.models import WideResNet
from typer.testing import CliRunner

import morph
from morph.growth.layout import OLD

TOL = 1e-6
X = (3, 32, 32)


def _resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4)


class _GNBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(4, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(4, c)

    def forward(self, x):
        return F.relu(x + self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))


def _resnet_gn():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), _GNBlock(16),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), _GNBlock(32),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    for mod in m.modules():  # GroupNorm's default affine (1, 0) makes new and old channels look alike
        if isinstance(mod, nn.GroupNorm):
            nn.init.normal_(mod.weight, 1.0, 0.2)
            nn.init.normal_(mod.bias, 0.0, 0.2)
    return m


def _convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), num_classes=5, ls_init_value=0.5)


def _densenet():
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)


ARCHS = {
    "residual": motifs.Residual,
    "concat": motifs.Concat,
    "depthwise_se": motifs.DepthwiseSE,
    "flatten_spatial": motifs.FlattenSpatial,
    "norms_gn_ln": motifs.Norms,
    "hardcoded_view": motifs.HardCodedView,
    "wrn10_1": lambda: WideResNet(depth=10, widen_factor=1, num_classes=5, norm="preact"),
    "resnext_grouped": _resnext,
    "resnet_groupnorm": _resnet_gn,
    "convnext_layernorm": _convnext,
    "densenet_concat": _densenet,
    "mobilenetv3_se": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
}


def _randomize_norms(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics and affine parameters (fresh ones are 0/1 everywhere)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _batch(n=4, classes=5, seed=0, size=X):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *size), generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_function_preserved(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().double()
    with torch.no_grad():
        _randomize_norms(model)
    model.eval()
    plan = morph.analyze(model, X)
    x, y = _batch()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for method in ("net2net", "random", "gradmax"):
        grown = morph.grow(model, method, 2.0, data=(x, y), seed=0, plan=plan)
        # every growing group really grew, and new outgoing weights are not all zero (nothing to hide behind)
        assert sum(p.numel() for p in grown.parameters()) > 1.8 * sum(p.numel() for p in model.parameters())
        assert grown.growth_report and all(r["channels"][1] > r["channels"][0] for r in grown.growth_report)
        for mode in ("eval", "train") if has_bn else ("eval",):
            model.train(mode == "train")
            grown.train(mode == "train")
            with torch.no_grad():
                err = _relerr(model(x), grown(x))
            assert err <= TOL, (method, mode, err)
        model.eval()
        info = morph.get_info(grown)
        assert info.kind == "plain" and info.width == 2.0 and info.extra["growth"]["method"] == method


def test_new_weights_are_nonzero_and_rules_reported():
    torch.manual_seed(0)
    model = motifs.Residual().double().eval()
    x, y = _batch()
    grown = morph.grow(model, "gradmax", 2.0, data=(x, y), seed=0)
    rules = {tuple(r["producers"]): r["rule"] for r in grown.growth_report}
    assert rules[("conv1",)] == "gradmax (conv1 -> conv2)"
    assert rules[("stem", "conv2")].startswith("random (2 producer(s)")  # the residual stream
    assert rules[("down",)].startswith("random (conv -> linear")
    w = grown.conv2.weight.detach()
    assert w[:8, 8:].abs().sum() > 0  # outgoing weights of new neurons
    assert w[8:].abs().sum() == 0 and grown.conv1.weight[8:].abs().sum() == 0  # zero incoming (epsilon 0)


def test_stock_load_and_checkpoint(tmp_path):
    """A half grown by each method is the stock model: strict load into timm, same outputs; morph.load rebuilds
    it from its record with no per-method branch, and the record names the method and its options."""
    stock = timm.create_model("resnet10t", num_classes=7)
    base = morph.build_model("timm/resnet10t", num_classes=7)
    half = morph.scale_width(base, 0.5, input_size=X).double().eval()
    x, y = _batch(classes=7)
    for method in ("net2net", "gradmax"):
        grown = morph.grow(half, method, 2.0, data=(x, y), seed=0)
        stock.double().eval().load_state_dict(grown.state_dict(), strict=True)
        with torch.no_grad():
            assert _relerr(grown.eval()(x), stock(x)) <= TOL
            assert _relerr(half(x), grown(x)) <= TOL
        path = morph.save(grown, tmp_path / f"{method}.safetensors")
        loaded = morph.load(path).double().eval()
        info = morph.read_info(path)[0]
        assert info.kind == "plain" and info.width == 1.0 and info.extra["growth"]["method"] == method
        with torch.no_grad():
            assert _relerr(grown(x), loaded(x)) <= TOL


def test_width_ratios_and_internal_groups():
    torch.manual_seed(0)
    model = motifs.Residual().double().eval()
    x, _ = _batch()
    g = morph.grow(model, "net2net", 1.5, seed=0)
    assert g.conv1.weight.shape == (12, 12, 3, 3)
    with torch.no_grad():
        assert _relerr(model(x), g(x)) <= TOL
    g = morph.grow(model, "random", 2.0, seed=0, which="internal")
    assert g.conv1.weight.shape == (16, 8, 3, 3) and g.conv2.weight.shape == (8, 16, 3, 3)
    assert g.stem.weight.shape == model.stem.weight.shape
    with torch.no_grad():
        assert _relerr(model(x), g(x)) <= TOL


def test_net2net_is_one_mapping_per_group():
    """Replicas of the residual stream use one mapping everywhere, so every new channel equals its source."""
    torch.manual_seed(0)
    model = motifs.Residual().double().eval()
    g = morph.grow(model, "net2net", 2.0, seed=3)
    x, _ = _batch()
    acts = {}
    g.bn2.register_forward_hook(lambda m, a, o: acts.setdefault("bn2", o))
    g.bn.register_forward_hook(lambda m, a, o: acts.setdefault("bn", o))
    with torch.no_grad():
        g(x)
    for k in ("bn", "bn2"):
        new = acts[k][:, 8:]
        # each new channel is a copy of one old channel
        d = (new[:, :, None] - acts[k][:, None, :8]).abs().flatten(3).amax((0, 3))
        assert (d.min(dim=1).values <= 1e-12).all()


# -- GradMax exactness ---------------------------------------------------------------------------------------------
class _ReLU1(torch.autograd.Function):
    """ReLU with derivative 1 at 0 (GradMax's assumption; PyTorch's is 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x >= 0).to(g)


class _Act(nn.Module):
    def forward(self, x):
        return _ReLU1.apply(x)


class MLP(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 4), act or nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = _Act()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        z = self.conv2(self.act(self.bn(self.conv1(x))))
        return self.fc(z.mean((2, 3)))


def _definition_matrix(model, x, y, new_out_shape, new_in_shape, add_new):
    """M[(out), (in)] = d/dU of the loss with one new neuron of outgoing weights e_out and incoming U = 0,
    where the new neuron's path is linearized (activation derivative 1 at 0, identity norm): by autograd."""
    rows = []
    n_out = int(torch.tensor(new_out_shape).prod())
    for i in range(n_out):
        v = torch.zeros(n_out, dtype=torch.float64)
        v[i] = 1
        u = torch.zeros(new_in_shape, dtype=torch.float64, requires_grad=True)
        loss = F.cross_entropy(add_new(x, u, v.view(new_out_shape)), y)
        rows.append(torch.autograd.grad(loss, u)[0].flatten())
    return torch.stack(rows)


def _check_top_singular(m_def, new_vectors):
    u, s, _ = torch.linalg.svd(m_def)
    assert s[0] > 0
    for j, v in enumerate(new_vectors):
        v = v.flatten() / v.norm()
        assert abs(abs(float(v @ u[:, j])) - 1) <= 1e-8, (j, float(v @ u[:, j]))


def test_gradmax_mlp_matches_definition():
    torch.manual_seed(0)
    model = MLP().double().train()
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    grown = morph.grow(model, "gradmax", 1.5, data=(x, y), seed=0, input_size=(6,))  # 4 -> 6 hidden

    def add_new(x, u, v):  # z2 + v (u x): the new neuron, tanh'(0) = 1
        return model(x) + (x @ u.t()) @ v.view(1, -1)

    m_def = _definition_matrix(model, x, y, (3,), (1, 6), add_new)
    _check_top_singular(m_def, grown.fc2.weight.detach()[:, 4:].t())
    # the new vectors' norm: 0.5 x the mean norm of the existing outgoing vectors
    want = 0.5 * float(model.fc2.weight.detach().norm(dim=0).mean())
    assert torch.allclose(grown.fc2.weight.detach()[:, 4:].norm(dim=0), torch.full((2,), want, dtype=torch.float64))


def test_gradmax_conv_pair_matches_definition():
    torch.manual_seed(0)
    model = ConvPair().double().train()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    grown = morph.grow(model, "gradmax", 2.0, data=(x, y), seed=0, input_size=(3, 8, 8))
    assert any(r["rule"].startswith("gradmax (conv1 -> conv2)") for r in grown.growth_report)

    def add_new(x, u, v):  # conv2's output plus the new neuron's path conv2_v(conv1_u(x))
        feats = {}
        h = model.conv2.register_forward_hook(lambda m, a, o: o + F.conv2d(
            F.conv2d(x, u, padding=1), v, stride=2, padding=1))
        try:
            return model(x)
        finally:
            h.remove()
            del feats

    m_def = _definition_matrix(model, x, y, (5, 1, 3, 3), (1, 3, 3, 3), add_new)
    new = grown.conv2.weight.detach()[:5, 4:].transpose(0, 1)  # [new, old out, 3, 3] (conv2's out grows too)
    _check_top_singular(m_def, new)


@pytest.mark.parametrize("pair", ["mlp", "conv"])
def test_gradmax_beats_random_gradient(pair):
    """Right after growth, the gradient of the new incoming weights is larger than random's, at equal
    outgoing norm (one new neuron, so GradMax's top singular vector is the maximizer)."""
    torch.manual_seed(0)
    if pair == "mlp":
        model, size = MLP().double().train(), (6,)
        x = torch.randn(16, 6, dtype=torch.float64)
        width, layer, cut = 1.25, "fc1", 4
    else:
        model, size = ConvPair().double(), (3, 8, 8)
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
        width, layer, cut = 1.25, "conv1", 4
    model.eval()
    y = torch.randint(0, 3, (x.shape[0],))
    norms = {}
    for method in ("gradmax", "random"):
        for seed in range(3):
            g = morph.grow(model, method, width, data=(x, y), seed=seed, input_size=size).eval()
            w = g.get_submodule(layer).weight
            loss = F.cross_entropy(g(x), y)
            grad = torch.autograd.grad(loss, w)[0][cut:]
            norms.setdefault(method, []).append(float(grad.norm()))
            out = g.fc2.weight if pair == "mlp" else g.conv2.weight
            norms.setdefault(method + "_out", []).append(float(out.detach()[:, cut:].norm()))
    assert max(abs(a - b) for a, b in zip(norms["gradmax_out"], norms["random_out"], strict=True)) <= 1e-9
    assert min(norms["gradmax"]) > max(norms["random"]) > 0


# -- Firefly ------------------------------------------------------------------------------------------------------
def test_firefly_changes_only_new_weights_and_lowers_loss():
    torch.manual_seed(0)
    model = motifs.Residual().double().eval()
    with torch.no_grad():
        _randomize_norms(model)
    x, y = _batch(n=8)
    g = morph.grow(model, "firefly", 2.0, data=(x, y), seed=0, steps=10, lr=1e-2)
    losses = g.growth_losses
    assert losses[-1] < losses[0]
    r = morph.grow(model, "random", 2.0, seed=0, epsilon=0.01)  # the same random start
    changed = 0
    old = dict(model.named_parameters())
    for name, p in g.named_parameters():
        (src, old_name, index), = g.growth_record.params[name]
        sel = [(i >= 0).nonzero().flatten() if i is not None else slice(None) for i in index]
        keep = p.detach()
        for d, s in enumerate(sel):
            keep = keep.index_select(d, s) if not isinstance(s, slice) else keep
        ref = old[old_name].detach()
        for d, i in enumerate(index):
            if i is not None:
                ref = ref.index_select(d, i[i >= 0])
        assert torch.equal(keep, ref), name  # old entries untouched
        changed += int(not torch.equal(p.detach(), r.get_parameter(name).detach()))
    assert changed >= 2  # new incoming and outgoing weights moved


# -- optimizer state ---------------------------------------------------------------------------------------------
def test_optimizer_state_carry_plain():
    torch.manual_seed(0)
    model = motifs.Residual().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    grown = morph.grow(model, "net2net", 2.0, seed=0)
    new_opt = morph.carry_optimizer_state(opt, model, grown)
    mom_old = opt.state[model.conv1.weight]["momentum_buffer"]
    mom = new_opt.state[grown.conv1.weight]["momentum_buffer"]
    assert mom.shape == grown.conv1.weight.shape
    assert torch.equal(mom[:8, :8], mom_old) and mom[8:].abs().sum() == 0 and mom[:, 8:].abs().sum() == 0
    assert len(new_opt.param_groups[0]["params"]) == len(list(grown.parameters()))
    assert new_opt.param_groups[0]["momentum"] == 0.9
    F.cross_entropy(grown(x), y).backward()
    new_opt.step()  # it is a working optimizer


def test_optimizer_state_carry_fusion():
    torch.manual_seed(0)
    base = motifs.Residual().double()
    a, b = (morph.convert(base, seed=s, input_size=X) for s in (1, 2))
    x, y = _batch()
    opts = []
    for m in (a, b):
        o = torch.optim.Adam(m.parameters())
        F.cross_entropy(m(x), y).backward()
        o.step()
        opts.append(o)
    fused = morph.fuse(a, b, seed=0)
    new_opt = morph.carry_optimizer_state(opts, [a, b], fused)
    c = fused.get_submodule("conv1").mix.coefficients
    st = new_opt.state[c]["exp_avg"]
    assert torch.equal(st[0], opts[0].state[a.conv1.mix.coefficients]["exp_avg"][0])
    assert torch.equal(st[3], opts[1].state[b.conv1.mix.coefficients]["exp_avg"][0])
    assert st[1:3].abs().sum() == 0
    bn, n = new_opt.state[fused.bn1.weight]["exp_avg"], a.bn1.weight.numel()
    assert torch.equal(bn[:n], opts[0].state[a.bn1.weight]["exp_avg"])
    assert torch.equal(bn[n:], opts[1].state[b.bn1.weight]["exp_avg"])
    t = fused.conv1.mix.banks[1].templates
    assert torch.equal(new_opt.state[t]["exp_avg"], opts[1].state[b.conv1.mix.banks[0].templates]["exp_avg"])
    # growth without fusion: one source, the copies are new
    grown = morph.grow(a, seed=0)
    st = morph.carry_optimizer_state(opts[0], a, grown).state[grown.bn1.weight]["exp_avg"]
    assert torch.equal(st[:n], opts[0].state[a.bn1.weight]["exp_avg"]) and st[n:].abs().sum() == 0


# -- the seam ------------------------------------------------------------------------------------------------------
def test_registry_and_errors():
    assert morph.list_growth_methods() == ["firefly", "gradmax", "mixturegrowth", "net2net", "random"]
    model = motifs.Residual()
    with pytest.raises(morph.MorphError, match="unknown growth method 'bogus'; known: firefly, gradmax"):
        morph.grow(model, "bogus")
    with pytest.raises(morph.MorphError, match="reads data"):
        morph.grow(model, "gradmax")
    with pytest.raises(morph.MorphError, match="pass method="):
        morph.grow(model)
    with pytest.raises(morph.MorphError, match="no option epsilon"):
        morph.grow(model, "net2net", epsilon=1.0)
    with pytest.raises(morph.MorphError, match="ratio >= 1"):
        morph.grow(model, "random", 0.5)
    with pytest.raises(morph.MorphError, match="template models"):
        morph.grow(model, "mixturegrowth")
    half = morph.convert(model, input_size=X)
    with pytest.raises(morph.MorphError, match="bake it first"):
        morph.grow(half, "random")
    # a template half grows the MixtureGrowth way by default, as before
    assert morph.get_info(morph.grow(half, init="zero")).kind == "grown"


# -- CLI -----------------------------------------------------------------------------------------------------------
def _image_folder(root, classes=2, per_class=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            px = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / f"class{c}" / f"{i}.png")
    return root


def test_cli_convert_plain_and_grow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    r = run("convert", "timm/resnet10t", "--half", "--plain", "--input-size", "3,32,32", "--num-classes", "4")
    assert r.exit_code == 0, r.output
    half = tmp_path / "resnet10t-half-plain.safetensors"
    assert morph.read_info(half)[0].kind == "plain"
    # gradmax without data: one line, exit 2, no file
    r = run("grow", half, "-o", "g.safetensors", "--method", "gradmax")
    assert r.exit_code == 2 and "--data" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.safetensors").exists()
    r = run("grow", half, "-o", "g.safetensors", "--method", "nope")
    assert r.exit_code == 2 and "known: firefly, gradmax" in r.stderr and not (tmp_path / "g.safetensors").exists()
    data = _image_folder(tmp_path / "imgs")
    r = run("grow", half, "-o", "g.safetensors", "--method", "gradmax", "--data", data, "--batch-size", "4", "--seed",
            "0")
    assert r.exit_code == 0, r.output
    assert "by gradmax" in r.stdout
    grown, small = morph.load("g.safetensors").eval(), morph.load(half).eval()
    x = torch.randn(2, *X)
    with torch.no_grad():
        assert _relerr(small(x), grown(x)) <= 1e-5  # float32
    timm.create_model("resnet10t", num_classes=4).load_state_dict(grown.state_dict(), strict=True)
    r = run("inspect", "g.safetensors", "--no-flops")
    assert r.exit_code == 0, r.output
    assert "grown by gradmax" in " ".join(r.stdout.split())


def test_layout_positions():
    """The shape seam: old channels keep their index in their group, new ones follow."""
    model = motifs.Concat()
    from morph.growth.layout import build_layout

    lay = build_layout(model, 2.0, input_size=X)
    d = lay.dim(lay.plan.layers["mix"].in_dim)  # cat of stem (8), a (4), b (12)
    old = (d.kind == OLD).nonzero().flatten().tolist()
    assert old == list(range(8)) + list(range(16, 20)) + list(range(24, 36))
    assert d.src[old].tolist() == list(range(24))


class _Grouped(nn.Module):
    """12 channels in 3 groups of 4: at half width the group width 4 does not divide 6 channels, so
    ``scale_width`` keeps 3 groups (of 2); the original's 3 groups are recorded in ``info.original``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(F.relu(self.stem(x)))).mean((2, 3)))


def test_growth_back_to_the_original_uses_its_recorded_groups():
    """A half whose grouped conv kept its 3 groups (of 2) grows back to the original's 3 groups of 4: the
    channel groups around it grow block by block, so every method keeps the function and the result loads
    into the original architecture."""
    model = _Grouped().double().eval()
    half = morph.scale_width(model, 0.5, input_size=X).eval()
    assert half.conv.groups == 3 and morph.get_info(half).original["groups"]["conv"] == 3
    x, y = _batch()
    for method in ("net2net", "random", "gradmax"):
        g = morph.grow(half, method, 2.0, data=(x, y), seed=0).eval()
        assert g.conv.groups == 3 and g.conv.weight.shape == (12, 4, 3, 3)
        _Grouped().double().load_state_dict(g.state_dict(), strict=True)
        with torch.no_grad():
            assert _relerr(half(x), g(x)) <= TOL, method
        notes = [r["note"] for r in g.growth_report]
        assert any("grown block by block" in n for n in notes), notes
    n2n = morph.grow(half, "net2net", 2.0, seed=0)
    # replicas stay in their conv group: new channel 2 of group 0 copies channel 0, of group 1 channel 2
    assert torch.equal(n2n.stem.weight[[2, 3, 6, 7]], half.stem.weight[[0, 1, 2, 3]])
    # a width that is not the original's follows the channel plan (constant group width where it divides)
    g = morph.grow(half, "net2net", 3.0, seed=0)
    assert g.conv.weight.shape == (18, 2, 3, 3) and g.conv.groups == 9
    with torch.no_grad():
        assert _relerr(half(x), g.eval()(x)) <= TOL


def test_internal_growth_checkpoint_loads(tmp_path):
    """which="internal" grows only block-internal groups: not a width of the architecture, yet morph.load
    rebuilds it (from the record's growth layout) and the round trip is bit-exact."""
    half = morph.scale_width(morph.build_model("timm/resnet10t", num_classes=5), 0.5, input_size=X).eval()
    g = morph.grow(half, "random", 2.0, seed=0, which="internal", epsilon=0.1).eval()
    assert g.layer1[0].conv1.weight.shape[0] == 2 * half.layer1[0].conv1.weight.shape[0]
    assert g.layer1[0].conv2.weight.shape[0] == half.layer1[0].conv2.weight.shape[0]  # the residual stream kept
    path = morph.save(g, tmp_path / "internal.safetensors")
    loaded = morph.load(path).eval()
    x = _batch()[0].float()
    with torch.no_grad():
        assert torch.equal(loaded(x), g(x))
    assert morph.read_info(path)[0].extra["growth"]["which"] == "internal"
