"""Where zero-initialized new neurons cannot start to train, read from the traced graph, and what to do there.

Random and GradMax (epsilon 0) give new neurons zero incoming weights, so every new channel is exactly zero at
growth and the function is kept. Behind a ReLU with sub-gradient 1 at 0 (:mod:`.activation`) such a neuron
normally gets a gradient at the first step. Two graph motifs stop it:

- **A product of two new channels** (StarNet's ``act(f1(x)) * f2(x)``, gates of two grown branches): both
  factors are 0 and each one's gradient is the other one's value, so both stay 0 forever, under any activation.
  Only one factor has to be 0 for the product (and the function) to be kept: :func:`dead_products` finds such
  products whose factors are each computed from their own ungrouped conv/linear through elementwise ops with
  f(0) = 0, and names the producer of one factor, the **live** one, whose new neurons then get non-zero
  incoming weights (the method's random directions at ``scale`` x the layer's mean row norm). The other factor
  stays 0, so does the product; it receives ``live factor x upstream gradient``. The live factor is the one
  behind a non-linearity when only one is (the zero factor's own gradient then does not depend on an
  activation's derivative at 0), and its producer must feed nothing but that product, else the function would
  change elsewhere.
- **BatchNorms of zero channels in series** (RepVGG/MobileOne blocks: an identity BatchNorm of the block's input
  next to conv-BN branches, block after block). In training mode a BatchNorm
  multiplies the gradient of an all-zero channel by ``weight / sqrt(eps)`` (31.6 at ``new_gamma = 0.1``, eps
  1e-5; GradMax App. C). Behind a new conv/linear neuron that gain reaches its incoming weights once (twice behind
  a depthwise conv: MobileNet's expand-BN-dw-BN); but where the gradient of a zero norm's input flows on into
  another zero norm, and from that one into a third (through elementwise ops, sums and depthwise/grouped convs,
  without meeting the zero rows of an ungrouped conv/linear), the gains multiply: 31.6 per block over a RepVGG
  stage, and the first steps diverge (``timm/repvgg_a0``: new rows at 1e5 after one
  step, inf after two). :func:`chained_norms` finds those norms; their new channels get weight
  ``new_gamma x sqrt(eps)`` instead of ``new_gamma``: gain ``new_gamma`` (0.1) at growth. (Gain 1 is not enough:
  a block that sums an identity norm and k norm branches of depthwise convs multiplies by about 1 + k, and
  ``timm/mobileone_s1``'s first update still reached 6e5 x the old rows' norm; at 0.1 per norm the sum decays.)
  A smaller weight is not free: where a ReLU follows, the norm's bias moves at the first step while the channel
  is still ~0, and a channel whose bias turned negative stays off (on MobileNets' depthwise norms, chains of 2,
  this killed 66 of 5532 new rows of ``timm/mnasnet_small``), so only series of :data:`SERIES` (3) or more
  zero norms get it. Norms straight behind a conv/linear, a depthwise conv's norm behind an expand conv's, and
  norms of a residual stream made by convs (ResNet, pre-activation WRN, DenseNet) keep ``new_gamma``.

Both rules only apply where new incoming weights are zero (Random, GradMax at epsilon 0); they keep the
function (the product keeps a zero factor; a zero channel normalizes to 0 whatever its weight).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .layout import Layout

__all__ = ["dead_products", "chained_norms", "constant_inputs", "shuffled_inputs", "split_products", "zero_inputs"]

# modules and functions that map 0 to 0 channel by channel (elementwise with f(0) = 0, pooling, dropout)
_ZERO_MODULES = ("relu", "relu6", "gelu", "gelutanh", "quickgelu", "silu", "swish", "swishme", "hardswish",
                 "hardswishme", "mish", "mishme", "leakyrelu", "elu", "celu", "selu", "tanh", "hardtanh", "prelu",
                 "identity", "dropout", "dropout1d", "dropout2d", "dropout3d", "droppath", "maxpool2d", "avgpool2d",
                 "adaptiveavgpool2d", "adaptivemaxpool2d", "avgpool1d", "maxpool1d")
_LINEAR_MODULES = ("identity", "dropout", "dropout1d", "dropout2d", "dropout3d", "droppath", "avgpool2d",
                   "adaptiveavgpool2d", "avgpool1d")
_ZERO_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
                   F.hardtanh, F.dropout, F.dropout2d, torch.relu, torch.tanh, F.tanh, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_LINEAR_FUNCTIONS = {F.dropout, F.dropout2d, F.avg_pool2d, F.adaptive_avg_pool2d}
_ZERO_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "to", "type_as"}
_LINEAR_METHODS = {"contiguous", "clone", "float", "double", "to", "type_as"}
_MUL = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
_SUM = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.cat, torch.concat}
_SUM_METHODS = {"add", "add_", "sub", "sub_", "__add__", "__radd__"}


def _mod_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    return type(gm.get_submodule(node.target)).__name__.lower()


def _unary(layout: Layout, node: fx.Node) -> tuple[bool, bool]:
    """(maps 0 to 0 channel by channel, is linear at 0) for a one-input node; norms of new channels are identity
    channels (0 -> 0)."""
    gm, layers = layout.plan.gm, layout.plan.layers
    if node.op == "call_module":
        p = layers.get(node.target)
        if p is not None:
            return p.kind == "norm", p.kind == "norm"
        kind = _mod_kind(gm, node)
        return kind in _ZERO_MODULES, kind in _LINEAR_MODULES
    if node.op == "call_function":
        return node.target in _ZERO_FUNCTIONS, node.target in _LINEAR_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ZERO_METHODS, node.target in _LINEAR_METHODS
    return False, False


def _ungrouped(layout: Layout, name: str) -> bool:
    p = layout.plan.layers[name]
    if p.kind == "linear":
        return True
    m = layout.plan.gm.get_submodule(name)
    return p.kind == "conv" and m.groups == 1 and not m.transposed


def _fresh(layout: Layout, name: str) -> bool:
    return bool(layout.dim(layout.plan.layers[name].out_dim).fresh.any())


def _factor(layout: Layout, node: fx.Node) -> tuple[str | None, bool, list[fx.Node]]:
    """Walk back from a factor of a product through ops that map 0 to 0: (the ungrouped conv/linear with new rows
    that computes it, or None; whether every op on the way is linear; the nodes from that layer to the factor)."""
    chain, linear = [], True
    while isinstance(node, fx.Node):
        chain.append(node)
        if node.op == "call_module" and node.target in layout.plan.layers:
            p = layout.plan.layers[node.target]
            if p.kind in ("conv", "linear"):
                ok = _ungrouped(layout, node.target) and _fresh(layout, node.target)
                return (node.target if ok else None), linear, chain
        zero, lin = _unary(layout, node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not zero or len(tensors) != 1:
            return None, linear, chain
        linear = linear and lin
        node = tensors[0]
    return None, linear, chain


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MUL) or (node.op == "call_method" and node.target in _MUL_METHODS)


def dead_products(layout: Layout) -> dict[str, str]:
    """Products of two new zero channels: producer layer of the factor to make live -> the product node's name."""
    live: dict[str, str] = {}
    zero: set[str] = set()
    for node in layout.plan.gm.graph.nodes:
        if not _is_mul(node):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        (pa, lin_a, chain_a), (pb, lin_b, chain_b) = _factor(layout, args[0]), _factor(layout, args[1])
        if pa is None or pb is None or pa == pb:
            continue
        roots_a = set(layout.roots(layout.plan.layers[pa].out_dim))
        roots_b = set(layout.roots(layout.plan.layers[pb].out_dim))
        if not roots_a & roots_b:
            continue  # the factors' new channels are not multiplied with each other
        # the zero factor: the linear one when only one is (its gradient is then the live factor's value)
        order = [(pa, chain_a, pb), (pb, chain_b, pa)] if lin_b and not lin_a else [(pb, chain_b, pa), (pa, chain_a, pb)]
        for cand, chain, other in order:
            if cand in live or cand in zero or other in live:
                continue
            if all(len(n.users) == 1 for n in chain):  # the live producer feeds nothing but this product
                live[cand] = node.name
                zero.add(other)
                break
    return live


