"""Neural parameter allocation search (SuperWeights §1.3): the library steps of learned sharing.

Every step works on *layer refs* ``(member, layer path)`` so that one network and an ensemble of
several use the same code:

- :func:`depth_bins`: the initial clusters, contiguous depth bins per kernel shape (official
  ``_get_layers_per_bin``: ``round(B * n_k / depth)`` bins, at least one, the first bins one layer longer);
- :class:`WeightGradients`: ``dL/dW`` of every generated (or plain) layer weight, summed over as many
  batches as the caller runs (the official code uses one mini-batch);
- :func:`cropped_cosine`: ``cos(vec G_i[:o, :c], vec G_j[:o, :c])`` with the top-left crop, in float64;
- :func:`connected_components`: Algorithm 1 as it is meant, single linkage: the connected components of the
  graph with an edge where ``psi > threshold`` (union-find; not the official label overwrite);
- :func:`allocate`: template counts under a budget of template parameters (official ``_allocate_templates``);
- :func:`learn_clusters`: split each initial cluster at ``tau``, lowering ``tau`` by ``step`` until the
  budget's minimum (one template per bank) fits;
- :class:`CoefficientGradients` and :func:`untie`: coefficient untying at ``beta``; each new group gets a
  clone of the current vector (the function is unchanged), appended to the optimizer group of the vector it
  came from, with its optimizer state cloned: it enters the optimizer exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from morph.errors import MorphError

from .banks import MAX_TEMPLATES, SuperWeightMixing, _Recorder, cluster_layout, superweight_layers

__all__ = [
    "CoefficientGradients", "WeightGradients", "Allocation", "allocate", "connected_components", "cropped_cosine",
    "depth_bins", "kernel_key", "learn_clusters", "similarity_matrix", "untie", "min_budget",
]

Ref = tuple[int, str]


def kernel_key(shape: Sequence[int], depthwise: bool = False) -> tuple:
    """Layers share a cluster only with the same kernel (``shape[2:]``; linear layers have ``()``) and the same
    depthwise-ness (official ``--separate_kernels``)."""
    return (len(shape), tuple(shape[2:]), bool(depthwise))


def depth_bins(layers: Sequence[tuple[Ref, tuple, tuple[int, ...]]], bins: int = 4) -> list[list[Ref]]:
    """Initial clusters: for each kernel key, member 0's layers (in execution order) cut into
    ``max(1, round(bins * n_k / depth))`` contiguous bins, the first bins one layer longer when uneven;
    every other member cuts its own layers of that key into the same number of bins, and bin ``i`` of every
    member joins cluster ``i`` of that key (official ``all_nets_groupslim_depth``).

    Args:
        layers: ``(ref, key, shape)`` in execution order per member.
        bins: ``B`` (official ``--param_group_bins`` 4).
    """
    if bins < 1:
        raise MorphError(f"bins must be a positive integer, got {bins}")
    members = sorted({r[0] for r, _, _ in layers})
    depth0 = sum(1 for r, _, _ in layers if r[0] == members[0])
    keys = list(dict.fromkeys(k for _, k, _ in layers))
    clusters: list[list[Ref]] = []
    for key in keys:
        n0 = sum(1 for r, k, _ in layers if k == key and r[0] == members[0])
        nb = max(1, round(bins * n0 / max(depth0, 1))) if n0 else 1
        per: list[list[Ref]] = [[] for _ in range(nb)]
        for m in members:
            refs = [r for r, k, _ in layers if k == key and r[0] == m]
            b = min(nb, len(refs))
            if not b:
                continue
            size, extra = divmod(len(refs), b)
            i = 0
            for j in range(b):
                n = size + (1 if j < extra else 0)
                per[j].extend(refs[i:i + n])
                i += n
        clusters.extend(p for p in per if p)
    return clusters


class WeightGradients(_Recorder):
    """Sum ``dL/dW`` of every template-generated layer over the backward passes run inside ``with`` (float64).

    Plain layers (a stock model) are summed from ``weight.grad`` by :meth:`step`, called after each backward
    (for generated weights :meth:`step` only counts the batch). ``grads`` maps ``(member, path)`` to the sum.
    """

    weights = True

    def __init__(self, model: nn.Module, members: Sequence[nn.Module] | None = None) -> None:
        self.members = list(members) if members is not None else [model]
        self.grads: dict[Ref, torch.Tensor] = {}
        self.batches = 0
        self._mixes = [(i, m.mix) for i, mod in enumerate(self.members) for _, m in superweight_layers(mod)]
        mixed = {id(m) for _, m in self._mixes}
        self._plain = [((i, n), m) for i, mod in enumerate(self.members) for n, m in mod.named_modules()
                       if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(getattr(m, "mix", None)) not in mixed
                       and isinstance(m._parameters.get("weight"), nn.Parameter)]

    def __enter__(self) -> WeightGradients:
        for _, mix in self._mixes:
            mix.recorders.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for _, mix in self._mixes:
            if self in mix.recorders:
                mix.recorders.remove(self)

    def weight_grad(self, layer: SuperWeightMixing, grad: torch.Tensor) -> None:
        g = grad.to(torch.float64)
        ref = layer.ref
        self.grads[ref] = self.grads[ref] + g if ref in self.grads else g.clone()

    def step(self) -> None:
        """Count one batch; add the ``.grad`` of plain layers' weights."""
        self.batches += 1
        for ref, m in self._plain:
            g = m.weight.grad
            if g is not None:
                g = g.detach().to(torch.float64)
                self.grads[ref] = self.grads[ref] + g if ref in self.grads else g.clone()


