"""Channel analysis: which dims of which tensors and parameters must change width together.

``analyze(model)`` traces the model (:mod:`.trace`), then walks the graph once, applying the rule
of each op (:mod:`.rules`) to the :data:`~.coupling.Dim` of its inputs. The result, a
:class:`ChannelPlan`, names every parameterized layer by module path and tells, for each of its
dims, which channel groups it is made of. Widening or narrowing a model is then arithmetic on the
plan (:mod:`morph.scale`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import MorphError, UnsupportedOpError
from .coupling import CouplingError, Dim, Groups, Seg
from .trace import node_qualname, trace

__all__ = ["ChannelPlan", "LayerPlan", "ConstSite", "TD", "analyze", "default_input_size"]


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


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size if it declares one (timm ``pretrained_cfg``), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3:
        return tuple(int(s) for s in size)  # type: ignore[return-value]
    return (3, 224, 224)


class _Analyzer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.g = Groups()
        self.env: dict[fx.Node, Any] = {}
        self.layers: dict[str, LayerPlan] = {}
        self.params: dict[str, tuple[Dim, ...]] = {}
        self.consts: list[ConstSite] = []
        self.node: fx.Node | None = None

    # -- helpers used by rules ------------------------------------------------------------------
    def shape(self, node: fx.Node | None = None) -> Any:
        node = node or self.node
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return tuple(meta.shape)
        return [tuple(m.shape) if hasattr(m, "shape") else None for m in meta]

    def fresh(self, size: int, **flags: bool) -> Dim:
        return self.g.new_dim(size, **flags)

    def structural(self, size: int) -> Dim:
        return self.g.new_dim(size, structural=True)

    def fail(self, what: str, hint: str = "") -> UnsupportedOpError:
        node = self.node
        assert node is not None
        return UnsupportedOpError(node.name, node_qualname(node), what, hint)

    def add_layer(self, plan: LayerPlan) -> None:
        if plan.name in self.layers:
            prev = self.layers[plan.name]
            # a module called twice: couple the dims of both calls
            self.g.unify(prev.in_dim, plan.in_dim)
            self.g.unify(prev.out_dim, plan.out_dim)
            return
        plan.order = len(self.layers)
        self.layers[plan.name] = plan

    def value(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        return a

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> None:
        from .rules import apply_rule

        for node in self.gm.graph.nodes:
            self.node = node
            try:
                if node.op == "placeholder":
                    shape = self.shape(node)
                    if shape is None:
                        self.env[node] = None
                        continue
                    dims = tuple(self.g.new_dim(s, fixed=True, structural=True) for s in shape)
                    self.env[node] = TD(dims, shape)
                elif node.op == "output":
                    self._fix_outputs(self.value(node.args[0]))
                elif node.op == "get_attr":
                    self.env[node] = self._get_attr(node)
                else:
                    self.env[node] = apply_rule(self, node)
            except CouplingError as e:
                raise self.fail(str(e), "the op couples channels in a way morph does not model") from e

    def _fix_outputs(self, v: Any) -> None:
        if isinstance(v, TD):
            for d in v.dims:
                self.g.mark_fixed(d)
        elif isinstance(v, (list, tuple)):
            for x in v:
                self._fix_outputs(x)
        elif isinstance(v, dict):
            for x in v.values():
                self._fix_outputs(x)

    def _get_attr(self, node: fx.Node) -> Any:
        target = str(node.target)
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            return None
        dims = tuple(self.structural(s) if s == 1 else self.fresh(s) for s in obj.shape)
        if target in self.params:
            for d0, d1 in zip(self.params[target], dims, strict=True):
                self.g.unify(d0, d1)
            dims = self.params[target]
        else:
            self.params[target] = dims
        return TD(dims, tuple(obj.shape))


def analyze(
    model: nn.Module, input_size: tuple[int, ...] | None = None, *, batch_size: int = 2
) -> ChannelPlan:
    """Trace ``model`` and find its coupled channel groups.

    Args:
        model: any nn.Module that torch.fx can trace (with timm's and torchvision's leaf rules).
        input_size: ``(C, H, W)`` of one input; defaults to :func:`default_input_size`.
        batch_size: batch used for shape propagation.

    Raises:
        UnsupportedOpError: an op the analysis does not understand, naming the node and module path.
    """
    input_size = tuple(input_size or default_input_size(model))
    p = next(iter(model.parameters()), None)
    example = torch.zeros((batch_size, *input_size), dtype=p.dtype if p is not None else torch.float32)
    gm = trace(model, example)
    a = _Analyzer(gm)
    a.run()
    if not _covered(model, a):
        # heads that run only in training (googlenet and inception aux logits): trace in train mode
        gm = trace(model, example, train=True)
        a = _Analyzer(gm)
        a.run()
        _check_coverage(model, a)
    node_dims = {n.name: a.env.get(n) for n in gm.graph.nodes}
    return ChannelPlan(a.g, a.layers, a.params, a.consts, gm, input_size, node_dims)


def _covered(model: nn.Module, a: _Analyzer) -> bool:
    try:
        _check_coverage(model, a)
    except MorphError:
        return False
    return True


def _check_coverage(model: nn.Module, a: _Analyzer) -> None:
    """Every parameter must belong to an analyzed layer or a get_attr tensor: no silent guesses."""
    covered = set(a.layers)
    for name, _ in model.named_parameters():
        mod, _, pname = name.rpartition(".")
        parts = name.split(".")
        if name in a.params or any(".".join(parts[:i]) in covered for i in range(1, len(parts))):
            continue
        m = model.get_submodule(mod) if mod else model
        raise MorphError(
            f"parameter {name} ({type(m).__name__}) is not used in the traced forward (eval or train mode); "
            "morph cannot tell which channels it belongs to: remove the unused module"
        )


# operator helpers exported for rules
BINARY_OPS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow)
