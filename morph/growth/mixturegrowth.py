"""``mixturegrowth``: template-mixing models grow by tiling (:mod:`morph.fuse`), through the same seam.

Without ``other`` it is MixtureGrowth without fusion (``morph.fuse.grow``: every new tile mixes the
model's own templates with new coefficients); with ``other`` (a second half) it is the fusion
(``morph.fuse``). Tiling doubles the width: ``width`` must be 2. The coefficient rules of the new tiles
(``init``) live in :data:`morph.fuse.COEFFICIENT_INITS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..errors import MorphError
from .registry import GrowthMethod, register_growth

__all__ = ["MixtureGrowth", "COEFFICIENT_INITS", "register_coefficient_init"]

CoefficientInit = Callable[[list[torch.Tensor], torch.Tensor, int, torch.Generator, "float | None"], torch.Tensor]
"""``rule(existing, same_tile, k, gen, noise)``: the coefficient vector of a new tile mixing a bank of ``k``
templates whose vectors (every layer's) are ``existing``; ``same_tile``: the diagonal tile's vector there."""

COEFFICIENT_INITS: dict[str, CoefficientInit] = {}


def register_coefficient_init(name: str) -> Callable[[CoefficientInit], CoefficientInit]:
    """File a rule for the coefficients of new tiles under ``name`` (``morph fuse --init NAME``)."""

    def deco(fn: CoefficientInit) -> CoefficientInit:
        COEFFICIENT_INITS[name] = fn
        return fn

    return deco


@register_coefficient_init("orthogonal")
def _orthogonal(existing, same_tile, k, gen, noise):
    """Paper §3.3: orthogonal to every vector that mixes the same templates, scaled to their mean norm."""
    ex = torch.stack(existing).double()
    _, s, vh = torch.linalg.svd(ex, full_matrices=True)
    rank = int((s > 1e-10 * max(float(s.max()), 1e-30)).sum())
    comp = vh[rank:] if rank < k else vh[-1:]
    w = torch.randn(comp.shape[0], generator=gen).double()
    v = w @ comp
    v = v / v.norm().clamp_min(1e-30) * ex.norm(dim=1).mean()
    return v.to(same_tile.dtype)


@register_coefficient_init("orthogonal-official")
def _orthogonal_official(existing, same_tile, k, gen, noise):
    """Official code: the least-singular direction of the stacked vectors, x c = 1."""
    _, _, vh = torch.linalg.svd(torch.stack(existing).double(), full_matrices=True)
    return vh[-1].to(same_tile.dtype)


@register_coefficient_init("random")
def _random(existing, same_tile, k, gen, noise):
    """Paper: standard normal."""
    return torch.randn(k, generator=gen).to(same_tile.dtype)


@register_coefficient_init("random-uniform")
def _random_uniform(existing, same_tile, k, gen, noise):
    """Official: U[0, 1) x c, c = 1."""
    return torch.rand(k, generator=gen).to(same_tile.dtype)


@register_coefficient_init("copy")
def _copy(existing, same_tile, k, gen, noise):
    """The diagonal tile's vector plus noise (paper: "small noise", 1% of its norm by default; official: norm 1
    in a U[0, 1) direction)."""
    n = torch.rand(k, generator=gen).to(same_tile.dtype)
    scale = 0.01 * float(same_tile.norm()) if noise is None else noise
    return same_tile + n / n.norm().clamp_min(1e-12) * scale


@register_coefficient_init("zero")
def _zero(existing, same_tile, k, gen, noise):
    """Block-diagonal: a fusion computes the average of the halves, growth alone the half's function."""
    return torch.zeros(k, dtype=same_tile.dtype)


@register_growth
class MixtureGrowth(GrowthMethod):
    name = "mixturegrowth"
    summary = "MixtureGrowth: new tiles mix the learned templates (fusion with a second half, or growth alone)"
    template = True
    options: ClassVar[dict[str, Any]] = {"init": "orthogonal", "growth": "vertical", "noise": None, "other": None,
                                         "inplace": False}

    def grow(self, model, width, data, gen):
        from ..fuse import fuse, grow

        if float(width) != 2.0:
            raise MorphError(f"mixturegrowth tiles two halves into a model twice as wide: width must be 2, got {width:g}")
        seed = int(gen.initial_seed())
        o = self.opts
        if o["other"] is not None:
            return fuse(model, o["other"], growth=o["growth"], init=o["init"], seed=seed, noise=o["noise"],
                        inplace=o["inplace"])
        return grow(model, init=o["init"], seed=seed, noise=o["noise"], inplace=o["inplace"])
