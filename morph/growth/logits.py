"""Attention logits of heads whose size grows (``head_dim`` mode): scaled queries keep them.

A head that grows from ``d`` to ``d'`` channels changes its logits ``q . k / sqrt(d)`` in two ways, though every
other part of the step keeps the function:

- the scale: timm's attention modules compute ``head_dim ** -0.5`` (``self.scale``, which the grown model's
  modules recompute, :mod:`morph.scale`) and ``F.scaled_dot_product_attention`` takes it from the tensor's last
  dim, so the logits shrink by ``sqrt(d / d')``;
- replicated channels (Net2Net; groups normalized by a LayerNorm under every method, and PVT-v2, whose
  attention channels share the residual stream's group): a channel and its replicas add the same product
  ``q_i k_i`` ``count`` times.

Both are undone on the query rows, as LEMON (Wang et al. 2024) scales the queries of an expanded head: new query
row ``j`` (weights and bias) is multiplied by ``sqrt(d' / d) x share_j``, where ``share_j`` is the fraction of its
source's fan-out the channel takes (:func:`.layout.split_unevenly`: uneven, summing to 1 over a source's
replicas; 1 for an old or fresh channel). The logits are then ``sum_i q_i k_i (sum_j share_j) / sqrt(d) ``: the
old ones, exactly. The uneven shares also break the symmetry a replicated channel would otherwise keep for good:
``q_j`` and ``k_j`` equal to their source's get equal gradients through ``q . k`` (the uneven split of
:mod:`.layout` acts on fan-out weights, which queries and keys do not have), while scaled queries give the keys
gradients in proportion to their shares, so replicas part at the first step.

Which rows are queries is read off the grown model, as :mod:`.keys` does: one forward pass of the model and of
the grown model with SDPA (``F.scaled_dot_product_attention``, and ``torch._C._nn``'s, which fx
GraphModules call) and batched ``Tensor.__matmul__`` and ``Tensor.matmul`` (torchvision's Swin) watched; a call whose
contraction size grew and whose output keeps its shape is a logit product ``q @ k^T`` (``attn @ v`` contracts
over tokens, which do not change); the rows of the last layer that reach its left factor (``q``) and not its
right one are that call's queries. For SDPA ``s`` is the ratio of the scales it applies (its default
``head_dim ** -0.5``, or an explicit ``scale=``); for ``q @ k^T`` it is measured (the grown module may or may not
recompute ``self.scale``: Swin's does not). A scale applied after the product (``(q @ k^T) * self.scale``:
visformer's and efficientformer's non-fused paths) is not seen by the measurement.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["keep_logits"]

_ATTENTION_OPS: tuple = (F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm)
try:  # torchvision's Swin: the window attention is one fx-wrapped function (q.matmul(k.transpose(-2, -1)) inside)
    from torchvision.models.swin_transformer import shifted_window_attention as _tv_swin_attention

    _ATTENTION_OPS += (_tv_swin_attention,)
except ImportError:
    pass


class _Watch:
    """Records ``("sdpa", q, k, scale)`` and ``("mm", a, b, None)`` for every SDPA call and batched ``@`` or
    ``Tensor.matmul`` (torchvision's Swin: ``q.matmul(k.transpose(-2, -1))``). SDPA is watched under both of its
    names: ``F.scaled_dot_product_attention`` and ``torch._C._nn.scaled_dot_product_attention``, which is what the
    code of an fx ``GraphModule`` calls (timm's maxxvit halves are rewritten GraphModules)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, float | None]] = []

    def __enter__(self) -> _Watch:
        self.sdpa, self.nn_sdpa = F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention
        self.mm, self.matmul = torch.Tensor.__matmul__, torch.Tensor.matmul
        orig_sdpa, calls, inside = self.nn_sdpa, self.calls, [False]

        def once(call, record):
            # a TorchFunctionMode (the grown model's ReLU sub-gradient, .activation) dispatches the original
            # method to the patched name again: record the outer call only
            if inside[0]:
                return call()
            if record is not None:
                calls.append(record)
            inside[0] = True
            try:
                return call()
            finally:
                inside[0] = False

        def sdpa(q, k, v, *args, **kwargs):
            scale = kwargs.get("scale", args[3] if len(args) > 3 else None)
            return once(lambda: orig_sdpa(q, k, v, *args, **kwargs), ("sdpa", q, k, scale))

        def watching(orig):
            def mm(a, b):
                batched = isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() >= 3
                return once(lambda: orig(a, b), ("mm", a, b, None) if batched else None)

            return mm

        F.scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention = sdpa
        torch.Tensor.__matmul__, torch.Tensor.matmul = watching(self.mm), watching(self.matmul)
        return self

    def __exit__(self, *exc: object) -> None:
        F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention = self.sdpa, self.nn_sdpa
        torch.Tensor.__matmul__, torch.Tensor.matmul = self.mm, self.matmul


def _shape(kind: str, a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """Output shape of the product (SDPA: the logits ``q @ k^T``)."""
    return (*a.shape[:-1], b.shape[-2]) if kind == "sdpa" else (*a.shape[:-1], b.shape[-1])


def _scale(kind: str, a: torch.Tensor, scale: float | None) -> float | None:
    if kind == "mm":
        return None
    return float(scale) if scale is not None else a.shape[-1] ** -0.5


def keep_logits(new: nn.Module, model: nn.Module, layout, x: torch.Tensor) -> dict[str, int]:
    """Scale the query rows of ``new`` (``model`` grown by ``layout``) whose heads grew so that every attention
    logit is ``model``'s on the same input (module docstring); returns, per layer changed, the rows scaled."""
    if not any(n.op == "call_function" and n.target in _ATTENTION_OPS for n in layout.plan.gm.graph.nodes):
        return {}
    was_old, was_new = model.training, new.training
    buffers = {k: v.detach().clone() for k, v in new.named_buffers()}
    model.eval()
    new.eval()
    try:
        with torch.no_grad(), _Watch() as w_old:
            model(x.to(next(model.parameters())))
        with torch.enable_grad(), _Watch() as w_new:
            new(x)
        return _scale_queries(new, layout, x, w_old.calls, w_new.calls)
    finally:
        model.train(was_old)
        new.train(was_new)
        with torch.no_grad():
            for k, v in new.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])


def _scale_queries(new: nn.Module, layout, x: torch.Tensor, old_calls, new_calls) -> dict[str, int]:
    """The logit calls of the two forward passes, their query rows, and the factors (module docstring). SDPA
    calls: ``s`` from the scales SDPA applies. Batched ``@``: the scale sits in the factors (``q * self.scale``,
    which the grown module may or may not recompute), so ``s`` is measured, call after call in forward order:
    with the calls before it corrected, the call's inputs are the model's, and ``s`` is the least-squares ratio
    of its old and new products (one forward pass per call)."""
    if len(old_calls) != len(new_calls) or any(o[0] != n[0] for o, n in zip(old_calls, new_calls, strict=True)):
        return {}  # the forward passes differ in their attention products: nothing to pair
    layers = [(name, p, new.get_submodule(name)) for name, p in layout.plan.layers.items()
              if p.kind in ("conv", "linear")]
    layers = [(name, p, m) for name, p, m in layers if len(layout.dim(p.out_dim)) > layout.dim(p.out_dim).n_old]
    weights = [m.weight for _, _, m in layers]
    probe = torch.Generator().manual_seed(0)
    factors: dict[str, torch.Tensor] = {}
    measure: list[tuple[int, str, torch.Tensor, float]] = []  # batched @: (call, layer, query rows, sqrt(d'/d))
    for i, ((kind, a0, b0, s0), (_, a, b, s1)) in enumerate(zip(old_calls, new_calls, strict=True)):
        d_old, d_new = a0.shape[-1], a.shape[-1]
        if d_old == d_new or _shape(kind, a0, b0) != _shape(kind, a, b) or not (a.requires_grad and b.requires_grad):
            continue  # not a logit product whose head size grew
        if kind == "mm" and _unit(a0, -1) and _unit(b0, -2):
            continue  # cosine attention (Swin-V2): L2-normalized factors do not see a query scale (.cosine)
        grads = []
        for t in (a, b):
            loss = (t * torch.randn(t.shape, generator=probe, dtype=torch.float64).to(t)).sum()
            grads.append(torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True))
        hit = None
        for j, (name, p, _m) in enumerate(layers):
            ga, gb = grads[0][j], grads[1][j]
            if ga is None:
                continue
            rows = ga.detach().flatten(1).abs().sum(1) > 0
            if gb is not None:
                rows &= ~(gb.detach().flatten(1).abs().sum(1) > 0)
            if rows.any():
                hit = (name, p, rows)  # the last such layer: the projection that makes q
        if hit is None:
            continue
        name, p, rows = hit
        dm = layout.dim(p.out_dim)
        share = torch.where(dm.fresh, torch.ones(len(dm), dtype=torch.float64, device=dm.fresh.device),
                            dm.fanout.to(torch.float64))
        f = factors.setdefault(name, torch.ones(len(rows), dtype=torch.float64, device=rows.device))
        f[rows] = share[rows]
        if kind == "sdpa":
            f[rows] *= _scale(kind, a0, s0) / _scale(kind, a, s1)
        else:
            measure.append((i, name, rows, (d_new / d_old) ** 0.5))
    del new_calls
    _apply(new, factors)
    for i, name, rows, ratio in measure:
        a, b, _ = _call(new, x, i)
        _, a0, b0, _ = old_calls[i]
        l0, l1 = (a0 @ b0).double(), (a @ b).double()
        s = float((l0 * l1).sum() / (l1 * l1).sum().clamp_min(1e-300))
        _scale_rows(new, factors, name, rows, s)
        # a scale applied after the product ((q @ k^T) * self.scale, recomputed for the grown head: visformer)
        # is not in the measurement: the probabilities (the next product's left factor) tell; keep what fits
        err = _probs_error(new, x, i, old_calls)
        if err is not None and err > 0:
            _scale_rows(new, factors, name, rows, ratio)
            if _probs_error(new, x, i, old_calls) >= err:
                _scale_rows(new, factors, name, rows, 1 / ratio)
    return {name: int((f != 1).sum()) for name, f in factors.items()}


