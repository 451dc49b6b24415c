"""The *shape* of a growth step: which channels are new and where they go.

A :class:`Layout` is computed once from the channel plan and knows nothing about values. For every
atom channel group of the plan it holds the old and new width, a **rule** and a **mapping**:

- ``keep``: the group does not grow;
- ``replicate``: new channels are copies of old ones (``mapping[j]`` names the source channel);
- ``fresh``: new channels are new neurons whose values a growth method decides.

Old channels keep their index inside their group and new ones follow them, which is the layout
:func:`morph.scale.dim_index` gives (around a grouped conv that keeps its group count while its groups
widen, the same block by block: one block per conv group, see :func:`_block_widening_groups`); a dim made of several groups (a concatenation) lists each group's
old and new channels together. :meth:`Layout.dim` turns a plan dim into a :class:`DimMap`, the
per-position view every growth method works with.

The target shapes are those of :func:`morph.scale_width` of the *reference* model at the new width:
for a plain model that morph scaled from a recorded spec (``morph convert --plain``), the reference is
the stock model and the target the stock architecture at ``width x`` the model's width, so that
``morph.load`` rebuilds a grown checkpoint like any other plain one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import MorphError
from ..graph.analyze import ChannelPlan, analyze
from ..graph.coupling import Dim
from ..graph.mha import traceable
from ..graph.rules import attention_width
from ..info import get_info
from ..scale import apply_width, check_width, layer_shapes

__all__ = ["DimMap", "GroupGrowth", "Layout", "build_layout", "OLD", "REPLICA", "FRESH"]

OLD, REPLICA, FRESH = 0, 1, 2


@dataclass(frozen=True)
class DimMap:
    """One channel dim of the grown model, position by position.

    Attributes:
        src: index into the old dim: the channel itself (old), its source (replica), or a cycling
            stand-in (fresh; methods overwrite those).
        kind: ``OLD``, ``REPLICA`` or ``FRESH``.
        count: how many old-or-replica positions share ``src``.
        group: the atom group (plan root) of each position.
        n_old: length of the old dim.
        share: the fraction of ``src``'s fan-out weights each position takes (Net2Net's rule: ``1 / count``
            for an even split; the shares of one source's positions sum to 1); ``None``: ``1 / count``.
    """

    src: torch.Tensor
    kind: torch.Tensor
    count: torch.Tensor
    group: torch.Tensor
    n_old: int
    share: torch.Tensor | None = None

    @property
    def fanout(self) -> torch.Tensor:
        """Per position, the factor its fan-out weights are multiplied by (``share``, else ``1 / count``)."""
        return self.share if self.share is not None else 1.0 / self.count

    @property
    def fresh(self) -> torch.Tensor:
        return self.kind == FRESH

    @property
    def kept(self) -> torch.Tensor:
        return self.kind != FRESH

    def __len__(self) -> int:
        return int(self.src.numel())


@dataclass
class GroupGrowth:
    """How one atom group grows."""

    root: int
    old: int
    new: int
    rule: str  # keep | replicate | fresh
    mapping: torch.Tensor  # [new]: source channel of each position (old: itself)
    note: str = ""  # why a non-default rule ran (reported per group)
    blocks: int = 1  # equal blocks (the groups of a grouped conv that keeps its group count), each old-then-new
    share: torch.Tensor | None = None  # [new]: fan-out share of each kept position (None: 1 / replica count)

    @property
    def old_mask(self) -> torch.Tensor:
        """Which positions hold old channels: the first ``old / blocks`` of every block."""
        ob, nb = self.old // self.blocks, self.new // self.blocks
        return (torch.arange(self.new) % nb) < ob


@dataclass
class Layout:
    """The shape of one growth step (see the module docstring)."""

    plan: ChannelPlan
    reference: nn.Module
    w_from: float
    w_to: float
    groups: dict[int, GroupGrowth]
    conv_groups: dict[str, int] | None = None  # the original's group counts when the target is the original
    #: where :meth:`dim`'s maps live: the grown model's device (set by the plain methods), so that every index
    #: and mask they give is on the device of the weights it selects from; ``None``: the CPU
    device: torch.device | None = None
    _dims: dict[tuple, DimMap] = field(default_factory=dict)

    # -- per-position maps ------------------------------------------------------------------------
    def dim(self, dim: Dim) -> DimMap:
        """The map of one plan dim, on :attr:`device` (computed on the CPU from the groups' mappings, then moved)."""
        key = tuple(dim)
        if key not in self._dims:
            src, kind, count, group, share = [], [], [], [], []
            base = 0
            for s in self.plan.atoms(dim):
                g = self.groups[self.plan.groups.find(s.group)]
                ch = g.mapping
                k = torch.full((g.new,), OLD, dtype=torch.int8)
                k[~g.old_mask] = FRESH if g.rule == "fresh" else REPLICA
                kept = k != FRESH
                cnt = torch.bincount(ch[kept], minlength=g.old).to(torch.float64)[ch].clamp_min(1)
                cnt[~kept] = 1
                sh = g.share.to(torch.float64) if g.share is not None else 1.0 / cnt
                r = torch.arange(s.inner)
                src.append((base + ch[:, None] * s.inner + r[None, :]).reshape(-1))
                kind.append(k.repeat_interleave(s.inner))
                count.append(cnt.repeat_interleave(s.inner))
                share.append(sh.repeat_interleave(s.inner))
                group.append(torch.full((g.new * s.inner,), g.root, dtype=torch.long))
                base += g.old * s.inner
            cat = lambda xs, dt: (torch.cat(xs) if xs else torch.zeros(0, dtype=dt)).to(self.device)  # noqa: E731
            self._dims[key] = DimMap(cat(src, torch.long), cat(kind, torch.int8), cat(count, torch.float64),
                                     cat(group, torch.long), base, cat(share, torch.float64))
        return self._dims[key]

    # -- graph queries ----------------------------------------------------------------------------
    def roots(self, dim: Dim) -> list[int]:
        return [self.plan.groups.find(s.group) for s in self.plan.atoms(dim)]

    def producers(self, root: int) -> list[str]:
        """Conv/linear layers whose output holds the group."""
        return [p.name for p in self.plan.conv_layers() if root in self.roots(p.out_dim)]

    def consumers(self, root: int) -> list[str]:
        """Conv/linear layers whose input holds the group."""
        return [p.name for p in self.plan.conv_layers() if root in self.roots(p.in_dim)]

    def growing(self) -> list[GroupGrowth]:
        return [g for g in self.groups.values() if g.new > g.old]

    def skeleton(self) -> nn.Module:
        """The grown model's modules at their new shapes, values not yet decided."""
        new, _ = apply_width(self.reference, self.plan, self.w_to, groups=self.conv_groups)
        return new


def _reference(model: nn.Module, input_size: tuple[int, ...] | None,
               plan: ChannelPlan | None = None) -> tuple[nn.Module, ChannelPlan, float]:
    """The model whose ``scale_width`` gives both the given model's shapes and the target's."""
    info = get_info(model)
    if plan is not None:  # the caller's analysis of the model itself
        return model, plan, 1.0
    from ..zoo import TRUSTED_FACTORIES, build_recorded

    rebuildable = info is not None and info.spec is not None and (
        info.spec.source != "callable" or info.spec.name in TRUSTED_FACTORIES)  # never import a recorded callable
    if rebuildable and info.kind == "plain" and info.width != 1:
        base = traceable(build_recorded(info.spec))
        mode = (info.extra or {}).get("attention_width")
        with attention_width(mode) if mode else contextlib.nullcontext():  # the mode the model was made in
            plan = analyze(base, info.input_size)
        shapes = layer_shapes(plan, base, info.width)
        if all(tuple(model.get_submodule(n).weight.shape) == s.weight_shape
               for n, s in shapes.items() if s.kind in ("conv", "linear")):
            return base, plan, info.width
    size = input_size or (info.input_size if info is not None else None)
    return model, analyze(model, size), 1.0


def _constrained(plan: ChannelPlan) -> dict[int, str]:
    """Groups whose replicas must be whole blocks in order (cycling): a per-channel random map would
    break GroupNorm groups, LayerNorm statistics, or the groups of a grouped convolution."""
    out: dict[int, str] = {}
    find = plan.groups.find
    for p in plan.layers.values():
        if p.kind == "layernorm":
            for d in p.ln_dims:
                for s in plan.atoms(d):
                    out.setdefault(find(s.group), f"LayerNorm {p.name}")
        elif p.kind == "groupnorm":
            for s in plan.atoms(p.in_dim):
                out.setdefault(find(s.group), f"GroupNorm {p.name}")
        elif p.kind == "conv" and p.groups > 1:
            m = plan.gm.get_submodule(p.name)
            if m.groups != m.in_channels:
                for s in plan.atoms(p.in_dim) + plan.atoms(p.out_dim):
                    out.setdefault(find(s.group), f"grouped conv {p.name}")
    for r in plan.groups.derived:
        out.setdefault(find(r), "channel shuffle")
    return out


def layernorm_groups(plan: ChannelPlan) -> dict[int, str]:
    """Groups normalized across channels (LayerNorm): adding zero channels would change their
    statistics, so every method grows them by uniform replication."""
    out: dict[int, str] = {}
    for p in plan.layers.values():
        if p.kind == "layernorm":
            for d in p.ln_dims:
                for s in plan.atoms(d):
                    out.setdefault(plan.groups.find(s.group), p.name)
    return out


def token_bias_groups(plan: ChannelPlan) -> dict[int, str]:
    """Groups that a token-mixing Linear (one over a structural dim: ResMLP's ``linear_tokens``, Mixer's token
    MLP) reads as a batch dim while adding its bias: a channel of zeros leaves it as the bias, not zero, so
    these groups too grow by replication under every method (replicas compute what their source does)."""
    out: dict[int, str] = {}
    find = plan.groups.find
    for node in plan.gm.graph.nodes:
        p = plan.layers.get(str(node.target)) if node.op == "call_module" else None
        if p is None or p.kind != "linear" or not plan.groups.is_structural(p.in_dim):
            continue
        if getattr(plan.gm.get_submodule(p.name), "bias", None) is None:
            continue
        x = plan.node_dims.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        for d in (x.dims[:-1] if x is not None else ()):
            for s in plan.atoms(d):
                if not plan.groups.structural[find(s.group)]:
                    out.setdefault(find(s.group), p.name)
    return out


_SHAPE_ONLY = {"permute", "transpose", "reshape", "view", "contiguous", "flatten", "unsqueeze", "squeeze"}


def softmax_fed_groups(plan: ChannelPlan) -> dict[int, str]:
    """Groups that a Linear or conv reads straight from a softmax (through shape-only ops and dropout): CaiT's
    talking heads mix the heads' attention probabilities with ``proj_w``. A new head's probabilities are
    ``1/N``, not 0, so fresh channels with random outgoing weights would change the function: these groups grow
    by replication under every method."""
    out: dict[int, str] = {}
    find = plan.groups.find
    modules = dict(plan.gm.named_modules())
    for node in plan.gm.graph.nodes:
        p = plan.layers.get(str(node.target)) if node.op == "call_module" else None
        if p is None or p.kind not in ("linear", "conv") or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        while True:
            name = str(src.target) if src.op == "call_method" else getattr(src.target, "__name__", "")
            is_drop = src.op == "call_module" and isinstance(modules.get(str(src.target)), nn.Dropout)
            if (name in _SHAPE_ONLY or is_drop) and src.args and isinstance(src.args[0], fx.Node):
                src = src.args[0]
                continue
            break
        if name == "softmax":
            for s in plan.atoms(p.in_dim):
                if not plan.groups.structural[find(s.group)]:
                    out.setdefault(find(s.group), p.name)
    return out


def _internal(plan: ChannelPlan, root: int) -> bool:
    """A block-internal group: one producing and one consuming conv/linear layer (growneuron's placement)."""
    find = plan.groups.find
    prod = [p for p in plan.conv_layers() if root in [find(s.group) for s in plan.atoms(p.out_dim)]]
    cons = [p for p in plan.conv_layers() if root in [find(s.group) for s in plan.atoms(p.in_dim)]]
    return len(prod) == 1 and len(cons) == 1 and prod[0].name != cons[0].name


def build_layout(
    model: nn.Module, width: float, *, rule: str = "fresh", mapping: str = "cycle", which: str = "all",
    gen: torch.Generator | None = None, input_size: tuple[int, ...] | None = None, plan: ChannelPlan | None = None,
    device: torch.device | None = None,
) -> Layout:
    """The layout of growing ``model`` by ``width`` (a ratio, e.g. 2.0).

    Args:
        rule: what new channels of a growing group are: ``fresh`` (new neurons) or ``replicate``.
            LayerNorm-normalized groups always replicate (uniformly, so that their statistics hold).
        mapping: source channels of replicas: ``cycle`` (channel ``j`` copies ``j mod old``) or
            ``random`` (uniform, Net2Net's g(j)); groups tied to GroupNorm, LayerNorm, grouped convs or
            a channel shuffle always cycle.
        which: ``all`` (every group that can grow: the stock architecture at the new width) or
            ``internal`` (only groups between one producing and one consuming layer).
        plan: a precomputed :func:`morph.analyze` of ``model`` itself (saves the trace when growing one
            model several ways); the target is then ``model`` at ``width`` x its own width.
        device: where :meth:`Layout.dim` puts its maps (the model's device); the groups' mappings, and the
            random draws that make them (``gen``, a CPU generator), stay on the CPU.
    """
    ratio = check_width(width)
    if ratio < 1:
        raise MorphError(f"growth needs a width ratio >= 1, got {ratio:g}; use morph.scale_width to narrow a model")
    if which not in ("all", "internal"):
        raise MorphError(f"which groups grow must be 'all' or 'internal', got {which!r}")
    if mapping not in ("cycle", "random"):
        raise MorphError(f"mapping must be 'cycle' or 'random', got {mapping!r}")
    ref, plan, w0 = _reference(model, input_size, plan)
    w1 = w0 * ratio
    info = get_info(model)
    conv_groups = None
    if ref is model and info is not None and info.original and abs(info.width * ratio - 1) < 1e-9:
        # growing a reduced model back to its original's width: the original's group counts, which the
        # channel plan alone cannot tell from a scaled-down model (scale_width records them)
        conv_groups = dict(info.original.get("groups", {}))
    plan = dataclasses.replace(plan, _sizes={})
    old_sizes, new_sizes = plan._allocate(w0), plan._allocate(w1)
    constrained = _constrained(plan)
    ln = layernorm_groups(plan)
    tokens = token_bias_groups(plan)
    soft = softmax_fed_groups(plan)
    roots = {plan.groups.find(s.group) for p in plan.layers.values()
             for d in (p.in_dim, p.out_dim, *p.ln_dims) for s in plan.atoms(d)}
    roots |= {plan.groups.find(s.group) for dims in plan.params.values() for d in dims for s in plan.atoms(d)}
    groups: dict[int, GroupGrowth] = {}
    for r in sorted(roots):
        m = old_sizes.get(r, plan._own(r, w0))
        n = new_sizes.get(r, plan._own(r, w1))
        if which == "internal" and n > m and not _internal(plan, r):
            n = new_sizes[r] = m
        if n < m:
            raise MorphError(f"channel group {r} would shrink from {m} to {n} channels; growth only adds channels")
        note = ""
        g_rule = "keep" if n == m else rule
        if g_rule == "fresh" and r in ln:
            g_rule, note = "replicate", f"normalized across channels by {ln[r]}: replicated uniformly"
        elif g_rule == "fresh" and r in tokens:
            g_rule, note = "replicate", f"token-mixing {tokens[r]} adds its bias to every channel: replicated"
        elif g_rule == "fresh" and r in soft:
            g_rule, note = "replicate", f"{soft[r]} reads a softmax (a new channel would be 1/N, not 0): replicated"
        ch = torch.arange(n)
        src = ch % max(m, 1)
        if g_rule == "replicate" and mapping == "random" and n > m:
            if r in constrained:
                note = note or f"tied to {constrained[r]}: replicas cycle"
            else:
                src = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=gen)])
        if g_rule == "replicate" and r in ln and n % m:
            note += f" (inexact: {n} is not a multiple of {m})"
        groups[r] = GroupGrowth(r, m, n, g_rule, src, note)
    # the plan answers sizes at both widths from the (possibly edited) allocation
    plan._sizes[w0], plan._sizes[w1] = old_sizes, new_sizes
    _block_widening_groups(model, ref, plan, w1, groups, conv_groups)
    return Layout(plan, ref, w0, w1, groups, conv_groups, device)


