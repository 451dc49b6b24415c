"""Grown models train: what ``morph.grow`` returns learns with its new neurons in an ordinary training loop.

- ReLU with sub-gradient 1 at 0 (``morph.growth.activation``): forward bit-identical to PyTorch's for every
  ReLU-family call, gradient 1 at 0, scoped to the grown model's forward, kept by ``morph.save``/``morph.load``
  and by :func:`morph.growth.restore`; state dict and strict load into the stock model unchanged;
- on 12 architectures, every method: the function is kept at growth where the method claims it, and after a
  few SGD steps in train mode no new row of a grown layer is still zero or still equal to an old row; with
  PyTorch's ReLU (``relu_grad="stock"``) new rows stay exactly zero, and Net2Net with an even split
  (``split=0``) keeps replicas, so these checks can fail;
- eval mode right after a data-driven step (BatchNorm statistics re-estimated); the input size from the data;
- the registry: labels, recipe rows, growth-step FLOPs and recipe options come from the method classes.
"""

from __future__ import annotations

import copy

import motifs  # tests/motifs.py: tiny models
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_growth import ARCHS, _randomize_norms

import morph
from morph.errors import CheckpointError, MorphError
from morph.growth import activation
from morph.growth.plain import reestimate_norm_stats

X = (3, 32, 32)
S = (3, 16, 16)  # the fast tier's inputs
METHODS = ("random", "gradmax", "net2net", "firefly")
PRESERVING = ("random", "gradmax", "net2net")  # epsilon 0 / replicas with shares that sum to 1


def _batch(n=8, classes=5, seed=0, size=X, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *size), generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _relerr(a, b):
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _new_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv/linear weights with new output rows (fresh or replica): name -> mask of those rows."""
    out = {}
    for k, entries in model.growth_record.params.items():
        mod = model.get_submodule(k.rpartition(".")[0]) if "." in k else model
        if not k.endswith("weight") or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        rows = entries[0][2][0]
        if isinstance(mod, nn.Conv2d) and mod.transposed:
            continue
        if rows is not None and (rows < 0).any():
            out[k] = rows < 0
    return out


def _stuck_rows(model: nn.Module, new_rows: dict[str, torch.Tensor],
                before: dict[str, torch.Tensor] | None = None) -> tuple[int, int, int]:
    """(new rows, rows still zero, rows still equal to an old row up to 1e-9 of the row norms). With ``before``
    (the weights before training), a row counts as a replica only when it equals an old row that moved (by more
    than 1e-7 of the row norms, so that an uneven split shows): the replica of a neuron that got no gradient (a
    ReLU off on every image) cannot part from it, whatever the growth method did."""
    sd = model.state_dict()
    total = zero = same = 0
    for k, new in new_rows.items():
        w = sd[k].flatten(1).double()
        ref = w[~new].norm(dim=1).mean()
        total += int(new.sum())
        zero += int((w[new].norm(dim=1) <= 1e-12 * ref).sum())
        if (~new).any():
            old = w[~new]
            d = torch.cdist(w[new], old, compute_mode="donot_use_mm_for_euclid_dist")
            if before is not None:
                moved = (old - before[k].flatten(1).double()[~new]).norm(dim=1) > 1e-7 * ref
                d = d[:, moved]
            if d.shape[1]:
                same += int((d.min(1).values <= 1e-9 * ref).sum())
    return total, zero, same


def _train(model: nn.Module, x, y, steps=3, lr=0.1):
    """``steps`` SGD steps in train mode: on ``(x, y)``, then on fresh batches of its shape."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(steps):
        if i:
            x, y = _batch(len(x), 5, seed=100 + i, size=tuple(x.shape[1:]), dtype=x.dtype)
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, y).backward()
        opt.step()


def _opts(method, **kw):
    return {**({"steps": 3} if method == "firefly" else {}), **kw}


def _check_arch(arch: str, methods=METHODS, size=X) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]().double()
    with torch.no_grad():
        _randomize_norms(model)
    model.eval()
    plan = morph.analyze(model, size)
    x, y = _batch(size=size)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for method in methods:
        grown = morph.grow(model, method, 2.0, data=(x, y), seed=0, plan=plan, **_opts(method))
        assert activation.enabled(grown)
        claims = morph.growth.get_growth_method(method)(**_opts(method)).keeps_function()
        assert claims == (method in PRESERVING)
        if claims:
            for mode in ("eval", "train") if has_bn else ("eval",):
                model.train(mode == "train")
                grown.train(mode == "train")
                with torch.no_grad():
                    err = _relerr(model(x), grown(x))
                assert err <= 1e-6, (arch, method, mode, err)
            model.eval()
        rows = _new_rows(grown)
        assert rows, (arch, method)
        before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in rows}
        _train(grown, x, y)
        total, zero, same = _stuck_rows(grown, rows, before)
        assert total > 0 and zero == 0 and same == 0, (arch, method, total, zero, same)


