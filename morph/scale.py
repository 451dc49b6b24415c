"""Plain width scaling: ``scale_width(model, width)`` rebuilds every layer at a new width.

The result is a plain model: the same classes and module paths as the original, with standard
modules only (a ``torch.fx.GraphModule`` only when the forward hard-codes a channel count that has
to change). Weights keep the original model's initialization family: at ``width <= 1`` each layer
keeps the first channels of every coupled channel group of the original's weights, rescaled by
``sqrt(fan_in_old / fan_in_new)`` so that the variance matches the stock init at the new fan-in;
at ``width > 1`` weights are drawn from a normal with that variance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import MorphError
from .graph.analyze import ChannelPlan, LayerPlan, analyze
from .graph.coupling import Dim
from .graph.mha import stock as mha_stock
from .graph.mha import traceable
from .zoo import get_spec

__all__ = ["scale_width", "attention_record", "LayerShape", "WeightInit", "apply_width", "check_width", "dim_index", "layer_shapes", "stock_init"]


@dataclass(frozen=True)
class LayerShape:
    """New hyper-parameters of one layer at a target width."""

    name: str
    kind: str
    in_ch: int
    out_ch: int
    groups: int
    weight_shape: tuple[int, ...]
    constant_group_width: bool = True


def check_width(width: float) -> float:
    width = float(width)
    if not (width > 0 and math.isfinite(width)):
        raise MorphError(f"width must be a positive number, got {width}")
    return width


def dim_index(plan: ChannelPlan, dim: Dim, width: float) -> torch.Tensor:
    """Indices into a dim at width 1 that give the dim at ``width``: the first channels of every
    atom group (cycling when the group grows), with their repeats."""
    idx: list[torch.Tensor] = []
    base = 0
    for s in plan.atoms(dim):
        n = plan.groups.size[s.group]
        n_new = plan.atom_size(s.group, width)
        ch = torch.arange(n_new) % n
        idx.append((base + ch[:, None] * s.inner + torch.arange(s.inner)[None, :]).reshape(-1))
        base += n * s.inner
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def _conv_groups(p: LayerPlan, m: nn.Module, cin: int, cout: int) -> tuple[int, bool]:
    g = m.groups
    if g == 1:
        return 1, True
    if g == m.in_channels:  # depthwise: one group per input channel
        return cin, True
    gw_in, gw_out = m.in_channels // g, m.out_channels // g
    if cin % gw_in == 0 and cout % gw_out == 0 and cin // gw_in == cout // gw_out:
        return cin // gw_in, True
    if cin % g == 0 and cout % g == 0:
        return g, False
    raise MorphError(
        f"grouped conv {p.name}: {cin} in / {cout} out channels fit neither {gw_in}-wide groups nor {g} groups; "
        "choose a width that keeps channel counts divisible"
    )


def layer_shapes(
    plan: ChannelPlan, model: nn.Module, width: float, groups: dict[str, int] | None = None
) -> dict[str, LayerShape]:
    """Predict every layer's new shape at ``width`` without building anything (``groups``: conv
    group counts to use instead of the derived ones, e.g. the stock model's)."""
    out: dict[str, LayerShape] = {}
    for p in plan.layers.values():
        m = model.get_submodule(p.name)
        cin, cout = plan.size(p.in_dim, width), plan.size(p.out_dim, width)
        if p.kind == "conv":
            if groups and p.name in groups:
                groups_n, const_w = groups[p.name], groups[p.name] != m.groups
            else:
                groups_n, const_w = _conv_groups(p, m, cin, cout)
            k = tuple(m.kernel_size)
            shape = (cin, cout // groups_n, *k) if m.transposed else (cout, cin // groups_n, *k)
            out[p.name] = LayerShape(p.name, p.kind, cin, cout, groups_n, shape, const_w)
        elif p.kind == "linear":
            out[p.name] = LayerShape(p.name, p.kind, cin, cout, 1, (cout, cin))
        elif p.kind == "groupnorm":
            c_old, g = m.num_channels, m.num_groups
            if groups and p.name in groups:  # the stock model's group count
                gn_groups, const_w = groups[p.name], groups[p.name] * c_old == g * cin
            elif (g * cin) % c_old == 0 and (g * cin) // c_old > 0:
                gn_groups, const_w = (g * cin) // c_old, True
            elif cin % g == 0:
                gn_groups, const_w = g, False
            else:
                raise MorphError(f"GroupNorm {p.name}: {cin} channels do not split into groups of either kind")
            out[p.name] = LayerShape(p.name, p.kind, cin, cin, gn_groups, (cin,), const_w)
        elif p.kind == "layernorm":
            shape = tuple(plan.size(d, width) for d in p.ln_dims)
            out[p.name] = LayerShape(p.name, p.kind, cin, cin, 1, shape)
        elif p.kind == "scalar":
            out[p.name] = LayerShape(p.name, p.kind, cin, cin, 1, tuple(m.weight.shape))
        else:
            out[p.name] = LayerShape(p.name, p.kind, cin, cin, 1, (cin,))
    return out


def _take(t: torch.Tensor, dims: list[torch.Tensor | None]) -> torch.Tensor:
    for d, idx in enumerate(dims):
        if idx is not None:
            t = t.index_select(d, idx.to(t.device))
    return t


WeightInit = Callable[[torch.Tensor, list, tuple, int, int, float], torch.Tensor]
"""``init(w, idx, shape, fan_old, fan_new, width)``: the values of a conv/linear weight resized from ``w``
(``idx``: per-dim indices into ``w`` that give the new shape, cycling where a dim grows)."""


def stock_init(gen: torch.Generator | None = None) -> WeightInit:
    """:func:`scale_width`'s weights: at ``width <= 1`` the first channels of every group, rescaled by
    ``sqrt(fan_in_old / fan_in_new)``; above 1 a normal draw with that variance."""

    def init(w, idx, shape, fan_old, fan_new, width):
        if width <= 1:
            new = _take(w.detach(), idx)
        else:
            std = float(w.detach().float().std()) if w.numel() > 1 else 0.0
            new = torch.randn(shape, generator=gen, dtype=torch.float32).to(w) * std
        assert tuple(new.shape) == tuple(shape), (new.shape, shape)
        if fan_new > 0 and fan_old != fan_new:
            new = new * math.sqrt(fan_old / fan_new)
        return new.clone()

    return init


def _empty_init(w, idx, shape, fan_old, fan_new, width):
    """Shape only: the caller (fusion, a growth method) writes every value."""
    return torch.empty(shape, dtype=w.dtype, device=w.device)


def _resize_layer(plan: ChannelPlan, p: LayerPlan, m: nn.Module, s: LayerShape, width: float, init: WeightInit) -> None:
    i_in, i_out = dim_index(plan, p.in_dim, width), dim_index(plan, p.out_dim, width)
    if p.kind == "conv":
        w = m.weight
        k = math.prod(m.kernel_size)
        per_group_old = w.shape[1]
        per_group_new = s.weight_shape[1]
        if m.transposed:
            idx = [i_in, torch.arange(per_group_new) % per_group_old]
            fan_old, fan_new = w.shape[0] // m.groups * k, s.weight_shape[0] // s.groups * k
        else:
            pg = None if per_group_new == per_group_old else torch.arange(per_group_new) % per_group_old
            idx = [i_out, pg]
            fan_old, fan_new = per_group_old * k, per_group_new * k
        m.weight = nn.Parameter(init(w, idx, s.weight_shape, fan_old, fan_new, width),
                                requires_grad=w.requires_grad)
        if m.bias is not None:
            m.bias = nn.Parameter(_take(m.bias.detach(), [i_out]).clone(), requires_grad=m.bias.requires_grad)
        if not m.transposed:  # other per-output-channel tensors of conv subclasses (timm ScaledStdConv2d's gain)
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if name in ("weight", "bias") or t is None or t.dim() == 0 or t.shape[0] != m.out_channels:
                    continue
                new = _take(t.detach(), [i_out]).clone()
                if isinstance(t, nn.Parameter):
                    setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad))
                else:
                    setattr(m, name, new)
        m.in_channels, m.out_channels, m.groups = s.in_ch, s.out_ch, s.groups
    elif p.kind == "linear":
        w = m.weight
        m.weight = nn.Parameter(
            init(w, [i_out, i_in], s.weight_shape, w.shape[1], s.weight_shape[1], width),
            requires_grad=w.requires_grad,
        )
        if m.bias is not None:
            m.bias = nn.Parameter(_take(m.bias.detach(), [i_out]).clone(), requires_grad=m.bias.requires_grad)
        m.in_features, m.out_features = s.in_ch, s.out_ch
    elif p.kind == "scalar":
        return
    else:
        if p.kind == "layernorm":
            idxs = [dim_index(plan, d, width) for d in p.ln_dims]
            m.normalized_shape = tuple(s.weight_shape)
        else:
            idxs = [i_in]
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is None or t.dim() == 0:
                continue
            new = _take(t.detach(), idxs).clone()
            if isinstance(t, nn.Parameter):
                setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                setattr(m, name, new)
        if p.kind == "norm" and hasattr(m, "num_features"):
            m.num_features = s.in_ch
        if isinstance(m, nn.PReLU):
            m.num_parameters = s.in_ch
        if p.kind == "groupnorm":
            m.num_channels, m.num_groups = s.in_ch, s.groups


