"""The built-in channel rules: one per op (module class, function, tensor method).

Each rule registers itself through :mod:`morph.graph.registry` (the same public decorators users call)
when this module is imported, which :mod:`morph.graph` does. See the registry for what a rule is.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .analyzer import Analyzer
from .coupling import Dim, Seg
from .plan import TD, ConstSite, LayerPlan
from .registry import register_function_rule as _function
from .registry import register_method_rule as _method
from .registry import register_module_rule as _module
from .trace import node_qualname

__all__ = ["ATTENTION_WIDTHS", "SizeOf", "attention_width", "current_attention_width", "broadcast", "couple", "reshape"]


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _x(a: Analyzer, node: fx.Node) -> TD:
    v = a.value(node.args[0] if node.args else next(iter(node.kwargs.values())))
    if not isinstance(v, TD):
        raise a.fail("expected a tensor input")
    return v


def _out_shape(a: Analyzer) -> tuple[int, ...]:
    s = a.shape()
    if s is None or isinstance(s, list):
        raise a.fail("expected a single tensor output")
    return s


def _spatial(a: Analyzer, x: TD, out_shape: tuple[int, ...], keep: int = 2) -> TD:
    """First ``keep`` dims as given by caller; trailing dims reuse the input's when sizes match."""
    dims: list[Dim] = []
    for i in range(keep, len(out_shape)):
        if i < len(x.shape) and x.shape[i] == out_shape[i]:
            dims.append(x.dims[i])
        else:
            dims.append(a.structural(out_shape[i]))
    return TD(tuple(dims), out_shape[keep:])


# ------------------------------------------------------------------------------------------------
# modules with parameters
# ------------------------------------------------------------------------------------------------
@_module(nn.modules.conv._ConvNd)
def _conv(a: Analyzer, node: fx.Node) -> TD:
    m = a.modules[str(node.target)]
    x = _x(a, node)
    out_shape = _out_shape(a)
    if m.transposed and m.groups != 1:
        raise a.fail("grouped transposed convolution is not supported")
    cin = x.dims[1]
    if m.groups == 1:
        out = a.fresh(out_shape[1], source=True)
    elif m.groups == m.in_channels and not m.transposed:
        mult = m.out_channels // m.in_channels
        out = tuple(Seg(s.group, s.inner * mult) for s in a.g.atoms(cin))
    else:
        out = a.fresh(out_shape[1], source=True)
    a.add_layer(LayerPlan(str(node.target), "conv", cin, out, groups=m.groups))
    rest = _spatial(a, x, out_shape)
    return TD((x.dims[0], out, *rest.dims), out_shape)


