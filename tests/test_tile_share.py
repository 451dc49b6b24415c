"""benchmarks/tile_share.py: the share of the learned template change that MixtureGrowth's new tiles carry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from morph.recipes.models import wrn

import morph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tile_share import templates_of, tile_shares  # noqa: E402


def halves():
    torch.manual_seed(0)
    target = wrn(10, 1, num_classes=10)
    return [morph.convert(target, width=0.5, templates=2, seed=s, input_size=(3, 16, 16)) for s in (1, 2)]


def learn(model, gen):
    """Template updates as SGD makes them with fixed coefficients: dT_k = c_k * G, one G per layer."""
    from morph.templates import mixed_layers

    with torch.no_grad():
        for _, mod in mixed_layers(model):
            t = mod.mix.banks[0].templates
            g = torch.randn(t.shape[1:], generator=gen, dtype=torch.float64)
            t += torch.einsum("k,...->k...", mod.mix.coefficients[0].double(), g).to(t)


@pytest.mark.slow  # 5 s on the loaded machine
@pytest.mark.parametrize("growth", ["vertical", "horizontal"])
def test_share_of_the_learned_change(growth):
    a, b = halves()
    start = {0: templates_of(a), 1: templates_of(b)}
    gen = torch.Generator().manual_seed(3)
    learn(a, gen)
    learn(b, gen)
    # orthogonal new coefficients (K = 2) are orthogonal to the one trained vector: they carry none of c * G
    ortho = tile_shares(morph.fuse(a, b, growth=growth, init="orthogonal", seed=0), start)
    assert ortho and all(abs(v) < 1e-6 for r in ortho.values() for v in r["share"])
    assert all(v > 0 for r in ortho.values() for v in r["magnitude"])  # not a zero tile: only none of what was learned
    zero = tile_shares(morph.fuse(a, b, growth=growth, init="zero", seed=0), start)
    assert all(v == 0.0 for r in zero.values() for v in r["share"] + r["magnitude"])
    # a copy of the diagonal tile's vector (1% noise) carries all of it, at the same size
    copy = tile_shares(morph.fuse(a, b, growth=growth, init="copy", seed=0), start)
    assert all(abs(v - 1) < 0.05 for r in copy.values() for v in r["share"] + r["magnitude"])
    # random coefficients: against the definition computed directly in float64
    fused = morph.fuse(a, b, growth=growth, init="random", seed=0)
    got = tile_shares(fused, start)
    from morph.templates import mixed_layers

    for name, mod in mixed_layers(fused):
        if name not in got:
            continue
        c = mod.mix.coefficients.detach().double()
        tb = list(mod.mix.tile_banks)
        for i, t in enumerate((1, 2)):
            bank = tb[t]
            old = 0 if bank == tb[0] else 3
            d = mod.mix.banks[bank].templates.detach().double() - start[0 if bank == tb[0] else 1][name].double()
            share = (c[t][:, None] * d.flatten(1)).sum(0).norm() / (c[old][:, None] * d.flatten(1)).sum(0).norm()
            assert got[name]["share"][i] == pytest.approx(float(share), rel=1e-12)