def _unit(t: torch.Tensor, dim: int) -> bool:
    """Every vector of ``t`` along ``dim`` has unit L2 norm (an ``F.normalize`` output)."""
    n = t.detach().double().norm(dim=dim)
    return bool(torch.allclose(n, torch.ones_like(n), atol=1e-5))


def _apply(new: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, f in factors.items():
            m = new.get_submodule(name)
            m.weight.mul_(f.to(m.weight).view(-1, *([1] * (m.weight.dim() - 1))))
            if m.bias is not None:
                m.bias.mul_(f.to(m.bias))


def _call(new: nn.Module, x: torch.Tensor, i: int):
    """The factors of the ``i``-th watched call of a forward pass of ``new`` (and of the next call, if any)."""
    with torch.no_grad(), _Watch() as w:
        new(x)
    nxt = w.calls[i + 1] if i + 1 < len(w.calls) else None
    return w.calls[i][1], w.calls[i][2], nxt


def _probs_error(new: nn.Module, x: torch.Tensor, i: int, old_calls) -> float | None:
    """Relative error of the left factor of the call after the ``i``-th (``attn @ v``: the probabilities)."""
    _, _, nxt = _call(new, x, i)
    if nxt is None or i + 1 >= len(old_calls) or nxt[1].shape != old_calls[i + 1][1].shape:
        return None
    p0, p1 = old_calls[i + 1][1].double(), nxt[1].double()
    return float((p1 - p0).norm() / p0.norm().clamp_min(1e-300))


def _scale_rows(new: nn.Module, factors: dict[str, torch.Tensor], name: str, rows: torch.Tensor, s: float) -> None:
    f = torch.ones(len(rows), dtype=torch.float64, device=rows.device)
    f[rows] = s
    _apply(new, {name: f})
    factors[name][rows] *= s