_SPLITS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split"}
_SHAPE_METHODS = {"permute", "transpose", "reshape", "view", "contiguous", "flatten", "unsqueeze", "squeeze"}


def _split_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(split node, index)`` when ``node`` is ``getitem(split(x, ...), index)`` (``torch.split``/``chunk``)."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    src, k = node.args
    if not isinstance(src, fx.Node) or not isinstance(k, int):
        return None
    if (src.op == "call_function" and src.target in _SPLITS) or (src.op == "call_method" and src.target in _SPLIT_METHODS):
        return src, k
    return None


def _split_factor(layout: Layout, node: fx.Node) -> tuple[fx.Node, int, bool, list[fx.Node]] | None:
    """Walk back from a factor of a product through ops that map 0 to 0 to a slice ``getitem(split(x), k)``:
    (the split, ``k``, whether every op on the way is linear, the nodes from the slice to the factor)."""
    chain, linear = [], True
    while isinstance(node, fx.Node):
        chain.append(node)
        hit = _split_of(node)
        if hit is not None:
            return hit[0], hit[1], linear, chain
        if node.op == "call_module" and node.target in layout.plan.layers:
            return None
        zero, lin = _unary(layout, node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not zero or len(tensors) != 1:
            return None
        linear = linear and lin
        node = tensors[0]
    return None


def _zero_slices(layout: Layout, node: fx.Node, split: fx.Node, k: int) -> bool:
    """Whether the new channels of ``node`` are computed only from slices of ``split`` other than ``k``, through
    ops that keep a new channel at 0: elementwise ops with f(0) = 0, concatenations, shape-only methods, and
    depthwise/grouped convs (whose new filters read only new channels)."""
    plan, stack, seen, hits = layout.plan, [node], set(), 0
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        hit = _split_of(n)
        if hit is not None:
            if hit[0] is not split or hit[1] == k:
                return False
            hits += 1
            continue
        tensors = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_function" and n.target in (torch.cat, torch.concat):
            stack += [a for a in (n.args[0] if n.args else []) if isinstance(a, fx.Node)]
        elif n.op == "call_method" and n.target in _SHAPE_METHODS and tensors:
            stack.append(tensors[0])
        elif n.op == "call_module" and n.target in plan.layers and plan.layers[n.target].kind == "conv" and not (
                _ungrouped(layout, n.target)) and tensors:
            stack.append(tensors[0])
        else:
            zero, _ = _unary(layout, n)
            if not zero or len(tensors) != 1:
                return False
            stack.append(tensors[0])
    return hits > 0


def _slice_rows(layout: Layout, producer: str, split: fx.Node, k: int) -> torch.Tensor | None:
    """The positions of the grown ``producer``'s output rows that slice ``k`` of ``split`` holds: the slices'
    channel dims, read from the plan, are consecutive runs of the producer's output atoms."""
    plan = layout.plan
    counts: dict[int, int] = {}
    for u in split.users:
        hit = _split_of(u)
        td = plan.node_dims.get(u.name)
        if hit is None or td is None or not td.dims:
            return None
        counts[hit[1]] = len(plan.atoms(td.dims[-1] if _channels_last(layout, producer) else td.dims[1]))
    if any(j not in counts for j in range(k + 1)):
        return None
    atoms = plan.atoms(plan.layers[producer].out_dim)
    start, stop = sum(counts[j] for j in range(k)), sum(counts[j] for j in range(k + 1))
    if stop > len(atoms):
        return None
    sizes = [layout.groups[plan.groups.find(a.group)].new * a.inner for a in atoms]
    mask = torch.zeros(sum(sizes), dtype=torch.bool, device=layout.device)
    mask[sum(sizes[:start]):sum(sizes[:stop])] = True
    return mask


def _channels_last(layout: Layout, name: str) -> bool:
    return layout.plan.layers[name].kind == "linear"


def split_products(layout: Layout) -> dict[str, tuple[str, torch.Tensor]]:
    """Products of two slices of one layer's new channels (MambaOut's gated conv block: ``g, i, c =
    split(fc1(x))``, ``fc2(act(g) * cat(i, dwconv(c)))``): both factors are 0 at growth and each one's gradient is
    the other's value, as in :func:`dead_products`, but the factors share a producer, so the live part is chosen by
    position: producer -> (the product node's name, a mask of the producer's grown output rows in the live slice).
    The live slice is the one behind a non-linearity when only one is, it must feed nothing but this product, the
    split must cut the producer's channel dim, and the other factor must come from the other slices through ops
    that keep a new channel at 0 (:func:`_zero_slices`)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for node in layout.plan.gm.graph.nodes:
        if not _is_mul(node):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        fa, fb = _split_factor(layout, args[0]), _split_factor(layout, args[1])
        order = [(fa, args[1]), (fb, args[0])]
        if fa is not None and fb is not None and fb[2] and not fa[2]:
            pass
        elif fb is not None and (fa is None or (fa[2] and not fb[2])):
            order = [(fb, args[0]), (fa, args[1])]
        for f, other in order:
            if f is None:
                continue
            split, k, _, chain = f
            if not split.args or not isinstance(split.args[0], fx.Node):
                continue
            producer, _, pchain = _factor(layout, split.args[0])
            if producer is None or producer in out or any(len(n.users) != 1 for n in chain + pchain):
                continue
            dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
            want = (-1,) if _channels_last(layout, producer) else (1, -3)
            if dim not in want and not (_channels_last(layout, producer) and dim == _ndim(layout, split) - 1):
                continue
            if not _zero_slices(layout, other, split, k):
                continue
            rows = _slice_rows(layout, producer, split, k)
            if rows is None or not bool((rows & layout.dim(layout.plan.layers[producer].out_dim).fresh).any()):
                continue
            out[producer] = (node.name, rows)
            break
    return out


def _ndim(layout: Layout, node: fx.Node) -> int:
    x = node.args[0] if node.args else None
    td = layout.plan.node_dims.get(x.name) if isinstance(x, fx.Node) else None
    return len(td.dims) if td is not None and td.dims else -1


#: a zero BatchNorm is "in series" when at least this many zero BatchNorms, itself included, follow one another
#: backwards from it (RepVGG: the identity norms of every block; MobileNet's depthwise-conv norm behind the expand
#: conv's norm is a chain of 2, which ends at the expand conv's rows, and keeps ``new_gamma``)
SERIES = 3


def chained_norms(layout: Layout) -> list[str]:
    """BatchNorm layers with new channels in a series of at least :data:`SERIES` zero BatchNorms: a norm's input
    gradient flows on into the norms its backward walk meets (through elementwise ops, sums, concatenations and
    depthwise/grouped convs; an ungrouped conv/linear ends the walk, its new rows take the gradient), and the
    length of a series is the longest such path of norms."""
    plan = layout.plan
    norms = {n.name: n for n in plan.gm.graph.nodes
             if n.op == "call_module" and n.target in plan.layers and plan.layers[n.target].kind == "norm"
             and isinstance(plan.gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
             and bool(layout.dim(plan.layers[n.target].in_dim).fresh.any())}
    length: dict[str, int] = {}
    for name, norm in norms.items():  # graph order: the norms a walk meets come earlier and have their length
        seen: set[str] = set()
        stack = [a for a in norm.args[:1] if isinstance(a, fx.Node)]
        met: set[str] = set()
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.name in norms:
                met.add(node.name)  # the walk stops at a norm: the series goes on through its own walk
                continue
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if node.op == "call_module" and node.target in plan.layers:
                p = plan.layers[node.target]
                if p.kind == "conv" and not _ungrouped(layout, node.target):
                    stack += tensors[:1]  # a depthwise/grouped conv passes a new channel's gradient to new channels
                continue  # an ungrouped conv/linear (its new rows take the gradient), other norm kinds
            if _is_mul(node) or (node.op == "call_function" and node.target in _SUM) or (
                    node.op == "call_method" and node.target in _SUM_METHODS):
                stack += tensors
                if node.target in (torch.cat, torch.concat) and node.args and isinstance(node.args[0], (list, tuple)):
                    stack += [a for a in node.args[0] if isinstance(a, fx.Node)]
                continue
            zero, _ = _unary(layout, node)
            if zero and len(tensors) == 1:
                stack += tensors
        length[name] = 1 + max((length.get(m, 1) for m in met), default=0)
    return [norms[n].target for n, k in length.items() if k >= SERIES]


def shuffled_inputs(layout: Layout) -> dict[str, str]:
    """Ungrouped conv/linear layers with new rows that read a channel group derived by a channel shuffle
    (ShuffleNet): layer -> why. The layout of a wider shuffle is not the old one plus new channels (growth does
    not keep the function there, docs/growth.md), and in the grown model such a layer can read only new, zero
    channels at growth: its zero rows then get no gradient at the first step while the bias of the BatchNorm
    behind them does, and where that bias goes negative the constant channel sits below the ReLU for good
    (``torchvision/shufflenet_v2_x0_5``: 20 of 1988 rows). These are the candidates; the ones whose input is
    exactly zero on a probe batch (:func:`zero_inputs`) get the live factor's random incoming weights: with a zero
    input any incoming weights keep the function, and once the input moves the new neurons vary."""
    plan = layout.plan
    derived = {plan.groups.find(r) for r in plan.groups.derived}
    out = {}
    for p in plan.conv_layers():
        if p.kind not in ("conv", "linear") or not _ungrouped(layout, p.name) or not _fresh(layout, p.name):
            continue
        if derived & set(layout.roots(p.in_dim)):
            out[p.name] = "reads a channel shuffle"
    return out


def _probe(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One eval-mode forward of ``model`` on ``x`` without gradient, for ``hooks`` to read; the hooks are removed
    and the model's training flag restored afterwards."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()


def zero_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """Of the layers ``names`` of ``model``, those whose input is exactly zero on the batch ``x`` (eval mode, no
    gradient; the model's training flag is restored)."""
    seen: dict[str, bool] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, seen.get(n, True) and not bool(args[0].detach().any())))
        for n in names]
    _probe(model, x, hooks)
    return [n for n in names if seen.get(n, False)]


