"""Queries and keys of new attention heads: the one symmetry a zero-initialized growth step cannot break.

A new attention head (or new channels of a head) grown with zero incoming weights has zero query, key and
value rows. Its logits ``q . k`` are 0, its attention is uniform, its output is the mean of its values (0 at
growth): the function is kept. But the gradient of the logits reaches ``q`` only through ``k`` and ``k`` only
through ``q``, so with both at zero neither ever moves: the head stays a mean pool for good, whatever the
training. Two facts keep the function with nonzero queries and keys:

- **keys**: with the queries of the new channels at zero every new logit term is ``0 . k = 0``, whatever ``k``
  (this holds in ``head_dim`` mode too, where new channels join old heads);
- **queries of a new head**: a whole new head outputs ``attn @ v`` with its value rows at zero, i.e. 0 for
  any attention pattern (``heads`` mode). New channels of an old head (``head_dim`` mode) would change that
  head's logits: their queries stay 0.

So new key rows get random directions, then new query rows where the outputs do not change. The values move
at the first step (their gradient needs only the outgoing weights), then the loss reaches q and k.

Which rows are queries and keys is read off the grown model itself, not off its class: one forward pass with
``F.scaled_dot_product_attention`` and batched ``Tensor.__matmul__`` and ``Tensor.matmul`` (explicit
``q @ k.transpose(-2, -1)``: Swin, LeViT; torchvision's Swin: ``q.matmul(...)``) watched, and the gradients of random probes of each call's inputs with respect to every weight
whose new rows are all zero. The zero new rows of one layer that reach ``k`` (SDPA) or the right factor of a
matmul and no other input of that call are a candidate, then those that reach ``q`` (the left factor) only;
a candidate is kept where the outputs stay the same to rounding and undone where they change (the values of
``attn @ v``; queries in ``head_dim`` mode). Rows that pass through a BatchNorm on the way (LeViT's
``LinearNorm``) reach q and k through a zero-variance channel: the norm's new weight (``new_gamma``) scales them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .directions import mean_norm, random_directions

__all__ = ["KEYS", "init_new_keys"]

_ATTENTION_OPS: tuple = (F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm)
try:  # torchvision's Swin: the window attention is one fx-wrapped function (q.matmul(k.transpose(-2, -1)) inside)
    from torchvision.models.swin_transformer import shifted_window_attention as _tv_swin_attention

    _ATTENTION_OPS += (_tv_swin_attention,)
except ImportError:
    pass

#: ``keys`` option of the plain methods: ``random`` (new key rows at random, query rows 0) or ``zero``.
KEYS = ("random", "zero")


def init_new_keys(new: nn.Module, layout, x: torch.Tensor, gen: torch.Generator) -> list[str]:
    """Give the all-zero new key rows of ``new`` (grown by ``layout``) random directions at the mean norm of
    their layer's old rows, where the outputs on ``x`` stay the same; returns the layers changed."""
    if not any(n.op == "call_function" and n.target in _ATTENTION_OPS for n in layout.plan.gm.graph.nodes):
        return []  # no attention product in the traced graph (CNNs): nothing to watch
    cands: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for name, p in layout.plan.layers.items():
        if p.kind not in ("conv", "linear"):
            continue
        mod = new.get_submodule(name)
        rows = layout.dim(p.out_dim).fresh.nonzero().flatten()
        if len(rows) == 0 or rows.max() >= mod.weight.shape[0] or mod.weight.detach()[rows].any():
            continue
        cands[name] = (mod.weight, rows)
    if not cands:
        return []
    seen: list[tuple[torch.Tensor, ...]] = []  # (q, k, v) of SDPA calls; (a, b) of matmuls
    orig_sdpa, orig_mm, orig_matmul = F.scaled_dot_product_attention, torch.Tensor.__matmul__, torch.Tensor.matmul

    def watch_sdpa(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return orig_sdpa(q, k, v, *args, **kwargs)

    def watching(orig):
        def watch_mm(a, b):
            if isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() >= 3:  # batched: attention products
                seen.append((a, b))
            return orig(a, b)

        return watch_mm

    was = new.training
    buffers = {k: v.detach().clone() for k, v in new.named_buffers()}
    new.eval()
    try:  # the operator and the method (torchvision's Swin: q.matmul(k.transpose(-2, -1)))
        F.scaled_dot_product_attention = watch_sdpa
        torch.Tensor.__matmul__, torch.Tensor.matmul = watching(orig_mm), watching(orig_matmul)
        with torch.enable_grad():
            y0 = _first(new(x))
    finally:
        F.scaled_dot_product_attention = orig_sdpa
        torch.Tensor.__matmul__, torch.Tensor.matmul = orig_mm, orig_matmul
    try:
        # the outputs must stay the same with BatchNorms on batch statistics too: in eval mode a candidate may
        # keep them by chance (EfficientViT's ReLU kernel zeroes random new queries on the running statistics)
        inputs = [(x, y0, False)]
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in new.modules()):
            try:
                with torch.no_grad():
                    inputs.append((x, _run(new, x, bn_train=True), True))
            except (ValueError, RuntimeError):  # a batch too small for batch statistics: eval mode only
                pass
        changed = _set_keys(new, inputs, cands, seen, gen)
        if any(len(rows) for rows in _zero_rows(cands)):
            # linear attention (LiteMLA: relu(q) @ (relu(k)^T @ v) / normalizer): in call order the values (the
            # right factor of k^T @ v) and the keys pass while the queries are 0, and the queries, which then
            # change the outputs, stay 0, where the normalizer (q . sum k + eps, eps 1e-15) makes their gradient
            # kv / eps. From the last product back, left factors first, queries and keys pass and the values stay
            # 0 (softmax attention ends the same either way). The order whose zero rows get the smaller gradient
            # wins, by a wide margin only.
            g_first = _zero_row_grad(new, x, cands)
            first = {n: w.detach()[rows].clone() for n, (w, rows) in cands.items()}
            for w, rows in cands.values():
                w.data[rows] = 0
            changed_rev = _set_keys(new, inputs, cands, seen[::-1], gen, targets=(0, 1))
            if _zero_row_grad(new, x, cands) * 1e3 < g_first:
                return changed_rev
            for n, (w, rows) in cands.items():
                w.data[rows] = first[n]
        return changed
    finally:
        new.train(was)
        with torch.no_grad():
            for k, v in new.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])