def cropped_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``cos(vec a[:o, :c], vec b[:o, :c])``, ``o``/``c`` the smaller output/input sizes (float64; 0 when a
    crop is all zero). Vectors (coefficient gradients) are compared whole."""
    if a.dim() < 2:  # coefficient vectors
        n = min(a.numel(), b.numel())
        x, y = a.reshape(-1)[:n].to(torch.float64), b.reshape(-1)[:n].to(torch.float64)
    else:
        o, c = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        x = a[:o, :c].reshape(-1).to(torch.float64)
        y = b[:o, :c].reshape(-1).to(torch.float64)
    d = float(x.norm() * y.norm())
    return float(x @ y) / d if d > 0 else 0.0


def similarity_matrix(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise :func:`cropped_cosine` of a list of gradients, ``[n, n]`` float64 (1 on the diagonal)."""
    n = len(grads)
    s = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            s[i, j] = s[j, i] = cropped_cosine(grads[i], grads[j])
    return s


def connected_components(sim: torch.Tensor, threshold: float) -> list[list[int]]:
    """Algorithm 1 (supplement), single linkage: the connected components of the graph on ``range(n)`` with an
    edge ``i - j`` where ``sim[i, j] > threshold`` (only the upper triangle is read). Components are listed by
    their smallest index, each sorted."""
    n = sim.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # the priority queue of Algorithm 1: pairs by similarity, highest first; union-find makes merges transitive
    pairs = sorted(((float(sim[i, j]), i, j) for i in range(n) for j in range(i + 1, n)), reverse=True)
    for psi, i, j in pairs:
        if not psi > threshold:
            break
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda c: c[0])


@dataclass(frozen=True)
class Allocation:
    """Templates per bank under a budget.

    Attributes:
        banks: ``(cluster, level)`` of every bank, in order.
        pieces: piece size (numel) of every bank.
        templates: ``K`` of every bank.
        uses: pieces each bank serves.
        budget: the budget (template parameters), or ``None``.
    """

    banks: tuple[tuple[int, int], ...]
    pieces: tuple[int, ...]
    templates: tuple[int, ...]
    uses: tuple[int, ...]
    budget: int | None

    @property
    def template_params(self) -> int:
        return sum(p * k for p, k in zip(self.pieces, self.templates, strict=True))


