"""The built-in channel rules of attention and token-mixing models (timm's ViT, DeiT, Swin, MLP-Mixer
families and their hybrids, torchvision's ViT and Swin).

What they add to :mod:`.rules` (which holds the reshape into heads, :func:`~.rules.attention_width`):

- ``F.scaled_dot_product_attention``: q and k share their head channels, k and v their tokens, and the
  batch and head dims of all three couple (the explicit ``q @ k.transpose(-2, -1)`` path couples the same
  through the matmul rule);
- timm's ``resample_abs_pos_embed``: the position table keeps its channels, its token count follows the grid.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .analyzer import Analyzer
from .plan import TD, ConstSite, LayerPlan
from .registry import register_function_rule as _function
from .registry import register_module_rule as _module
from .rules import _heads_of, broadcast, couple, current_attention_width
from .trace import node_qualname

__all__: list[str] = []


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _shape(a: Analyzer) -> tuple[int, ...]:
    s = a.shape()
    if s is None or isinstance(s, list):
        raise a.fail("expected a single tensor output")
    return s


@_function(F.scaled_dot_product_attention)
def _sdpa(a: Analyzer, node: fx.Node) -> TD:
    """``softmax(q k^T / sqrt(d) + mask) v`` over the last two dims; the leading dims broadcast."""
    q, k, v = (a.value(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if not all(isinstance(t, TD) for t in (q, k, v)):
        raise a.fail("expected tensors for query, key and value")
    if _arg(node, 7, "enable_gqa", False):
        raise a.fail("grouped-query attention (fewer key/value heads than query heads)")
    out_shape = _shape(a)
    couple(a, q.dims[-1], k.dims[-1])
    couple(a, k.dims[-2], v.dims[-2])
    lead = [TD(t.dims[:-2], t.shape[:-2]) for t in (q, k, v)]
    batch = broadcast(a, lead, out_shape[:-2])
    mask = a.value(_arg(node, 3, "attn_mask"))
    if isinstance(mask, TD):
        broadcast(a, [TD((*batch.dims, q.dims[-2], k.dims[-2]), (*batch.shape, q.shape[-2], k.shape[-2])), mask],
                  (*batch.shape, q.shape[-2], k.shape[-2]))
    return TD((*batch.dims, q.dims[-2], v.dims[-1]), out_shape)


def _resample_pos_embed(a: Analyzer, node: fx.Node) -> TD:
    """``resample_abs_pos_embed(posemb [1, tokens, C], new_size, ...)``: interpolates the table over the patch
    grid; the channels stay, the token count follows the grid."""
    x = a.value(node.args[0] if node.args else node.kwargs["posemb"])
    out_shape = _shape(a)
    if not isinstance(x, TD) or len(out_shape) != 3:
        raise a.fail("expected a [1, tokens, channels] position table")
    tokens = x.dims[1] if out_shape[1] == x.shape[1] else a.structural(out_shape[1])
    return TD((x.dims[0], tokens, x.dims[2]), out_shape)


try:  # timm is optional
    from timm.layers import resample_abs_pos_embed as _timm_resample

    _function(_timm_resample)(_resample_pos_embed)
except ImportError:
    pass


def _channels_last_reverse(a: Analyzer, node: fx.Node) -> TD:
    """timm's ``window_reverse`` / ``grid_reverse`` (Swin, MaxViT): windows ``[B * nW, wh, ww, C]`` back to the
    image ``[B, H, W, C]``; the channels (last dim) stay, the positions are rearranged."""
    x = a.value(node.args[0] if node.args else node.kwargs["windows"])
    out_shape = _shape(a)
    if not isinstance(x, TD) or out_shape[-1] != x.shape[-1]:
        raise a.fail("expected channels-last windows with the image's channels")
    for d in x.dims[:-1]:
        if not a.g.is_structural(d):
            raise a.fail("window reverse over a channel dim")
    return TD((*(a.structural(n) for n in out_shape[:-1]), x.dims[-1]), out_shape)


def _channels_first_reverse(a: Analyzer, node: fx.Node) -> TD:
    """MaxViT's ``window_reverse_nchw`` / ``grid_reverse_nchw``: ``[B * nW, C, wh, ww]`` -> ``[B, C, H, W]``."""
    x = a.value(node.args[0] if node.args else node.kwargs["windows"])
    out_shape = _shape(a)
    if not isinstance(x, TD) or out_shape[1] != x.shape[1]:
        raise a.fail("expected channels-first windows with the image's channels")
    return TD((a.structural(out_shape[0]), x.dims[1], *(a.structural(n) for n in out_shape[2:])), out_shape)