def _run(new, x, bn_train: bool):
    """``new(x)`` in eval mode, or with its BatchNorms on batch statistics (momentum 0: running statistics kept)."""
    if not bn_train:
        new.eval()
        return _first(new(x))
    norms = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    moms = [m.momentum for m in norms]
    try:
        for m in norms:
            m.train()
            m.momentum = 0.0
        return _first(new(x))
    finally:
        for m, mom in zip(norms, moms, strict=True):
            m.eval()
            m.momentum = mom


def _zero_rows(cands) -> list[torch.Tensor]:
    """Per candidate layer, its new rows still at zero where other new rows of the layer are not."""
    out = []
    for w, rows in cands.values():
        zero = rows[~w.detach()[rows].flatten(1).any(1)]
        out.append(zero if len(zero) < len(rows) else zero[:0])
    return out


def _zero_row_grad(new, x, cands) -> float:
    """The largest gradient norm (of a fixed random probe of the outputs) of a zero new row, relative to the
    mean gradient norm of its layer's old rows."""
    ws = [w for w, _ in cands.values()]
    new.eval()
    with torch.enable_grad():
        out = new(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out)
        grads = torch.autograd.grad((out * probe).sum(), ws, allow_unused=True)
    worst = 0.0
    for (_, rows), zero, g in zip(cands.values(), _zero_rows(cands), grads, strict=True):
        if g is None or len(zero) == 0:
            continue
        g = g.detach().flatten(1).norm(dim=1)
        old = g[~_fresh_mask(len(g), rows)]
        worst = max(worst, float(g[zero].max() / old.mean().clamp_min(1e-30)))
    return worst


def _set_keys(new, inputs, cands, seen, gen, targets=(1, 0)) -> list[str]:
    """Candidates: per watched call and layer, the new rows still at zero that reach ``k`` (SDPA) or the right
    factor of a matmul (``q @ k^T``, but also ``attn @ v``) and no other input of the call, then those that reach
    ``q`` (the left factor) only; each is kept only where the outputs stay the same (a value's rows, and queries
    of new channels inside old heads, do not: they are undone)."""
    weights = [w for w, _ in cands.values()]
    probe = torch.Generator().manual_seed(0)
    tried: set[tuple[str, tuple[int, ...]]] = set()
    changed: list[str] = []
    tol = 1e-9 if inputs[0][1].dtype == torch.float64 else 1e-4
    for call in seen:
        if not any(t.requires_grad for t in call):
            continue
        grads = []
        for t in call:
            if not t.requires_grad:
                grads.append([None] * len(weights))
                continue
            loss = (t * torch.randn(t.shape, generator=probe, dtype=torch.float64).to(t)).sum()
            grads.append(torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True))
        with torch.no_grad():
            for target in targets:  # keys (k of SDPA, the right factor of a matmul) first, then queries
                for j, (name, (w, rows)) in enumerate(cands.items()):
                    hit = [None if g[j] is None else g[j].detach()[rows].flatten(1).abs().sum(1) > 0 for g in grads]
                    if hit[target] is None:
                        continue
                    only = hit[target].clone()
                    for i, h in enumerate(hit):
                        if i != target and h is not None:
                            only &= ~h
                    krows = rows[only]
                    krows = krows[~w.detach()[krows].flatten(1).any(1)]  # rows still at zero
                    sig = (name, tuple(krows.tolist()))
                    if len(krows) == 0 or sig in tried:
                        continue
                    tried.add(sig)
                    old_w = w.detach()[~_fresh_mask(w.shape[0], rows)]
                    w.data[krows] = random_directions(len(krows), tuple(w.shape[1:]), gen, w) * mean_norm(old_w, 0)
                    if not all(float((_run(new, xi, bn) - yi).norm() / yi.norm().clamp_min(1e-30)) <= tol
                               for xi, yi, bn in inputs):
                        w.data[krows] = 0  # it changes the outputs (values; queries in head_dim mode): undo
                    else:
                        changed.append(name)
    return sorted(set(changed))


def _fresh_mask(n: int, rows: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=rows.device)
    m[rows] = True
    return m


def _first(out):
    return (out[0] if isinstance(out, (tuple, list)) else out).detach()