def _resize_attr(plan: ChannelPlan, model: nn.Module, path: str, dims: tuple[Dim, ...], width: float) -> None:
    mod_path, _, name = path.rpartition(".")
    owner = model.get_submodule(mod_path) if mod_path else model
    t = getattr(owner, name)
    if all(plan.size(d, width) == n for d, n in zip(dims, t.shape, strict=True)):
        return  # nothing scales (index tables, fx's constants of tensors a forward builds)
    new = _take(t.detach(), [dim_index(plan, d, width) for d in dims]).clone()
    if isinstance(t, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=t.requires_grad))
    elif name not in owner._buffers:
        setattr(owner, name, new)
    else:
        owner.register_buffer(name, new, persistent=name not in getattr(owner, "_non_persistent_buffers_set", ()))


def _rewrite_consts(plan: ChannelPlan, model: nn.Module, width: float, consts: list | None = None) -> nn.Module:
    graph = copy.deepcopy(plan.gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    for c in plan.consts if consts is None else consts:
        n = nodes[c.node]
        args = list(n.args)
        if c.kind == "groups":  # depthwise F.conv2d: groups follow the channels
            if len(args) > 6:
                args[6] = plan.size(c.dims[0], width)
            else:
                n.kwargs = {**n.kwargs, "groups": plan.size(c.dims[0], width)}
            n.args = tuple(args)
            continue
        if c.kind == "split":
            args[1] = [plan.size(p, width) for p in c.dims]
            n.args = tuple(args)
            continue
        if c.kind == "slice":
            idx = list(c.index_tuple)
            old = idx[c.index]
            start = plan.size(c.dims[0], width) if c.dims[0] else old.start
            stop = (start or 0) + plan.size(c.dims[1], width) if old.stop is not None else None
            idx[c.index] = slice(start, stop, old.step)
            args[1] = tuple(idx)
            n.args = tuple(args)
            continue
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            shape = list(args[1])
            shape[c.index] = plan.size(c.dims[0], width)
            args[1] = type(n.args[1])(shape)
        else:
            args[1 + c.index] = plan.size(c.dims[0], width)
        n.args = tuple(args)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    for attr in ("morph_spec", "pretrained_cfg", "default_cfg", *_MODEL_ATTRS):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    heads = _heads_at(plan, width)
    if heads:  # the graph keeps no attention modules: their head counts, for the next analysis (.graph.analyze)
        gm.meta["morph_heads"] = heads
    return gm


def _heads_at(plan: ChannelPlan, width: float) -> dict[str, int]:
    """The head count of every attention module of ``plan`` at ``width``: a hard-coded count that is a dim of
    heads (heads mode) scales with it; otherwise (head_dim mode, one head) the count stays."""
    heads = dict(plan.gm.meta.get("morph_heads") or {})
    nodes = {n.name: n for n in plan.gm.graph.nodes}
    new = {}
    for c in plan.consts:
        if (c.kind == "shape" and c.qualname in heads and _shape_literal(nodes[c.node], c.index) == heads[c.qualname]
                and _head_attr_fits(plan, c.dims[0], "num_heads")):
            new[c.qualname] = plan.size(c.dims[0], width)
    return {**heads, **new}


def apply_width(
    model: nn.Module, plan: ChannelPlan, width: float, init: WeightInit | None = None,
    groups: dict[str, int] | None = None,
) -> tuple[nn.Module, dict[str, LayerShape]]:
    """Resize a deep copy of ``model`` (analyzed as ``plan``) to ``width``; returns it and its shapes.

    This is the *shape* half of every width change: which channels exist and where they sit. The values
    of conv/linear weights come from ``init`` (:func:`stock_init` for :func:`scale_width`); without one
    they are left uninitialized for the caller (fusion, :mod:`morph.growth`) to write. Other tensors
    (biases, norm parameters and statistics) are indexed with :func:`dim_index`.
    """
    init = init or _empty_init
    shapes = layer_shapes(plan, model, width, groups)
    new = copy.deepcopy(model)
    for name, p in plan.layers.items():
        _resize_layer(plan, p, new.get_submodule(name), shapes[name], width, init)
    for path, dims in plan.params.items():
        _resize_attr(plan, new, path, dims, width)
    _model_attributes(plan, model, new, width)
    consts = _attention_attributes(plan, new, width)
    if consts:  # the model's own forward cannot run at the new width: the traced graph with every literal rewritten
        new = _rewrite_consts(plan, new, width)
    return new, shapes


# the model-level widths timm models keep (``num_features``: channels into the head, ``head_hidden_size``: into
# the classifier, ``embed_dim``: of the token embedding / first stage): the first layer of that width read from the
# classifier back, or (``embed_dim``) from the input forward
_MODEL_ATTRS = {"num_features": -1, "head_hidden_size": -1, "embed_dim": 1}


def _model_attributes(plan: ChannelPlan, model: nn.Module, new: nn.Module, width: float) -> None:
    """Set the root module's ``num_features``, ``head_hidden_size`` and ``embed_dim`` (an int that timm's
    ``VisionTransformer``, ``SwinTransformer``, ``ResNet``, ``EfficientNet`` ... keep) to the width of the channel
    group they describe, so that a derived model's attributes describe its real width. The group: the first
    conv/linear input (from the classifier back; ``embed_dim``: output, from the input forward) whose original
    width equals the attribute; an attribute no layer matches is left alone."""
    layers = sorted(plan.layers.values(), key=lambda p: p.order)
    for name, direction in _MODEL_ATTRS.items():
        old = getattr(model, name, None)
        if not isinstance(old, int) or isinstance(old, bool):
            continue
        if direction > 0:
            dims = [p.out_dim for p in layers if p.kind in ("conv", "linear")]
        else:
            dims = [p.in_dim for p in reversed(layers) if p.kind in ("conv", "linear", "norm", "layernorm")]
        for d in dims:
            if plan.size(d) == old:
                try:
                    setattr(new, name, plan.size(d, width))
                except AttributeError:  # a read-only property: it derives the width itself
                    pass
                break


_HEAD_ATTRS = ("num_heads", "head_dim", "attn_dim", "val_attn_dim")


def _attention_attributes(plan: ChannelPlan, new: nn.Module, width: float) -> list:
    """Set ``num_heads``, ``head_dim``, ``attn_dim`` (and ``scale = head_dim ** -0.5``) of every attention module
    whose traced reshapes hard-code them (timm's ``Attention``: ``reshape(B, N, 3, self.num_heads,
    self.head_dim)``), so that the module's own forward runs at the new width and the model keeps its classes;
    returns the constants that no attribute explains (those need a rewritten graph).

    Raises:
        MorphError: the width leaves one head of several (heads mode), which cannot grow back into heads.
    """
    heads = plan.gm.meta.get("morph_heads") or {}
    if not heads or not plan.consts:
        return list(plan.consts)
    nodes = {n.name: n for n in plan.gm.graph.nodes}
    rest, changes, widths = [], {}, {}
    for c in plan.consts:
        mod = None
        if c.kind == "shape" and _width_attribute(plan, new, c, nodes[c.node], width, widths):
            continue
        if c.kind == "shape" and c.qualname in heads and plan.size(c.dims[0], width) == plan.size(c.dims[0]):
            continue  # a size that stays (the fixed number of heads in head_dim mode): nothing to rewrite
        if c.kind == "shape" and c.qualname in heads:
            try:
                mod = new.get_submodule(c.qualname)
            except AttributeError:
                mod = None
        literal = _shape_literal(nodes[c.node], c.index) if mod is not None else None
        names = [n for n in _HEAD_ATTRS if literal is not None and getattr(mod, n, None) == literal
                 and _head_attr_fits(plan, c.dims[0], n)]
        if not names:
            rest.append(c)
            continue
        value = plan.size(c.dims[0], width)
        for n in names:
            old = changes.setdefault(c.qualname, {}).get(n)
            if old is not None and old != value:
                raise MorphError(f"{c.qualname}.{n}: the channel analysis gives it two widths ({old} and {value})")
            changes[c.qualname][n] = value
    for path, attrs in changes.items():
        mod = new.get_submodule(path)
        h, hd = attrs.get("num_heads", mod.num_heads), attrs.get("head_dim", getattr(mod, "head_dim", None))
        if h < 2 <= mod.num_heads and "num_heads" in attrs:
            raise MorphError(
                f"{path}: at width {width:g} the attention keeps 1 of its {mod.num_heads} heads, which cannot grow "
                "back into heads; choose a width that keeps 2 or more, or scale the head size instead "
                "(morph.graph.attention_width('head_dim'))")
        if hd is not None and "attn_dim" in attrs and attrs["attn_dim"] != h * hd:
            raise MorphError(f"{path}: attn_dim {attrs['attn_dim']} is not {h} heads x {hd}")
        for n, v in attrs.items():
            setattr(mod, n, v)
        if hd is not None and hasattr(mod, "attn_dim"):
            mod.attn_dim = h * hd
        if hd is not None and isinstance(getattr(mod, "scale", None), float) and "head_dim" in attrs:
            mod.scale = hd ** -0.5
    return rest


_WIDTH_ATTRS = ("hidden_dim",)


def _width_attribute(plan: ChannelPlan, new: nn.Module, c, node: fx.Node, width: float, done: dict) -> bool:
    """A reshape's literal that is its module's ``hidden_dim`` (torchvision's ViT: ``x.reshape(n,
    self.hidden_dim, n_h * n_w)`` after the patch embedding): the attribute is set to the new width, so that the
    module's own forward runs at it (``done``: the values set). Whether ``c`` was handled so."""
    try:
        mod = new.get_submodule(c.qualname)
    except AttributeError:
        return False
    literal = _shape_literal(node, c.index)
    # the attribute's value before this call set it (``done``: (original, new) per module and attribute)
    names = [n for n in _WIDTH_ATTRS if literal is not None
             and done.get((c.qualname, n), (getattr(mod, n, None),))[0] == literal]
    if not names:
        return False
    value = plan.size(c.dims[0], width)
    for n in names:
        if done.get((c.qualname, n), (literal, value))[1] != value:
            raise MorphError(f"{c.qualname}.{n}: the channel analysis gives it two widths "
                             f"({done[(c.qualname, n)][1]} and {value})")
        done[(c.qualname, n)] = (literal, value)
        setattr(mod, n, value)
    return True


def _head_attr_fits(plan: ChannelPlan, dim: Dim, name: str) -> bool:
    """Whether a hard-coded size of ``dim`` can be the attention attribute ``name``: the number of heads is a
    dim of heads groups (heads mode); the head size a dim of channels (head_dim mode); ``attn_dim`` either."""
    heads = {plan.groups.find(h) for h in plan.groups.heads}
    atoms = plan.atoms(dim)
    of_heads = bool(atoms) and all(plan.groups.find(s.group) in heads for s in atoms)
    if name == "num_heads":
        return of_heads and all(s.inner == 1 for s in atoms)
    if name == "head_dim":
        return not of_heads
    return True


def _shape_literal(node: fx.Node, index: int):
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args[index] if index < len(args) and isinstance(args[index], int) else None


def verify_forward(original_out: tuple[int, ...], model: nn.Module, input_size: tuple[int, ...]) -> None:
    """Run ``model`` once and check that its output has the original's shape."""
    p = next(iter(model.parameters()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_size), dtype=p.dtype, device=p.device))
    except Exception as e:
        raise MorphError(f"the rescaled {type(model).__name__} fails to run: {str(e).splitlines()[0]}") from e
    finally:
        model.train(was)
    while isinstance(out, (tuple, list, dict)):  # the first output (a segmentation model's "out")
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    if tuple(out.shape[1:]) != tuple(original_out):
        raise MorphError(f"rescaled output shape {tuple(out.shape[1:])} differs from the original {original_out}")


