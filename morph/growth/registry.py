"""The growth-method registry: one class per method, filed under its CLI word (timm's ``register_model``).

A method is a :class:`GrowthMethod` subclass with a ``name``; :func:`register_growth` files it when its
module is imported (``morph.growth`` imports them all). :func:`morph.grow` looks methods up here, so a
new method is one new module and nothing else: no CLI enum, no recipe table, no loader branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import MorphError

__all__ = ["GrowthMethod", "register_growth", "list_growth_methods", "get_growth_method"]

_METHODS: dict[str, type[GrowthMethod]] = {}


class GrowthMethod:
    """Decides the values of new channels; the layout (which channels are new) is not its business.

    Class attributes:
        name: registry key and CLI word.
        summary: one line for ``morph grow --help`` and the docs.
        needs_data: the method reads a batch of the user's data.
        template: the method grows template-mixing models (MixtureGrowth) instead of plain ones.
        options: option name -> default; :func:`morph.grow` passes ``**options`` through.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    template: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}

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
