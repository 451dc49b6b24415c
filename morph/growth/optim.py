"""Optimizer state across growth (growneuron ``copy_optimizer_slots``): old entries keep their slots
(momentum, Adam moments), new entries start at zero.

Every growth method leaves ``model.growth_record`` on its result (:class:`GrowthRecord`): per grown
parameter, which parameter of which source model each entry comes from. Plain methods have one source
(the model grown); a MixtureGrowth fusion has two (``a`` and ``b``), growth without fusion one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import MorphError

__all__ = ["GrowthRecord", "carry_optimizer_state"]


@dataclass
class GrowthRecord:
    """``params[new_name]`` = list of ``(source, old_name, index)``: ``source`` numbers the models grown from
    (0, or 1 for a fusion's ``b``); ``index`` has, per axis, the old index of every position (``-1``: not
    from this source), or ``None`` for an axis taken whole."""

    params: dict[str, list[tuple[int, str, list[torch.Tensor | None]]]]


def _embed(old: torch.Tensor, shape: tuple[int, ...], index: list[torch.Tensor | None], out: torch.Tensor) -> None:
    """``out[pos] = old[index[pos]]`` where every axis' index is >= 0."""
    sel_new, sel_old = [], []
    for d in range(len(shape)):
        idx = index[d] if d < len(index) else None
        if idx is None:
            sel_new.append(torch.arange(shape[d], device=out.device))
            sel_old.append(torch.arange(shape[d], device=out.device))
        else:
            idx = idx.to(out.device)  # the record's indices are on the CPU; the state is where the model is
            keep = (idx >= 0).nonzero().flatten()
            sel_new.append(keep)
            sel_old.append(idx[keep])
    if any(len(s) == 0 for s in sel_new):
        return
    out[torch.meshgrid(*sel_new, indexing="ij")] = old[torch.meshgrid(*sel_old, indexing="ij")].to(out)


def carry_optimizer_state(
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    old_models: nn.Module | list[nn.Module],
    new_model: nn.Module,
) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters over ``new_model``'s parameters, with the state
    of ``optimizer`` carried over: per-entry slots (momentum buffers, Adam moments) copied for old entries and
    zero for new ones, scalar state (step counts) copied.

    Args:
        optimizer: the optimizer of the model grown (for a fusion: a list, one per half, in ``a, b`` order).
        old_models: the model(s) it optimized, in the same order.
        new_model: the result of :func:`morph.grow` or :func:`morph.fuse` (it carries ``growth_record``).

    Parameters of ``new_model`` that no old parameter maps to join the first parameter group, with empty state.
    """
    opts = optimizer if isinstance(optimizer, list) else [optimizer]
    olds = old_models if isinstance(old_models, list) else [old_models]
    if len(opts) != len(olds):
        raise MorphError(f"{len(opts)} optimizer(s) for {len(olds)} model(s)")
    record = getattr(new_model, "growth_record", None)
    if record is None:
        raise MorphError("the model carries no growth record: pass the model returned by morph.grow or morph.fuse")
    old_named = [dict(m.named_parameters()) for m in olds]
    group_of: dict[int, int] = {}
    for g, grp in enumerate(opts[0].param_groups):
        for p in grp["params"]:
            group_of[id(p)] = g
    new_named = dict(new_model.named_parameters())
    groups = [{k: v for k, v in grp.items() if k != "params"} | {"params": []} for grp in opts[0].param_groups]
    state: dict[nn.Parameter, dict] = {}
    for name, p in new_named.items():
        entries = record.params.get(name, [(0, name, [None] * p.dim())])
        g = 0
        st: dict = {}
        for src, old_name, index in entries:
            old_p = old_named[src].get(old_name)
            if old_p is None:
                continue
            if src == 0 and id(old_p) in group_of:
                g = group_of[id(old_p)]
            old_state = opts[src].state.get(old_p, {})
            for k, v in old_state.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == old_p.shape:
                    if k not in st:
                        st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if tuple(v.shape) == tuple(p.shape) and all(i is None for i in index):
                        st[k].copy_(v)
                    else:
                        _embed(v, tuple(p.shape), index, st[k])
                elif k not in st:
                    st[k] = v.clone() if isinstance(v, torch.Tensor) else v
        groups[g]["params"].append(p)
        if st:
            state[p] = st
    new_opt = type(opts[0])([grp for grp in groups if grp["params"]])
    for p, st in state.items():
        new_opt.state[p] = st
    return new_opt