def min_budget(clusters_shapes: Sequence[Sequence[tuple[int, ...]]]) -> int:
    """The least budget clusters of these weight shapes fit: one template per bank."""
    return sum(cluster_layout(s).min_size() for s in clusters_shapes)


def allocate(clusters_shapes: Sequence[Sequence[tuple[int, ...]]], budget: int | None, templates: int = 2,
             cap: int = MAX_TEMPLATES) -> Allocation:
    """Templates per bank (official ``_allocate_templates``, ``cap`` 8).

    Each bank (cluster, level) first gets one template. Then, for ``c = 1 .. cap - 1``, every bank (in order)
    that serves more than ``c`` pieces gets one more while the budget allows: busier banks get more. Then
    banks get one more each in turn until all reach ``cap`` or none fits. What is left of the budget stays
    unused: it is an upper bound. Without a budget every bank gets ``min(templates, cap)``.

    Raises:
        MorphError: the budget is below the minimum, one template per bank.
    """
    banks, pieces, uses = [], [], []
    for c, shapes in enumerate(clusters_shapes):
        lay = cluster_layout(shapes)
        levels = [lay.level(tuple(s)) for s in shapes]
        for w, p in enumerate(lay.pieces):
            banks.append((c, w))
            pieces.append(p)
            uses.append(sum(1 for lv in levels if lv >= w))
    if budget is None:
        k = [max(1, min(int(templates), cap))] * len(banks)
        return Allocation(tuple(banks), tuple(pieces), tuple(k), tuple(uses), None)
    need = sum(pieces)
    if budget < need:
        raise MorphError(f"budget {budget:,} is below the minimum {need:,} template parameters of these clusters "
                         f"(one template per bank, {len(banks)} banks)")
    k = [1] * len(banks)
    left = budget - need
    for cands in range(1, cap):
        for b, p in enumerate(pieces):
            if uses[b] > cands and k[b] < cap and p <= left:
                k[b] += 1
                left -= p
    grew = True
    while grew:
        grew = False
        for b, p in enumerate(pieces):
            if k[b] < cap and p <= left:
                k[b] += 1
                left -= p
                grew = True
    return Allocation(tuple(banks), tuple(pieces), tuple(k), tuple(uses), int(budget))


def learn_clusters(initial: Sequence[Sequence[Ref]], grads: dict[Ref, torch.Tensor], shapes: dict[Ref, tuple],
                   budget: int | None, tau: float = 0.1, step: float = 0.05) -> tuple[list[list[Ref]], float]:
    """Split every initial cluster into the connected components of gradient similarity above ``tau``; lower
    ``tau`` by ``step`` until the clusters' minimum budget (one template per bank) fits ``budget``.

    Only member 0's layers are compared (the official ``split``); another member's layer joins the cluster of
    the member-0 layer of the same initial cluster with the most similar gradient (official ``join_large``).

    Returns:
        the clusters and the ``tau`` that made them.

    Raises:
        MorphError: a layer without a gradient, or a budget that even one cluster per initial cluster misses.
    """
    if step <= 0:
        raise MorphError(f"the tau step must be positive, got {step}")
    missing = [r for c in initial for r in c if r not in grads]
    if missing:
        raise MorphError(f"no weight gradient recorded for {len(missing)} layer(s), e.g. member {missing[0][0]} "
                         f"{missing[0][1]!r}: run forward and backward passes inside WeightGradients first")
    sims = []
    for c in initial:
        own = [r for r in c if r[0] == min(x[0] for x in c)]
        sim = similarity_matrix([grads[r] for r in own])
        others = [r for r in c if r not in own]
        attach = {r: max(range(len(own)), key=lambda i, r=r: (cropped_cosine(grads[r], grads[own[i]]), -i))
                  for r in others}
        sims.append((own, sim, attach))
    floor = min_budget([[shapes[r] for r in c] for c in initial])
    if budget is not None and budget < floor:
        raise MorphError(f"budget {budget:,} is below {floor:,}, the template parameters of one template per bank "
                         f"with every initial cluster kept whole")
    while True:
        clusters: list[list[Ref]] = []
        for own, sim, attach in sims:
            for comp in connected_components(sim, tau):
                members = {own[i] for i in comp}
                clusters.append([r for r in own if r in members]
                                + [r for r, i in attach.items() if own[i] in members])
        if budget is None or min_budget([[shapes[r] for r in c] for c in clusters]) <= budget:
            return clusters, tau
        tau -= step
        if tau < -1 - step:  # unreachable: below -1 every pair is an edge and the floor check passed
            raise MorphError("learned sharing could not fit the budget")


