"""``convert``: a model at reduced width whose conv and linear weights are template mixtures."""

from __future__ import annotations

import math
import uuid

import torch
import torch.nn as nn

from .errors import MorphError
from .graph.analyze import ChannelPlan, LayerPlan, analyze
from .graph.mha import traceable
from .info import MorphInfo, original_layout, set_info
from .scale import apply_width, attention_record, check_width, output_shape, stock_init, verify_forward
from .templates import TemplateBank, TemplateMixing, attach
from .zoo import get_spec

__all__ = ["convert", "SHARE_MODES", "edge_layers", "sharing_plan"]

SHARE_MODES = ("none", "consecutive", "learned")


def edge_layers(plan: ChannelPlan) -> set[str]:
    """Layers whose input or output width is fixed: the stem (reads the image) and the classifier."""
    return {p.name for p in plan.conv_layers() if not plan.scales(p.in_dim) or not plan.scales(p.out_dim)}


def sharing_plan(plan: ChannelPlan, shapes: dict[str, tuple[int, ...]], share: str) -> list[list[str]]:
    """Group layers into banks: one per layer (``none``), or consecutive same-shape pairs
    (``consecutive``, paper §3.1: at most two layers per bank, in execution order)."""
    layers = [p.name for p in plan.conv_layers()]
    if share == "none":
        return [[n] for n in layers]
    banks: list[list[str]] = []
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and shapes[layers[i]] == shapes[layers[i + 1]]:
            banks.append([layers[i], layers[i + 1]])
            i += 2
        else:
            banks.append([layers[i]])
            i += 1
    return banks


def _template_std(w: torch.Tensor, p: LayerPlan) -> float:
    std = float(w.detach().float().std()) if w.numel() > 1 else 0.0
    if std > 0:
        return std
    fan_in = w[0].numel() if w.dim() > 1 else 1  # zero-initialized layer: kaiming normal
    return math.sqrt(2.0 / max(fan_in, 1))


def convert(
    model: nn.Module,
    width: float | None = None,
    templates: int = 2,
    share: str = "none",
    seed: int | None = None,
    *,
    set_id: str | None = None,
    train_edge_coefficients: bool = False,
    input_size: tuple[int, ...] | None = None,
    plan: ChannelPlan | None = None,
    budget: int | None = None,
    clusters: str | list[list[str]] = "bins",
    bins: int = 4,
    tie: bool = False,
) -> nn.Module:
    """Return ``model`` at ``width`` with every conv and linear weight generated as ``sum_k a_k T_k``.

    Args:
        model: any model :func:`morph.analyze` understands (left unchanged).
        width: width multiplier of the template model (default 0.5: the paper's half-width networks; 1 with
            template sharing).
        templates: templates per bank (paper: 2).
        share: ``none`` (default; each layer its own templates, the official CIFAR code and the
            parameter budget of the supplementary) or ``consecutive`` (paper §3.1: consecutive layers
            with identical weight shapes share one bank, at most two per bank, each with its own
            coefficients).
        seed: seed of the template and coefficient initialization.
        set_id: id of this network's template set (default: derived from ``seed``, else random).
            Two models fused later must have different ids.
        train_edge_coefficients: train the coefficients of the first conv and the classifier
            (supplementary §1.1 says they are fixed: default ``False``; the official CIFAR code trains them).
        input_size: ``(C, H, W)`` used for tracing.
        plan: a precomputed :func:`morph.analyze` result.

    Template sharing across layers (SuperWeights, :mod:`morph.superweights`; docs/superweights.md):
    ``share="learned"`` (and ``share="none"`` with a ``budget``) returns a model at ``width`` (default 1, the
    stock widths) whose conv/linear weights but the heads are nested blocks of template banks shared by the
    layers of a cluster, with ``budget`` template parameters at most. ``clusters``: ``bins`` (``bins`` depth bins
    per kernel shape, the start of learned sharing; with ``share="none"``, ``layer``: one cluster per layer),
    ``shape``, or lists of layer paths (from :func:`morph.superweights.learn_clusters`); ``tie``: one coefficient
    vector per bank (warm-up, or a start to untie from). ``templates`` is then the number per bank without a
    budget (at most 8).

    Templates start with the initialization of the layer they replace (normal with the variance of
    the stock init at the new width); coefficients start orthogonal (``torch.nn.init.orthogonal_``
    over the layers of a bank x templates, as in the official code).
    """
    if share not in SHARE_MODES:
        raise MorphError(f"share must be one of {', '.join(SHARE_MODES)}, got {share!r}")
    if int(templates) != templates or templates < 1:
        raise MorphError(f"templates must be a positive integer, got {templates}")
    if share == "learned" or budget is not None:
        if share == "consecutive":
            raise MorphError("a budget applies to share learned or none, not consecutive")
        if budget is not None and (isinstance(budget, bool) or int(budget) != budget or budget < 1):
            raise MorphError(f"budget must be a positive number of template parameters, got {budget}")
        from .superweights.build import convert_shared

        return convert_shared(model, 1.0 if width is None else width, budget, clusters if share == "learned" else "layer",
                              bins=bins, templates=templates, tie=tie, seed=seed, set_id=set_id,
                              input_size=input_size, plan=plan)
    width = check_width(0.5 if width is None else width)
    model = traceable(model)  # nn.MultiheadAttention's packed projection as the Linear in_proj
    plan = plan or analyze(model, input_size)
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(
        int(torch.empty((), dtype=torch.int64).random_()))
    if set_id is None:
        set_id = f"seed{seed}" if seed is not None else uuid.uuid4().hex[:12]
    half, shapes = apply_width(model, plan, width, stock_init())  # template scale from the stock init
    edges = edge_layers(plan)
    banks = sharing_plan(plan, {n: s.weight_shape for n, s in shapes.items()}, share)
    for members in banks:
        first = half.get_submodule(members[0])
        w = first.weight
        std = _template_std(w, plan.layers[members[0]])
        t = torch.randn((templates, *w.shape), generator=gen, dtype=torch.float32) * std
        bank = TemplateBank(t.to(dtype=w.dtype, device=w.device), set_id=set_id, name=members[0])
        coef = torch.empty(len(members), templates)
        nn.init.orthogonal_(coef, generator=gen)
        for i, name in enumerate(members):
            m = half.get_submodule(name)
            mix = TemplateMixing([bank], coef[i : i + 1].clone().to(dtype=w.dtype, device=w.device))
            mix.coefficients.requires_grad_(train_edge_coefficients or name not in edges)
            attach(m, mix)
    verify_forward(output_shape(plan), half, plan.input_size)
    info = MorphInfo(
        kind="half", spec=get_spec(model), width=width, templates=int(templates), share=share,
        set_ids=(set_id,), input_size=tuple(plan.input_size), train_edge_coefficients=train_edge_coefficients,
        original=original_layout(model), extra=attention_record(plan),
    )
    return set_info(half, info)
