"""Tracing: a leaf-aware fx tracer that keeps module paths, plus shape propagation."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import MorphError
from .forwards import traceable_forward
from .mha import TracedMultiheadAttention
from .registry import autowrap_functions, has_module_rule

__all__ = ["MorphTracer", "trace", "node_qualname"]

# Module types the analysis has rules for are leaves, whatever their subclass does inside
# (timm's StdConv2d, Conv2dSame, BatchNormAct2d, LayerNorm2d ...).
_LEAF_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


# timm modules registered as not traceable for reasons that do not apply to morph's tracer: NormFreeBlock's
# in-place ``mul_`` (skipinit) has no users and is lost to dead-code elimination, which morph never runs.
_TRACE_THROUGH = ("timm.models.nfnet.NormFreeBlock",)


def _timm_notrace() -> tuple[set, set]:
    try:
        from timm.layers import _fx as tfx

        leaves = {c for c in tfx._leaf_modules if f"{c.__module__}.{c.__qualname__}" not in _TRACE_THROUGH}
        return leaves, set(tfx._autowrap_functions)
    except Exception:  # timm absent or its private registry moved: trace everything
        return set(), set()


class MorphTracer(fx.Tracer):
    """fx tracer that treats as leaves: morph's rule types, modules with a registered rule
    (:func:`morph.graph.register_module_rule`), torch.nn modules, and the modules timm marks as not
    traceable (``timm.layers.register_notrace_module``), as timm's own fx helpers do, except those with a
    traceable stand-in forward (:mod:`morph.graph.forwards`), which it traces. Functions with a
    registered rule are recorded as one call (:func:`morph.graph.register_function_rule`)."""

    def __init__(self) -> None:
        leaf_mods, autowrap = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap) + autowrap_functions())
        self._timm_leaves = tuple(leaf_mods)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, TracedMultiheadAttention):  # traced through: its Linear modules and heads
            return False
        if isinstance(m, _LEAF_TYPES) or has_module_rule(m):
            return True
        if traceable_forward(m) is not None:
            return False
        if self._timm_leaves and isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        stand_in = traceable_forward(m)
        if stand_in is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, lambda *a, **k: stand_in(m, *a, **k), args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module, example: torch.Tensor, *, train: bool = False) -> fx.GraphModule:
    """Trace ``model`` in eval mode (train mode if ``train``) and record the shape of every node (``node.meta["tensor_meta"]``).

    Raises:
        MorphError: the model cannot be traced symbolically, with fx's reason.
    """
    was_training = model.training
    model.train(train)
    try:
        tracer = MorphTracer()
        try:
            graph = tracer.trace(model)
        except Exception as e:
            raise MorphError(
                f"torch.fx cannot trace {type(model).__name__}: {str(e).splitlines()[0]}; "
                "mark the offending submodule as a leaf with timm.layers.register_notrace_module"
            ) from e
        if isinstance(model, fx.GraphModule):
            _keep_module_paths(model.graph, graph)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        with torch.no_grad(), torch.random.fork_rng():
            try:
                _propagate_shapes(gm, example)
            except Exception as e:
                raise MorphError(
                    f"running {type(model).__name__} on an input of shape {tuple(example.shape)} failed: "
                    f"{str(e).splitlines()[0]}; pass a larger input_size"
                ) from e
    finally:
        model.train(was_training)
    return gm


def _keep_module_paths(old: fx.Graph, new: fx.Graph) -> None:
    """A GraphModule's code runs at its root: retraced, its nodes lose the module paths (``nn_module_stack``)
    that the graph it runs recorded, such as the attention module a reshape into heads runs in, whose head
    count the reshape rule reads (a rewritten half of timm's maxvit: without it, ``view(B, -1, heads,
    3 * head_dim)`` is read as a channel shuffle). They are copied from the GraphModule's own graph onto the
    nodes the retrace reproduced (same name, op and target) that have none."""
    recorded = {n.name: n for n in old.nodes}
    for n in new.nodes:
        o = recorded.get(n.name)
        if (o is not None and o.op == n.op and o.target == n.target and o.meta.get("nn_module_stack")
                and not n.meta.get("nn_module_stack")):
            n.meta["nn_module_stack"] = dict(o.meta["nn_module_stack"])


def _propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape: on fake tensors (shapes only, no arithmetic: a resnet50 at
    224x224 in a fraction of a second instead of a full forward pass), or, where a module needs real
    values (data-dependent shapes, ops without a fake implementation), by running it."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(example)
        return
    except Exception:
        for node in gm.graph.nodes:  # start again from clean metadata
            node.meta.pop("tensor_meta", None)
    ShapeProp(gm).propagate(example)


def node_qualname(node: fx.Node) -> str:
    """The module path a node belongs to, as users see it (``layer1.0.conv1``)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    if node.op == "get_attr":
        return str(node.target)
    return ""