# -- the activation ------------------------------------------------------------------------------------------

class _Calls(nn.Module):
    """Every ReLU-family form, in-place ones included, on one zero-initialized linear layer."""

    def __init__(self, form: str):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.form = form
        self.mods = nn.ModuleDict({"ReLU": nn.ReLU(), "ReLU_inplace": nn.ReLU(inplace=True), "ReLU6": nn.ReLU6(),
                                   "ReLU6_inplace": nn.ReLU6(inplace=True)})

    def forward(self, x):
        z = self.fc(x)
        f = self.form
        if f in self.mods:
            h = self.mods[f](z)
        else:
            h = {"F.relu": lambda: F.relu(z), "F.relu_inplace": lambda: F.relu(z, inplace=True),
                 "F.relu_": lambda: F.relu_(z), "torch.relu": lambda: torch.relu(z), "torch.relu_": lambda: torch.relu_(z),
                 "Tensor.relu": lambda: z.relu(), "Tensor.relu_": lambda: z.relu_(), "F.relu6": lambda: F.relu6(z),
                 "F.hardtanh_0_6": lambda: F.hardtanh(z, 0.0, 6.0)}[f]()
        return self.out(h)


FORMS = ["ReLU", "ReLU_inplace", "ReLU6", "ReLU6_inplace", "F.relu", "F.relu_inplace", "F.relu_", "torch.relu",
         "torch.relu_", "Tensor.relu", "Tensor.relu_", "F.relu6", "F.hardtanh_0_6"]


