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
from typing import Any

import torch.fx as fx
import torch.nn as nn

__all__ = [
    "Rule", "register_module_rule", "register_function_rule", "register_method_rule", "has_module_rule",
    "autowrap_functions", "module_rule", "function_rule", "method_rule",
]

Rule = Callable[[Any, fx.Node], Any]
"""``rule(a, node)``: ``a`` is the :class:`~.analyzer.Analyzer` (which calls the rules; this module only files them)."""

_MODULE_RULES: dict[type, Rule] = {}
_MODULE_NAME_RULES: dict[str, Rule] = {}  # "package.module.Class": classes of optional libraries (timm)
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


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


def module_rule(mod: nn.Module) -> Rule | None:
    """The rule of ``mod``: the most specific class in its MRO that has one; ``None`` where none has."""
    for cls in type(mod).__mro__:
        rule = _MODULE_NAME_RULES.get(_qualname(cls)) or _MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def has_module_rule(mod: nn.Module) -> bool:
    """Whether a rule handles ``mod`` (the tracer keeps such modules as leaves)."""
    return module_rule(mod) is not None


def autowrap_functions() -> tuple[Callable, ...]:
    """Plain Python functions with a rule, outside torch: the tracer records them as one call each."""
    return tuple(
        f for f in _FUNCTION_RULES
        if isinstance(f, types.FunctionType) and not (f.__module__ or "").startswith(("torch.", "torchvision."))
    )


def function_rule(fn: Any) -> Rule | None:
    """The rule of a ``call_function`` node's target, or ``None``."""
    return _FUNCTION_RULES.get(fn)


def method_rule(name: str) -> Rule | None:
    """The rule of a ``call_method`` node's ``Tensor`` method name, or ``None``."""
    return _METHOD_RULES.get(name)
