"""The growth-method registry: one class per method, filed under its CLI word (timm's ``register_model``).

A method is a :class:`GrowthMethod` subclass with a ``name``; :func:`register_growth` files it when its
module is imported (``morph.growth`` imports them all). :func:`morph.grow` looks methods up here, and so do
the recipes (:func:`baseline_methods`: the rows that grow the plain small model, their labels, their options
from the recipe config and the FLOPs of their growth step), ``morph cka --run`` and the loader, so a new
method is one new module and nothing else: no CLI enum, no recipe table, no loader branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import MorphError

__all__ = ["GrowthMethod", "baseline_methods", "register_growth", "list_growth_methods", "get_growth_method"]

_METHODS: dict[str, type[GrowthMethod]] = {}


class GrowthMethod:
    """Decides the values of new channels; the layout (which channels are new) is not its business.

    Class attributes:
        name: registry key and CLI word.
        summary: one line for ``morph grow --help`` and the docs.
        needs_data: the method reads a batch of the user's data.
        template: the method grows template-mixing models (MixtureGrowth) instead of plain ones.
        options: option name -> default; :func:`morph.grow` passes ``**options`` through.
        label: the method's name in result tables (MixtureGrowth Table 1: ``GradMax``).
        baseline: a recipe row that grows the plain small model with this method (``morph train``).
        order: position among the baseline rows (Table 1's order).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    template: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}
    label: ClassVar[str] = ""
    baseline: ClassVar[bool] = False
    order: ClassVar[int] = 100

    @classmethod
    def recipe_options(cls, growth: Any) -> dict[str, Any]:
        """The method's options from a recipe's ``growth`` config section (:class:`recipes.config.GrowthConfig`)."""
        return {}

    def step_flops(self, f_small: float, f_grown: float, images: int) -> float:
        """Training FLOPs of one growth step (``3 x F`` per image for a forward and a backward pass, ``F`` per
        forward), with ``f_small``/``f_grown`` the forward FLOPs per image of the model grown and of the result,
        and ``images`` the images of the data it reads. Default: nothing (no data read)."""
        return 0.0

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise MorphError(f"growth method {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        self.opts = {**self.options, **options}

    def grow(self, model: nn.Module, width: float, data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
             gen: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What :class:`~morph.info.MorphInfo` ``extra["growth"]`` records (JSON scalars)."""
        return {"method": self.name, **{k: v for k, v in self.opts.items() if _is_json_scalar(v)}}


def _is_json_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def register_growth(cls: type[GrowthMethod]) -> type[GrowthMethod]:
    """Class decorator: file ``cls`` under ``cls.name``."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"growth method name {cls.name!r} is empty or taken")
    _METHODS[cls.name] = cls
    return cls


def baseline_methods() -> list[str]:
    """Names of the methods that are recipe baseline rows (``baseline``), in their ``order``."""
    return sorted((n for n, c in _METHODS.items() if c.baseline), key=lambda n: (_METHODS[n].order, n))


def list_growth_methods() -> list[str]:
    """Names of the registered growth methods, sorted."""
    return sorted(_METHODS)


def get_growth_method(name: str) -> type[GrowthMethod]:
    """The class registered as ``name``.

    Raises:
        MorphError: no such method; the message lists the known ones.
    """
    if name not in _METHODS:
        raise MorphError(f"unknown growth method {name!r}; known: {', '.join(list_growth_methods())}")
    return _METHODS[name]
