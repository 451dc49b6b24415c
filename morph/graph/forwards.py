"""Traceable forwards: the tracer's stand-ins for the forwards of modules timm keeps out of fx.

timm marks some modules as fx leaves (``register_notrace_module``) because their forward reads the input's
shape into Python arithmetic or control flow (``math.ceil``, ``if``) or switches autocast by device. To
morph such a leaf is opaque: its convs, linears and reshapes are not in the graph. For the modules below
morph traces a stand-in instead, written with traceable ops only: it calls the module's own submodules (so
their paths, and every parameter, are the module's) and computes the same function for the inputs the
analysis runs. The stand-ins are read by the analysis only; a model keeps running its
own forward.

Register one with :func:`register_traceable_forward` (a class or ``"package.module.Class"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["register_traceable_forward", "traceable_forward"]

_BY_CLASS: dict[type, Callable[..., Any]] = {}
_BY_NAME: dict[str, Callable[..., Any]] = {}


def register_traceable_forward(*classes: type | str) -> Callable:
    """Decorator: ``fn(module, *args, **kwargs)`` is traced instead of ``module.forward`` for modules of these
    classes (exact class: a subclass may change the forward)."""

    def deco(fn: Callable) -> Callable:
        for c in classes:
            if isinstance(c, str):
                _BY_NAME[c] = fn
            else:
                _BY_CLASS[c] = fn
        return fn

    return deco


def traceable_forward(m: nn.Module) -> Callable | None:
    """The registered stand-in forward of ``m``'s class, if any."""
    t = type(m)
    return _BY_CLASS.get(t) or _BY_NAME.get(f"{t.__module__}.{t.__qualname__}")


@register_traceable_forward("timm.models.mobilevit.MobileVitBlock")
def _mobilevit_block(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``MobileVitBlock`` (MobileViT v1): local convs, the unfold of ``p_h x p_w`` patches into a batch of
    ``P = p_h p_w`` sequences of ``N`` patches (``[B, C, H, W] -> [B * P, N, C]``), the transformer, and the fold
    back. timm's forward computes the same permutation of positions by reshapes that fold the channels into the
    batch (``[B * C * n_h, p_h, n_w, p_w]``); here the channels stay a dim of their own."""
    shortcut = x
    x = m.conv_kxk(x)
    x = m.conv_1x1(x)
    ph, pw = m.patch_size
    b, c, h, w = x.shape
    nh, nw = (h + ph - 1) // ph, (w + pw - 1) // pw  # math.ceil(h / ph) in traceable arithmetic
    # timm interpolates to a multiple of the patch size when it does not divide the map; bilinear
    # interpolation to the same size is the identity, so the stand-in always interpolates
    x = F.interpolate(x, size=(nh * ph, nw * pw), mode="bilinear", align_corners=False)
    x = x.reshape(b, c, nh, ph, nw, pw).permute(0, 3, 5, 2, 4, 1).reshape(b * ph * pw, nh * nw, c)
    x = m.transformer(x)
    x = m.norm(x)
    x = x.reshape(b, ph, pw, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh * ph, nw * pw)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = m.conv_proj(x)
    if m.conv_fusion is not None:
        x = m.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


@register_traceable_forward("timm.models.efficientvit_mit.LiteMLA")
def _lite_mla(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``LiteMLA`` (EfficientViT-MIT): a qkv conv whose channels are ``heads`` blocks of ``[q | k | v]``
    (``dim`` channels each), multi-scale copies of it (a depthwise conv and a grouped 1x1 conv, one group per
    block), and ReLU linear attention per head, the values padded with a constant-1 channel whose output is the
    normalizer. timm's forward reshapes the concatenated scales at once (``[B, scales * heads, 3 * dim, HW]``);
    here each scale is viewed as its heads before the concatenation (the same tensor), so the reshape splits one
    projection's channels into heads. It leaves out timm's float32 upcast under disabled autocast (dtypes do not
    change the channels)."""
    b, _, h, w = x.shape
    qkv = m.qkv(x)
    scales = [qkv] + [op(qkv) for op in m.aggreg]
    x = torch.cat([t.reshape(b, -1, 3 * m.dim, h * w) for t in scales], dim=1).transpose(-1, -2)
    q, k, v = x.chunk(3, dim=-1)
    q = m.kernel_func(q)
    k = m.kernel_func(k)
    v = F.pad(v, (0, 1), mode="constant", value=1.0)
    out = q @ (k.transpose(-1, -2) @ v)
    out = out[..., :-1] / (out[..., -1:] + m.eps)
    return m.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


def head_count(m: nn.Module) -> int | None:
    """The number of attention heads of ``m``: its ``num_heads``, or for the stand-ins' modules that keep no
    such attribute, the count their reshapes split into (``LiteMLA``: its qkv channels over ``3 * dim``)."""
    n = getattr(m, "num_heads", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    t = type(m)
    if f"{t.__module__}.{t.__qualname__}" == "timm.models.efficientvit_mit.LiteMLA":
        return int(m.qkv.conv.out_channels) // (3 * int(m.dim))
    return None
