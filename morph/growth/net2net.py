"""``net2net``: Net2WiderNet (Chen et al. 2016), function-preserving by construction.

Every new channel replicates an existing channel of its group: incoming weights, bias, norm affine
parameters and statistics are copied, and fan-out weights are divided by the number of replicas of
their source. There is **one mapping per coupled channel group** (residual adds, concatenations,
depthwise convs stay consistent), unlike the official MixtureGrowth port, which draws one per layer
pair and normalizes filters. ``mapping="random"`` (default, the paper's g(j)) draws sources uniformly;
``"cycle"`` makes channel ``j`` copy ``j mod old``. Groups tied to GroupNorm, LayerNorm, grouped convs
or a channel shuffle always cycle (a random map would break their block structure). ``noise`` adds
N(0, (noise x std(W))^2) to the weights of new entries (the paper's symmetry breaking; off by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .layout import REPLICA
from .plain import PlainGrowth
from .registry import register_growth

__all__ = ["Net2NetGrowth"]


@register_growth
class Net2NetGrowth(PlainGrowth):
    name = "net2net"
    label, baseline, order = "Net2Net", True, 2
    summary = "Net2WiderNet: replicate channels, divide fan-out by replica count (one mapping per channel group)"
    rule = "replicate"
    options: ClassVar[dict[str, Any]] = {**PlainGrowth.options, "mapping": "random", "noise": 0.0}

    def keeps_function(self) -> bool:
        return float(self.opts["noise"]) == 0

    def grow(self, model, width, data, gen):
        self.mapping = self.opts["mapping"]
        return super().grow(model, width, data, gen)

    def _fill_weight(self, layout, p, old, mod, record):
        super()._fill_weight(layout, p, old, mod, record)
        noise = float(self.opts["noise"])
        if noise <= 0:
            return
        out_map, in_map = layout.dim(p.out_dim), layout.dim(p.in_dim)
        w = mod.weight.data
        rows = out_map.kind == REPLICA
        mask = rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        if p.kind == "linear" or mod.groups == 1:
            mask |= (in_map.kind == REPLICA).view(1, -1, *([1] * (w.dim() - 2))).expand_as(w)
        std = float(old.weight.detach().double().std()) if old.weight.numel() > 1 else 0.0
        w[mask] += (torch.randn(int(mask.sum()), generator=self.gen, dtype=torch.float64) * noise * std).to(w)