@pytest.mark.parametrize("form", FORMS)
def test_relu_one_forms(form):
    torch.manual_seed(0)
    m = _Calls(form).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.bias.zero_()
    ref = m(x)
    ref.sum().backward()
    assert float(m.fc.weight.grad.abs().sum()) == 0  # PyTorch: gradient 0 at 0, the zero neurons are dead
    m.zero_grad()
    activation.enable(m)
    out = m(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    # sub-gradient 1 at 0: the zero neurons' incoming gradient is W_out^T 1 x^T
    expect = m.out.weight.t() @ torch.ones(3, 5, dtype=torch.float64) @ x
    assert torch.allclose(m.fc.weight.grad, expect, rtol=1e-12, atol=1e-12)


def test_relu_one_forward_bit_identical_and_gradient_elsewhere_unchanged():
    x = torch.randn(4096, dtype=torch.float64) * 8
    x[:16] = 0.0
    x[16:32] = 6.0
    x[32] = -0.0
    for fn, upper in ((F.relu, None), (F.relu6, 6.0)):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        ya, yb = fn(a), activation.ReLUOne.apply(b, upper, False)
        assert torch.equal(ya.view(torch.int64), yb.view(torch.int64))
        g = torch.randn_like(x)
        ya.backward(g)
        yb.backward(g)
        nz = x != 0
        assert torch.equal(a.grad[nz], b.grad[nz])  # elsewhere PyTorch's gradient, bit for bit
        assert torch.equal(b.grad[~nz], g[~nz])  # 1 at 0
    # float32: the same clamp
    y = torch.randn(1000)
    assert torch.equal(torch.relu(y), activation.ReLUOne.apply(y.clone().requires_grad_(), None, False))


def test_relu_one_is_scoped_to_the_model_and_survives_exceptions():
    m = activation.enable(_Calls("F.relu").double())
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    F.relu(z).sum().backward()
    assert float(z.grad.abs().sum()) == 0  # outside the model's forward: PyTorch's ReLU
    with pytest.raises(RuntimeError):
        m(torch.zeros(2, 5, dtype=torch.float64))  # wrong input width: raises inside the forward
    z.grad = None
    F.relu(z).sum().backward()
    assert float(z.grad.abs().sum()) == 0  # the mode did not leak out of the failed forward
    activation.disable(m)
    assert not activation.enabled(m)


def test_relu_grad_option_and_record():
    model = motifs.Residual().double()
    x, y = _batch(size=S)
    on = morph.grow(model, "random", 2.0, seed=0, input_size=S)
    off = morph.grow(model, "random", 2.0, seed=0, input_size=S, relu_grad="stock")
    assert activation.enabled(on) and not activation.enabled(off)
    assert morph.get_info(on).extra["growth"]["relu_grad"] == "one"
    assert morph.get_info(off).extra["growth"]["relu_grad"] == "stock"
    # new BatchNorm channels start at new_gamma, the rest of the norm is identity
    bn = on.get_submodule("bn1")
    assert torch.equal(bn.weight[8:], torch.full((8,), 0.1, dtype=torch.float64))
    assert torch.equal(bn.bias[8:], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(bn.running_var[8:], torch.ones(8, dtype=torch.float64))
    rows = _new_rows(on)
    _train(on, x, y)
    _train(off, x, y)
    assert float(on.get_submodule("bn1").weight.detach()[8:].sub(0.1).abs().min()) > 0  # the new channels' weight learns
    assert _stuck_rows(on, rows)[1] == 0
    total, zero, _ = _stuck_rows(off, rows)
    # PyTorch's ReLU: every new neuron behind a ReLU (stem, conv1, conv2: 8 each) is dead; the 16 of ``down``
    # (no ReLU before the classifier) learn
    assert (zero, total) == (24, 40)
    with pytest.raises(MorphError, match="relu_grad"):
        morph.grow(model, "random", 2.0, input_size=S, relu_grad="yes")
    with pytest.raises(MorphError, match="new_gamma"):
        morph.grow(model, "random", 2.0, input_size=S, new_gamma=0)
    with pytest.raises(MorphError, match="bn_stats"):
        morph.grow(model, "random", 2.0, input_size=S, bn_stats="sometimes")


def test_relu_grad_does_not_change_net2net_or_firefly_gradients():
    """Where no pre-activation is exactly 0 (replicas; Firefly's epsilon > 0) the choice changes nothing."""
    model = motifs.Residual().double()
    x, y = _batch(size=S)
    for method in ("net2net", "firefly"):
        grads = []
        for rg in ("one", "stock"):
            g = morph.grow(model, method, 2.0, data=(x, y), seed=0, relu_grad=rg, **_opts(method))
            g.train()
            F.cross_entropy(g(x), y).backward()
            grads.append([p.grad.clone() for p in g.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), method


def test_save_load_keeps_the_activation(tmp_path):
    x, y = _batch(4, size=S, dtype=torch.float32)
    for rg in ("one", "stock"):
        grown = morph.grow(motifs.Residual(), "random", 2.0, seed=0, input_size=S, relu_grad=rg)
        path = tmp_path / f"r-{rg}.safetensors"
        morph.save(grown, path)
        back = morph.load(path, model_fn=motifs.Residual)
        assert activation.enabled(back) == (rg == "one")
        for m in (grown, back):
            m.train()
            F.cross_entropy(m(x), y).backward()
        for (k, a), b in zip(grown.named_parameters(), back.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), k


@pytest.mark.slow
def test_save_load_keeps_the_activation_and_strict_stock_load(tmp_path):
    half = morph.scale_width(timm.create_model("resnet10t", num_classes=5), 0.5, input_size=(3, 32, 32))
    x, y = _batch(4, dtype=torch.float32)
    for rg in ("one", "stock"):
        grown = morph.grow(half, "gradmax", 2.0, data=(x, y), seed=0, relu_grad=rg)
        path = tmp_path / f"g-{rg}.safetensors"
        morph.save(grown, path)
        back = morph.load(path)
        assert activation.enabled(back) == (rg == "one")
        stock = timm.create_model("resnet10t", num_classes=5)
        stock.load_state_dict(back.state_dict(), strict=True)
        assert set(stock.state_dict()) == set(grown.state_dict())
        for m in (grown, back):
            m.train()
            F.cross_entropy(m(x), y).backward()
        for (k, a), b in zip(grown.named_parameters(), back.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), k  # the same gradients: the substitution came back
    # the recipes' resume path: the method's activation on a rebuilt model of the grown shape
    fresh = timm.create_model("resnet10t", num_classes=5)
    assert activation.enabled(morph.growth.restore(fresh, "gradmax"))
    assert not activation.enabled(morph.growth.restore(fresh, "gradmax", relu_grad="stock"))


def test_a_bad_relu_grad_in_a_file_is_refused(tmp_path):
    import dataclasses

    from morph.info import set_info

    grown = morph.grow(motifs.Residual(), "random", 2.0, input_size=S)
    info = morph.get_info(grown)
    bad = dataclasses.replace(info, extra={**info.extra, "growth": {**info.extra["growth"], "relu_grad": "maybe"}})
    path = tmp_path / "bad.safetensors"
    morph.save(set_info(grown, bad), path)
    with pytest.raises(CheckpointError, match="relu_grad"):
        morph.load(path, model_fn=motifs.Residual)


# -- symmetry, eval mode, input size -------------------------------------------------------------------------

def test_net2net_even_split_keeps_replicas_uneven_split_parts_them():
    model = motifs.Residual().double()
    x, y = _batch(size=S)
    even = morph.grow(model, "net2net", 2.0, seed=0, input_size=S, split=0.0)
    uneven = morph.grow(model, "net2net", 2.0, seed=0, input_size=S)
    rows = _new_rows(even)
    before = {k: v.detach().clone() for k, v in uneven.state_dict().items() if k in rows}
    _train(even, x, y)
    _train(uneven, x, y)
    total, _, same = _stuck_rows(even, rows)
    assert same == total > 0  # Net2Net as published: every replica still a copy of its source
    assert _stuck_rows(uneven, rows, before)[2] == 0
    with pytest.raises(MorphError, match="split"):
        morph.grow(model, "net2net", 2.0, input_size=S, split=1.5)


def test_eval_mode_right_after_data_driven_growth():
    """Firefly changes the train-mode function; with the norm statistics re-estimated on its batches the
    eval-mode loss is the train-mode one (the stale identity statistics of new channels are not)."""
    torch.manual_seed(0)
    model = motifs.Residual().double()
    with torch.no_grad():
        _randomize_norms(model)
    x, y = _batch(16, size=S)

    def losses(m):
        out = {}
        for mode in ("train", "eval"):
            state = {k: v.clone() for k, v in m.state_dict().items()}
            m.train(mode == "train")
            with torch.no_grad():
                out[mode] = float(F.cross_entropy(m(x), y))
            m.load_state_dict(state)
        return out

    fresh = morph.grow(model, "firefly", 2.0, data=(x, y), seed=0, steps=10)
    stale = morph.grow(model, "firefly", 2.0, data=(x, y), seed=0, steps=10, bn_stats="keep")
    a, b = losses(fresh), losses(stale)
    assert a["train"] == pytest.approx(b["train"], rel=1e-12)  # the same step
    assert abs(a["eval"] - a["train"]) <= 0.02 * a["train"], a
    assert abs(b["eval"] - b["train"]) > 10 * abs(a["eval"] - a["train"]), (a, b)
    # with a second batch, Firefly fits the first and the statistics come from the second, which it did not fit
    x2, y2 = _batch(16, size=S, seed=5)
    two = morph.grow(model, "firefly", 2.0, data=[(x, y), (x2, y2)], seed=0, steps=10)
    two.train()
    with torch.no_grad():
        train2 = float(F.cross_entropy(two(x2), y2))
    two.eval()
    with torch.no_grad():
        assert abs(float(F.cross_entropy(two(x2), y2)) - train2) <= 0.02 * train2
    # GradMax keeps the function: statistics exact, not re-estimated (auto); eval = the small model's
    model.eval()
    g = morph.grow(model, "gradmax", 2.0, data=(x, y), seed=0).eval()
    with torch.no_grad():
        assert _relerr(model(x), g(x)) <= 1e-12
    assert morph.get_info(g).extra["growth"]["bn_stats"] == "auto"


def test_reestimate_norm_stats_is_the_batch_average():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    m[1].momentum = 0.3
    batches = [_batch(6, seed=s, size=(3, 8, 8)) for s in range(3)]
    assert reestimate_norm_stats(m, batches) == 3
    z = [m[0](x).detach() for x, _ in batches]
    mean = torch.stack([t.mean((0, 2, 3)) for t in z]).mean(0)
    var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in z]).mean(0)
    assert torch.allclose(m[1].running_mean, mean, rtol=1e-12) and torch.allclose(m[1].running_var, var, rtol=1e-12)
    assert m[1].momentum == 0.3 and int(m[1].num_batches_tracked) == 0 and m.training


def test_input_size_comes_from_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(4, 6, 12, 20)
    y = torch.randint(0, 3, (4,))
    grown = morph.grow(model, "gradmax", 2.0, data=(x, y), seed=0)
    assert morph.get_info(grown).input_size == (6, 12, 20)
    assert grown(x).shape == (4, 3)
    batches = iter([(x, y), (x, y)])  # an iterator is read once
    assert morph.grow(model, "firefly", 2.0, data=batches, seed=0, steps=1)(x).shape == (4, 3)


# -- registry ------------------------------------------------------------------------------------------------

def test_methods_declare_label_rows_cost_and_recipe_options():
    from morph.recipes.config import GROWTH_BASELINES, METHODS, GrowthConfig

    from morph.growth import baseline_methods, get_growth_method

    assert baseline_methods() == ["random", "net2net", "firefly", "gradmax"] == list(GROWTH_BASELINES)
    assert [METHODS[m] for m in GROWTH_BASELINES] == ["Random", "Net2Net", "Firefly", "GradMax"]
    cfg = GrowthConfig(firefly_steps=7)
    opts = {m: get_growth_method(m).recipe_options(cfg) for m in GROWTH_BASELINES}
    assert opts == {"random": {}, "net2net": {}, "firefly": {"steps": 7}, "gradmax": {}}
    fs, fg, n = 10.0, 40.0, 3
    cost = {m: get_growth_method(m)(**opts[m]).step_flops(fs, fg, n) for m in GROWTH_BASELINES}
    # Firefly: 7 Adam steps (forward + backward), a final forward, and the norm statistics' forward
    assert cost == {"random": 0.0, "net2net": 0.0, "firefly": (3 * 7 + 1 + 1) * fg * n, "gradmax": 3 * fs * n}
    assert get_growth_method("gradmax")(epsilon=0.1).step_flops(fs, fg, n) == 3 * fs * n + fg * n
    assert get_growth_method("firefly")(steps=7, bn_stats="keep").step_flops(fs, fg, n) == 22 * fg * n


# -- every method on every architecture ----------------------------------------------------------------------

def test_grown_models_train_fast():
    _check_arch("residual", size=S)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_grown_models_train(arch):
    _check_arch(arch, size=S if arch == "resnext_grouped" else X)  # torchvision's ResNeXt is 2048 wide at the end


# -- graph motifs where zero new neurons could not start (morph.growth.liveness) -------------------------------

def _first_update(model: nn.Module, x, y, against: str = "norm") -> float:
    """One SGD step: the largest update of a new row, relative to the mean norm of its layer's old rows
    (``against="norm"``) or to the largest update of an old row of its layer (``"update"``)."""
    rows = _new_rows(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if k in rows}
    _train(model, x, y, steps=1)
    sd, worst = model.state_dict(), 0.0
    for k, new in rows.items():
        d = (sd[k] - before[k]).flatten(1).double()
        ref = before[k].flatten(1)[~new].norm(dim=1).mean() if against == "norm" else d[~new].norm(dim=1).max()
        worst = max(worst, float(d[new].norm(dim=1).max() / ref))
    return worst


def _motif_check(factory, method: str, rules: bool = True, moved: dict | None = None,
                 size=S) -> tuple[float, tuple[int, int, int], float]:
    """Grow ``factory()`` (float64, trained-looking norms) with ``method``; returns (the largest relative error
    at growth, eval and train mode; (new rows, still zero, still replicas) after 3 SGD steps; the largest
    first-step update of a new row relative to its layer's old rows). ``rules=False``: without the rules of
    :mod:`morph.growth.liveness` (what morph did before them). ``moved``: filled with, per layer, the new rows
    that did not change in the 3 steps."""
    from unittest import mock

    torch.manual_seed(0)
    model = factory().double()
    with torch.no_grad():
        _randomize_norms(model)
    model.eval()
    x, y = _batch(size=size)
    patches = [] if rules else [mock.patch("morph.growth.plain.dead_products", return_value={}),
                                mock.patch("morph.growth.plain.chained_norms", return_value=[]),
                                mock.patch("morph.growth.plain.shuffled_inputs", return_value={}),
                                mock.patch("morph.growth.plain.split_products", return_value={}),
                                mock.patch("morph.growth.plain.constant_inputs", return_value={})]
    for p in patches:
        p.start()
    try:
        grown = morph.grow(model, method, 2.0, data=(x, y), seed=0)
    finally:
        for p in patches:
            p.stop()
    grown2 = copy.deepcopy(grown)
    grown2.growth_record = grown.growth_record  # a GraphModule's deepcopy drops the attribute
    err = 0.0
    for mode in (False, True):
        model.train(mode)
        grown.train(mode)
        with torch.no_grad():
            err = max(err, _relerr(model(x), grown(x)))
    rows = _new_rows(grown)
    before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in rows}
    _train(grown, x, y)
    if moved is not None:
        sd = grown.state_dict()
        moved.update({k: int(((sd[k] - before[k]).flatten(1)[new].norm(dim=1) == 0).sum()) for k, new in rows.items()})
    return err, _stuck_rows(grown, rows, before), _first_update(grown2, x, y)