def _register_timm_windows() -> None:
    import importlib

    for mod, names, rule in (
        ("timm.models.swin_transformer", ("window_reverse",), _channels_last_reverse),
        ("timm.models.swin_transformer_v2", ("window_reverse",), _channels_last_reverse),
        ("timm.models.swin_transformer_v2_cr", ("window_reverse",), _channels_last_reverse),
        ("timm.models.maxxvit", ("window_reverse", "grid_reverse"), _channels_last_reverse),
        ("timm.models.maxxvit", ("window_reverse_nchw", "grid_reverse_nchw"), _channels_first_reverse),
    ):
        try:
            m = importlib.import_module(mod)
        except ImportError:  # timm absent, or a version without the model
            continue
        for n in names:
            f = getattr(m, n, None)
            if f is not None:
                _function(f)(rule)


_register_timm_windows()


@_function(torch.roll)
def _roll(a: Analyzer, node: fx.Node) -> TD:
    """``torch.roll(x, shifts, dims)`` over positions (Swin's shifted windows): the dims stay."""
    x = a.value(node.args[0])
    dims = _arg(node, 2, "dims", None)
    if not isinstance(x, TD):
        raise a.fail("expected a tensor")
    rolled = range(len(x.shape)) if dims is None else [d % len(x.shape) for d in (
        dims if isinstance(dims, (list, tuple)) else [dims])]
    if any(not a.g.is_structural(x.dims[d]) for d in rolled):
        raise a.fail("roll along a channel dim")
    return TD(x.dims, _shape(a))


def _rms_norm(a: Analyzer, node: fx.Node) -> TD:
    """timm's ``RmsNorm`` (channels last): a LayerNorm-like layer over its last ``len(normalized_shape)`` dims,
    with a weight only; its channels grow by uniform replication like LayerNorm's (the RMS of ``k`` equal
    copies is the RMS of the original)."""
    x = a.value(node.args[0])
    m = a.modules[str(node.target)]
    k = len(m.normalized_shape)
    if not isinstance(x, TD):
        raise a.fail("expected a tensor")
    ln_dims = x.dims[-k:]
    a.add_layer(LayerPlan(str(node.target), "layernorm", ln_dims[0], ln_dims[0], ln_dims=ln_dims))
    return TD(x.dims, _shape(a))


try:
    from timm.layers import RmsNorm as _TimmRmsNorm

    _module(_TimmRmsNorm)(_rms_norm)
except ImportError:
    pass


def _multihead_attention(a: Analyzer, node: fx.Node) -> TD:
    """Refused, with the reason: an ``nn.MultiheadAttention`` that :mod:`.mha` does not rewrite into Linear modules
    (separate q/k/v embedding sizes, ``bias_k``/``bias_v`` or zero attention) keeps its raw projection parameters
    inside ``F.multi_head_attention_forward``, where neither its heads nor its projections are visible."""
    raise a.fail(
        "torch.nn.MultiheadAttention with separate key/value sizes, bias_k/bias_v or add_zero_attn keeps its raw "
        "projections inside F.multi_head_attention_forward: morph rewrites only the packed self-attention "
        "(torchvision's ViT)",
        "use one embedding size for query, key and value",
    )


_module(torch.nn.MultiheadAttention)(_multihead_attention)