def constant_inputs(model: nn.Module, layout: Layout, x: torch.Tensor, tol: float = 1e-12) -> dict[str, torch.Tensor]:
    """Ungrouped conv/linear layers of the grown ``model`` whose new input channels are not zero at growth although
    new neurons have zero incoming weights, because an activation with ``f(0) != 0`` sits in between (timm's
    StarReLU ``s * relu(x) ** 2 + b`` gives ``b``): layer -> the value of each new input channel, for the layers
    where every such channel is one constant over the batch ``x`` and its positions (eval mode, no gradient). A
    new channel's outgoing weights then add ``value x weight`` to every output; with the weights of each output
    row and kernel tap orthogonal to those values (:func:`project_out`) the function is kept exactly."""
    plan = layout.plan
    names, cols = [], {}
    for p in plan.conv_layers():
        if p.kind not in ("conv", "linear") or not _ungrouped(layout, p.name):
            continue
        m = layout.dim(p.in_dim)
        if m.fresh.any() and len(m) == model.get_submodule(p.name).weight.shape[1]:
            names.append(p.name)
            cols[p.name] = m.fresh.nonzero().flatten()
    seen: dict[str, tuple[torch.Tensor, float]] = {}  # layer -> (first position's values, largest deviation)

    def hook(mod, args, name):
        t = args[0].detach()
        t = t.movedim(1, -1) if isinstance(mod, nn.modules.conv._ConvNd) else t
        v = t.index_select(-1, cols[name].to(t.device)).reshape(-1, len(cols[name])).double()
        c, dev = seen.get(name, (v[0], 0.0))
        seen[name] = (c, max(dev, float((v - c).abs().max())))

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    _probe(model, x, hooks)
    out = {}
    for name, (c, dev) in seen.items():
        scale = float(c.abs().max())
        if scale > 0 and dev <= tol * scale:
            out[name] = c
    return out


def project_out(w: torch.Tensor, cols: torch.Tensor, c: torch.Tensor) -> None:
    """Make ``w[:, cols]`` (a conv/linear weight, in place) orthogonal to ``c`` along the input axis, for every
    output row and kernel tap: the layer then maps input channels ``cols`` holding the constants ``c`` to 0,
    inside the image and at its zero-padded borders alike."""
    sub = w.index_select(1, cols).double()  # [out, k, taps...]
    c = c.to(sub).view(1, -1, *([1] * (w.dim() - 2)))
    sub = sub - (sub * c).sum(1, keepdim=True) / (c * c).sum() * c
    w.index_copy_(1, cols, sub.to(w.dtype))
