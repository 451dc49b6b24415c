"""The rule registry: how the channel analysis learns an op, built-in or yours.

A *rule* is a function ``rule(a, node)`` that takes the :class:`~.analyzer.Analyzer` and an fx node and
returns the :class:`~.plan.TD` (dims) of the node's output, a list of them for several outputs, or
``None`` for a value that is not a tensor. Rules are looked up:

- for a ``call_module`` node, by the module's class: the most specific class in its MRO that has a rule
  (:func:`register_module_rule`, with classes or ``"package.module.Class"`` names); a module class with a
  rule is a leaf for the tracer, so its forward is never traced into;
- for a ``call_function`` node, by the function (:func:`register_function_rule`); a plain Python
  function registered here is also kept whole by the tracer (fx's ``autowrap_functions``);
- for a ``call_method`` node, by the ``Tensor`` method name (:func:`register_method_rule`).

The built-in rules (:mod:`morph.graph.rules`) register themselves when :mod:`morph.graph` is imported;
a later registration for the same key replaces an earlier one. An op without a rule is an
:class:`~morph.errors.UnsupportedOpError` that names the node, its module path and these functions.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn as nn

from .plan import TD

if TYPE_CHECKING:
    from .analyzer import Analyzer

__all__ = [
    "Rule", "register_module_rule", "register_function_rule", "register_method_rule", "has_module_rule",
    "autowrap_functions", "apply_rule",
]

Rule = Callable[["Analyzer", fx.Node], Any]

_MODULE_RULES: dict[type, Rule] = {}
_MODULE_NAME_RULES: dict[str, Rule] = {}  # "package.module.Class": classes of optional libraries (timm)
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}

_HOW = ("teach the analysis this op with morph.graph.register_{kind}_rule (docs/design.md, "
        "'Adding a rule')")


def register_module_rule(*classes: type | str) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles calls of modules of these classes (and their subclasses).

    Args:
        classes: module classes, or qualified class names (``"timm.models.vgg.ConvMlp"``) for classes of a
            library that need not be imported.

    Example::

        @morph.graph.register_module_rule(MyGate)
        def _my_gate(a, node):          # MyGate(x) keeps x's shape and couples nothing
            x = a.value(node.args[0])
            return morph.graph.TD(x.dims, a.shape())
    """

    def deco(fn: Rule) -> Rule:
        for c in classes:
            if isinstance(c, str):
                _MODULE_NAME_RULES[c] = fn
            elif isinstance(c, type) and issubclass(c, nn.Module):
                _MODULE_RULES[c] = fn
            else:
                raise TypeError(f"register_module_rule takes nn.Module classes or their qualified names, got {c!r}")
        return fn

    return deco


def register_function_rule(*functions: Any) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles ``call_function`` nodes of these functions (``torch.*``, ``F.*``,
    ``operator.*`` or your own). Your own plain Python function is then recorded as one call instead of
    being traced into, where a model's ``forward`` calls it by a global name that does not start with an
    underscore (fx's ``autowrap_functions``; for other names, ``torch.fx.wrap`` it)."""

    def deco(fn: Rule) -> Rule:
        for f in functions:
            if not callable(f):
                raise TypeError(f"register_function_rule takes functions, got {f!r}")
            _FUNCTION_RULES[f] = fn
        return fn

    return deco


def register_method_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles ``call_method`` nodes of these ``Tensor`` method names (``"view"``)."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"register_method_rule takes method names, got {n!r}")
            _METHOD_RULES[n] = fn
        return fn

    return deco


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_rule(mod: nn.Module) -> Rule | None:
    for cls in type(mod).__mro__:
        rule = _MODULE_NAME_RULES.get(_qualname(cls)) or _MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def has_module_rule(mod: nn.Module) -> bool:
    """Whether a rule handles ``mod`` (the tracer keeps such modules as leaves)."""
    return _module_rule(mod) is not None


def autowrap_functions() -> tuple[Callable, ...]:
    """Plain Python functions with a rule, outside torch: the tracer records them as one call each."""
    return tuple(
        f for f in _FUNCTION_RULES
        if isinstance(f, types.FunctionType) and not (f.__module__ or "").startswith(("torch.", "torchvision."))
    )


def apply_rule(a: Analyzer, node: fx.Node) -> Any:
    """The value of ``node``: its rule applied, or an ``UnsupportedOpError`` where there is none."""
    if node.op == "call_module":
        mod = a.modules[str(node.target)]
        rule = _module_rule(mod)
        if rule is not None:
            return rule(a, node)
        if type(mod).__module__.startswith("torch.nn") and not any(True for _ in mod.parameters(recurse=False)):
            return _same_shape_module(a, node)
        raise a.fail(
            f"no channel rule for module {_qualname(type(mod))}",
            _HOW.format(kind="module") + ", or make it traceable",
        )
    if node.op == "call_function":
        rule = _FUNCTION_RULES.get(node.target)
        if rule is None and isinstance(node.target, type) and issubclass(node.target, tuple):
            return list(a.value(list(node.args)))  # namedtuple outputs (GoogLeNetOutputs)
        if rule is None:
            if not _any_tensor(a, node):
                return None
            name = getattr(node.target, "__qualname__", str(node.target))
            raise a.fail(f"no channel rule for function {name}", _HOW.format(kind="function"))
        return rule(a, node)
    if node.op == "call_method":
        rule = _METHOD_RULES.get(str(node.target))
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