@_module(nn.Linear)
def _linear(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    out_shape = _out_shape(a)
    out = a.fresh(out_shape[-1], source=True)
    a.add_layer(LayerPlan(str(node.target), "linear", x.dims[-1], out))
    return TD((*x.dims[:-1], out), out_shape)


@_module(nn.modules.batchnorm._NormBase)
def _batchnorm(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    a.add_layer(LayerPlan(str(node.target), "norm", x.dims[1], x.dims[1]))
    return TD(x.dims, _out_shape(a))


@_module(nn.GroupNorm)
def _groupnorm(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    m = a.modules[str(node.target)]
    a.add_layer(LayerPlan(str(node.target), "groupnorm", x.dims[1], x.dims[1], groups=m.num_groups))
    return TD(x.dims, _out_shape(a))


@_module(nn.LayerNorm)
def _layernorm(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    m = a.modules[str(node.target)]
    k = len(m.normalized_shape)
    if _is_channels_first_ln(m, x):
        if k != 1:
            raise a.fail("channels-first LayerNorm over more than one dim")
        ln_dims: tuple[Dim, ...] = (x.dims[1],)
    else:
        ln_dims = x.dims[-k:]
    a.add_layer(LayerPlan(str(node.target), "layernorm", ln_dims[0], ln_dims[0], ln_dims=ln_dims))
    return TD(x.dims, _out_shape(a))


def _is_channels_first_ln(m: nn.LayerNorm, x: TD) -> bool:
    # timm's LayerNorm2d and relatives (LayerNorm2dFp32, metaformer's LayerNorm2dNoBias) subclass
    # nn.LayerNorm and normalize dim 1 of NCHW
    below = type(m).__mro__[: type(m).__mro__.index(nn.LayerNorm)]
    return len(x.shape) == 4 and any(c.__name__.endswith("2d") or c.__name__.endswith("2dFp32") for c in below)


@_module(nn.PReLU)
def _prelu(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    m = a.modules[str(node.target)]
    if m.num_parameters != 1:
        a.add_layer(LayerPlan(str(node.target), "norm", x.dims[1], x.dims[1]))
    else:
        a.add_layer(LayerPlan(str(node.target), "scalar", x.dims[1], x.dims[1]))
    return TD(x.dims, _out_shape(a))


@_module("timm.layers.cond_conv2d.CondConv2d")
def _cond_conv(a: Analyzer, node: fx.Node) -> TD:
    """Refused, with the reason. A CondConv2d computes each sample's kernel as a routed mixture of expert
    kernels, ``W(x) = sum_e r_e(x) W_e``, stored flat as one ``[experts, out*in/groups*k*k]`` parameter and
    applied as one grouped conv over the batch. Growing it needs its own layer kind in every pass (width
    surgery per expert, templates per expert, tiles per expert, bake back to the flat layout): a conv rule
    would only resize it as a plain conv and corrupt the flat expert layout."""
    raise a.fail(
        "CondConv2d (per-sample mixtures of expert kernels in one flat [experts, out*in*k*k] parameter) has no "
        "layer kind in morph's width surgery, templates or tiling, so it cannot be converted or grown",
        "use the family's plain variant (efficientnet_b0 for efficientnet_cc_b0_4e)",
    )


@_module("timm.models.vgg.ConvMlp")
def _timm_conv_mlp(a: Analyzer, node: fx.Node) -> TD:
    """timm's VGG head, a leaf for fx (its forward pools inputs under the kernel size up to it):
    ``fc1`` (k x k conv) -> act -> dropout -> ``fc2`` (1x1 conv) -> act."""
    m = a.modules[str(node.target)]
    x = _x(a, node)
    out_shape = _out_shape(a)
    name = str(node.target)
    mid = a.fresh(m.fc1.out_channels, source=True)
    a.add_layer(LayerPlan(f"{name}.fc1", "conv", x.dims[1], mid, groups=m.fc1.groups))
    out = a.fresh(m.fc2.out_channels, source=True)
    a.add_layer(LayerPlan(f"{name}.fc2", "conv", mid, out, groups=m.fc2.groups))
    if m.fc1.groups != 1 or m.fc2.groups != 1:
        raise a.fail("grouped convolutions in timm's ConvMlp")
    return TD((x.dims[0], out, *(a.structural(s) for s in out_shape[2:])), out_shape)


# ------------------------------------------------------------------------------------------------
# parameter-free modules
# ------------------------------------------------------------------------------------------------
_POOLS = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
)


@_module(*_POOLS)
def _pool_module(a: Analyzer, node: fx.Node) -> TD:
    return _pool(a, node)


def _pool(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    out_shape = _out_shape(a)
    if len(out_shape) != len(x.shape) or out_shape[:2] != x.shape[:2]:
        raise a.fail(f"pooling changed the channel dims {x.shape} -> {out_shape}")
    rest = _spatial(a, x, out_shape)
    return TD((x.dims[0], x.dims[1], *rest.dims), out_shape)


@_module(nn.Flatten, nn.Unflatten)
def _flatten_module(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    return reshape(a, x, _out_shape(a))


@_module(nn.ChannelShuffle)
def _shuffle_module(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    g = a.modules[str(node.target)].groups
    n, c = x.shape[0], x.shape[1]
    y = reshape(a, x, (n, g, c // g, *x.shape[2:]))
    y = TD((y.dims[0], y.dims[2], y.dims[1], *y.dims[3:]), (n, c // g, g, *x.shape[2:]))
    return reshape(a, y, x.shape)


# ------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------
def couple(a: Analyzer, d0: Dim, d1: Dim) -> None:
    """Couple two dims element by element. Where one is structural (positions: spatial, tokens) and the other
    a channel dim (a token-mixing Linear's output added to the token axis: MLP-Mixer, ResMLP, gMLP), the
    channels are positions and keep their count."""
    s0, s1 = a.g.is_structural(d0), a.g.is_structural(d1)
    if s0 != s1:
        other = d1 if s0 else d0
        a.g.mark_fixed(other)
        for s in a.g.atoms(other):
            a.g.structural[s.group] = True
    a.g.unify(d0, d1)


def broadcast(a: Analyzer, inputs: list[Any], out_shape: tuple[int, ...]) -> TD:
    tds = [v for v in inputs if isinstance(v, TD)]
    dims: list[Dim] = []
    n = len(out_shape)
    for i in range(n):
        size = out_shape[i]
        chosen: Dim | None = None
        for t in tds:
            j = len(t.shape) - n + i
            if j < 0 or t.shape[j] != size:
                continue
            if chosen is None:
                chosen = t.dims[j]
            elif size > 1:
                couple(a, chosen, t.dims[j])
        dims.append(chosen if chosen is not None else a.structural(size))
    return TD(tuple(dims), out_shape)


def _elementwise(a: Analyzer, node: fx.Node) -> TD | None:
    vals = a.value(list(node.args) + list(node.kwargs.values()))
    flat = [v for v in vals if isinstance(v, TD)]
    if not flat:
        return None
    shape = a.shape()
    if shape is None:
        return None
    return broadcast(a, vals, shape)


_function(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp,
    torch.erf, torch.neg, torch.softmax, torch.log_softmax, torch.addcmul, torch.addcdiv,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout2d, F.softmax, F.log_softmax,
    F.alpha_dropout, F.gelu, F.logsigmoid, F.prelu,
)(_elementwise)

try:  # torchvision wraps stochastic_depth as an fx leaf function
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    _function(_tv_stochastic_depth)(_elementwise)
except ImportError:  # torchvision is optional for users of timm only
    pass

_method(
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "pow", "neg", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "exp", "abs",
    "sqrt", "rsqrt", "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type",
    "type_as", "softmax", "log_softmax", "hardswish", "hardsigmoid", "sign", "erf", "floor", "ceil", "round",
    "masked_fill", "bernoulli_", "fill_", "requires_grad_", "__add__", "__mul__", "__radd__", "__rmul__",
    "addcmul", "addcmul_", "addcdiv", "addcdiv_",
)(_elementwise)


@_function(torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full)
def _factory(a: Analyzer, node: fx.Node) -> TD | None:
    shape = a.shape()
    if shape is None or isinstance(shape, list):
        return None
    return TD(tuple(a.structural(s) for s in shape), shape)


@_method("new_empty", "new_zeros", "new_ones", "new_full")
def _new_factory(a: Analyzer, node: fx.Node) -> TD | None:
    return _factory(a, node)


@_method("expand_as")
def _expand_as(a: Analyzer, node: fx.Node) -> TD:
    return broadcast(a, [a.value(node.args[0]), a.value(node.args[1])], _out_shape(a))


@_method("expand")
def _expand(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    out = _out_shape(a)
    n = len(out)
    dims = []
    for i, s in enumerate(out):
        j = len(x.shape) - n + i
        dims.append(x.dims[j] if j >= 0 and x.shape[j] == s else a.structural(s))
    return TD(tuple(dims), out)


# ------------------------------------------------------------------------------------------------
# concatenation and splitting
# ------------------------------------------------------------------------------------------------
@_function(torch.cat, torch.concat)
def _cat(a: Analyzer, node: fx.Node) -> TD:
    tensors = [v for v in a.value(_arg(node, 0, "tensors"))]
    dim = _arg(node, 1, "dim", 0)
    out_shape = _out_shape(a)
    nd = len(out_shape)
    dim = dim % nd
    for i in range(nd):
        if i == dim:
            continue
        for t in tensors[1:]:
            if out_shape[i] > 1:
                a.g.unify(tensors[0].dims[i], t.dims[i])
    cat_dim: Dim = tuple(seg for t in tensors for seg in t.dims[dim])
    dims = list(tensors[0].dims)
    dims[dim] = cat_dim
    return TD(tuple(dims), out_shape)


def _split_dim(a: Analyzer, x: TD, dim: int, lengths: list[int]) -> list[TD]:
    pieces = a.g.split(x.dims[dim], lengths)
    out = []
    for p, n in zip(pieces, lengths, strict=True):
        dims = list(x.dims)
        dims[dim] = p
        shape = list(x.shape)
        shape[dim] = n
        out.append(TD(tuple(dims), tuple(shape)))
    return out


@_function(torch.chunk, torch.split, torch.tensor_split, torch.unbind)
def _split_fn(a: Analyzer, node: fx.Node) -> list[TD]:
    return _split(a, node)


@_method("chunk", "split", "tensor_split", "unbind")
def _split_method(a: Analyzer, node: fx.Node) -> list[TD]:
    return _split(a, node)


def _split(a: Analyzer, node: fx.Node) -> list[TD]:
    x = _x(a, node)
    shapes = a.shape()
    name = getattr(node.target, "__name__", str(node.target))
    if name == "unbind":
        dim = _arg(node, 1, "dim", 0) % len(x.shape)
        if not a.g.is_structural(x.dims[dim]):
            raise a.fail("unbind along a channel dim")
        return [TD(tuple(d for i, d in enumerate(x.dims) if i != dim), s) for s in shapes]
    dim = _arg(node, 2, "dim", 0) % len(x.shape)
    lengths = [s[dim] for s in shapes]
    if a.g.is_structural(x.dims[dim]):
        return [TD(tuple(d if i != dim else a.structural(s[dim]) for i, d in enumerate(x.dims)), s) for s in shapes]
    pieces = _split_dim(a, x, dim, lengths)
    sizes = _arg(node, 1, "split_size_or_sections", None)
    if name == "split" and sizes is not None and not isinstance(sizes, fx.Node):
        a.consts.append(ConstSite(node.name, "split", 1, tuple(p.dims[dim] for p in pieces), node_qualname(node)))
    return pieces


@_function(operator.getitem)
def _getitem(a: Analyzer, node: fx.Node) -> Any:
    base = a.value(node.args[0])
    idx = node.args[1]
    if isinstance(base, (list, tuple)):
        if isinstance(idx, fx.Node):
            raise a.fail("indexing a tuple with a traced value")
        return base[idx]
    if isinstance(idx, fx.Node) and isinstance(base, TD) and isinstance(a.value(idx), TD):
        return _take_rows(a, base, a.value(idx))
    if isinstance(idx, tuple) and isinstance(base, TD):
        nodes = [k for k, i in enumerate(idx) if isinstance(i, fx.Node)]
        if len(nodes) == 1 and isinstance(a.value(idx[nodes[0]]), TD) and all(
                i == slice(None) for k, i in enumerate(idx) if k != nodes[0]):
            return _take_rows(a, base, a.value(idx[nodes[0]]), nodes[0])
    if not isinstance(base, TD):
        return None
    return _index(a, node, base, idx)


class SizeOf:
    """The value of ``x.shape[i]`` / ``x.size(i)`` in the traced graph: a reshape that takes it as an argument
    (``x.reshape(B, N, C)`` with ``B, N, C = x.shape``) gives that axis the length of ``x``'s dim."""

    __slots__ = ("dim", "size")

    def __init__(self, dim: Dim, size: int) -> None:
        self.dim, self.size = dim, size


def _take_rows(a: Analyzer, x: TD, idx: TD, at: int = 0) -> TD:
    """``table[index]`` (or ``table[:, index]``, ``at = 1``) with an integer tensor (a relative-position bias table
    read through its index buffer): that dim of ``table`` holds positions, which keep their count; the index's
    dims replace it."""
    out_shape = _out_shape(a)
    a.g.mark_fixed(x.dims[at])
    for s in a.g.atoms(x.dims[at]):
        a.g.structural[s.group] = True
    dims = x.dims[:at] + tuple(a.structural(n) for n in idx.shape) + x.dims[at + 1:]
    if x.shape[:at] + tuple(idx.shape) + x.shape[at + 1:] != tuple(out_shape):
        raise a.fail(f"tensor index of shape {idx.shape} into {x.shape} gave {out_shape}")
    return TD(dims, out_shape)


def _index(a: Analyzer, node: fx.Node, x: TD, idx: Any) -> TD:
    out_shape = _out_shape(a)
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
        raise a.fail("tensor or traced indices", "use slices with constant bounds")
    n_ell = sum(i is Ellipsis for i in idx)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if n_ell:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(x.shape) - n_real) + idx[k + 1 :]
    idx = idx + (slice(None),) * (len(x.shape) - sum(1 for i in idx if i is not None))
    dims: list[Dim] = []
    d = 0
    for pos, i in enumerate(idx):
        if i is None:
            dims.append(a.structural(1))
            continue
        src, size = x.dims[d], x.shape[d]
        if isinstance(i, int):
            if not a.g.is_structural(src):
                raise a.fail("integer index into a channel dim")
        elif isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)):
            if not a.g.is_structural(src):  # bounds read from the graph (Swin crops its padded windows)
                raise a.fail("slice of a channel dim with traced bounds", "use slices with constant bounds")
            dims.append(src if out_shape[len(dims)] == size else a.structural(out_shape[len(dims)]))
        elif isinstance(i, slice):
            start, stop, step = i.indices(size)
            if (start, stop, step) == (0, size, 1):
                dims.append(src)
            elif a.g.is_structural(src):
                dims.append(a.structural(len(range(start, stop, step))))
            else:
                if step != 1:
                    raise a.fail("strided slice of a channel dim")
                lengths = [start, stop - start, size - stop]
                pieces = a.g.split(src, [n for n in lengths if n > 0])
                prefix: Dim = pieces[0] if start > 0 else ()
                middle = pieces[1] if start > 0 else pieces[0]
                dims.append(middle)
                # the rewritten bounds are the new widths of the prefix and of prefix + middle
                a.consts.append(ConstSite(node.name, "slice", pos, (prefix, middle), node_qualname(node), idx))
        else:
            raise a.fail(f"index {i!r}")
        d += 1
    if len(dims) != len(out_shape):
        raise a.fail(f"indexing produced {len(dims)} dims, expected {len(out_shape)}")
    return TD(tuple(dims), out_shape)


# ------------------------------------------------------------------------------------------------
# shape ops
# ------------------------------------------------------------------------------------------------
def reshape(a: Analyzer, x: TD, out_shape: tuple[int, ...], site: tuple[str, list[int]] | None = None) -> TD:
    """Map dims through a reshape by matching blocks of equal product."""
    in_shape = x.shape
    out_dims: list[Dim] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        # skip size-1 dims on either side
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            out_dims.append(a.structural(1))
            j += 1
            continue
        i0, j0 = i, j
        pi, pj = in_shape[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        out_dims.extend(_reshape_block(a, x.dims[i0:i], in_shape[i0:i], out_shape[j0:j]))
    return TD(tuple(out_dims), out_shape)


def _reshape_block(
    a: Analyzer, dims: tuple[Dim, ...], in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]
) -> list[Dim]:
    chan = [k for k, d in enumerate(dims) if in_sizes[k] > 1 and not a.g.is_structural(d)]
    if not chan:
        return [a.structural(s) if not (len(dims) == 1 and len(out_sizes) == 1) else dims[0] for s in out_sizes]
    if len(dims) == 1 and len(out_sizes) == 1:
        return [dims[0]]
    if len(chan) > 1 and all(not a.g.source[a.g.find(s.group)] and a.g.find(s.group) not in a.g.derived
                             for k in chan for s in a.g.atoms(dims[k])):
        # dims of a free tensor that nothing produces (a buffer's grid: timm's RelPosMlp reads its [Lh, Lw, 2]
        # coordinate table and flattens the grid): positions, which keep their sizes from now on
        for k in chan:
            a.g.mark_fixed(dims[k])
            for s in a.g.atoms(dims[k]):
                a.g.structural[a.g.find(s.group)] = True
        return _reshape_block(a, dims, in_sizes, out_sizes)
    if len(chan) > 1:
        raise a.fail("reshape merges two channel dims into one")
    k = chan[0]
    if len(out_sizes) == 1:  # merge: outer copies x channel segments x inner repeats
        outer = math.prod(in_sizes[:k])
        inner = math.prod(in_sizes[k + 1 :])
        if any(s.group in a.g.derived for s in a.g.atoms(dims[k])):
            # re-merging a shuffled view: the merged channels scale with it as a whole
            return [a.g.derive(out_sizes[0], dims[k])]
        segs = [Seg(s.group, s.inner * inner) for s in a.g.atoms(dims[k])]
        return [tuple(segs) * outer]
    if len(dims) == 1:  # split one channel dim into several
        d = dims[0]
        big = [t for t, s in enumerate(out_sizes) if s > 1]
        heads = _heads_of(a)
        if heads is not None and len(big) >= 2 and out_sizes[big[-2]] == heads:
            return _split_heads(a, d, out_sizes, big)
        if heads == 1 and len(big) >= 2 and big[-1] == len(out_sizes) - 1 and out_sizes[-2] == 1:
            # one head: (parts, 1, head_dim) (PVT-v2's kv in its 1-head stage): the parts' channels couple element
            # by element, as heads do in head_dim mode, so that SDPA's q . k pairs each key channel with its query
            pieces = a.g.split(d, [out_sizes[-1]] * math.prod(out_sizes[t] for t in big[:-1]))
            for piece in pieces[1:]:
                a.g.unify(pieces[0], piece)
            out = [a.structural(s) for s in out_sizes]
            out[-1] = pieces[0]
            return out
        if len(big) != 2:
            raise a.fail(f"reshape splits a channel dim into {out_sizes}")
        p, q = out_sizes[big[0]], out_sizes[big[1]]
        atoms = a.g.atoms(d)
        out: list[Dim] = [a.structural(s) for s in out_sizes]
        if all(s.inner % q == 0 for s in atoms):  # (channels, fixed inner)
            out[big[0]] = tuple(Seg(s.group, s.inner // q) for s in atoms)
            return out
        # (fixed outer, channels): when the p parts have the same group structure (selective-kernel
        # attention viewing [path0 | path1]) they couple element by element; otherwise (channel
        # shuffle) the inner channels form a derived group that scales with the input
        parts = a.g.split(d, [q] * p)
        shapes = [[(a.g.size[s.group], s.inner) for s in a.g.atoms(part)] for part in parts]
        shuffled = a.node is not None and any(
            u.target in ("transpose", "permute", torch.transpose, torch.permute) for u in a.node.users
        )
        if not shuffled and all(sh == shapes[0] for sh in shapes[1:]) and not any(
            s.group in a.g.derived for s in atoms
        ):
            for part in parts[1:]:
                a.g.unify(parts[0], part)
            out[big[1]] = parts[0]
        else:
            out[big[1]] = a.g.derive(q, d)
        return out
    raise a.fail(f"reshape {in_sizes} -> {out_sizes} regroups channel dims")


# ------------------------------------------------------------------------------------------------
# attention heads
# ------------------------------------------------------------------------------------------------
ATTENTION_WIDTHS = ("heads", "head_dim")
_ATTENTION = {"width": "heads"}


class attention_width:  # noqa: N801 - used like a function: ``with attention_width("head_dim"): ...``
    """How attention projections change width, for every analysis in the block (or from now on when called
    without ``with``): ``"heads"`` (default: the number of heads scales, each head keeps its ``head_dim``
    channels; DeiT-Tiny -> DeiT-Small, 3 -> 6 heads of 64) or ``"head_dim"`` (every head keeps its place and
    its channels scale; the number of heads stays). A model with a single head always scales its head size."""

    def __init__(self, mode: str) -> None:
        if mode not in ATTENTION_WIDTHS:
            from ..errors import MorphError

            raise MorphError(f"attention width must be one of {', '.join(ATTENTION_WIDTHS)}, got {mode!r}")
        self.prev = _ATTENTION["width"]
        _ATTENTION["width"] = mode

    def __enter__(self) -> attention_width:
        return self

    def __exit__(self, *exc: object) -> None:
        _ATTENTION["width"] = self.prev


def current_attention_width() -> str:
    """The attention width mode analyses use now (:class:`attention_width`)."""
    return _ATTENTION["width"]


def _heads_of(a: Analyzer) -> int | None:
    """``num_heads`` of the attention module the current node runs in (innermost first), if any."""
    node = a.node
    table = a.gm.meta.get("morph_heads") if node is not None else None
    if not table:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for path in reversed(list(stack.values())):
        name = path[0] if isinstance(path, tuple) else str(path)
        if name in table:
            return table[name]
    return None


def _split_heads(a: Analyzer, d: Dim, out_sizes: tuple[int, ...], big: list[int]) -> list[Dim]:
    """A projection's channels viewed as ``(..., parts, heads, head_dim)`` (timm's qkv: ``(3, heads, head_dim)``):
    the parts (q, k, v) are structural; ``heads`` and ``head_dim`` follow the attention width mode. In
    ``heads`` mode each part's channels become a group of heads, each repeated ``head_dim`` times, and the
    parts' heads couple (head ``h`` of q, k and v change together); in ``head_dim`` mode every head's
    channels couple with every other head's and the number of heads is fixed."""
    h, hd = out_sizes[big[-2]], out_sizes[big[-1]]
    n_parts = math.prod(out_sizes[t] for t in big[:-2])
    out: list[Dim] = [a.structural(s) for s in out_sizes]
    if _ATTENTION["width"] == "head_dim":
        pieces = a.g.split(d, [hd] * (n_parts * h))
        for piece in pieces[1:]:
            a.g.unify(pieces[0], piece)
        out[big[-1]] = pieces[0]
        return out
    parts = a.g.split(d, [h * hd] * n_parts) if n_parts > 1 else [d]
    head_dims: list[Dim] = []
    for part in parts:
        segs: list[Seg] = []
        for s in a.g.atoms(part):
            n = a.g.size[a.g.find(s.group)]
            if s.inner % hd == 0:
                segs.append(Seg(s.group, s.inner // hd))
            elif s.inner == 1 and n % hd == 0:
                segs.append(Seg(a.g.repeat(s.group, n // hd, hd), 1))
            else:
                raise a.fail(f"attention heads of {hd} channels cut a channel group of {n} channels")
        head_dims.append(tuple(segs))
    for hd_dim in head_dims[1:]:
        a.g.unify(head_dims[0], hd_dim)
    out[big[-2]] = head_dims[0]
    return out


def _view(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    out_shape = _out_shape(a)
    y = reshape(a, x, out_shape)
    shape_args = list(node.args[1:])
    if len(shape_args) == 1 and isinstance(shape_args[0], (list, tuple)):
        shape_args = list(shape_args[0])
    if len(shape_args) == len(out_shape):
        for k, s in enumerate(shape_args):
            if isinstance(s, int) and s > 1 and not a.g.is_structural(y.dims[k]):
                a.consts.append(ConstSite(node.name, "shape", k, (y.dims[k],), node_qualname(node)))
            sv = a.value(s) if isinstance(s, fx.Node) else None
            if isinstance(sv, SizeOf) and sv.size == out_shape[k] > 1 and not any(
                    s.group in a.g.derived for s in a.g.atoms(y.dims[k]) + a.g.atoms(sv.dim)) and (
                    _cuts(a, y.dims[k]) == _cuts(a, sv.dim)):
                # the axis has the length of another tensor's dim (a shuffled view only its length: left alone).
                # Where the two dims are cut differently (EdgeNeXt: 4 heads of 22 channels read back with the
                # length of a residual split 30, 30, 28) coupling would refine both to their common divisor (units
                # of 2 channels, which halve to 1 and cannot grow back): they are left to scale each by its own
                # groups, and the reshape reads the length at run time
                couple(a, y.dims[k], sv.dim)
    return y


def _cuts(a: Analyzer, d: Dim) -> list[int]:
    """The lengths of ``d``'s atoms in order: where two dims' cuts differ, coupling them refines their groups."""
    return [a.g.size[a.g.find(s.group)] * s.inner for s in a.g.atoms(d)]


_method("view", "reshape")(_view)
_function(torch.reshape)(_view)


@_method("flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
def _reshape_method(a: Analyzer, node: fx.Node) -> TD:
    return reshape(a, _x(a, node), _out_shape(a))


_function(torch.flatten, torch.squeeze, torch.unsqueeze)(_reshape_method)


@_method("permute")
def _permute(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    order = node.args[1:] if len(node.args) > 2 else node.args[1]
    return TD(tuple(x.dims[i] for i in order), _out_shape(a))


_function(torch.permute)(_permute)


@_method("transpose", "swapaxes")
def _transpose(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    d0, d1 = (node.args[1] % len(x.shape), node.args[2] % len(x.shape))
    dims = list(x.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TD(tuple(dims), _out_shape(a))


_function(torch.transpose)(_transpose)


@_function(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var)
def _reduce_fn(a: Analyzer, node: fx.Node) -> TD:
    return _reduce(a, node)


@_method("mean", "sum", "amax", "amin", "std", "var")
def _reduce_method(a: Analyzer, node: fx.Node) -> TD:
    return _reduce(a, node)


@_function(torch.norm, torch.linalg.vector_norm)
def _norm_fn(a: Analyzer, node: fx.Node) -> TD:
    """``torch.norm(x, p, dim, keepdim)`` and ``vector_norm(x, ord, dim, keepdim)``: a reduction over ``dim``
    (ConvNeXt-V2's global response norm takes the L2 norm over the spatial dims)."""
    return _reduce(a, node, dim_at=2)


@_method("norm")
def _norm_method(a: Analyzer, node: fx.Node) -> TD:
    return _reduce(a, node, dim_at=2)


def _reduce(a: Analyzer, node: fx.Node, dim_at: int = 1) -> TD | None:
    """A reduction over ``dim`` (positional argument ``dim_at``, then ``keepdim``): reduced dims vanish, or
    become size-1 broadcast dims with ``keepdim``; reducing over channels is fine (the result broadcasts)."""
    x = _x(a, node)
    out_shape = a.shape()
    if out_shape is None or isinstance(out_shape, list):
        raise a.fail("reduction with several outputs")
    dim = _arg(node, dim_at, "dim", None)
    keep = bool(_arg(node, dim_at + 1, "keepdim", False))
    nd = len(x.shape)
    if dim is None:
        red = set(range(nd))
    else:
        red = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    dims = []
    for i in range(nd):
        if i in red:
            if keep:
                dims.append(a.structural(1))
        else:
            dims.append(x.dims[i])
    return TD(tuple(dims), out_shape)


@_function(
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate,
    F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d, F.lp_pool2d,
)
def _pool_fn(a: Analyzer, node: fx.Node) -> TD:
    return _pool(a, node)


@_function(F.pad)
def _pad(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    pad = list(_arg(node, 1, "pad"))
    nd = len(x.shape)
    out_shape = _out_shape(a)
    padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
    if any(not a.g.is_structural(x.dims[d]) for d in padded):
        raise a.fail("padding a channel dim")
    # zero padding leaves a dim as it is (Swin pads its channels-last windows with (0, 0, ...))
    return TD(tuple(x.dims[d] if d not in padded and x.shape[d] == out_shape[d] else a.structural(out_shape[d])
                    for d in range(nd)), out_shape)


@_function(torch.matmul, operator.matmul, torch.bmm)
def _matmul(a: Analyzer, node: fx.Node) -> TD:
    x, y = a.value(node.args[0]), a.value(node.args[1])
    if len(x.shape) < 2 or len(y.shape) < 2:
        raise a.fail("matmul of vectors")
    couple(a, x.dims[-1], y.dims[-2])
    out_shape = _out_shape(a)
    batch = broadcast(a, [TD(x.dims[:-2], x.shape[:-2]), TD(y.dims[:-2], y.shape[:-2])], out_shape[:-2])
    return TD((*batch.dims, x.dims[-2], y.dims[-1]), out_shape)


@_function(getattr)
def _getattr(a: Analyzer, node: fx.Node) -> Any:
    base = a.value(node.args[0])
    if isinstance(base, TD) and len(node.args) > 1 and node.args[1] == "shape":
        return tuple(SizeOf(d, n) for d, n in zip(base.dims, base.shape, strict=True))
    return None


@_method("size", "dim", "numel", "nelement")
def _size(a: Analyzer, node: fx.Node) -> Any:
    base = a.value(node.args[0])
    if node.target != "size" or not isinstance(base, TD):
        return None
    sizes = tuple(SizeOf(d, n) for d, n in zip(base.dims, base.shape, strict=True))
    dim = _arg(node, 1, "dim", None)
    if dim is None:
        return sizes
    return sizes[dim] if isinstance(dim, int) else None


@_function(F.channel_shuffle, torch.channel_shuffle)
def _shuffle_fn(a: Analyzer, node: fx.Node) -> TD:
    x = _x(a, node)
    g = _arg(node, 1, "groups")
    n, c = x.shape[0], x.shape[1]
    y = reshape(a, x, (n, g, c // g, *x.shape[2:]))
    y = TD((y.dims[0], y.dims[2], y.dims[1], *y.dims[3:]), (n, c // g, g, *x.shape[2:]))
    return reshape(a, y, x.shape)


@_function(torch.stack)
def _stack(a: Analyzer, node: fx.Node) -> TD:
    tensors = list(a.value(_arg(node, 0, "tensors")))
    out_shape = _out_shape(a)
    dim = _arg(node, 1, "dim", 0) % len(out_shape)
    for t in tensors[1:]:
        for d0, d1, n in zip(tensors[0].dims, t.dims, tensors[0].shape, strict=True):
            if n > 1:
                a.g.unify(d0, d1)
    dims = list(tensors[0].dims)
    dims.insert(dim, a.structural(out_shape[dim]))
    return TD(tuple(dims), out_shape)


@_function(F.conv2d, F.conv1d)
def _functional_conv(a: Analyzer, node: fx.Node) -> TD:
    """A fixed depthwise filter applied with F.conv2d to a buffer (timm's anti-aliasing blur pool)."""
    x = _x(a, node)
    w = a.value(_arg(node, 1, "weight"))
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(w, TD) or groups != x.shape[1] or w.shape[0] != x.shape[1] or w.shape[1] != 1:
        raise a.fail("functional convolution with a non-depthwise weight", "use an nn.Conv2d module")
    if isinstance(groups, fx.Node):
        raise a.fail("functional convolution with traced groups")
    a.g.unify(w.dims[0], x.dims[1])
    a.consts.append(ConstSite(node.name, "groups", 6, (x.dims[1],), node_qualname(node)))
    out_shape = _out_shape(a)
    rest = _spatial(a, x, out_shape)
    return TD((x.dims[0], x.dims[1], *rest.dims), out_shape)
