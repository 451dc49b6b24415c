"""New query and key channels of cosine attention (Swin-V2): a rotated copy of the head's old channels.

Swin-V2 computes each head's logits as ``normalize(q) . normalize(k)`` (L2 over the head's channels) times a
learned scale. A head that grows from ``d`` to ``d'`` channels (``head_dim`` mode) cannot take the rules that
keep other attention exact:

- **zero new channels** (Random, GradMax) keep the norms and the function, but the gradient of ``q_hat . k_hat``
  reaches a new query channel through the new key channel and back: with both at 0 neither ever moves (4416 of
  torchvision swin_v2_t's 20592 new rows stayed 0 after training); a random key channel alone (:mod:`.keys`)
  changes the key's norm, so the function;
- **replicated channels** (Net2Net; LayerNorm groups) change the norms unless every channel has the same number of
  replicas, and queries scaled by their shares (:mod:`.logits`) change them too.

With the new channels of a head ``q_new = A q_old`` and ``k_new = B k_old`` (linear in the old ones), the cosine
is kept for every input iff ``A^T A = a^2 I``, ``B^T B = b^2 I`` and ``A^T B = ab I`` with ``(1 + ab)^2 =
(1 + a^2)(1 + b^2)``, i.e. ``B = A = a O`` with ``O^T O = I``: then ``q' . k' = (1 + a^2) q . k`` and both norms
grow by ``sqrt(1 + a^2)``. That needs ``d' - d >= d`` (doubling or more); this module takes ``a = 1`` and ``O``
the first ``d`` columns of a random orthogonal matrix: new query rows (weights and bias) ``= O x`` the head's
old query rows, the same ``O`` for the key rows (the bias: the Linear's own, or timm's Swin-V2 ``q_bias``, ``k_bias``
and ``v_bias`` of the attention module, which its forward concatenates into ``F.linear``). Such a copy gets gradients ``O x`` the old rows' ones, so plain
SGD would keep it a rotated copy for good (Net2Net's symmetry); the columns of the new rows on input channels
that equal another one at growth (a replica and its source) are split differently (``+f`` on the replica, ``-f``
on its source, ``f`` random at the rows' entry scale): the outputs do not change at growth, and the copy parts
as soon as the replicated inputs do. Where the head grows by fewer than ``d`` channels no exact rule exists: the
new rows are left as the method made them.

Which rows are whose is read off the grown model: one forward pass with ``F.normalize`` and batched ``@``
watched; a product of two normalized tensors over their last dim is a cosine logit call (``q`` its left factor,
``k`` the transpose on the right). A layer's output row reaches one (head, channel) position of ``q`` through a
reshape: with a probe constant over the other dims, the row's weight gradient is ``code x`` the one of an
all-ones probe, and the code names the position. Rows that do not decode this way (a layer feeding ``q``
through a norm) are not touched. Every change is checked on the batch: where the outputs move it is undone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import OLD, REPLICA

__all__ = ["cosine_query_keys"]


class _Watch:
    """Records ``F.normalize`` calls over the last dim and batched ``@`` products of their outputs."""

    def __init__(self) -> None:
        self.normed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(output) -> (input, output)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (q, k) inputs of a cosine logit product

    def __enter__(self) -> _Watch:
        self.norm, self.mm, self.matmul = F.normalize, torch.Tensor.__matmul__, torch.Tensor.matmul
        orig_norm, orig_mm, orig_matmul, normed, pairs = self.norm, self.mm, self.matmul, self.normed, self.pairs

        def normalize(t, p=2.0, dim=1, eps=1e-12, out=None):
            y = orig_norm(t, p, dim, eps, out)
            if p == 2.0 and isinstance(t, torch.Tensor) and dim in (-1, t.dim() - 1) and t.dim() >= 3:
                normed[id(y)] = (t, y)
            return y

        def watching(orig):
            def mm(a, b):
                if isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() >= 3 and id(a) in normed:
                    base = b._base if b._base is not None else b
                    if id(base) in normed and b.shape[-2] == a.shape[-1]:
                        pairs.append((normed[id(a)][0], normed[id(base)][0]))
                return orig(a, b)

            return mm

        F.normalize = normalize
        torch.Tensor.__matmul__, torch.Tensor.matmul = watching(orig_mm), watching(orig_matmul)
        return self

    def __exit__(self, *exc: object) -> None:
        F.normalize = self.norm
        torch.Tensor.__matmul__, torch.Tensor.matmul = self.mm, self.matmul


def cosine_query_keys(new: nn.Module, model: nn.Module, layout, x: torch.Tensor, gen: torch.Generator,
                      zero_rows: bool = True) -> dict[str, int]:
    """Give the new query and key rows of every cosine-attention head of ``new`` (``model`` grown by ``layout``)
    a rotated copy of the head's old rows (module docstring), where the outputs on ``x`` get no further from
    ``model``'s; ``zero_rows``: rows still all zero too (else only replicated rows). Returns, per layer changed,
    the rows set."""
    layers = {name: new.get_submodule(name) for name, p in layout.plan.layers.items()
              if p.kind == "linear" and len(layout.dim(p.out_dim)) > layout.dim(p.out_dim).n_old}
    if not layers:
        return {}
    was, was_old = new.training, model.training
    buffers = {k: v.detach().clone() for k, v in new.named_buffers()}
    new.eval()
    try:
        with torch.enable_grad(), _Watch() as w:
            new(x)
        if not w.pairs:
            return {}
        heads = _decode(layers, w.pairs)
        model.eval()
        with torch.no_grad():
            y0 = _first(model(x.to(next(model.parameters())))).to(x)
        return _rotate(new, layout, layers, heads, x, y0, gen, zero_rows)
    finally:
        new.train(was)
        model.train(was_old)
        with torch.no_grad():
            for k, v in new.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])


def _decode(layers: dict[str, nn.Module], pairs) -> list[tuple[str, dict[int, dict[int, int]], dict[int, dict[int, int]]]]:
    """Per cosine call and layer: ``(layer, q positions, k positions)``, a position map ``head -> {channel:
    row}`` for the rows that reach ``q`` (``k``) through a reshape alone."""
    names = list(layers)
    weights = [layers[n].weight for n in names]
    out = []
    for q, k in pairs:
        maps = [_positions(t, weights) for t in (q, k)]
        for j, name in enumerate(names):
            if maps[0][j] and maps[1][j]:
                out.append((name, maps[0][j], maps[1][j]))
    return out


def _positions(t: torch.Tensor, weights) -> list[dict[int, dict[int, int]]]:
    """For each weight, ``head -> {channel: row}`` of its rows reaching ``t`` (``[..., heads, tokens, d]``: the
    head axis is tried from -3 back) through a reshape, or ``{}``."""
    empty: list[dict] = [{} for _ in weights]
    if not t.requires_grad or t.grad_fn is None:
        return empty
    near = _near(t, weights)
    if not near:
        return empty
    out = _positions_of(t, [weights[i] for i in near])
    for i, pos in zip(near, out, strict=True):
        empty[i] = pos
    return empty


def _near(t: torch.Tensor, weights, depth: int = 16) -> list[int]:
    """Indices of the weights within ``depth`` autograd nodes of ``t``: a layer whose rows reach ``t`` through a
    reshape is a few nodes away (view, permute, select, the matmul); asking autograd for the others' gradients
    would run the backward through the whole network before ``t``, per probe (85 s of swin_v2_t's growth)."""
    ids = {id(w): i for i, w in enumerate(weights)}
    found, seen, frontier = set(), set(), [t.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in ids:
                found.add(ids[id(var)])
            nxt += [f for f, _ in fn.next_functions]
        frontier = nxt
    return sorted(found)


def _positions_of(t: torch.Tensor, weights) -> list[dict[int, dict[int, int]]]:
    empty: list[dict] = [{} for _ in weights]
    d = t.shape[-1]
    g1 = torch.autograd.grad(t.sum(), weights, retain_graph=True, allow_unused=True)
    for axis in range(t.dim() - 2, 0, -1):  # -2 is tokens in [..., heads, tokens, d]; try -3, -4, ...
        if axis == t.dim() - 2 and t.dim() > 3:
            continue
        h = t.shape[axis]
        shape = [1] * t.dim()
        shape[axis], shape[-1] = h, d
        code = torch.arange(1, h * d + 1, dtype=t.dtype, device=t.device).view(shape)
        g2 = torch.autograd.grad((t * code).sum(), weights, retain_graph=True, allow_unused=True)
        res, ok = [], False
        for a, b in zip(g1, g2, strict=True):
            if a is None:
                res.append({})
                continue
            a, b = a.detach().flatten(1).double(), b.detach().flatten(1).double()
            na = (a * a).sum(1)
            hit = na > 1e-20 * na.max().clamp_min(1e-300)
            c = (a * b).sum(1) / na.clamp_min(1e-300)
            exact = (b - c[:, None] * a).norm(dim=1) <= 1e-6 * b.norm(dim=1).clamp_min(1e-300)
            ci = c.round()
            good = hit & exact & ((c - ci).abs() <= 1e-6 * ci.abs().clamp_min(1)) & (ci >= 1) & (ci <= h * d)
            rows = good.nonzero().flatten()
            if len(rows) == 0 or len(set(ci[rows].tolist())) < len(rows) or bool((hit & ~good).any()):
                res.append({})
                continue
            pos: dict[int, dict[int, int]] = {}
            for r in rows.tolist():
                idx = int(ci[r]) - 1
                pos.setdefault(idx // d, {})[idx % d] = r
            res.append(pos)
            ok = True
        if ok:
            return res
    return empty


def _rotate(new, layout, layers, heads, x, y0, gen, zero_rows) -> dict[str, int]:
    """Plan a rotated copy per head, apply all of them; where the outputs on ``x`` get further from ``y0``, undo
    and go head by head (each kept where the outputs do not get further)."""
    tol = 1e-9 if y0.dtype == torch.float64 else 1e-4

    def err() -> float:
        return float((_first(new(x)) - y0).norm() / y0.norm().clamp_min(1e-30))

    edits = _plan(new, layout, layers, heads, gen, zero_rows)
    if not edits:
        return {}
    changed: dict[str, int] = {}
    with torch.no_grad():
        before = err()
        for e in edits:
            e.apply(split=True)
        if err() <= max(tol, before * (1 + 1e-6)):
            for e in edits:
                changed[e.name] = changed.get(e.name, 0) + len(e.rows)
            return changed
        for e in edits:
            e.undo()
        for e in edits:  # head by head: a head may only be exact once the others are
            bound = max(tol, before * (1 + 1e-6))
            e.apply(split=True)
            now = err()
            if now > bound and e.split is not None:  # the inputs were not replicas after all: no split
                e.undo()
                e.apply(split=False)
                now = err()
            if now > bound:
                e.undo()
                continue
            before = now
            changed[e.name] = changed.get(e.name, 0) + len(e.rows)
    return changed


class _Bias:
    """The bias of a layer's output rows: the Linear's own, or (timm's Swin-V2, whose ``qkv`` Linear has none and
    runs as ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``) its attention module's ``q_bias``, ``k_bias``
    (a zero buffer) and ``v_bias`` side by side."""

    def __init__(self, new: nn.Module, name: str, mod: nn.Module) -> None:
        self.parts: list[torch.Tensor] = []
        if mod.bias is not None:
            self.parts = [mod.bias]
        elif name.endswith(".qkv"):
            owner = new.get_submodule(name[: -len(".qkv")])
            parts = [getattr(owner, f"{c}_bias", None) for c in "qkv"]
            n = mod.weight.shape[0]
            if all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in parts) and sum(t.numel() for t in parts) == n:
                self.parts = parts

    def __bool__(self) -> bool:
        return bool(self.parts)

    def get(self) -> torch.Tensor:
        return torch.cat([t.detach() for t in self.parts])

    def set(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        start = 0
        for t in self.parts:
            n = t.numel()
            sel = (rows >= start) & (rows < start + n)
            if bool(sel.any()):
                t.data[rows[sel] - start] = values[sel]
            start += n


class _Edit:
    """New query and key rows of one head: their rotated copy (and split), and the rows as the method left them."""

    def __init__(self, name, mod, bias, rows, w_new, b_new, split):
        self.name, self.mod, self.bias, self.rows, self.w_new, self.b_new = name, mod, bias, rows, w_new, b_new
        self.split = split
        self.w_old = mod.weight.detach()[rows].clone()
        self.b_old = bias.get()[rows].clone() if bias else None

    def apply(self, split: bool) -> None:
        w = self.w_new + self.split if split and self.split is not None else self.w_new
        self.mod.weight.data[self.rows] = w.view_as(self.w_old)
        if self.b_new is not None:
            self.bias.set(self.rows, self.b_new)

    def undo(self) -> None:
        self.mod.weight.data[self.rows] = self.w_old
        if self.b_old is not None:
            self.bias.set(self.rows, self.b_old)


def _plan(new, layout, layers, heads, gen, zero_rows) -> list[_Edit]:
    edits: list[_Edit] = []
    done: set[tuple[str, tuple[int, ...]]] = set()
    for name, qpos, kpos in heads:
        mod = layers[name]
        p = layout.plan.layers[name]
        out_map, in_map = layout.dim(p.out_dim), layout.dim(p.in_dim)
        bias = _Bias(new, name, mod)
        wd, b = mod.weight.detach(), (bias.get() if bias else None)
        for h in sorted(set(qpos) & set(kpos)):
            qh, kh = qpos[h], kpos[h]
            if sorted(qh) != sorted(kh):
                continue
            chans = sorted(qh)
            q_rows = torch.tensor([qh[c] for c in chans], device=wd.device)
            k_rows = torch.tensor([kh[c] for c in chans], device=wd.device)
            old = out_map.kind[q_rows] == OLD
            if not bool((old == (out_map.kind[k_rows] == OLD)).all()):
                continue
            n_old, n_new = int(old.sum()), int((~old).sum())
            if n_old == 0 or n_new < n_old:
                continue  # no exact rotated copy (module docstring)
            rows = torch.cat([q_rows[~old], k_rows[~old]])
            key = (name, tuple(rows.tolist()))
            if key in done:
                continue
            done.add(key)
            is_zero = ~wd[rows].flatten(1).any(1)
            is_rep = out_map.kind[rows] == REPLICA
            if not bool((is_rep | (is_zero & zero_rows)).all()):
                continue  # rows the method set otherwise (Firefly's fitted rows): left alone
            rot = _orthogonal(n_new, n_old, gen).to(wd)
            w_new = torch.cat([rot @ wd[q_rows[old]].flatten(1), rot @ wd[k_rows[old]].flatten(1)])
            b_new = None if b is None else torch.cat([rot @ b[q_rows[old]], rot @ b[k_rows[old]]])
            edits.append(_Edit(name, mod, bias, rows, w_new, b_new, _split(in_map, len(rows), wd, gen)))
    return edits


def _orthogonal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """The first ``m`` columns of a random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn((n, n), generator=gen, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(r)).clamp_min(0).mul(2).sub(1))[:, :m]


def _split(in_map, n_rows: int, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """Per new row, ``+f`` on each replicated input column and ``-f`` on its source's column (module docstring),
    or ``None`` where the layer has no replicated input."""
    reps = (in_map.kind == REPLICA).nonzero().flatten()
    if len(reps) == 0 or w.dim() != 2:
        return None
    olds = (in_map.kind == OLD).nonzero().flatten()
    where = {int(in_map.src[i]): int(i) for i in olds}
    reps = [int(r) for r in reps if int(in_map.src[r]) in where]
    if not reps:
        return None
    scale = float(w.double().std())
    f = torch.randn((n_rows, len(reps)), generator=gen, dtype=torch.float64).to(w) * scale
    e = torch.zeros((n_rows, w.shape[1]), dtype=w.dtype, device=w.device)
    e[:, torch.tensor(reps, device=w.device)] += f
    e.index_add_(1, torch.tensor([where[int(in_map.src[r])] for r in reps], device=w.device), -f)
    return e


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