class CoefficientGradients(_Recorder):
    """Sum ``dL/dalpha`` of every piece (layer, level) over the backward passes run inside ``with`` (float64);
    ``grads`` maps ``(member, path, level)`` to the sum. A tied vector's gradient is kept per piece."""

    coefficients = True

    def __init__(self, model: nn.Module) -> None:
        self._mixes = [m.mix for _, m in superweight_layers(model)]
        self.grads: dict[tuple[int, str, int], torch.Tensor] = {}

    def __enter__(self) -> CoefficientGradients:
        for mix in self._mixes:
            mix.recorders.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for mix in self._mixes:
            if self in mix.recorders:
                mix.recorders.remove(self)

    def coefficient_grad(self, layer: SuperWeightMixing, level: int, grad: torch.Tensor) -> None:
        key = (*layer.ref, level)
        g = grad.to(torch.float64)
        self.grads[key] = self.grads[key] + g if key in self.grads else g.clone()


def untie(model: nn.Module, grads: dict[tuple[int, str, int], torch.Tensor], beta: float,
          optimizer: torch.optim.Optimizer | None = None) -> list[nn.Parameter]:
    """Untie coefficient vectors whose pieces' gradients disagree (SuperWeights §1.3 D).

    For every coefficient vector that several pieces share, the pieces are split into the connected
    components of ``cos(g_i, g_j) > beta``. The component holding the first piece keeps the vector; every
    other component gets a new Parameter holding a clone of its current value (so the model computes the
    same function, bit for bit), appended to the bank's ``coefficients``. With ``optimizer``, each new
    Parameter is appended to the param group of the vector it was cloned from, once, and the optimizer
    state of that vector (momentum) is cloned for it.

    Returns:
        the new Parameters, in the order they were made.
    """
    pieces: dict[int, list[tuple[SuperWeightMixing, int]]] = {}
    banks = {}
    for _, m in superweight_layers(model):
        for lv in range(m.mix.levels):
            p = m.mix.coefficient(lv)
            pieces.setdefault(id(p), []).append((m.mix, lv))
            banks[id(p)] = (m.mix.banks[lv], p)
    group_of = {}
    if optimizer is not None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
    new: list[nn.Parameter] = []
    for pid, users in pieces.items():
        if len(users) < 2:
            continue
        missing = [(mix.ref, lv) for mix, lv in users if (*mix.ref, lv) not in grads]
        if missing:
            raise MorphError(f"no coefficient gradient for {missing[0][0][1]!r} level {missing[0][1]}: run backward "
                             "passes inside CoefficientGradients first")
        sim = similarity_matrix([grads[(*mix.ref, lv)] for mix, lv in users])
        comps = connected_components(sim, beta)
        bank, old = banks[pid]
        for comp in comps[1:]:
            p = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
            bank.coefficients.append(p)
            idx = len(bank.coefficients) - 1
            for i in comp:
                mix, lv = users[i]
                mix.coef[lv] = idx
            new.append(p)
            if optimizer is not None:
                if pid not in group_of:
                    raise MorphError("the optimizer does not hold the coefficient vector being untied")
                group_of[pid]["params"].append(p)
                state = optimizer.state.get(old)
                if state:
                    optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    return new

