"""Build template-sharing models: clusters of layers -> banks -> nested-block layers, under a budget.

:func:`plan_sharing` decides everything before a tensor is made (clusters, banks, templates per bank,
coefficient vectors) and predicts the parameter counts; :func:`build_shared` makes the banks and attaches
a :class:`~morph.superweights.banks.SuperWeightMixing` to every layer of every member; :func:`convert_shared`
is ``morph.convert(model, budget=N, share="learned")``. The record of the sharing (:func:`sharing_record`) is
stored in the model's :class:`~morph.info.MorphInfo` (``extra["superweights"]``) and in its checkpoint.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from morph.errors import MorphError
from morph.graph.analyze import ChannelPlan, analyze
from morph.graph.mha import traceable
from morph.info import MorphInfo, original_layout, set_info
from morph.scale import apply_width, check_width, output_shape, stock_init, verify_forward
from morph.templates import attach
from morph.zoo import get_spec

from .banks import SharedBank, SuperWeightMixing, cluster_layout
from .npas import Allocation, allocate, depth_bins, kernel_key

__all__ = ["CLUSTER_MODES", "SharingPlan", "template_layers", "initial_clusters", "plan_sharing", "build_shared",
           "convert_shared", "sharing_record", "RECORD_VERSION"]

RECORD_VERSION = 1
CLUSTER_MODES = ("bins", "layer", "shape")

Ref = tuple[int, str]


def template_layers(model: nn.Module, plan: ChannelPlan) -> list[tuple[str, tuple, tuple[int, ...]]]:
    """``(path, kernel key, weight shape)`` of the layers that take their weight from shared banks, in execution
    order: every conv and linear layer except the heads (a layer whose output channels are fixed, such as the
    classifier: per member, never shared, as in the official code)."""
    out = []
    for p in plan.conv_layers():
        if not plan.scales(p.out_dim):
            continue
        m = model.get_submodule(p.name)
        w = m._parameters.get("weight") if not hasattr(type(m), "_morph_base") else m.weight
        if w is None or w.dim() < 2:
            continue
        groups = getattr(m, "groups", 1)
        out.append((p.name, kernel_key(w.shape, groups > 1 and w.shape[1] == 1), tuple(w.shape)))
    return out


def initial_clusters(layers: Sequence[tuple[Ref, tuple, tuple[int, ...]]], mode: str = "bins",
                     bins: int = 4) -> list[list[Ref]]:
    """``bins``: depth bins per kernel key (:func:`~morph.superweights.npas.depth_bins`); ``layer``: the layers at
    one position of every member of the same depth share (one network: every layer its own cluster); ``shape``:
    one cluster per kernel key and weight shape (one bank per shape)."""
    if mode == "bins":
        return depth_bins(layers, bins)
    if mode == "layer":
        pos: dict[tuple, list[Ref]] = {}
        count: dict[tuple[int, tuple], int] = {}
        for ref, key, _ in layers:
            i = count.get((ref[0], key), 0)
            count[(ref[0], key)] = i + 1
            pos.setdefault((key, i), []).append(ref)
        return list(pos.values())
    if mode == "shape":
        by: dict[tuple, list[Ref]] = {}
        for ref, key, shape in layers:
            by.setdefault((key, shape), []).append(ref)
        return list(by.values())
    raise MorphError(f"clusters must be one of {', '.join(CLUSTER_MODES)} or a list of lists of layers, got {mode!r}")


@dataclass
class SharingPlan:
    """Everything :func:`build_shared` makes, decided in advance.

    Attributes:
        clusters: lists of layer refs ``(member, path)``.
        shapes: weight shape of every ref.
        allocation: templates per bank.
        coefficients: coefficient vectors per bank.
        coef: per ref, the index of each level's coefficient vector in its bank.
    """

    clusters: list[list[Ref]]
    shapes: dict[Ref, tuple[int, ...]]
    allocation: Allocation
    coefficients: list[int]
    coef: dict[Ref, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def template_params(self) -> int:
        """Template parameters: what the budget counts."""
        return self.allocation.template_params

    @property
    def coefficient_params(self) -> int:
        return sum(n * k for n, k in zip(self.coefficients, self.allocation.templates, strict=True))

    def bank_index(self) -> dict[tuple[int, int], int]:
        return {key: i for i, key in enumerate(self.allocation.banks)}


def plan_sharing(clusters: Sequence[Sequence[Ref]], shapes: dict[Ref, tuple[int, ...]], budget: int | None,
                 templates: int = 2, tie: bool = False) -> SharingPlan:
    """Banks, templates and coefficient vectors of ``clusters``. ``tie``: one coefficient vector per bank (every
    piece of a bank mixes its templates alike: the warm-up of learned sharing, or a start to untie from);
    otherwise one per piece.

    Raises:
        MorphError: a layer in two clusters, mixed kernels in a cluster, or a budget below the minimum.
    """
    seen: set[Ref] = set()
    for c in clusters:
        if not c:
            raise MorphError("an empty cluster")
        for r in c:
            if r in seen:
                raise MorphError(f"layer {r[1]!r} (member {r[0]}) is in two clusters")
            if r not in shapes:
                raise MorphError(f"layer {r[1]!r} (member {r[0]}) is not a template layer of the model")
            seen.add(r)
        kernels = {(len(shapes[r]), shapes[r][2:]) for r in c}
        if len(kernels) > 1:
            raise MorphError(f"a cluster mixes kernel shapes {sorted(kernels)} (layers {c[0][1]!r} ...)")
    if seen != set(shapes):
        left = sorted(set(shapes) - seen)
        raise MorphError(f"{len(left)} template layer(s) in no cluster, e.g. {left[0][1]!r} (member {left[0][0]})")
    clusters = [list(c) for c in clusters]
    alloc = allocate([[shapes[r] for r in c] for c in clusters], budget, templates)
    index = {key: i for i, key in enumerate(alloc.banks)}
    ncoef = [0] * len(alloc.banks)
    coef: dict[Ref, list[int]] = {}
    for ci, c in enumerate(clusters):
        lay = cluster_layout([shapes[r] for r in c])
        for r in c:
            idx = []
            for w in range(lay.level(shapes[r]) + 1):
                b = index[(ci, w)]
                if tie:
                    ncoef[b] = 1
                    idx.append(0)
                else:
                    idx.append(ncoef[b])
                    ncoef[b] += 1
            coef[r] = idx
    return SharingPlan(clusters, dict(shapes), alloc, ncoef, coef)


def _unit_rows(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, k]`` from ``orthogonal_`` (the official init), each row scaled to unit norm so that a mixed weight
    has its templates' variance whatever ``n``."""
    a = torch.empty(n, k)
    nn.init.orthogonal_(a, generator=gen)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def build_shared(members: Sequence[nn.Module], plan: SharingPlan, seed: int | None = None,
                 stds: dict[Ref, float] | None = None) -> list[SharedBank]:
    """Make the banks of ``plan`` and attach every layer of every member (in place). Templates of a bank are
    normal with the RMS of the stock-init standard deviations of the layers it serves (``stds``, default: the
    layers' current weights), a fan-in aware departure from the official fixed ``sqrt(2/9)``.

    Returns:
        the banks, in ``plan.allocation.banks`` order.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    alloc = plan.allocation
    layouts = [cluster_layout([plan.shapes[r] for r in c]) for c in plan.clusters]
    mods = {r: members[r[0]].get_submodule(r[1]) for c in plan.clusters for r in c}
    if stds is None:
        stds = {}
        for r, m in mods.items():
            w = m.weight.detach().float()
            s = float(w.std()) if w.numel() > 1 else 0.0
            stds[r] = s if s > 0 else math.sqrt(2.0 / max(w[0].numel(), 1))
    var: dict[tuple[int, int], list[float]] = {}
    for ci, c in enumerate(plan.clusters):
        for r in c:
            for w in range(layouts[ci].level(plan.shapes[r]) + 1):
                var.setdefault((ci, w), []).append(stds[r] ** 2)
    ref_param = next(iter(mods.values())).weight
    dtype, device = ref_param.dtype, ref_param.device
    banks = []
    for b, (ci, w) in enumerate(alloc.banks):
        k, p = alloc.templates[b], alloc.pieces[b]
        std = math.sqrt(sum(var[(ci, w)]) / len(var[(ci, w)]))
        t = torch.randn(k * p, generator=gen) * std
        a = _unit_rows(plan.coefficients[b], k, gen)
        banks.append(SharedBank(t.to(dtype=dtype, device=device), p, a.to(dtype=dtype, device=device), ci, w))
    index = plan.bank_index()
    for ci, c in enumerate(plan.clusters):
        lay = layouts[ci]
        for r in c:
            lv = lay.level(plan.shapes[r])
            mix = SuperWeightMixing([banks[index[(ci, w)]] for w in range(lv + 1)], plan.coef[r],
                                    lay.envelopes[: lv + 1], plan.shapes[r], ref=r)
            attach(mods[r], mix)
    return banks


def sharing_record(plan: SharingPlan, members: Sequence[nn.Module] | None = None, **meta: Any) -> dict[str, Any]:
    """The sharing as JSON data: clusters (``[member, path]`` lists), banks ``[cluster, level, piece, K,
    coefficient vectors]``, each layer's coefficient indices, the budget and the template parameter count.
    With ``members``, the coefficient indices are read from the models (after untying)."""
    coef = dict(plan.coef)
    ncoef = list(plan.coefficients)
    if members is not None:
        index = plan.bank_index()
        layouts = [cluster_layout([plan.shapes[r] for r in c]) for c in plan.clusters]
        for ci, c in enumerate(plan.clusters):
            for r in c:
                mix = members[r[0]].get_submodule(r[1]).mix
                coef[r] = list(mix.coef)
                for w in range(layouts[ci].level(plan.shapes[r]) + 1):
                    ncoef[index[(ci, w)]] = len(mix.banks[w].coefficients)
    a = plan.allocation
    return {
        "version": RECORD_VERSION,
        "budget": a.budget,
        "template_params": a.template_params,
        "clusters": [[[r[0], r[1]] for r in c] for c in plan.clusters],
        "banks": [[ci, w, p, k, n] for (ci, w), p, k, n in zip(a.banks, a.pieces, a.templates, ncoef, strict=True)],
        "coef": [[r[0], r[1], coef[r]] for c in plan.clusters for r in c],
        **meta,
    }


def plan_from_record(record: dict[str, Any], shapes: dict[Ref, tuple[int, ...]]) -> SharingPlan:
    """The :class:`SharingPlan` a (checked) record describes, for the layer shapes of a rebuilt model."""
    clusters = [[(int(m), str(n)) for m, n in c] for c in record["clusters"]]
    plan = plan_sharing(clusters, shapes, None, 1, tie=False)
    ks = tuple(int(b[3]) for b in record["banks"])
    if [tuple(b[:3]) for b in record["banks"]] != [(c, w, p) for (c, w), p in zip(plan.allocation.banks,
                                                                                  plan.allocation.pieces, strict=True)]:
        raise MorphError("the recorded banks do not fit the model's layer shapes")
    plan.allocation = Allocation(plan.allocation.banks, plan.allocation.pieces, ks, plan.allocation.uses,
                                 record.get("budget"))
    plan.coefficients = [int(b[4]) for b in record["banks"]]
    plan.coef = {(int(m), str(n)): [int(i) for i in idx] for m, n, idx in record["coef"]}
    return plan


def prepare(model: nn.Module, width: float, input_size: tuple[int, ...] | None = None,
            plan: ChannelPlan | None = None) -> tuple[nn.Module, ChannelPlan]:
    """A copy of ``model`` at ``width`` (stock init at that width) and its channel plan."""
    width = check_width(width)
    if width > 1:
        raise MorphError(f"template sharing converts at width <= 1, got {width:g}")
    model = traceable(model)  # nn.MultiheadAttention's packed projection as the Linear in_proj
    plan = plan or analyze(model, input_size)
    new, _ = apply_width(model, plan, width, stock_init())
    return new, plan


def convert_shared(
    model: nn.Module,
    width: float = 1.0,
    budget: int | None = None,
    clusters: str | Sequence[Sequence[str]] = "bins",
    *,
    bins: int = 4,
    templates: int = 2,
    tie: bool = False,
    seed: int | None = None,
    set_id: str | None = None,
    input_size: tuple[int, ...] | None = None,
    plan: ChannelPlan | None = None,
    meta: dict[str, Any] | None = None,
) -> nn.Module:
    """``model`` at ``width`` with every conv/linear weight but the heads generated from shared banks.

    Args:
        model: any model :func:`morph.analyze` understands (left unchanged).
        width: width of the result (1: the stock model).
        budget: template parameters allowed (``None``: ``templates`` per bank).
        clusters: ``bins`` (depth bins per kernel shape: the start of learned sharing), ``layer`` (no sharing),
            ``shape`` (one cluster per weight shape), or lists of layer paths (e.g. from
            :func:`~morph.superweights.npas.learn_clusters`).
        bins: depth bins per kernel shape (official 4).
        templates: templates per bank without a budget (at most 8).
        tie: one coefficient vector per bank (warm-up of learned sharing); else one per piece.
        seed: seed of templates and coefficients.
    """
    half, cplan = prepare(model, width, input_size, plan)
    layers = [((0, n), k, s) for n, k, s in template_layers(half, cplan)]
    if not layers:
        raise MorphError(f"{type(model).__name__} has no conv or linear layer to generate from templates")
    shapes = {r: s for r, _, s in layers}
    if isinstance(clusters, str):
        mode = clusters
        groups = initial_clusters(layers, clusters, bins)
    else:
        mode = "given"
        groups = [[(0, n) if isinstance(n, str) else (int(n[0]), str(n[1])) for n in c] for c in clusters]
    splan = plan_sharing(groups, shapes, budget, templates, tie)
    build_shared([half], splan, seed)
    verify_forward(output_shape(cplan), half, cplan.input_size)
    if set_id is None:
        set_id = f"seed{seed}" if seed is not None else uuid.uuid4().hex[:12]
    record = sharing_record(splan, mode=mode, bins=bins, tie=tie, **(meta or {}))
    info = MorphInfo(kind="shared", spec=get_spec(model), width=float(width), templates=max(splan.allocation.templates),
                     share="learned", set_ids=(set_id,), input_size=tuple(cplan.input_size),
                     train_edge_coefficients=True, extra={"superweights": record}, original=original_layout(model))
    return set_info(half, info)

