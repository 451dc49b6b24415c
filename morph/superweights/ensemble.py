"""SuperWeight ensembles: members of different widths and depths generating their weights from one set of
shared template banks (SuperWeights §3).

BatchNorm, biases and heads (the layers whose output channels are fixed) stay per member; every other conv
and linear layer of every member takes its weight from the shared banks, through nested blocks where
members differ in width. The training loss is the sum of the members' cross-entropies
(:meth:`SuperWeightEnsemble.loss`), the prediction the mean of their softmaxes
(:meth:`SuperWeightEnsemble.predict`), and :func:`anytime_subsets` orders member subsets by FLOPs for anytime
inference.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from morph.errors import MorphError
from morph.info import MorphInfo, set_info
from morph.scale import output_shape, verify_forward
from morph.zoo import get_spec

from .build import build_shared, initial_clusters, plan_sharing, prepare, sharing_record, template_layers

__all__ = ["SuperWeightEnsemble", "ensemble", "anytime_subsets", "MAX_MEMBERS"]

MAX_MEMBERS = 16


class SuperWeightEnsemble(nn.Module):
    """Members that share template banks. ``forward(x)`` returns the members' logits stacked, ``[M, B, C]``."""

    stacked_logits = True  # the recipes' trainer sums the members' losses and averages their softmaxes

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        idx = range(len(self.members)) if members is None else members
        return torch.stack([self.members[i](x) for i in idx])

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the members' cross-entropies (unweighted, as the official code trains)."""
        return sum(F.cross_entropy(lg, labels) for lg in logits)

    def predict(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        """Mean of the members' softmaxes (all members, or the subset ``members``)."""
        return self(x, members).softmax(-1).mean(0)


def ensemble(
    models: Sequence[nn.Module],
    widths: Sequence[float] | None = None,
    budget: int | None = None,
    clusters: str | Sequence[Sequence[tuple[int, str]]] = "bins",
    *,
    bins: int = 4,
    templates: int = 2,
    tie: bool = False,
    seed: int | None = None,
    set_id: str | None = None,
    input_size: tuple[int, ...] | None = None,
) -> SuperWeightEnsemble:
    """A SuperWeight ensemble of ``models`` (left unchanged), member ``i`` at ``widths[i]`` (default 1).

    Args:
        models: the members' architectures, deepest first (member 0 defines the depth bins and, in learned
            sharing, the clusters the other members attach to), e.g. WRN-28-7, 28-4, 28-3.
        budget: template parameters of the shared banks (``None``: ``templates`` per bank).
        clusters: ``bins`` (bin ``i`` of every member's layers of a kernel shape share cluster ``i``),
            ``layer`` (layer ``i`` of every member: homogeneous ensembles, one SuperWeight per layer),
            ``shape``, or lists of ``(member, path)`` refs (e.g. from :func:`~morph.superweights.learn_clusters`).
        tie: members start with one coefficient vector per bank (to untie with
            :func:`~morph.superweights.untie`); else one per piece.
    """
    if not 1 <= len(models) <= MAX_MEMBERS:
        raise MorphError(f"an ensemble has 1 to {MAX_MEMBERS} members, got {len(models)}")
    widths = [1.0] * len(models) if widths is None else [float(w) for w in widths]
    if len(widths) != len(models):
        raise MorphError(f"{len(widths)} widths for {len(models)} members")
    members, plans = [], []
    for m, w in zip(models, widths, strict=True):
        new, plan = prepare(m, w, input_size)
        members.append(new)
        plans.append(plan)
    layers = [((i, n), k, s) for i, (mem, p) in enumerate(zip(members, plans, strict=True))
              for n, k, s in template_layers(mem, p)]
    shapes = {r: s for r, _, s in layers}
    mode = clusters if isinstance(clusters, str) else "given"
    groups = initial_clusters(layers, clusters, bins) if isinstance(clusters, str) else \
        [[(int(r[0]), str(r[1])) for r in c] for c in clusters]
    splan = plan_sharing(groups, shapes, budget, templates, tie)
    build_shared(members, splan, seed)
    for mem, p in zip(members, plans, strict=True):
        verify_forward(output_shape(p), mem, p.input_size)
    ens = SuperWeightEnsemble(members)
    specs = [get_spec(m) for m in models]
    record = sharing_record(splan, mode=mode, bins=bins, tie=tie)
    extra: dict[str, Any] = {
        "superweights": record,
        "members": [{"spec": None if s is None else {"source": s.source, "name": s.name, "kwargs": s.kwargs},
                     "width": w} for s, w in zip(specs, widths, strict=True)],
    }
    if set_id is None:
        set_id = f"seed{seed}" if seed is not None else uuid.uuid4().hex[:12]
    info = MorphInfo(kind="ensemble", spec=specs[0], width=widths[0], templates=max(splan.allocation.templates),
                     share="learned", set_ids=(set_id,), input_size=tuple(plans[0].input_size),
                     train_edge_coefficients=True, extra=extra)
    return set_info(ens, info)


def anytime_subsets(ens: SuperWeightEnsemble, input_size: tuple[int, ...] | None = None,
                    member_flops: Sequence[float] | None = None) -> list[tuple[tuple[int, ...], float]]:
    """Every non-empty subset of members with its forward FLOPs per image (the sum of its members'), cheapest
    first (ties: fewer members, then lower indices): the order of anytime inference."""
    n = len(ens.members)
    if member_flops is None:
        from morph.flops import flops
        from morph.info import get_info

        info = get_info(ens)
        size = input_size or (info.input_size if info else (3, 224, 224))
        member_flops = [flops(m, size).forward for m in ens.members]
    subs = [(s, float(sum(member_flops[i] for i in s))) for k in range(1, n + 1)
            for s in itertools.combinations(range(n), k)]
    return sorted(subs, key=lambda t: (t[1], len(t[0]), t[0]))


def bake_members(ens: SuperWeightEnsemble) -> list[nn.Module]:
    """Each member as a plain model (stock modules, generated weights materialized)."""
    import copy

    from morph.templates import detach, mixed_layers

    out = []
    for m in ens.members:
        memo = {id(x.mix): x.mix for _, x in mixed_layers(m)}
        new = copy.deepcopy(m, memo)
        for _, x in mixed_layers(new):
            detach(x)
        for p in new.parameters():
            p.requires_grad_(True)
        out.append(new)
    return out
