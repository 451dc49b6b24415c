"""A second device on a CPU-only machine, for tests of device placement (``morph.grow`` on a GPU model).

On a GPU, an op that mixes a CUDA tensor with a CPU tensor (other than a 0-dim one) fails, or, for a few ops
(``index_select``'s index), fails with a CPU index where a test on the CPU alone cannot see it. Here the model is
"moved" to a pretend device: every tensor on it is a :class:`Pretend`, a wrapper subclass that reports the
``meta`` device and holds a real CPU tensor, so every op computes real numbers (a forward pass, autograd, an
SVD, Adam) while :class:`PretendDevice` checks, op by op, what a GPU would:

- an op (other than ``copy_``, which copies across devices) with a pretend tensor and a CPU tensor of at least
  one dim raises :class:`DeviceMix`, as a CUDA kernel does ("Expected all tensors to be on the same device"). It
  is stricter than CUDA in one place: advanced indexing (``w[cpu_index]``, ``aten.index``/``index_put_``), which
  CUDA accepts with a CPU index by copying it over at every call, is refused too: every index is to be on the
  device of the tensor it indexes;
- a factory on the pretend device given a CPU generator raises (CUDA refuses a CPU generator);
- ``t.data = cpu_tensor`` on a pretend tensor raises (on a GPU it silently moves the parameter to the CPU);
- ``.to(device)``, ``.to(other_tensor)``, ``torch.zeros(..., device=device)`` and the like create pretend
  tensors; ``.cpu()`` and ``.to("cpu")`` return plain CPU tensors.

Because every pretend tensor holds the CPU tensor the same op would have produced on the CPU, a computation on the
pretend device gives bit-identical numbers to the same computation on the CPU: the device contract (the same seed
grows the same weights wherever the model is) is exact here, up to the kernels of a real GPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceMix", "Pretend", "PretendDevice", "to_cpu", "to_pretend"]

PRETEND = torch.device("meta")
_DATA = torch._C.TensorBase.data  # its __set__ (a new method-wrapper at every access) is what ``t.data = x`` calls
_MOVES = {torch.ops.aten._to_copy.default}
_CROSS = {torch.ops.aten.copy_.default}  # legal across devices


class DeviceMix(AssertionError):
    """An op that mixes the pretend device with the CPU where a GPU would fail."""


class Pretend(torch.Tensor):
    """A tensor on the pretend device: reports ``meta``, computes on the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> Pretend:
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=PRETEND, requires_grad=False)
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"Pretend({self.elem!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DATA and getattr(func, "__name__", "") == "__set__":
            self, value = args
            if not isinstance(value, Pretend):
                raise _mix(_ACTIVE[-1] if _ACTIVE else None, f"tensor.data = a {value.device} tensor on a pretend-device "
                           "tensor (a GPU parameter would silently move to the CPU)")
            with torch._C.DisableTorchFunctionSubclass():
                func(self, value)
            self.elem = value.elem
            return None
        if func is torch.Tensor.tolist:  # refused for subclasses: a copy to the host, as on a GPU
            return args[0].elem.tolist()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_pretend_device(d) -> bool:
    return d is not None and torch.device(d).type == PRETEND.type


def _mix(mode: PretendDevice | None, message: str) -> DeviceMix:
    if mode is not None:
        mode.violations.append(message)  # kept even where the caller catches the exception
    return DeviceMix(message)


def _dispatch(func, args, kwargs, mode: PretendDevice | None = None):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    pretend = any(isinstance(t, Pretend) for t in tensors)
    target = kwargs.get("device")
    if func not in _CROSS and func not in _MOVES and pretend:
        cpu = [t for t in tensors if not isinstance(t, Pretend) and t.dim() > 0]
        if cpu:
            raise _mix(mode, f"{func}: a pretend-device tensor and a cpu tensor of shape {tuple(cpu[0].shape)} in one "
                             "op (on a GPU: Expected all tensors to be on the same device)")
    for t in tensors:
        if not isinstance(t, Pretend) and t.device.type == PRETEND.type:
            # fake tensors (morph's shape propagation tries FakeTensorMode first, and runs the model when that
            # fails) or a meta tensor made outside the mode: not a device question, and no numbers to compute
            raise RuntimeError(f"{func}: a meta tensor that is not a pretend one")
    gen = kwargs.get("generator")
    if _is_pretend_device(target) and gen is not None and gen.device.type == "cpu":
        raise _mix(mode, f"{func}: a cpu generator for a draw on the device")
    if func in _MOVES:
        wrap = _is_pretend_device(target) if target is not None else pretend
        if pretend and not wrap and mode is not None:
            mode.to_cpu.append(tuple(args[0].shape))
    else:
        wrap = pretend or _is_pretend_device(target)
    if _is_pretend_device(target):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    inner = {id(t.elem): t for t in tensors if isinstance(t, Pretend)}
    un = lambda t: t.elem if isinstance(t, Pretend) else t  # noqa: E731
    out = func(*tree_map(un, args), **tree_map(un, kwargs))

    def back(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in inner:  # in place (or an out= argument): the wrapper itself
            return inner[id(t)]
        return Pretend(t) if wrap else t

    return tree_map(back, out)


class PretendDevice(TorchDispatchMode):
    """Within it, ``meta`` is the pretend device (module docstring). ``to_cpu`` lists the shapes of the tensors
    copied from the device to the CPU (``.cpu()``, ``.to("cpu")``); ``violations`` every :class:`DeviceMix`
    raised, also those that the code under test caught."""

    def __init__(self) -> None:
        super().__init__()
        self.to_cpu: list[tuple[int, ...]] = []
        self.violations: list[str] = []

    def __enter__(self) -> PretendDevice:
        _ACTIVE.append(self)
        self._factories = _Factories().__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {}, self)


_ACTIVE: list[PretendDevice] = []
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` and its kin build the tensor and move it below the dispatch modes (with
    the Python key excluded): on the pretend device that would be a real meta tensor, without the data. They are
    built on the CPU here and moved through :class:`PretendDevice`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA and _is_pretend_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": torch.device("cpu")}).to(PRETEND)
        return func(*args, **kwargs)


def to_pretend(model: nn.Module) -> nn.Module:
    """``model`` on the pretend device (parameters and buffers become :class:`Pretend`); call inside
    :class:`PretendDevice`."""
    return model.to(PRETEND)


def to_cpu(model: nn.Module) -> nn.Module:
    """Every pretend tensor of ``model`` back to a plain CPU tensor (in place)."""
    with torch.no_grad():
        for mod in model.modules():
            for k, p in list(mod._parameters.items()):
                if isinstance(p, Pretend):
                    mod._parameters[k] = nn.Parameter(p.elem.clone(), requires_grad=p.requires_grad)
            for k, b in list(mod._buffers.items()):
                if isinstance(b, Pretend):
                    mod._buffers[k] = b.elem.clone()
    return model
