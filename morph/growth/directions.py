"""Random unit directions and neuron norms: the two numeric helpers every plain growth method and the
attention-key initialisation share (a module of their own, so that :mod:`morph.growth.keys` does not import
:mod:`morph.growth.plain`, which imports it)."""

from __future__ import annotations

import torch

__all__ = ["mean_norm", "random_directions"]


def random_directions(n: int, shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``n`` vectors of ``shape`` drawn from U[0, 1) and set to unit norm each (growneuron ``AddRandom``)."""
    v = torch.rand((n, *shape), generator=gen, dtype=torch.float64)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(n, *([1] * len(shape)))
    return v.to(like)


def mean_norm(w: torch.Tensor, axis: int) -> float:
    """Mean L2 norm of the neurons of ``w`` along ``axis`` (rows: incoming, columns: outgoing)."""
    if w.numel() == 0 or w.shape[axis] == 0:
        return 0.0
    return float(w.detach().transpose(0, axis).flatten(1).double().norm(dim=1).mean())
