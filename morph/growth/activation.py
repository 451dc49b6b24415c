"""ReLUs whose sub-gradient at 0 is 1, so that zero-initialized new neurons train (GradMax §3).

A new neuron with zero incoming weights outputs 0 behind a ReLU. PyTorch's ReLU (``nn.ReLU``, ``F.relu``,
``torch.relu``, ``Tensor.relu``, their in-place forms, ``nn.ReLU6``/``F.relu6``/``F.hardtanh(x, 0, max)``) has
gradient 0 at 0, so such a neuron receives exactly zero gradient forever. GradMax assumes f'(0) = 1 and its
implementation changes the ReLU to give sub-gradient 1 at 0 (growneuron ``relu1 = tf.math.maximum(x, 0)``).

:func:`enable` does that for a whole model without touching its modules, code or state dict: a forward
pre-hook and an always-called forward hook on the model enter and leave a ``TorchFunctionMode`` that routes
every ReLU-family call made during its forward (module or functional, inside any submodule, timm's and
torchvision's alike) to :class:`ReLUOne`, whose forward is the same ``clamp`` PyTorch's ReLU computes
(bit for bit) and whose backward passes the gradient where the input is >= 0 (and below the upper bound of
ReLU6). Everything else runs untouched. Outputs, parameters, state-dict keys and ``strict=True`` loading
into the stock model do not change; only the gradient at inputs exactly 0 does.

A power of a ReLU, ``relu(x) ** p`` with ``p > 1`` (timm's StarReLU ``s * relu(x) ** 2 + b`` in PoolFormer v2,
ConvFormer, CAFormer; squared ReLU), has derivative ``p * relu(x) ** (p - 1)``, 0 at 0, whatever the ReLU's
sub-gradient: a new neuron behind it would get no gradient either. While the mode is on, a ``pow``/``square`` of a
:class:`ReLUOne` output with a numeric exponent above 1 runs as :class:`PowOne`: the same call forward (bit for
bit), derivative 1 where the base is exactly 0 (so StarReLU's is ``s``), ``p * x ** (p - 1)`` elsewhere.

A grown model records ``relu_grad`` in ``MorphInfo.extra["growth"]``; :func:`restore` re-applies it to a
model rebuilt from a checkpoint (``morph.load``) or a resumed recipe stage.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError

__all__ = ["RELU_GRAD", "PowOne", "ReLUOne", "enable", "disable", "enabled", "restore"]

#: ``relu_grad`` values: ``one`` (sub-gradient 1 at 0) and ``stock`` (PyTorch's 0).
RELU_GRAD = ("one", "stock")


class ReLUOne(torch.autograd.Function):
    """``clamp(x, 0, upper)`` with gradient 1 where ``0 <= x < upper`` (``upper=None``: no upper bound)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        mask = x >= 0 if upper is None else (x >= 0) & (x < upper)
        ctx.save_for_backward(mask)
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_min_(0) if upper is None else x.clamp_(0, upper)
        return x.clamp_min(0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


class PowOne(torch.autograd.Function):
    """``func(*args, **kwargs)`` (a ``pow``/``square`` of ``x``, exponent ``p > 1``, ``x >= 0``) with derivative
    ``p * x ** (p - 1)``, and 1 where ``x`` is exactly 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.p = p
        return func(*args, **kwargs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        d = torch.where(x == 0, torch.ones_like(x), x.pow(ctx.p - 1) * ctx.p)
        return grad * d, None, None, None, None


def _relu_out(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and type(t.grad_fn).__name__ == "ReLUOneBackward"


def _pow(args, kwargs):
    p = _arg(args, kwargs, 1, "exponent", None)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 1:
        return None
    return float(p)


def _square(args, kwargs):
    return 2.0


_POW_RULES = {torch.pow: _pow, torch.Tensor.pow: _pow, torch.Tensor.__pow__: _pow, torch.square: _square,
              torch.Tensor.square: _square}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _relu(args, kwargs):
    return args[0], None, bool(_arg(args, kwargs, 1, "inplace", False))


def _relu_(args, kwargs):
    return args[0], None, True


def _relu6(args, kwargs):
    return args[0], 6.0, bool(_arg(args, kwargs, 1, "inplace", False))


def _hardtanh(args, kwargs):
    lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    if lo != 0 or not hi > 0:
        return None  # not a ReLU: its kink is not at 0
    return args[0], float(hi), bool(_arg(args, kwargs, 3, "inplace", False))


_RULES = {
    F.relu: _relu, torch.relu: _relu, torch.Tensor.relu: _relu,
    F.relu_: _relu_, torch.relu_: _relu_, torch.Tensor.relu_: _relu_,
    F.relu6: _relu6, F.hardtanh: _hardtanh,
}


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None and torch.is_grad_enabled():
            r = rule(args, kwargs)
            if r is not None and isinstance(r[0], torch.Tensor) and r[0].requires_grad and r[0].is_floating_point():
                return ReLUOne.apply(*r)
        pow_rule = _POW_RULES.get(func)
        if pow_rule is not None and torch.is_grad_enabled() and args and _relu_out(args[0]):
            p = pow_rule(args, kwargs)
            if p is not None:
                return PowOne.apply(args[0], p, func, args, kwargs)
        return func(*args, **kwargs)


_tls = threading.local()


def _enter(module: nn.Module, args: Any) -> None:
    stack = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    mode = _Mode()
    mode.__enter__()
    stack.append(mode)


def _leave(module: nn.Module, args: Any, out: Any) -> None:
    stack = getattr(_tls, "stack", None)
    if stack:
        stack.pop().__exit__(None, None, None)


def enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    return any(h is _enter for h in model._forward_pre_hooks.values())


def enable(model: nn.Module) -> nn.Module:
    """Give every ReLU-family call in ``model``'s forward sub-gradient 1 at 0 (idempotent); returns ``model``."""
    if not enabled(model):
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_leave, always_call=True)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: PyTorch's ReLU gradient again; returns ``model``."""
    for hooks, fn in ((model._forward_pre_hooks, _enter), (model._forward_hooks, _leave)):
        for k in [k for k, h in hooks.items() if h is fn]:
            del hooks[k]
            getattr(model, "_forward_hooks_always_called", {}).pop(k, None)
    return model


def restore(model: nn.Module, growth: dict[str, Any] | None, where: str = "checkpoint") -> nn.Module:
    """Re-apply what a growth record (``MorphInfo.extra["growth"]``) says about the activations.

    Raises:
        CheckpointError: ``relu_grad`` is neither ``one`` nor ``stock``.
    """
    value = (growth or {}).get("relu_grad", "stock")
    if value not in RELU_GRAD:
        raise CheckpointError(f"{where}: extra.growth.relu_grad must be one of {', '.join(RELU_GRAD)}, got {value!r}")
    return enable(model) if value == "one" else disable(model)