def output_shape(plan: ChannelPlan) -> tuple[int, ...]:
    out = [n for n in plan.gm.graph.nodes if n.op == "output"][0]
    node = out.args[0]
    while isinstance(node, (tuple, list, dict)):  # the first output (a segmentation model's "out")
        node = next(iter(node.values())) if isinstance(node, dict) else node[0]
    meta = node.meta["tensor_meta"]
    while not hasattr(meta, "shape"):
        meta = meta[0]
    return tuple(meta.shape[1:])


def scale_width(
    model: nn.Module, width: float, *, input_size: tuple[int, ...] | None = None, seed: int | None = None,
    plan: ChannelPlan | None = None,
) -> nn.Module:
    """Return a plain copy of ``model`` with every scalable channel group at ``width`` x its width.

    Image channels, the number of classes and anything coupled to them keep their size. Grouped
    convolutions keep their group width (the number of groups scales) where channel counts allow,
    else their number of groups.

    Args:
        model: the model to rescale (left unchanged).
        width: width multiplier, e.g. ``0.5``.
        input_size: ``(C, H, W)`` used for tracing; defaults to the model's own.
        seed: seed of the initialization of grown weights (``width > 1``).
        plan: a precomputed :func:`~morph.graph.analyze` result.
    """
    width = check_width(width)
    model = traceable(model)  # nn.MultiheadAttention as Linear modules, turned back below
    plan = plan or analyze(model, input_size)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    new, _ = apply_width(model, plan, width, stock_init(gen))
    mha_stock(new)
    verify_forward(output_shape(plan), new, plan.input_size)
    from .info import MorphInfo, original_layout, set_info

    return set_info(new, MorphInfo(kind="plain", spec=get_spec(model), width=width,
                                   input_size=tuple(plan.input_size), original=original_layout(model),
                                   extra=attention_record(plan)))


def attention_record(plan: ChannelPlan) -> dict:
    """``{"attention_width": mode}`` for a model with attention modules (recorded in its ``MorphInfo.extra`` so
    that fusing or growing it analyzes its heads the same way), else ``{}``."""
    if not plan.gm.meta.get("morph_heads"):
        return {}
    from .graph.rules import current_attention_width

    return {"attention_width": plan.gm.meta.get("morph_attention_width") or current_attention_width()}