@pytest.mark.parametrize("method", ["random", "gradmax"])
def test_a_product_of_two_new_channels_trains(method):
    """StarNet's ``relu6(f1(x)) * f2(x)``: with both factors' new neurons at zero, each factor's gradient is the
    other one's value (0): dead forever. One live factor keeps the product (and the function) at 0 and trains."""
    err, (total, zero, same), _ = _motif_check(motifs.StarGate, method)
    assert err <= 1e-6 and total > 0 and zero == 0 and same == 0, (err, total, zero, same)
    grown = morph.grow(motifs.StarGate(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
    assert grown.growth_liveness["live"] == {"blocks.0.f1": "mul", "blocks.1.f1": "mul_1"}  # behind the ReLU6
    f1, f2 = grown.get_submodule("blocks.0.f1").weight, grown.get_submodule("blocks.0.f2").weight
    with torch.no_grad():
        assert float(f1[24:].norm(dim=1).min()) > 0 and float(f2[24:].abs().max()) == 0
    err, (total, zero, _), _ = _motif_check(motifs.StarGate, method, rules=False)
    assert err <= 1e-6 and zero == 96  # before the rule: both factors' 2 x 2 x 24 new rows stay exactly zero


@pytest.mark.parametrize("method", ["random", "gradmax"])
def test_batchnorm_sums_in_series_train_stably(method):
    """RepVGG/MobileOne blocks sum a 3x3 conv-BN, a 1x1 conv-BN and an identity BatchNorm of the block's input:
    a zero channel's gradient passes one zero BatchNorm per block (gain weight/sqrt(eps) each). With the identity
    norms' new weight at new_gamma x sqrt(eps) (gain 0.1) the first update of a new row stays of the order of the
    old rows' norm."""
    err, (total, zero, same), first = _motif_check(motifs.RepBranches, method, size=(3, 8, 8))
    assert err <= 1e-6 and total > 0 and zero == 0 and same == 0, (err, total, zero, same)
    assert first <= 10, first
    grown = morph.grow(motifs.RepBranches(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
    # the identity norm of block 0 ends a series of 2 (the stem's norm, its conv): from block 1 on, series of 3+
    assert grown.growth_liveness["chained_norms"] == [f"blocks.{i}.identity" for i in range(1, 6)]
    bn = grown.get_submodule("blocks.1.identity")
    assert torch.allclose(bn.weight[8:], torch.full((8,), 0.1 * bn.eps ** 0.5), rtol=1e-6, atol=0)
    assert torch.equal(grown.get_submodule("blocks.1.bn3").weight[8:], torch.full((8,), 0.1))
    assert torch.equal(grown.get_submodule("blocks.0.identity").weight[8:], torch.full((8,), 0.1))
    _, _, first_before = _motif_check(motifs.RepBranches, method, rules=False, size=(3, 8, 8))
    assert first_before > 1e6  # before the rule: 31.6 per block, six blocks


@pytest.mark.parametrize("method", ["random", "gradmax"])
def test_a_layer_behind_a_channel_shuffle_trains(method):
    """ShuffleNet: the wider shuffle routes only new, zero channels into the first unit after a two-branch unit,
    so its zero rows get no gradient at the first step while the BatchNorm bias behind them does; where that bias
    turns negative the constant channel stays below the ReLU. Layers whose input is all zero at growth get live
    incoming weights (the function is the same either way: their input is zero), and every new row moves."""
    unmoved: dict = {}
    err, (total, zero, same), _ = _motif_check(motifs.ShuffleBN, method, moved=unmoved)
    assert total > 0 and zero == 0 and same == 0 and not any(unmoved.values()), (total, zero, same, unmoved)
    before: dict = {}
    err0, (_, zero0, _), _ = _motif_check(motifs.ShuffleBN, method, rules=False, moved=before)
    assert err == err0 > 0.1  # growth does not keep a channel shuffle's function, with or without the rule
    assert zero0 == before["branch.0.weight"] == 4  # without it: 4 of branch.0's 8 new rows dead
    grown = morph.grow(motifs.ShuffleBN(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
    assert grown.growth_liveness["live"] == {"branch.0": "reads a channel shuffle"}  # the others read old channels


def test_relu_power_gets_derivative_one_at_zero():
    """``relu(x) ** p`` (p > 1: StarReLU's square) under the mode: forward bit-identical to PyTorch's, derivative 1
    where the ReLU's input is exactly 0 (StarReLU's ``s``), ``p x^(p-1)`` elsewhere; other exponents untouched."""
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    forms = {"**": lambda r: r ** 2, "pow": lambda r: r.pow(3), "torch.pow": lambda r: torch.pow(r, 2.5),
             "square": lambda r: torch.square(r), "Tensor.square": lambda r: r.square()}
    p = {"**": 2.0, "pow": 3.0, "torch.pow": 2.5, "square": 2.0, "Tensor.square": 2.0}
    for name, f in forms.items():
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with activation._Mode():
            ya = f(torch.relu(a))
        yb = f(torch.relu(b))
        assert torch.equal(ya, yb), name
        ya.sum().backward()
        yb.sum().backward()
        assert a.grad[1] == 1 and b.grad[1] == 0 and a.grad[0] == 0, (name, a.grad)
        assert torch.allclose(a.grad[2:], p[name] * x[2:] ** (p[name] - 1), rtol=1e-12, atol=0), (name, a.grad)
        assert torch.equal(a.grad[2:], b.grad[2:]), name
    a = x.clone().requires_grad_()
    with activation._Mode():
        y = torch.relu(a) ** 0.5  # derivative infinite at 0: not a square-like kink, left alone
    assert type(y.grad_fn).__name__ == "PowBackward0"
    m = motifs.StarReLU(0.7, 0.2).double()
    activation.enable(m)
    a = x.clone().requires_grad_()
    m(a).sum().backward()
    assert float(a.grad[1]) == pytest.approx(0.7, rel=1e-6)  # StarReLU's f'(0) = s


@pytest.mark.parametrize("method", ["random", pytest.param("gradmax", marks=pytest.mark.slow)])
def test_starrelu_keeps_the_function_and_trains(method):
    """PoolFormer v2's StarReLU ``s * relu(x) ** 2 + b``: a new neuron with zero incoming weights outputs ``b``, not
    0, so its outgoing weights would change the function; and ``f'(0) = 0`` leaves it without gradient. Outgoing
    weights orthogonal to the constants (every output row and tap: a 3x3 consumer with zero padding too) keep the
    function; ``relu(x) ** 2`` with derivative 1 at 0 lets the new rows train."""
    err, (total, zero, same), _ = _motif_check(motifs.StarMlp, method)
    assert err <= 1e-6 and total > 0 and zero == 0 and same == 0, (err, total, zero, same)
    grown = morph.grow(motifs.StarMlp(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
    assert grown.growth_liveness["offsets"] == ["fc2.0", "fc2.1"]
    w = grown.get_submodule("fc2.1").weight.detach().double()
    assert float(w[:, 16:].sum(1).abs().max()) <= 1e-6 * float(w.abs().max())  # orthogonal to a constant, per tap
    err0, (_, zero0, _), _ = _motif_check(motifs.StarMlp, method, rules=False)
    assert err0 > 1e-2  # without the cancellation: b x the new outgoing weights
    from unittest import mock

    with mock.patch.dict(activation._POW_RULES, clear=True):  # PyTorch's derivative of relu(x) ** 2 in training
        _, (_, zero1, _), _ = _motif_check(motifs.StarMlp, method)
    assert zero0 == 0 and zero1 == 32  # then the 2 x 16 new rows of fc1 stay exactly zero


@pytest.mark.parametrize("method", ["random", pytest.param("gradmax", marks=pytest.mark.slow)])
def test_a_gate_split_from_one_layer_trains(method):
    """MambaOut: ``g, i, c = split(fc1(x))``, ``fc2(gelu(g) * cat(i, dwconv(c)))``: both factors of the product are
    new channels of one layer, zero at growth, each one's gradient the other's value. The new rows of fc1 in the
    ``g`` slice get live incoming weights (the product stays 0 with (i, c) at 0); all new rows train."""
    err, (total, zero, same), _ = _motif_check(motifs.GatedSplit, method)
    assert err <= 1e-6 and total > 0 and zero == 0 and same == 0, (err, total, zero, same)
    grown = morph.grow(motifs.GatedSplit(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
    assert grown.growth_liveness["live"] == {"fc1.0": "mul", "fc1.1": "mul_1"}
    w = grown.get_submodule("fc1.0").weight.detach()  # grown rows: g 24 (12 old, 12 new), i 16, c 8
    assert float(w[12:24].norm(dim=1).min()) > 0  # the g slice's new rows: live
    assert float(w[24 + 8:40].abs().max()) == 0 and float(w[44:].abs().max()) == 0  # i's and c's new rows: 0
    err0, (_, zero0, _), _ = _motif_check(motifs.GatedSplit, method, rules=False)
    assert err0 <= 1e-6 and zero0 == 2 * 24  # before: all 2 x 24 new rows of fc1 stay zero (the dwconv's new filters are random)


@pytest.mark.parametrize("method", ["random", *[pytest.param(m, marks=pytest.mark.slow) for m in ("gradmax", "net2net")]])
def test_weight_standardized_convs_keep_the_function_and_train(method):
    """NF-Nets' ``ScaledStdConv2d`` standardizes every filter over its fan-in: new input channels change each
    filter's mean and variance (and Net2Net's split replicas its mean). New entries at the filter's old mean,
    replicas splitting the deviation from it, and the gain taking the variance's change keep the function; new
    filters get gain new_gamma, like a BatchNorm channel of new neurons."""
    from unittest import mock

    err, (total, zero, same), _ = _motif_check(motifs.StdConvNet, method)
    assert err <= 1e-6 and total > 0 and zero == 0 and same == 0, (err, total, zero, same)
    with mock.patch("morph.growth.plain.PlainGrowth._restandardize"):
        err0, _, _ = _motif_check(motifs.StdConvNet, method)
    assert err0 > 1e-2, err0  # before: every filter re-standardized over the wider fan-in
    if method != "net2net":
        grown = morph.grow(motifs.StdConvNet(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0)
        conv = grown.get_submodule("conv2")
        assert torch.equal(conv.gain.detach()[16:].flatten(), torch.full((16,), 0.1))  # new filters: new_gamma


def test_liveness_rules_leave_residual_networks_alone():
    """ResNet (post-activation) and the recipes' pre-activation WRN have no product of new channels and no zero
    BatchNorms in series: what they get is unchanged (new_gamma, zero incoming weights)."""
    for arch in ("residual", "wrn10_1"):
        grown = morph.grow(ARCHS[arch](), "random", 2.0, seed=0, input_size=S)
        assert grown.growth_liveness == {"live": {}, "chained_norms": [], "offsets": []}, arch
    # Net2Net (no zero channels) and Firefly (epsilon > 0) never apply them
    for method in ("net2net", "firefly"):
        grown = morph.grow(motifs.RepBranches(), method, 2.0, data=_batch(size=S, dtype=torch.float32), seed=0,
                           **_opts(method))
        assert grown.growth_liveness == {"live": {}, "chained_norms": [], "offsets": []}, method


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["timm/starnet_s050", "timm/repvgg_a0", "timm/mobileone_s1",
                                  "torchvision/shufflenet_v2_x0_5", "timm/mambaout_femto", "timm/poolformerv2_s12"])
def test_the_zoo_models_of_the_liveness_rules_train(spec):
    """The coverage list's models behind each rule, at 32x32 in float64: the half (norms randomized) grown back
    with Random and GradMax keeps its function (not ShuffleNet's: a channel shuffle's is not kept) and every new
    row moves off zero in 3 SGD steps, the first moving none more than 1000x as far as the most-moved old row of
    its layer (no BatchNorm gains multiplied over blocks; MobileNet-like chains of two zero norms give 100-300x)."""
    torch.manual_seed(0)
    half = morph.scale_width(morph.build_model(spec), 0.5, input_size=X).double().eval()
    with torch.no_grad():
        _randomize_norms(half)
        for name, m in half.named_modules():  # StarReLU: f(0) = b, 0 at the stock init
            if name.endswith(".act") and isinstance(getattr(m, "bias", None), torch.Tensor) and hasattr(m, "scale"):
                m.bias.uniform_(-0.5, 0.5)
                m.scale.uniform_(0.5, 1.5)
    x, y = _batch(4, classes=1000)
    for method in ("random", "gradmax"):
        grown = morph.grow(half, method, 2.0, data=(x, y), seed=0)
        if "shufflenet" not in spec:
            for mode in (False, True):
                half.train(mode)
                grown.train(mode)
                with torch.no_grad():
                    err = _relerr(half(x), grown(x))
                assert err <= 1e-6, (spec, method, mode, err)
            half.eval()
        if "shufflenet" not in spec:  # the wider shuffle feeds old neurons zero channels too: their norms' gains
            g2 = copy.deepcopy(grown)  # multiply until the layout is fixed
            g2.growth_record = grown.growth_record  # a GraphModule's deepcopy drops the attribute
            first = _first_update(g2, x, y, "update")
            assert first <= 1e3, (spec, method, first)  # without the rules: 7e32 (mobileone_s1), 2e19 (repvgg_a0)
        rows = _new_rows(grown)
        before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in rows}
        _train(grown, x, y)
        assert all(bool(torch.isfinite(p).all()) for p in grown.parameters()), (spec, method)
        total, zero, same = _stuck_rows(grown, rows, before)
        assert total > 0 and zero == 0 and same == 0, (spec, method, total, zero, same)