@_module("timm.models.edgenext.PositionalEncodingFourier", "timm.models.xcit.PositionalEncodingFourier")
def _fourier_positions(a: Analyzer, node: fx.Node) -> TD:
    """timm's ``PositionalEncodingFourier`` (EdgeNeXt, XCiT): sine/cosine features of the patch grid, built from
    the grid size alone (``2 x hidden_dim`` fixed channels), projected by a 1x1 ``token_projection`` conv to the
    model's channels: ``[B, dim, H, W]``. The features are no channel group (they never scale); the projection's
    output is the added position table's channels."""
    name = str(node.target)
    m = a.modules[name]
    out_shape = _shape(a)
    conv = m.token_projection
    if len(out_shape) != 4 or out_shape[1] != conv.out_channels or conv.groups != 1:
        raise a.fail("expected a [B, dim, H, W] position table from a plain 1x1 token_projection conv")
    feats = a.g.new_dim(conv.in_channels, fixed=True)
    out = a.fresh(conv.out_channels, source=True)
    a.add_layer(LayerPlan(f"{name}.token_projection", "conv", feats, out, groups=1))
    return TD((a.structural(out_shape[0]), out, a.structural(out_shape[2]), a.structural(out_shape[3])), out_shape)


@_function(F.normalize)
def _normalize(a: Analyzer, node: fx.Node) -> TD:
    """``F.normalize(x, p, dim)``: ``x`` divided by its norm over ``dim``. Over positions (XCiT's and EdgeNeXt's
    cross-covariance attention normalize q and k over the tokens) the dims stay; over channels, a norm that
    replicas and zero channels would change (unlike LayerNorm's mean statistics, replication changes an
    L2 norm), so it is refused."""
    x = a.value(node.args[0] if node.args else node.kwargs["input"])
    if not isinstance(x, TD):
        raise a.fail("expected a tensor")
    dim = _arg(node, 2, "dim", 1) % len(x.shape)
    if not a.g.is_structural(x.dims[dim]) and not _head_channels(a, x, dim):
        raise a.fail("L2 normalization over a channel dim (replicated or new channels change the norm)")
    return TD(x.dims, _shape(a))


def _head_channels(a: Analyzer, x: TD, dim: int) -> bool:
    """Whether ``x``'s ``dim`` is the channel dim of attention heads: the last dim of a ``[..., heads, tokens,
    head_dim]`` tensor inside a module with ``num_heads`` heads, in ``head_dim`` mode (cosine attention,
    timm's Swin-V2: ``normalize(q) . normalize(k)`` per head). Growth keeps such heads' norms with rotated
    copies of their query and key rows (:mod:`morph.growth.cosine`)."""
    heads = _heads_of(a)
    return (current_attention_width() == "head_dim" and heads is not None and dim == len(x.shape) - 1
            and len(x.shape) >= 3 and x.shape[-3] == heads)


@_module("timm.models.mobilevit.MobileVitV2Block")
def _mobilevit_v2_block(a: Analyzer, node: fx.Node) -> TD:
    """Refused, with the reason: timm keeps MobileViT v2's block out of fx (``register_notrace_module``: its
    forward sizes the patch grid with ``math.ceil`` on the input shape), and morph has no stand-in forward for it
    (:mod:`.forwards` has one for v1's ``MobileVitBlock``), so its convs and linear self-attention (a softmax over
    one query channel, split off the qkv conv) are not in the traced graph."""
    raise a.fail(
        "timm's MobileVitV2Block is an fx leaf (its forward sizes the patch grid with math.ceil on the input shape) "
        "and morph has no traceable stand-in for it, so its convs and linear attention are not in the traced graph",
        "morph grows MobileViT v1 (mobilevit_xxs/xs/s), EfficientViT-MIT, EdgeNeXt and timm's ViTs",
    )


def _positions(a: Analyzer, t: TD) -> None:
    """The dims of an index or coordinate table: positions, which keep their sizes."""
    for d in t.dims:
        a.g.mark_fixed(d)
        for seg in a.g.atoms(d):
            a.g.structural[a.g.find(seg.group)] = True


