"""``gradmax``: GradMax (Evci et al., ICLR 2022), new neurons that maximize the gradient norm.

New incoming weights are zero (``epsilon = 0``), so the step keeps the function. For a new neuron
between a producer layer l and a consumer layer l+1, with f(0) = 0 and f'(0) = 1 (the activation's
derivative at 0 taken as 1 while computing it) and identity norm channels, the gradient of its
incoming weights is ``W_{l+1}^new^T M`` with ``M = E[dL/dz_{l+1} h_{l-1}^T]`` (GM Eq. 9-11); the new
outgoing weights are the top-k singular vectors of M, each scaled to ``scale`` (0.5) x the mean norm
of the consumer's existing outgoing vectors (GM §4.2).

Conv pairs (GM App. A, growneuron ``get_aux_layer``): M relates the producer's input patches
``(c, a, b)`` (``c x k1 x k1``) to the consumer's output and kernel ``(o, p, q)`` (``o x k2 x k2``).
morph computes it exactly: the producer's im2col laid out on its output grid, then the consumer's
weight gradient over it (one convolution backward, ``torch.nn.grad.conv2d_weight``): that takes
strides, dilations, padding and the consumer's zero border into account, where growneuron's auxiliary conv (kernel ``k1+k2-1``) is exact only for stride 1 away
from borders. The right singular vectors, reshaped to ``[o, k2, k2]``, are the new filters.

Which groups GradMax runs on: a channel group made by exactly one conv (or linear) layer and read by
exactly one conv (or linear) layer of the same kind, ungrouped, with only norm layers and activations
in between. Every other growing group gets a documented rule, reported per group in
``model.growth_report``: several producers or consumers (residual streams, concatenations),
grouped or depthwise convs in the path, or a conv feeding a linear layer: new neurons as ``random``
with the same epsilon (growneuron grows conv->dense pairs randomly); groups normalized across
channels (LayerNorm): uniform replication, as every method.

Data: one batch or several (M is accumulated), cross-entropy on the model's logits, the model in
training mode (norm statistics are restored afterwards), as growneuron does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MorphError
from .plain import PlainGrowth, iterate_batches
from .random import RandomGrowth
from .registry import register_growth

__all__ = ["GradMaxGrowth", "pair_matrix", "growth_directions"]

# memory of one unfolded chunk (elements) when accumulating M of a conv pair
_CHUNK_ELEMS = 1 << 25


def _plain_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def pair_matrix(producer: nn.Module, consumer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                hidden: tuple[int, ...] | None = None) -> torch.Tensor:
    """``sum_batch dL/dz_{l+1} h_{l-1}^T`` as the matrix whose rows index the producer's input (``c``, or
    ``(c, a, b)`` for convs) and whose columns index the consumer's output (``o``, or ``(o, p, q)``).

    Args:
        x: the producer's input batch.
        grad: the gradient of the loss with respect to the consumer's output.
        hidden: spatial size of the producer's output (conv pairs).
    """
    x, grad = x.double(), grad.double()
    if isinstance(producer, nn.Linear):
        c, o = x.shape[-1], grad.shape[-1]
        return x.reshape(-1, c).t() @ grad.reshape(-1, o)
    k1, k2 = producer.kernel_size, consumer.kernel_size
    c, o = x.shape[1], grad.shape[1]
    b = x.shape[0]
    ck = c * k1[0] * k1[1]
    step = max(1, _CHUNK_ELEMS // max(ck * hidden[0] * hidden[1], 1))
    m = x.new_zeros(o, ck, k2[0], k2[1])
    for i in range(0, b, step):
        # the producer's im2col on its output grid, then the consumer's weight gradient over it: one
        # convolution backward per chunk gives sum_batch grad (o, p, q) x patch (c, a, b; p, q)
        x1 = F.unfold(x[i:i + step], k1, dilation=producer.dilation, padding=producer.padding, stride=producer.stride)
        x1 = x1.view(x1.shape[0], ck, *hidden)
        m += torch.nn.grad.conv2d_weight(x1, tuple(m.shape), grad[i:i + step], stride=consumer.stride,
                                         padding=consumer.padding, dilation=consumer.dilation)
    # (o, (c, a, b), p, q) -> rows (c, a, b), columns (o, p, q)
    return m.view(o, ck, k2[0] * k2[1]).permute(1, 0, 2).reshape(ck, o * k2[0] * k2[1])


def growth_directions(a: torch.Tensor, k: int, gen: torch.Generator, eps: float | None = None) -> torch.Tensor:
    """The top-``k`` right singular vectors of ``a`` (rows of the result), by singular value, as far as its
    numerical rank goes; beyond it, random unit directions. A singular vector of singular value 0 is a direction
    the loss does not see (the all-ones direction of the logits of a classifier pair, whose cross-entropy
    gradient sums to 0 over the classes): a neuron with those outgoing weights would never get a gradient,
    while a random direction has a component where the gradient is. ``eps``: the machine epsilon of the data
    ``a`` was computed from (default: ``a``'s own dtype; :func:`pair_matrix` accumulates in float64)."""
    n = a.shape[1]
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    # numerical rank at the data's precision (numpy's matrix_rank tolerance): a direction the loss does not see
    # keeps a singular value of rounding size, ~1e-7 of the largest in float32 (a layer feeding LayerNorms, whose
    # gradients sum to 0 over the channels, as CaiT's fc2: a fixed 1e-10 cut, or float64's epsilon for a matrix
    # accumulated in float64 from float32 activations, gave a new neuron the all-ones direction, which gets no
    # gradient: 24 of cait_xxs24's 17858 new rows stayed 0 after training)
    eps = torch.finfo(a.dtype).eps if eps is None else eps
    tol = float(s.max()) * max(a.shape) * eps if s.numel() else 0.0
    rank = int((s > tol).sum()) if s.numel() and float(s.max()) > 0 else 0
    top = vh[:min(k, rank)]
    if k <= top.shape[0]:
        return top
    extra = torch.randn(k - top.shape[0], n, generator=gen, dtype=vh.dtype).to(vh.device)  # drawn on the CPU
    return torch.cat([top, extra / extra.norm(dim=1, keepdim=True)])


@register_growth
class GradMaxGrowth(RandomGrowth):
    name = "gradmax"
    label, baseline, order = "GradMax", True, 4
    summary = "GradMax: zero incoming; outgoing = top singular vectors of E[dL/dz_{l+1} h_{l-1}^T] (needs data)"
    needs_data = True
    options: ClassVar[dict[str, Any]] = {
        **PlainGrowth.options, "epsilon": 0.0, "scale": 0.5, "scale_method": "mean_norm", "train_mode": True,
    }

    def data_flops(self, f_small, f_grown, images):
        return 3.0 * f_small * images  # a forward and a backward pass of the small model per image

    def prepare(self, model, layout, data):
        self.chains: dict[int, tuple[str, str]] = {}
        self.why: dict[int, str] = {}
        for g in layout.growing():
            if g.rule != "fresh":
                continue
            prod, cons = layout.producers(g.root), layout.consumers(g.root)
            why = self._not_chain(model, layout, g.root, prod, cons)
            if why:
                self.why[g.root] = why
            else:
                self.chains[g.root] = (prod[0], cons[0])
        self.eps: dict[int, float] = {}  # per pair, the machine epsilon of the activations and gradients of M
        self.matrices = self._matrices(model, data) if self.chains else {}

    def _not_chain(self, model, layout, root, prod, cons) -> str:
        if len(prod) != 1 or len(cons) != 1:
            return f"{len(prod)} producer(s) and {len(cons)} consumer(s) (residual stream or concatenation)"
        p, c = model.get_submodule(prod[0]), model.get_submodule(cons[0])
        if prod[0] == cons[0]:
            return "a layer that reads its own output"
        if _plain_conv(p) and _plain_conv(c) or _plain_linear(p) and _plain_linear(c):
            inner = [s.inner for s in layout.plan.atoms(layout.plan.layers[cons[0]].in_dim)
                     if layout.plan.groups.find(s.group) == root]
            return "" if inner == [1] else "flattened into the consumer"
        if isinstance(p, nn.Conv2d) and isinstance(c, nn.Linear):
            return "conv -> linear pair (growneuron grows these randomly)"
        return f"{type(p).__name__} -> {type(c).__name__} pair (not two ungrouped convs or two linears)"

    def _matrices(self, model: nn.Module, data) -> dict[int, torch.Tensor]:
        prods = {p for p, _ in self.chains.values()}
        cons = {c for _, c in self.chains.values()}
        was = model.training
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        acc: dict[int, torch.Tensor] = {}
        n = 0
        cap_in: dict[str, list] = {}
        cap_out: dict[str, list] = {}
        cap_shape: dict[str, list] = {}

        def pre(name):
            return lambda m, args: cap_in.setdefault(name, []).append(args[0].detach())

        def post_shape(key):
            return lambda m, args, out: cap_shape.setdefault(key, []).append(tuple(out.shape[2:]))

        def cpre(name):
            return lambda m, args: cap_shape.setdefault("in:" + name, []).append(tuple(args[0].shape[2:]))

        def cpost(name):
            return lambda m, args, out: cap_out.setdefault(name, []).append(out)

        hooks = []
        for name in prods:
            hooks += [model.get_submodule(name).register_forward_pre_hook(pre(name)),
                      model.get_submodule(name).register_forward_hook(post_shape("out:" + name))]
        for name in cons:
            hooks += [model.get_submodule(name).register_forward_pre_hook(cpre(name)),
                      model.get_submodule(name).register_forward_hook(cpost(name))]
        try:
            model.train(bool(self.opts["train_mode"]))
            for x, y in iterate_batches(data):
                cap_in.clear()
                cap_out.clear()
                cap_shape.clear()
                with torch.enable_grad():
                    p0 = next(iter(model.parameters()))
                    x = x.to(p0).requires_grad_(True)
                    out = model(x)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    loss = F.cross_entropy(out, y.to(out.device))
                    names = sorted(c for c in cons if c in cap_out)
                    outs = [cap_out[c][0] for c in names]
                    grads = dict(zip(names, torch.autograd.grad(loss, outs, allow_unused=True), strict=True))
                n += 1
                for root, (p, c) in self.chains.items():
                    if len(cap_in.get(p, [])) != 1 or len(cap_out.get(c, [])) != 1 or grads.get(c) is None:
                        self.why[root] = "a layer of the pair runs more than once per forward (or not at all)"
                        continue
                    hidden = cap_shape["out:" + p][0]
                    if isinstance(model.get_submodule(p), nn.Conv2d) and hidden != cap_shape["in:" + c][0]:
                        self.why[root] = "a spatial op (pooling) between the pair"
                        continue
                    if isinstance(model.get_submodule(p), nn.Linear) and \
                            tuple(cap_in[p][0].shape[:-1]) != tuple(grads[c].shape[:-1]):
                        self.why[root] = "a token op (pooling over tokens) between the pair"
                        continue
                    m = pair_matrix(model.get_submodule(p), model.get_submodule(c), cap_in[p][0], grads[c], hidden)
                    self.eps[root] = max(self.eps.get(root, 0.0), torch.finfo(grads[c].dtype).eps,
                                         torch.finfo(cap_in[p][0].dtype).eps)
                    acc[root] = acc[root] + m if root in acc else m
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
            with torch.no_grad():
                for k, v in model.named_buffers():
                    if k in buffers:
                        v.copy_(buffers[k])
        if n == 0:
            raise MorphError("gradmax got no batches of data")
        for root in list(self.chains):
            if root in self.why:
                del self.chains[root]
                acc.pop(root, None)
        return acc

    def rule_of(self, layout, root):
        g = layout.groups[root]
        if g.rule != "fresh":
            return f"{g.rule} ({g.note})" if g.note else g.rule
        if root in self.chains:
            p, c = self.chains[root]
            return f"gradmax ({p} -> {c})"
        return f"random ({self.why.get(root, '')})"

    def outgoing(self, name, w, rows, cols, group, old):
        done = torch.zeros(len(cols), dtype=torch.bool, device=cols.device)
        for root in group.unique().tolist():
            if root not in self.chains or self.chains[root][1] != name:
                continue
            sel = (group == root).nonzero().flatten()
            a = self.matrices[root]
            v = growth_directions(a, len(sel), self.gen, self.eps.get(root))  # [k, o * k2 * k2]
            v = v.view(len(sel), old.shape[0], *old.shape[2:])
            v = v * (float(self.opts["scale"]) * self._norm(old, 1))
            out_map = self.layout.dim(self.layout.plan.layers[name].out_dim)
            src_rows = out_map.src[rows]
            sub = w.index_select(0, rows)
            sub[:, cols[sel]] = v.index_select(1, src_rows).transpose(0, 1).to(w)
            w[rows] = sub
            done[sel] = True
        if not done.all():
            super().outgoing(name, w, rows, cols[~done], group[~done], old)