def _block_widening_groups(model: nn.Module, ref: nn.Module, plan: ChannelPlan, w1: float,
                           groups: dict[int, GroupGrowth], conv_groups: dict[str, int] | None) -> None:
    """A grouped conv that keeps its group count while its channels grow (RegNet halves whose group width did
    not divide the half's channels) widens each group: its channel groups then grow block by block, old
    channels first in every block, so that each old channel stays in its conv group (replicas too)."""
    shapes = layer_shapes(plan, ref, w1, conv_groups)
    find = plan.groups.find
    for p in plan.conv_layers():
        if p.kind != "conv" or p.groups <= 1:
            continue
        old_g = model.get_submodule(p.name).groups
        if old_g <= 1 or shapes[p.name].groups != old_g:
            continue
        for dim in (p.in_dim, p.out_dim):
            atoms = plan.atoms(dim)
            g = groups[find(atoms[0].group)] if len(atoms) == 1 and atoms[0].inner == 1 else None
            if g is None or g.new == g.old:
                continue
            if g.old % old_g or g.new % old_g:
                raise MorphError(f"{p.name}: {g.old} -> {g.new} channels do not split into its {old_g} groups")
            if g.blocks not in (1, old_g):
                raise MorphError(f"{p.name}: channel group {g.root} is tied to grouped convs of {g.blocks} and "
                                 f"{old_g} groups that both widen; growth cannot keep both")
            ob, nb = g.old // old_g, g.new // old_g
            t = torch.arange(g.new)
            block, pos = t // nb, t % nb
            src = block * ob + pos % ob  # old positions: themselves; new ones: a channel of their own block
            note = f"grouped conv {p.name} widens its {old_g} groups: grown block by block"
            groups[g.root] = dataclasses.replace(g, mapping=src, blocks=old_g, note=note)


