"""SuperWeights (morph.superweights): shared banks, nested blocks, NPAS steps, ensembles, metrics, files.

Exact tests of the invariants: a shared bank is one Parameter object; the parameter counts are predicted
before building; every layer's weight equals an independent float64 evaluation of the nested-block formula
and has its stock shape; bake loads ``strict=True`` into the stock model with the same outputs; the grouping
equals brute-force connected components; untying keeps outputs bit-identical and registers each new vector
once; save/load is bit-exact. The zoo sweep at three budgets is in the slow tier.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morph
from morph.errors import MorphError
from morph.superweights import (
    CoefficientGradients,
    WeightGradients,
    allocate,
    cluster_layout,
    connected_components,
    depth_bins,
    learn_clusters,
    min_budget,
    plan_sharing,
    superweight_layers,
    template_layers,
    untie,
)
from morph.superweights.build import initial_clusters, prepare
from morph.superweights.ensemble import SuperWeightEnsemble, anytime_subsets, bake_members, ensemble
from morph.superweights.metrics import EnsembleMetrics, diversity, ece, nll, top1

SIZE = (3, 32, 32)


def _tiny(name: str = "timm/test_resnet", classes: int = 10) -> nn.Module:
    return morph.build_model(name, num_classes=classes)


def _banks(model: nn.Module) -> dict[int, nn.Module]:
    return {id(b): b for _, m in superweight_layers(model) for b in m.mix.banks}


def _reference_weight(mix) -> torch.Tensor:
    """The nested-block formula evaluated independently, in float64, element by element per block."""
    env = mix.envelopes
    w = torch.zeros(env[-1], dtype=torch.float64)
    for lv, bank in enumerate(mix.banks):
        k = bank.num_templates
        t = bank.templates.detach().double().view(k, bank.piece)
        a = bank.coefficients[mix.coef[lv]].detach().double()
        flat = sum(a[i] * t[i] for i in range(k))
        if lv == 0:
            w[: env[0][0], : env[0][1]] = flat.view(env[0])
            continue
        prev, cur = env[lv - 1], env[lv]
        nc = prev[0] * (cur[1] - prev[1]) * math.prod(cur[2:])
        w[: prev[0], prev[1]: cur[1]] = flat[:nc].view(prev[0], cur[1] - prev[1], *cur[2:])
        w[prev[0]: cur[0], : cur[1]] = flat[nc:].view(cur[0] - prev[0], cur[1], *cur[2:])
    return w[: mix.shape[0], : mix.shape[1]]


# ---------------------------------------------------------------------------------------------- nested blocks


def test_cluster_layout_matches_the_official_probe():
    """Reference §1.2: WRN-28-[3,4,7] layers with 192/256/448 channels."""
    lay = cluster_layout([(448, 448, 3, 3), (192, 192, 3, 3), (256, 256, 3, 3)])
    assert lay.envelopes == ((192, 192, 3, 3), (256, 256, 3, 3), (448, 448, 3, 3))
    assert lay.pieces == (192 * 192 * 9, (192 * 64 + 64 * 256) * 9, (256 * 192 + 192 * 448) * 9)
    assert lay.min_size() == 448 * 448 * 9  # monotone chains cost exactly the largest layer
    assert [lay.level(s) for s in [(192, 192, 3, 3), (256, 256, 3, 3), (448, 448, 3, 3)]] == [0, 1, 2]


def test_cluster_layout_non_monotone_shapes_use_an_envelope():
    """Sorting by numel is not sorting by each dim: [64,256] and [256,64] nest in a [256,256] envelope."""
    lay = cluster_layout([(64, 256, 1, 1), (256, 64, 1, 1)])
    assert lay.envelopes == ((64, 256, 1, 1), (256, 256, 1, 1))
    assert lay.level((64, 256, 1, 1)) == 0 and lay.level((256, 64, 1, 1)) == 1
    assert lay.pieces == (64 * 256, 192 * 256)  # no new columns at level 1: only rows
    with pytest.raises(ValueError, match="kernel"):
        cluster_layout([(8, 8, 3, 3), (8, 8, 1, 1)])


def test_assembly_equals_float64_reference_and_stock_shapes():
    base = _tiny().double()
    model = morph.convert(base, budget=None, share="learned", clusters="bins", bins=2, templates=3, seed=0,
                          input_size=SIZE)
    stock = {n: tuple(m.weight.shape) for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    layers = superweight_layers(model)
    assert len(layers) >= 5 and any(m.mix.levels > 1 for _, m in layers)  # nested blocks are exercised
    from morph import native
    from morph.templates import grid_reference

    for path in ("default", "pytorch", "reference"):  # native kernels where built, _Grid, the CUDA path
        with native.disabled() if path != "default" else contextlib.nullcontext(), \
                mock.patch("morph.superweights.banks.generate", grid_reference) if path == "reference" \
                else contextlib.nullcontext():
            for name, m in layers:
                w = m.weight
                assert tuple(w.shape) == stock[name]
                torch.testing.assert_close(w.detach(), _reference_weight(m.mix), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shapes", [
    [(3, 5, 3, 3), (6, 4, 3, 3), (2, 2, 3, 3)],  # non-monotone: crops and a block clipped away
    [(4, 4, 1, 1), (8, 4, 1, 1), (8, 8, 1, 1)],  # a chain with only rows or only columns at a level
    [(5, 7), (9, 3), (9, 7)],                    # linear
])
def test_nested_blocks_forward_and_gradients(shapes):
    """Every layer of a cluster: the weight equals the float64 reference, and the in-place nested path's
    gradients (templates and coefficients) equal central differences in float64."""
    from morph.superweights.banks import SharedBank, SuperWeightMixing

    lay = cluster_layout(shapes)
    g = torch.Generator().manual_seed(0)
    banks = [SharedBank(torch.randn(2 * p, generator=g, dtype=torch.float64), p,
                        torch.randn(len(shapes), 2, generator=g, dtype=torch.float64), 0, w)
             for w, p in enumerate(lay.pieces)]
    for i, shp in enumerate(shapes):
        lv = lay.level(shp)
        mix = SuperWeightMixing(banks[: lv + 1], [i] * (lv + 1), lay.envelopes[: lv + 1], shp)
        w = mix()
        assert tuple(w.shape) == shp and w.is_contiguous()
        torch.testing.assert_close(w.detach(), _reference_weight(mix), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(w.detach(), mix._concatenated().detach(), rtol=1e-14, atol=1e-14)
        params = [b.templates for b in banks[: lv + 1]] + [mix.coefficient(j) for j in range(lv + 1)]

        # central differences against the analytic gradient of <W, seed>
        seed = torch.randn(shp, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((mix() * seed).sum(), params)
        for p, gr in zip(params, grads, strict=True):
            num = torch.zeros_like(p)
            for j in range(p.numel()):
                with torch.no_grad():
                    p.view(-1)[j] += 1e-6
                    up = float((mix() * seed).sum())
                    p.view(-1)[j] -= 2e-6
                    down = float((mix() * seed).sum())
                    p.view(-1)[j] += 1e-6
                num.view(-1)[j] = (up - down) / 2e-6
            torch.testing.assert_close(gr, num, rtol=1e-6, atol=1e-8)


def test_shared_banks_are_single_parameters_and_counts_are_predicted():
    base = _tiny()
    copy, cplan = prepare(base, 1.0, SIZE)
    layers = [((0, n), k, s) for n, k, s in template_layers(copy, cplan)]
    shapes = {r: s for r, _, s in layers}
    clusters = initial_clusters(layers, "bins", 4)
    floor = min_budget([[shapes[r] for r in c] for c in clusters])
    budget = floor + floor // 3
    plan = plan_sharing(clusters, shapes, budget, tie=False)  # decided before any tensor is made
    other = sum(p.numel() for n, p in copy.named_parameters() if n.removesuffix(".weight") not in
                {r[1] for r in shapes})
    model = morph.convert(base, budget=budget, share="learned", seed=1, input_size=SIZE)
    banks = _banks(model)
    assert sum(b.templates.numel() for b in banks.values()) == plan.template_params <= budget
    assert budget - plan.template_params < max(plan.allocation.pieces)  # nothing else would have fitted
    assert sum(p.numel() for p in model.parameters()) == plan.template_params + plan.coefficient_params + other
    assert morph.get_info(model).extra["superweights"]["template_params"] == plan.template_params
    # every layer using a bank holds that very object, and its templates are one Parameter
    users: dict[int, list[str]] = {}
    for name, m in superweight_layers(model):
        for b in m.mix.banks:
            users.setdefault(id(b), []).append(name)
            assert b.templates is banks[id(b)].templates
    assert max(len(u) for u in users.values()) > 1
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    # gradients of a shared bank are the sum over its layers
    model(torch.randn(2, *SIZE)).sum().backward()
    assert all(b.templates.grad is not None for b in banks.values())


def test_budget_floor_and_mode_errors():
    base = _tiny()
    with pytest.raises(MorphError, match="below the minimum"):
        morph.convert(base, budget=1000, share="learned", input_size=SIZE)
    with pytest.raises(MorphError, match="not consecutive"):
        morph.convert(base, budget=10**6, share="consecutive", input_size=SIZE)
    with pytest.raises(MorphError, match="budget must be"):
        morph.convert(base, budget=-5, share="learned", input_size=SIZE)


@pytest.mark.parametrize("name", ["timm/test_resnet", "timm/test_efficientnet", "timm/test_byobnet"])
def test_bake_loads_strict_into_the_stock_model(name):
    base = _tiny(name)
    copy, cplan = prepare(base, 1.0, SIZE)
    layers = [((0, n), k, s) for n, k, s in template_layers(copy, cplan)]
    shapes = {r: s for r, _, s in layers}
    floor = max(min_budget([[shapes[r] for r in c] for c in initial_clusters(layers, mode, 4)])
                for mode in ("layer", "bins"))
    for share, budget in (("learned", None), ("learned", floor), ("none", floor)):
        model = morph.convert(base, budget=budget, share=share, templates=2, seed=3, input_size=SIZE)
        plain = morph.bake(model)
        stock = _tiny(name)
        stock.load_state_dict(plain.state_dict(), strict=True)
        x = torch.randn(2, *SIZE)
        model.eval()
        stock.eval()
        with torch.no_grad():
            torch.testing.assert_close(stock(x), model(x), rtol=0, atol=0)


def test_allocate_follows_the_official_rule():
    # bank A: one piece, 10 values; bank B: 3 pieces of one shape (one level), 4 values
    shapes = [[(10, 1)], [(2, 2), (2, 2), (2, 2)]]
    a = allocate(shapes, 14)
    assert a.templates == (1, 1) and a.template_params == 14
    a = allocate(shapes, 22)  # B serves 3 > 1 and 3 > 2 pieces: two more templates first; A does not fit then
    assert a.templates == (1, 3) and a.template_params == 22
    a = allocate(shapes, 34)  # then round robin: A +1 (20+12 = 32), B cannot take 4 more (2 left)
    assert a.templates == (2, 3) and a.template_params == 32
    a = allocate(shapes, 10**9)
    assert a.templates == (8, 8)
    assert allocate(shapes, None, templates=3).templates == (3, 3)
    with pytest.raises(MorphError, match="below the minimum 14"):
        allocate(shapes, 13)


# ---------------------------------------------------------------------------------------------- NPAS


def _brute_components(sim: torch.Tensor, thr: float) -> list[list[int]]:
    n = sim.shape[0]
    reach = [[i == j or bool(sim[min(i, j), max(i, j)] > thr) for j in range(n)] for i in range(n)]
    for k in range(n):  # transitive closure (Floyd-Warshall)
        for i in range(n):
            for j in range(n):
                reach[i][j] = reach[i][j] or (reach[i][k] and reach[k][j])
    comps = {tuple(j for j in range(n) if reach[i][j]) for i in range(n)}
    return sorted((list(c) for c in comps), key=lambda c: c[0])


def test_grouping_equals_brute_force_connected_components():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = 1 + trial % 12
        s = torch.rand(n, n, generator=gen, dtype=torch.float64) * 2 - 1
        s = (s + s.T) / 2
        if trial % 3 == 0:  # ties
            s = (s * 4).round() / 4
        for thr in (-0.5, 0.0, 0.1, 0.25, 0.5, 0.9):
            assert connected_components(s, thr) == _brute_components(s, thr), (trial, thr)


def test_grouping_is_transitive_where_the_official_code_is_not():
    """Reference §1.4: A-B 0.9, C-D 0.8, B-C 0.5, eps 0.1: Algorithm 1 gives one group."""
    s = torch.zeros(4, 4, dtype=torch.float64)
    s[0, 1], s[2, 3], s[1, 2] = 0.9, 0.8, 0.5
    assert connected_components(s, 0.1) == [[0, 1, 2, 3]]
    assert connected_components(s, 0.6) == [[0, 1], [2, 3]]


def test_depth_bins_as_the_official_code():
    """WRN-28: 3 1x1 shortcuts form one bin; 25 3x3 layers form 4 bins of 7, 6, 6, 6 (reference §1.3)."""
    layers = [((0, f"c{i}"), (4, (3, 3), False), (16, 16, 3, 3)) for i in range(25)]
    layers += [((0, f"s{i}"), (4, (1, 1), False), (16, 16, 1, 1)) for i in range(3)]
    bins = depth_bins(layers, 4)
    assert [len(b) for b in bins] == [7, 6, 6, 6, 3]
    # a shallower member cuts its own layers into the same number of bins, joining them position-wise
    layers += [((1, f"d{i}"), (4, (3, 3), False), (8, 8, 3, 3)) for i in range(13)]
    bins = depth_bins(layers, 4)
    assert [sum(1 for r in b if r[0] == 1) for b in bins] == [4, 3, 3, 3, 0]


def test_learn_clusters_lowers_tau_until_the_budget_fits():
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(4, 4, 3, 3, generator=g) for _ in range(2)]
    grads, shapes = {}, {}
    for i in range(6):  # two families of similar gradients, and a family member of larger shape
        shp = (4, 4, 3, 3) if i != 5 else (8, 4, 3, 3)
        gr = torch.zeros(shp, dtype=torch.float64)
        gr[:4] = base[i % 2] + 0.05 * torch.randn(4, 4, 3, 3, generator=g)
        grads[(0, f"l{i}")], shapes[(0, f"l{i}")] = gr, shp
    initial = [[(0, f"l{i}") for i in range(6)]]
    free, tau = learn_clusters(initial, grads, shapes, None, tau=0.5)
    assert tau == 0.5 and sorted(len(c) for c in free) == [3, 3]
    floor_two = min_budget([[shapes[r] for r in c] for c in free])
    one = min_budget([[shapes[r] for r in initial[0]]])
    assert one < floor_two
    tight, tau2 = learn_clusters(initial, grads, shapes, one, tau=0.5)
    assert tight == [sorted(initial[0])] and tau2 < 0.5
    assert min_budget([[shapes[r] for r in c] for c in tight]) <= one
    with pytest.raises(MorphError, match="below"):
        learn_clusters(initial, grads, shapes, one - 1)
    with pytest.raises(MorphError, match="no weight gradient"):
        learn_clusters(initial, {}, shapes, None)


def test_weight_gradients_sum_over_batches():
    model = morph.convert(_tiny().double(), share="learned", seed=0, input_size=SIZE)
    plain = morph.bake(model)  # the same function with plain weights: their .grad is dL/dW, independently
    xs = [torch.randn(2, *SIZE, dtype=torch.float64) for _ in range(3)]
    expect: dict[str, torch.Tensor] = {}
    names = [n for n, _ in superweight_layers(model)]
    for x in xs:
        plain.zero_grad()
        plain(x).square().sum().backward()
        for n in names:
            gr = plain.get_submodule(n).weight.grad.clone()
            expect[n] = expect[n] + gr if n in expect else gr
    with WeightGradients(model) as wg:
        for x in xs:
            model.zero_grad()
            model(x).square().sum().backward()
            wg.step()
    assert wg.batches == 3 and {r[1] for r in wg.grads} == set(expect) | {"fc"}  # the head: plain, from .grad
    for n in names:
        torch.testing.assert_close(wg.grads[(0, n)], expect[n], rtol=1e-10, atol=1e-12)
    # a plain model: the same sums from .grad
    with WeightGradients(plain) as pg:
        for x in xs:
            plain.zero_grad()
            plain(x).square().sum().backward()
            pg.step()
    for n in names:
        torch.testing.assert_close(pg.grads[(0, n)], expect[n], rtol=1e-10, atol=1e-12)


def _tied_model(seed: int = 0):
    return morph.convert(_tiny(), share="learned", tie=True, templates=3, seed=seed, input_size=SIZE)


def test_untie_keeps_outputs_bit_identical_and_registers_each_vector_once():
    model = _tied_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, *SIZE)
    model(x).logsumexp(1).sum().backward()
    opt.step()  # momentum buffers exist
    with CoefficientGradients(model) as cg:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(4, *SIZE)).logsumexp(1).sum().backward()
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    before = [p for g in opt.param_groups for p in g["params"]]
    new = untie(model, cg.grads, beta=0.5, optimizer=opt)
    assert new, "random gradients must split some tied vectors at beta 0.5"
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    after = [p for g in opt.param_groups for p in g["params"]]
    assert len(after) == len(before) + len(new) and len({id(p) for p in after}) == len(after)
    assert {id(p) for p in after} == {id(p) for p in model.parameters()}
    for p in new:
        assert not any(p.data_ptr() == q.data_ptr() for q in before)  # no aliased storage
        assert "momentum_buffer" in opt.state[p]
    # an untie at beta above 1 changes nothing more; at -1 nothing splits either (all similar)
    assert untie(model, cg.grads, beta=-2.0, optimizer=opt) == []
    model.train()
    model.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(p.grad is not None for p in new if p.requires_grad)


def test_untied_model_saves_loads_bit_exact_and_keeps_the_sharing(tmp_path):
    """Kill and resume: the file records which pieces share a coefficient vector."""
    model = _tied_model(2)
    with CoefficientGradients(model) as cg:
        model(torch.randn(4, *SIZE)).logsumexp(1).sum().backward()
    untie(model, cg.grads, beta=0.3)
    path = tmp_path / "m.safetensors"
    morph.save(model, path)
    back = morph.load(path)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta = {n: (m.mix.coef, [id(m.mix.coefficient(i)) for i in range(m.mix.levels)]) for n, m in superweight_layers(model)}
    tb = {n: (m.mix.coef, [id(m.mix.coefficient(i)) for i in range(m.mix.levels)]) for n, m in superweight_layers(back)}
    assert {n: v[0] for n, v in ta.items()} == {n: v[0] for n, v in tb.items()}

    def tying(t):  # which layers share each vector, as a partition
        groups: dict[int, list] = {}
        for n, (_, ids) in t.items():
            for lv, i in enumerate(ids):
                groups.setdefault(i, []).append((n, lv))
        return sorted(sorted(g) for g in groups.values())

    assert tying(ta) == tying(tb)
    x = torch.randn(2, *SIZE)
    model.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


# ---------------------------------------------------------------------------------------------- ensembles


def _ensemble_round_trip(tmp_path, bases, widths):
    ens = ensemble(bases, widths=widths, clusters="bins", seed=0, input_size=SIZE)
    assert isinstance(ens, SuperWeightEnsemble)
    shared = [b for b in _banks(ens).values()]
    users = {id(b): {m.mix.ref[0] for _, m in superweight_layers(ens) if b in list(m.mix.banks)} for b in shared}
    assert any(len(u) > 1 for u in users.values())  # a bank serves several members
    norms = [{id(m) for m in mem.modules() if isinstance(m, nn.BatchNorm2d)} for mem in ens.members]
    assert not norms[0] & norms[1]  # BatchNorm per member
    x, y = torch.randn(3, *SIZE), torch.tensor([1, 2, 3])
    logits = ens(x)
    assert logits.shape == (len(bases), 3, 10)
    torch.testing.assert_close(ens.loss(logits, y), sum(F.cross_entropy(lg, y) for lg in logits))
    ens.eval()
    with torch.no_grad():
        torch.testing.assert_close(ens.predict(x), torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0))
        y0 = ens(x)
    path = tmp_path / "e.safetensors"
    morph.save(ens, path)
    back = morph.load(path)
    back.eval()
    sa, sb = ens.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(back(x), y0)
    # each member bakes to its stock architecture at its width
    for i, (plain, base, w) in enumerate(zip(bake_members(ens), bases, widths, strict=True)):
        stock = morph.scale_width(base, w, input_size=SIZE)
        stock.load_state_dict(plain.state_dict(), strict=True)
        stock.eval()
        with torch.no_grad():
            assert torch.equal(stock(x), y0[i])
    with pytest.raises(MorphError, match="bake_members"):
        morph.bake(ens)


def test_ensemble_members_share_templates_and_round_trip(tmp_path):
    base = _tiny()
    _ensemble_round_trip(tmp_path, [base, base], [1.0, 0.5])


@pytest.mark.slow
def test_heterogeneous_ensemble_round_trip(tmp_path):
    """Members of different depths (test_resnet, test_byobnet) and widths."""
    _ensemble_round_trip(tmp_path, [_tiny(), _tiny(), _tiny("timm/test_byobnet")], [1.0, 0.5, 0.75])


def test_anytime_subsets_are_ordered_by_flops():
    ens = ensemble([_tiny(), _tiny()], widths=[1.0, 0.5], clusters="layer", seed=0, input_size=SIZE)
    subs = anytime_subsets(ens, member_flops=[10.0, 3.0])
    assert subs == [((1,), 3.0), ((0,), 10.0), ((0, 1), 13.0)]
    real = anytime_subsets(ens, SIZE)
    assert [s for s, _ in real] == [(1,), (0,), (0, 1)]


def test_metrics_equal_an_independent_float64_computation():
    rng = random.Random(0)
    m, n, c = 3, 200, 5
    logits = torch.randn(m, n, c, dtype=torch.float64) * 3
    y = torch.tensor([rng.randrange(c) for _ in range(n)])
    probs = logits.softmax(-1)
    mean = probs.mean(0)
    acc = sum(1 for i in range(n) if max(range(c), key=lambda k: mean[i, k]) == y[i]) / n
    assert top1(mean, y) == pytest.approx(acc, abs=1e-15)
    assert nll(mean, y) == pytest.approx(-sum(math.log(mean[i, y[i]]) for i in range(n)) / n, rel=1e-12)
    bins: dict[int, list] = {}
    for i in range(n):
        conf = float(mean[i].max())
        b = min(14, max(0, math.ceil(conf * 15) - 1))
        bins.setdefault(b, []).append((conf, int(mean[i].argmax()) == int(y[i])))
    want = sum(len(v) / n * abs(sum(ok for _, ok in v) / len(v) - sum(cf for cf, _ in v) / len(v)) for v in bins.values())
    assert ece(mean, y) == pytest.approx(want, rel=1e-12, abs=1e-15)
    preds = [[int(probs[j, i].argmax()) for i in range(n)] for j in range(m)]
    dis = sum(sum(a != b for a, b in zip(preds[i], preds[j], strict=True)) / n
              for i, j in itertools.combinations(range(m), 2)) / 3
    err = sum(sum(p != int(t) for p, t in zip(preds[j], y, strict=True)) / n for j in range(m)) / m
    assert diversity(list(probs), y) == pytest.approx(dis / err, rel=1e-12)
    acc_m = EnsembleMetrics()
    acc_m.update(logits[:, :120], y[:120])
    acc_m.update(logits[:, 120:], y[120:])
    out = acc_m.compute(subsets=[(0,), (0, 2)])
    assert out["n"] == n and out["ensemble"]["top1"] == pytest.approx(acc)
    assert out["members"][1]["nll"] == pytest.approx(nll(probs[1], y))
    assert out["subsets"][1]["ece"] == pytest.approx(ece(probs[[0, 2]].mean(0), y))


# ---------------------------------------------------------------------------------------------- the zoo


def _zoo_specs() -> list[str]:
    from zoo_list import TIMM_REFUSED, ci_specs

    return [s for s in ci_specs() if s not in TIMM_REFUSED]


@pytest.mark.slow
@pytest.mark.parametrize("spec", _zoo_specs())
def test_zoo_nested_blocks_at_three_budgets(spec, tmp_path):
    """Every layer gets its stock shape, the template count is the one predicted before building and fits the
    budget, bake loads ``strict=True`` into the stock model and computes the same outputs, and save/load is
    bit-exact, at the least budget, halfway, and the stock layers' size (float64, tests/zoo_list.py inputs)."""
    from zoo_list import spec_input_size

    size = spec_input_size(spec)
    base = morph.build_model(spec).double().eval()
    cplan = morph.analyze(base, size)
    layers = [((0, n), k, s) for n, k, s in template_layers(base, cplan)]
    shapes = {r: s for r, _, s in layers}
    clusters = initial_clusters(layers, "bins", 4)
    floor = min_budget([[shapes[r] for r in c] for c in clusters])
    stock_size = sum(math.prod(s) for s in shapes.values())
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    top = max(stock_size, floor)  # envelopes of non-monotone shapes can cost more than the stock layers
    for budget in (floor, (floor + top) // 2, top):
        predicted = plan_sharing(clusters, shapes, budget).template_params
        model = morph.convert(base, budget=budget, share="learned", seed=0, input_size=size, plan=cplan).eval()
        for name, m in superweight_layers(model):
            assert tuple(m.weight.shape) == shapes[(0, name)], name
        assert len(superweight_layers(model)) == len(shapes)
        assert sum(b.templates.numel() for b in _banks(model).values()) == predicted <= budget
        stock = morph.build_model(spec).double().eval()
        stock.load_state_dict(morph.bake(model).state_dict(), strict=True)
        with torch.no_grad():
            y = model(x)
            torch.testing.assert_close(stock(x), y, rtol=1e-12, atol=1e-12)
    # files hold the model in its own dtype; morph.load rebuilds in float32: round-trip a float32 one
    model = morph.convert(morph.build_model(spec), budget=floor, share="learned", seed=1, input_size=size,
                          plan=cplan).eval()
    morph.save(model, tmp_path / "m.safetensors")
    back = morph.load(tmp_path / "m.safetensors").eval()
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(back(x.float()), model(x.float()))


def test_search_learns_clusters_under_the_budget():
    from morph.superweights.learn import search

    base = _tiny()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    copy, cplan = prepare(base, 1.0, SIZE)
    layers = [((0, n), k, s) for n, k, s in template_layers(copy, cplan)]
    shapes = {r: s for r, _, s in layers}
    per_layer = min_budget([[s] for s in shapes.values()])
    model, report = search(base, per_layer, data, warmup_steps=2, grad_batches=2, tau=0.99, seed=0,
                           input_size=SIZE)
    assert report["grad_batches"] == 2 and report["warmup_steps"] == 2
    assert report["template_params"] <= per_layer and report["min_budget"] <= per_layer
    learned = {tuple(sorted(c)) for c in report["clusters"]}
    assert learned == {tuple(sorted(m.mix.ref[1] for _, m in superweight_layers(model) if m.mix.banks[0].cluster == i))
                       for i in range(len(report["clusters"]))}
    # every learned cluster lies inside one initial cluster
    initial = [set(c) for c in report["initial_clusters"]]
    assert all(any(set(c) <= b for b in initial) for c in report["clusters"])
    assert morph.get_info(model).extra["superweights"]["tau"] == report["tau"]


def test_cli_convert_budget_and_inspect(tmp_path):
    import json

    from morph.cli.convert import parse_budget
    from morph.cli.main import app
    from typer.testing import CliRunner

    assert parse_budget("2M") == 2_000_000 and parse_budget("500k") == 500_000 and parse_budget("1.5e6") == 1_500_000
    runner = CliRunner()
    out = tmp_path / "s.safetensors"
    r = runner.invoke(app, ["convert", "timm/test_resnet", "--share", "learned", "--budget", "250K", "--bins", "2",
                            "--input-size", "3,32,32", "--num-classes", "10", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["kind"] == "shared" and s["width"] == 1.0 and s["verified"]["ok"]
    assert s["superweights"]["budget"] == 250_000 and s["superweights"]["template_params"] <= 250_000
    r = runner.invoke(app, ["inspect", str(out), "--no-flops", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["superweights"]
    assert d["template_params"] == s["superweights"]["template_params"]
    assert sum(b["template_params"] for b in d["banks"]) == d["template_params"]
    assert sum(len(c["layers"]) for c in d["clusters"]) == s["template_layers"]
    r = runner.invoke(app, ["inspect", str(out), "--no-flops"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "shared template banks" in r.stdout and "budget 250,000" in r.stdout, r.output
    r = runner.invoke(app, ["convert", "timm/test_resnet", "--share", "learned", "--budget", "10",
                            "--input-size", "3,32,32", "-o", str(tmp_path / "t.safetensors")])
    assert r.exit_code == 2 and r.stderr.startswith("error: budget 10 is below the minimum")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "t.safetensors").exists()


@pytest.mark.slow
def test_ensemble_learned_clusters_attach_members_to_member_zero():
    base = _tiny()
    warm = ensemble([base, base], widths=[1.0, 0.5], clusters="bins", bins=2, tie=True, seed=0, input_size=SIZE)
    rec = morph.get_info(warm).extra["superweights"]
    initial = [[(m, n) for m, n in c] for c in rec["clusters"]]
    with WeightGradients(warm, members=warm.members) as wg:
        for _ in range(2):
            warm.zero_grad()
            warm.loss(warm(torch.randn(4, *SIZE)), torch.randint(0, 10, (4,))).backward()
            wg.step()
    shapes = {m.mix.ref: m.mix.shape for _, m in superweight_layers(warm)}
    clusters, _ = learn_clusters(initial, wg.grads, shapes, None, tau=0.3)
    for c in clusters:  # every cluster is led by member-0 layers; member 1 only attaches
        assert c[0][0] == 0
    assert sorted(r for c in clusters for r in c) == sorted(shapes)
    ens = ensemble([base, base], widths=[1.0, 0.5], clusters=clusters, seed=1, input_size=SIZE)
    assert morph.get_info(ens).extra["superweights"]["clusters"] == [[list(r) for r in c] for c in clusters]
    assert ens(torch.randn(2, *SIZE)).shape == (2, 2, 10)


def test_flops_forward_equals_the_stock_model_and_generation_is_counted():
    model = morph.convert(_tiny(), share="learned", bins=2, templates=2, seed=0, input_size=SIZE)
    assert any(m.mix.levels > 1 for _, m in superweight_layers(model))
    rep = morph.flops(model, SIZE, batch_size=1)
    stock = morph.flops(morph.bake(model), SIZE)
    assert rep.forward == pytest.approx(stock.forward, rel=1e-9)
    assert rep.generation == sum(b.templates.numel() for _, m in superweight_layers(model) for b in m.mix.banks)
