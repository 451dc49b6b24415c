"""``mixturegrowth``: template-mixing models grow by tiling (:mod:`morph.fuse`), through the same seam.

Without ``other`` it is MixtureGrowth without fusion (``morph.fuse.grow``: every new tile mixes the
model's own templates with new coefficients); with ``other`` (a second half) it is the fusion
(``morph.fuse``). Tiling doubles the width: ``width`` must be 2. The coefficient rules of the new tiles
(``init``) live in :data:`morph.fuse.COEFFICIENT_INITS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import MorphError
from .registry import GrowthMethod, register_growth

__all__ = ["MixtureGrowth"]


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