def split_unevenly(layout: Layout, spread: float, gen: torch.Generator) -> None:
    """Replicated channels and their source take uneven shares of the source's fan-out weights (LEMON, Wang et
    al. 2024) instead of Net2Net's ``1 / count``: the ``c`` positions of a source take weights ``1 + spread x t``
    with ``t`` evenly spaced over ``[-1, 1]`` (``c = 2``: ``1 -+ spread``), in a random order, normalized to sum
    to 1. The function is kept exactly (the shares sum to 1), and replicas, whose incoming weights are equal,
    get gradients in proportion to their shares (at ``spread = 0.5`` at least a third apart), so they part after
    the first step instead of staying copies of their source forever."""
    if not 0 <= spread < 1:
        raise MorphError(f"split must be in [0, 1), got {spread:g}")
    if spread == 0:
        return
    for g in layout.growing():
        if g.rule != "replicate":
            continue
        w = torch.ones(g.new, dtype=torch.float64)
        counts = torch.bincount(g.mapping, minlength=g.old)
        for src in (counts > 1).nonzero().flatten().tolist():
            pos = (g.mapping == src).nonzero().flatten()
            t = torch.linspace(-1.0, 1.0, len(pos), dtype=torch.float64)
            w[pos] = 1 + spread * t[torch.randperm(len(pos), generator=gen)]
        total = torch.zeros(g.old, dtype=torch.float64).index_add_(0, g.mapping, w)
        g.share = w / total[g.mapping]
    layout._dims.clear()