def _tv_relative_position_bias(a: Analyzer, node: fx.Node) -> TD:
    """torchvision's ``_get_relative_position_bias(table [(2wh-1)(2ww-1), heads], index [N*N], window_size)``:
    ``[1, heads, N, N]``, the table's rows gathered by the index: the heads stay, the rest are positions."""
    table, index = a.value(node.args[0]), a.value(node.args[1])
    out_shape = _shape(a)
    if not isinstance(table, TD) or len(table.shape) != 2 or len(out_shape) != 4 or out_shape[1] != table.shape[1]:
        raise a.fail("expected a [positions, heads] relative-position table")
    _positions(a, TD(table.dims[:1], table.shape[:1]))
    if isinstance(index, TD):
        _positions(a, index)
    return TD((a.structural(1), table.dims[1], a.structural(out_shape[2]), a.structural(out_shape[3])), out_shape)


def _tv_patch_merging_pad(a: Analyzer, node: fx.Node) -> TD:
    """torchvision's ``_patch_merging_pad(x [..., H, W, C])``: the four 2x2 neighbours side by side,
    ``[..., H/2, W/2, 4C]``: the channels four times over."""
    x = a.value(node.args[0])
    out_shape = _shape(a)
    if not isinstance(x, TD) or out_shape[-1] != 4 * x.shape[-1]:
        raise a.fail("expected channels-last input")
    lead = tuple(x.dims[:-3]) if out_shape[:-3] == x.shape[:-3] else tuple(a.structural(n) for n in out_shape[:-3])
    cat = tuple(seg for _ in range(4) for seg in a.g.atoms(x.dims[-1]))
    return TD((*lead, a.structural(out_shape[-3]), a.structural(out_shape[-2]), cat), out_shape)


def _linear_of(a: Analyzer, weight_arg, bias_arg, shape: tuple[int, int]) -> str:
    """The Linear module whose ``weight`` (and ``bias``) a function receives as raw tensors read through
    ``get_attr``: its path; the tensors are the layer's, not free parameters."""
    if not (isinstance(weight_arg, fx.Node) and weight_arg.op == "get_attr" and str(weight_arg.target).endswith(".weight")):
        raise a.fail("expected the weight of a Linear module")
    path = str(weight_arg.target)[: -len(".weight")]  # torchvision's Swin: the attention's qkv and proj Linears
    w = a.value(weight_arg)
    if not isinstance(w, TD) or w.shape != shape:
        raise a.fail(f"{path}.weight is not a {shape[0]} x {shape[1]} Linear weight")
    a.params.pop(str(weight_arg.target), None)
    if isinstance(bias_arg, fx.Node) and bias_arg.op == "get_attr":
        if str(bias_arg.target) != f"{path}.bias":
            raise a.fail(f"the bias of {path} is another module's")
        a.params.pop(str(bias_arg.target), None)
    return path


@_function(F.linear)
def _functional_linear(a: Analyzer, node: fx.Node) -> TD:
    """``F.linear(x, weight, bias)`` with the weight of a Linear module read through ``get_attr`` (timm's Swin-V2
    ``WindowAttention``: ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``): that module is the layer
    (its own forward reads the weight, so templates and tiling replace it as any Linear's), and a bias that is
    not the module's own (parameters and buffers concatenated) is a free tensor whose channels are the output's.
    A weight that is not a module's ``weight`` is refused (the module's own unused bias would be refused by the
    coverage check of :func:`~.analyze.analyze`)."""
    x = a.value(_arg(node, 0, "input"))
    w_arg, b_arg = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    out_shape = _shape(a)
    if not isinstance(x, TD) or not isinstance(a.value(w_arg), TD):
        raise a.fail("expected a tensor input and weight")
    path = _linear_of(a, w_arg, b_arg, (out_shape[-1], x.shape[-1]))
    out = a.fresh(out_shape[-1], source=True)
    a.add_layer(LayerPlan(path, "linear", x.dims[-1], out))
    bias = a.value(b_arg)
    if isinstance(bias, TD) and not (isinstance(b_arg, fx.Node) and b_arg.op == "get_attr"):
        if len(bias.shape) != 1 or bias.shape[0] != out_shape[-1]:
            raise a.fail(f"expected a bias of {out_shape[-1]} channels")
        a.g.unify(out, bias.dims[0])
    return TD((*x.dims[:-1], out), out_shape)


