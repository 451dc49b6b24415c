"""What the channel analysis finds: the dims of every value, every layer's channel groups, constants.

:class:`ChannelPlan` is the result of :func:`morph.graph.analyze`; :class:`TD` is what a rule returns for
one tensor value (:mod:`morph.graph.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .coupling import Dim, Groups, Seg

__all__ = ["TD", "LayerPlan", "ConstSite", "ChannelPlan"]


class TD:
    """The dims of one tensor value in the graph."""

    __slots__ = ("dims", "shape")

    def __init__(self, dims: tuple[Dim, ...], shape: tuple[int, ...]) -> None:
        assert len(dims) == len(shape), (dims, shape)
        self.dims = tuple(dims)
        self.shape = tuple(int(s) for s in shape)


@dataclass
class LayerPlan:
    """One parameterized leaf module.

    Attributes:
        name: module path (``layer1.0.conv1``).
        kind: ``conv``, ``linear``, ``norm`` (BatchNorm-like), ``groupnorm`` or ``layernorm``.
        in_dim: channel dim of the input (conv/linear), or the normalized channel dim (norms).
        out_dim: channel dim of the output (conv/linear); ``in_dim`` for norms.
        groups: conv groups.
        order: execution order among layers.
    """

    name: str
    kind: str
    in_dim: Dim
    out_dim: Dim
    groups: int = 1
    order: int = 0
    ln_dims: tuple[Dim, ...] = ()


@dataclass
class ConstSite:
    """A literal channel count in the graph (view/reshape/slice/split) that must be rewritten."""

    node: str
    kind: str  # "shape" | "slice" | "split"
    index: int  # position in the shape / which slice
    dims: tuple[Dim, ...]  # shape: the dim; split: the pieces; slice: (prefix, middle)
    qualname: str = ""
    index_tuple: tuple = ()  # slice: the full (Ellipsis-expanded) index


@dataclass
class ChannelPlan:
    """Result of :func:`analyze`."""

    groups: Groups
    layers: dict[str, LayerPlan]
    params: dict[str, tuple[Dim, ...]]  # free parameters/buffers read by get_attr: per-dim
    consts: list[ConstSite]
    gm: fx.GraphModule
    input_size: tuple[int, ...]
    node_dims: dict[str, Any] = field(default_factory=dict)

    _sizes: dict[float, dict[int, int]] = field(default_factory=dict)

    # -- arithmetic -----------------------------------------------------------------------------
    def atom_size(self, g: int, width: float) -> int:
        """New width of an atom group: ``round(width * size)`` for groups that scale; the children of a
        refined group share their parent's rounded width (largest remainder), so pieces add up."""
        if width not in self._sizes:
            self._sizes[width] = self._allocate(width)
        r = self.groups.find(g)
        return self._sizes[width].get(r, self._own(r, width))

    def _own(self, r: int, width: float) -> int:
        n = self.groups.size[r]
        if n <= 1 or not self.groups.scales(r):
            return n
        return max(1, int(n * width + 0.5))

    def _allocate(self, width: float) -> dict[int, int]:
        g = self.groups
        sizes: dict[int, int] = {}

        def assign(r: int, n_new: int) -> None:
            if r in sizes:
                return
            sizes[r] = n_new
            if r not in g.children:
                return
            kids = [g.find(c) for c in g.children[r]]
            fixed = [not g.scales(k) or g.size[k] <= 1 for k in kids]
            free_old = sum(g.size[k] for k, f in zip(kids, fixed, strict=True) if not f)
            budget = n_new - sum(g.size[k] for k, f in zip(kids, fixed, strict=True) if f)
            exact = [g.size[k] * budget / free_old if not f and free_old else g.size[k] for k, f in zip(kids, fixed, strict=True)]
            alloc = [int(e) for e in exact]
            rest = (budget - sum(a for a, f in zip(alloc, fixed, strict=True) if not f)) if free_old else 0
            order = sorted((i for i, f in enumerate(fixed) if not f), key=lambda i: -(exact[i] - alloc[i]))
            for i in order[: max(rest, 0)]:
                alloc[i] += 1
            for k, n in zip(kids, alloc, strict=True):
                assign(k, max(n, 1))

        child_roots = {g.find(c) for kids in g.children.values() for c in kids}
        for r in range(len(g.parent)):
            if g.find(r) == r and r not in child_roots and r not in g.alias:
                assign(r, self._own(r, width))
        return sizes

    def size(self, dim: Dim, width: float = 1.0) -> int:
        return sum(self.atom_size(s.group, width) * s.inner for s in self.groups.atoms(dim))

    def scales(self, dim: Dim) -> bool:
        return any(self.groups.scales(s.group) for s in self.groups.atoms(dim))

    def atoms(self, dim: Dim) -> list[Seg]:
        return self.groups.atoms(dim)

    def conv_layers(self) -> list[LayerPlan]:
        """Conv and linear layers in execution order."""
        return sorted((p for p in self.layers.values() if p.kind in ("conv", "linear")), key=lambda p: p.order)
