"""``random``: new neurons with random weights (growneuron ``AddRandom``; GradMax §4.2, MixtureGrowth Tab. 1).

New incoming weights are unit-norm U[0, 1) directions scaled to ``epsilon`` x the mean norm of the
layer's existing neurons (default ``epsilon = 0``: the step keeps the function exactly); new outgoing
weights are unit-norm U[0, 1) directions at ``scale`` (0.5) x the mean norm of the layer's existing
outgoing vectors (``scale_method="mean_norm"``), or at ``scale`` itself (``"fixed"``, growneuron's VGG
configs). Norm layers get identity channels, biases 0. ``outgoing_zero=True`` swaps the two scales
(growneuron ``is_outgoing_zero``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .directions import mean_norm, random_directions
from .plain import PlainGrowth
from .registry import register_growth

__all__ = ["RandomGrowth"]


@register_growth
class RandomGrowth(PlainGrowth):
    name = "random"
    label, baseline, order = "Random", True, 1
    summary = "random new neurons: incoming x epsilon (0), outgoing at 0.5 x the mean norm (growneuron AddRandom)"
    options: ClassVar[dict[str, Any]] = {
        **PlainGrowth.options, "epsilon": 0.0, "scale": 0.5, "scale_method": "mean_norm", "outgoing_zero": False,
    }

    def keeps_function(self) -> bool:
        return float(self.opts["epsilon"]) == 0

    def zero_incoming(self) -> bool:
        return self._scales()[0] == 0

    def _scales(self) -> tuple[float, float]:
        eps, s = float(self.opts["epsilon"]), float(self.opts["scale"])
        return (s, eps) if self.opts.get("outgoing_zero") else (eps, s)

    def _norm(self, old: torch.Tensor, axis: int) -> float:
        return mean_norm(old, axis) if self.opts["scale_method"] == "mean_norm" else 1.0

    def incoming(self, name, w, rows, old):
        s = self._scales()[0]
        w[rows] = 0 if s == 0 else random_directions(len(rows), tuple(w.shape[1:]), self.gen, w) * s * self._norm(old, 0)

    def outgoing(self, name, w, rows, cols, group, old):
        s = self._scales()[1]
        shape = (len(rows), *w.shape[2:])
        v = random_directions(len(cols), shape, self.gen, w) * s * self._norm(old, 1)  # [cols, rows, k...]
        sub = w.index_select(0, rows)
        sub[:, cols] = v.transpose(0, 1)
        w[rows] = sub
