"""The walk over a traced graph that the rules take part in.

:class:`Analyzer` runs the graph's nodes in order and asks the registry (:mod:`morph.graph.registry`)
for the rule of each op. Rules receive it: its helpers give a node's shape, new dims, the value of an
argument, and the error to raise (:meth:`Analyzer.fail`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..errors import UnsupportedOpError
from .coupling import CouplingError, Dim, Groups
from .plan import TD, ConstSite, LayerPlan
from .registry import function_rule, method_rule, module_rule
from .trace import node_qualname

__all__ = ["Analyzer", "apply_rule"]

_HOW = ("teach the analysis this op with morph.graph.register_{kind}_rule (docs/design.md, "
        "'Adding a rule')")


class Analyzer:
    """The state of one analysis: channel groups, the dims of each node's value, the layers found.

    Rules use :attr:`g` (the :class:`~.coupling.Groups`), :attr:`modules`, :attr:`node`, and the helpers
    :meth:`shape`, :meth:`fresh`, :meth:`structural`, :meth:`value`, :meth:`add_layer` and :meth:`fail`.
    """

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


def apply_rule(a: Analyzer, node: fx.Node) -> Any:
    """The value of ``node``: its rule applied, or an ``UnsupportedOpError`` where there is none."""
    if node.op == "call_module":
        mod = a.modules[str(node.target)]
        rule = module_rule(mod)
        if rule is not None:
            return rule(a, node)
        if type(mod).__module__.startswith("torch.nn") and not any(True for _ in mod.parameters(recurse=False)):
            return _same_shape_module(a, node)
        raise a.fail(
            f"no channel rule for module {type(mod).__module__}.{type(mod).__qualname__}",
            _HOW.format(kind="module") + ", or make it traceable",
        )
    if node.op == "call_function":
        rule = function_rule(node.target)
        if rule is None and isinstance(node.target, type) and issubclass(node.target, tuple):
            return list(a.value(list(node.args)))  # namedtuple outputs (GoogLeNetOutputs)
        if rule is None:
            if not _any_tensor(a, node):
                return None
            name = getattr(node.target, "__qualname__", str(node.target))
            raise a.fail(f"no channel rule for function {name}", _HOW.format(kind="function"))
        return rule(a, node)
    if node.op == "call_method":
        rule = method_rule(str(node.target))
        if rule is None:
            if not isinstance(a.value(node.args[0]), TD):
                return None
            raise a.fail(f"no channel rule for Tensor.{node.target}", _HOW.format(kind="method"))
        return rule(a, node)
    raise a.fail(f"unexpected node op {node.op}")


def _same_shape_module(a: Analyzer, node: fx.Node) -> TD:
    """A parameter-free ``torch.nn`` module (activation, dropout, identity) that keeps its input's shape."""
    x = a.value(node.args[0] if node.args else next(iter(node.kwargs.values())))
    out_shape = a.shape()
    if not isinstance(x, TD) or out_shape is None or isinstance(out_shape, list):
        raise a.fail("expected one tensor in and one tensor out")
    if tuple(out_shape) != x.shape:
        raise a.fail(f"module {type(a.modules[str(node.target)]).__name__} changes the shape {x.shape} -> {out_shape}")
    return TD(x.dims, out_shape)


def _any_tensor(a: Analyzer, node: fx.Node) -> bool:
    found = False

    def visit(v: Any) -> None:
        nonlocal found
        if isinstance(v, TD):
            found = True
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    visit(a.value(list(node.args) + list(node.kwargs.values())))
    return found