def _tv_shifted_window_attention(a: Analyzer, node: fx.Node) -> TD:
    """torchvision's ``shifted_window_attention(x [B, H, W, C], qkv_weight, proj_weight, relative_position_bias,
    window_size, num_heads, shift_size, ..., qkv_bias, proj_bias, logit_scale)``: one fx-wrapped function that
    applies the ``qkv`` and ``proj`` Linear modules' weights with ``F.linear``. Their layers are found through the
    ``get_attr`` of their weights (the module's own forward runs them; templates and tiling replace the modules'
    weights). The qkv rows are ``(3, heads, head_dim)`` like timm's (:func:`.rules.attention_width` says which
    scales), the bias ``[1, heads, N, N]`` (and Swin-V2's ``logit_scale [heads, 1, 1]``) has the heads, and
    ``num_heads`` is recorded as the module attribute to set at the new width."""
    from .rules import _split_heads, reshape

    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
    args = {n: _arg(node, i, n) for i, n in enumerate(names)}
    x, bias = a.value(args["input"]), a.value(args["relative_position_bias"])
    out_shape = _shape(a)
    heads = args["num_heads"]
    if not isinstance(x, TD) or len(x.shape) != 4 or tuple(out_shape) != x.shape or not isinstance(heads, int):
        raise a.fail("expected a channels-last [B, H, W, C] input and a literal num_heads")
    c = x.shape[3]
    if c % heads:
        raise a.fail(f"{c} channels do not split into {heads} heads")
    qkv = _linear_of(a, args["qkv_weight"], args["qkv_bias"], (3 * c, c))
    proj = _linear_of(a, args["proj_weight"], args["proj_bias"], (c, c))
    qkv_out = a.fresh(3 * c, source=True)
    a.add_layer(LayerPlan(qkv, "linear", x.dims[3], qkv_out))
    split = _split_heads(a, qkv_out, (3, heads, c // heads), [0, 1, 2])
    head_dim, chan = split[1], split[2]
    if isinstance(bias, TD):
        couple(a, head_dim, bias.dims[1])
    scale = a.value(args["logit_scale"])
    if isinstance(scale, TD):
        couple(a, head_dim, scale.dims[0])
    # Swin-V2's continuous position bias MLP (cpb_mlp: 2 -> 512 -> heads): torchvision fixes its hidden width at
    # 512 whatever the model's width, so it keeps it (the models made stay models torchvision builds)
    cpb = sorted((p for n, p in a.layers.items() if n.startswith(f"{node_qualname(node)}.cpb_mlp.")),
                 key=lambda p: p.order)
    for p in cpb[:-1]:
        a.g.mark_fixed(p.out_dim)
    merged = reshape(a, TD((head_dim, chan), (heads, c // heads)), (c,))
    out = a.fresh(c, source=True)
    a.add_layer(LayerPlan(proj, "linear", merged.dims[0], out))
    a.consts.append(ConstSite(node.name, "shape", 4, (head_dim,), node_qualname(node)))
    return TD((*x.dims[:3], out), out_shape)


try:
    import torchvision.models.swin_transformer as _tv_swin

    _function(_tv_swin._get_relative_position_bias)(_tv_relative_position_bias)
    _function(_tv_swin._patch_merging_pad)(_tv_patch_merging_pad)
    _function(_tv_swin.shifted_window_attention)(_tv_shifted_window_attention)
except (ImportError, AttributeError):
    pass
