"""MixtureGrowth (Pham et al., WACV 2024), the growth method ``mixturegrowth``: template models grow by tiling.

Fusion: two half-width template models become one full-width model. Growth without fusion: one half
becomes the full-width model, its own templates filling the new tiles.

Every conv and linear weight of the fused model is a grid of tiles (paper §3.3, Fig. 2)::

    W = [[m0, m2],      m0 = a's layer, m1 = b's layer, carried over unchanged;
         [m3, m1]]      m2, m3 = new tiles mixing a's or b's templates with new coefficients.

``vertical`` growth (default; official ``member_template_sets 0,1,0,1``): the tiles of one output
row share a template set (m2 mixes a's bank, m3 b's). ``horizontal`` (``0,1,1,0``): the tiles of one
input column share one (m2 mixes b's bank, m3 a's).

Edge layers get no new tiles (paper §3.3): the stem stacks a's and b's weights along its output
(grid 2x1); the classifier concatenates them along its input (grid 1x2) with both coefficient
vectors halved and the biases averaged, so that with zero off-diagonal tiles the logits are the
*average* of a's and b's (the official code sums them and has no bias). Grouped and depthwise
convolutions that keep their group width stack a's groups and b's groups (grid 2x1, no cross tiles).
Norm layers concatenate affine parameters and running statistics; biases follow their layers.
Where a channel dim is a concatenation of several groups (DenseNet), the tiles are permuted into the
full model's layout, group by group, so that the fused model is the stock full-width architecture.

The coefficient rules of the new tiles (``init``) are :data:`COEFFICIENT_INITS` (:func:`register_coefficient_init`
adds one). Public entry points: :func:`morph.fuse` (two halves) and :func:`morph.grow` (a half alone, or
``method="mixturegrowth", other=second_half``); the module :mod:`morph.fuse` re-exports this one's public names.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import MorphError
from ..graph.analyze import ChannelPlan, analyze
from ..graph.coupling import Dim
from ..info import MorphInfo, get_info, set_info
from ..scale import apply_width
from ..templates import TemplateBank, TemplateMixing, attach, is_mixed, mixed_layers
from .optim import GrowthRecord
from .registry import GrowthMethod, register_growth

__all__ = [
    "COEFFICIENT_INITS", "GROWTH_MODES", "INIT_MODES", "MixtureGrowth", "fuse", "grow", "layout_perm",
    "register_coefficient_init",
]

CoefficientInit = Callable[[list[torch.Tensor], torch.Tensor, int, torch.Generator, "float | None"], torch.Tensor]
"""``rule(existing, same_tile, k, gen, noise)``: the coefficient vector of a new tile mixing a bank of ``k``
templates whose vectors (every layer's) are ``existing``; ``same_tile``: the diagonal tile's vector there."""

COEFFICIENT_INITS: dict[str, CoefficientInit] = {}


def register_coefficient_init(name: str) -> Callable[[CoefficientInit], CoefficientInit]:
    """File a rule for the coefficients of new tiles under ``name`` (``morph fuse --init NAME``)."""

    def deco(fn: CoefficientInit) -> CoefficientInit:
        COEFFICIENT_INITS[name] = fn
        return fn

    return deco


@register_coefficient_init("orthogonal")
def _orthogonal(existing, same_tile, k, gen, noise):
    """Paper §3.3: orthogonal to every vector that mixes the same templates, scaled to their mean norm."""
    ex = torch.stack(existing).double()
    _, s, vh = torch.linalg.svd(ex, full_matrices=True)
    rank = int((s > 1e-10 * max(float(s.max()), 1e-30)).sum())
    comp = vh[rank:] if rank < k else vh[-1:]
    w = torch.randn(comp.shape[0], generator=gen).double()
    v = w @ comp
    v = v / v.norm().clamp_min(1e-30) * ex.norm(dim=1).mean()
    return v.to(same_tile.dtype)


@register_coefficient_init("orthogonal-official")
def _orthogonal_official(existing, same_tile, k, gen, noise):
    """Official code: the least-singular direction of the stacked vectors, x c = 1."""
    _, _, vh = torch.linalg.svd(torch.stack(existing).double(), full_matrices=True)
    return vh[-1].to(same_tile.dtype)


@register_coefficient_init("random")
def _random(existing, same_tile, k, gen, noise):
    """Paper: standard normal."""
    return torch.randn(k, generator=gen).to(same_tile.dtype)


@register_coefficient_init("random-uniform")
def _random_uniform(existing, same_tile, k, gen, noise):
    """Official: U[0, 1) x c, c = 1."""
    return torch.rand(k, generator=gen).to(same_tile.dtype)


@register_coefficient_init("copy")
def _copy(existing, same_tile, k, gen, noise):
    """The diagonal tile's vector plus noise (paper: "small noise", 1% of its norm by default; official: norm 1
    in a U[0, 1) direction)."""
    n = torch.rand(k, generator=gen).to(same_tile.dtype)
    scale = 0.01 * float(same_tile.norm()) if noise is None else noise
    return same_tile + n / n.norm().clamp_min(1e-12) * scale


@register_coefficient_init("zero")
def _zero(existing, same_tile, k, gen, noise):
    """Block-diagonal: a fusion computes the average of the halves, growth alone the half's function."""
    return torch.zeros(k, dtype=same_tile.dtype)


INIT_MODES = tuple(COEFFICIENT_INITS)


GROWTH_MODES = ("vertical", "horizontal")


def layout_perm(plan: ChannelPlan, dim: Dim, factor: int = 2) -> torch.Tensor | None:
    """Permutation from tile layout (``factor`` whole copies of the half dim, one per set) to the full
    model's layout (each channel group's copies side by side). ``None`` when they coincide."""
    atoms = plan.atoms(dim)
    lengths = [plan.size((s,), 1.0) for s in atoms]
    if len(atoms) <= 1:
        return None
    total = sum(lengths)
    perm, off = [], 0
    for n in lengths:
        for c in range(factor):
            perm.append(torch.arange(n) + c * total + off)
        off += n
    return torch.cat(perm)


def _check_pair(a: nn.Module, b: nn.Module | None) -> MorphInfo:
    ia = get_info(a)
    if ia is None or ia.kind != "half":
        what = "a plain model" if ia is None or ia.kind == "plain" else f"a {ia.kind} model"
        raise MorphError(f"fusion needs half-width template models from morph.convert; got {what}")
    if b is None:
        return ia
    ib = get_info(b)
    if ib is None or ib.kind != "half":
        what = "a plain model" if ib is None or ib.kind == "plain" else f"a {ib.kind} model"
        raise MorphError(f"fusion needs half-width template models from morph.convert; the second is {what}")
    for field in ("spec", "width", "templates", "share", "input_size"):
        va, vb = getattr(ia, field), getattr(ib, field)
        if va != vb:
            if field == "spec" and va.spec != vb.spec:
                field, va, vb = "architectures", va.spec, vb.spec
            elif field == "spec":
                field, va, vb = "constructor arguments", va.kwargs, vb.kwargs
            raise MorphError(f"cannot fuse models with different {field}: {va} vs {vb}")
    if ia.set_ids[0] == ib.set_ids[0]:
        raise MorphError(
            f"both models use template set {ia.set_ids[0]!r}; convert the second with another seed or set_id"
        )
    return ia


class _NewCoefficients:
    """Coefficients of new tiles by a rule of :data:`COEFFICIENT_INITS`, every
    new vector joining the bank's existing ones (the orthogonal rules see it)."""

    def __init__(self, init: str, gen: torch.Generator, noise: float | None) -> None:
        if init not in COEFFICIENT_INITS:
            raise MorphError(f"init must be one of {', '.join(COEFFICIENT_INITS)}, got {init!r}")
        self.rule, self.gen, self.noise = COEFFICIENT_INITS[init], gen, noise

    def __call__(self, existing: list[torch.Tensor], same_tile: torch.Tensor, k: int) -> torch.Tensor:
        """New coefficient vector for a tile mixing a bank whose existing vectors are ``existing``;
        ``same_tile`` is the diagonal tile's vector of that bank (for ``copy``)."""
        return self.rule(existing, same_tile, k, self.gen, self.noise)


def _bank_vectors(models: list[nn.Module]) -> dict[int, list[torch.Tensor]]:
    """Every coefficient vector that mixes each bank (by bank object id), across layers."""
    out: dict[int, list[torch.Tensor]] = {}
    for m in models:
        for _, mod in m.named_modules():
            if is_mixed(mod):
                for t, bi in enumerate(mod.mix.tile_banks):
                    out.setdefault(id(mod.mix.banks[bi]), []).append(mod.mix.coefficients[t].detach())
    return out


def _skeleton(a: nn.Module) -> nn.Module:
    """A plain copy of ``a`` with uninitialized weights, without copying its templates."""
    mixed = dict(mixed_layers(a))
    plain = copy.deepcopy(a, memo={id(m.mix): None for m in mixed.values()})
    for name, src in mixed.items():
        m = plain.get_submodule(name)
        m.__class__ = m._morph_base
        m._modules.pop("mix")
        m.weight = nn.Parameter(torch.empty(src.mix.tile_shape, dtype=src.mix.coefficients.dtype))
    return plain


def _build(
    a: nn.Module, b: nn.Module | None, growth: str, init: str, seed: int | None, noise: float | None,
    inplace: bool,
) -> nn.Module:
    """Fusion (``b`` given) or growth without fusion (``b`` None). The shape (which tiles, where the
    channels go) is the same; only the second member differs: ``b``'s layers, or ``a``'s templates mixed
    with new coefficients."""
    ia = _check_pair(a, b)
    if growth not in GROWTH_MODES:
        raise MorphError(f"growth must be one of {', '.join(GROWTH_MODES)}, got {growth!r}")
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    newc = _NewCoefficients(init, gen, noise)
    if not inplace:
        a = copy.deepcopy(a)
        b = copy.deepcopy(b) if b is not None else None
    plain = _skeleton(a)
    plan = analyze(plain, ia.input_size)
    groups, shapes = _original(ia)
    full, _ = apply_width(plain, plan, 2.0, groups=groups)
    _check_stock(ia, shapes, full)
    vectors = _bank_vectors([a] if b is None else [a, b])
    src_b = b if b is not None else a
    record: dict[str, list] = {}
    for name, p in plan.layers.items():
        ma, mb, mf = a.get_submodule(name), src_b.get_submodule(name), full.get_submodule(name)
        if p.kind in ("conv", "linear"):
            _fuse_weight(plan, p, ma, mb, mf, growth, newc, vectors, fused=b is not None, record=record)
            # other per-output-channel tensors of conv subclasses (timm ScaledStdConv2d's gain)
            _fuse_tensors(plan, p.out_dim, ma, mb, mf, exclude=("weight", "bias"), record=record, prefix=name)
        else:
            _fuse_tensors(plan, p.in_dim if p.kind != "layernorm" else p.ln_dims[0], ma, mb, mf, record=record,
                          prefix=name)
    for path, dims in plan.params.items():
        _fuse_attr(plan, path, dims, a, src_b, full, record)
    for prm in full.parameters():
        prm.requires_grad_(True)
    if b is None:  # growth alone: the copies of a's channels are new entries, not b's old ones
        record = {k: [e for e in v if e[0] == 0] for k, v in record.items()}
    full.growth_record = GrowthRecord(record)
    info = dataclasses.replace(ia, kind="fused" if b is not None else "grown", growth=growth, init=init, factor=2,
                               set_ids=ia.set_ids + (get_info(b).set_ids if b is not None else ()))
    return set_info(full, info)


def _original(info: MorphInfo) -> tuple[dict[str, int], dict[str, tuple[int, ...]] | None]:
    """Groups and tensor shapes of the full-width model that two halves tile back to: recorded by
    :func:`morph.convert` (``info.original``), or, for halves saved before morph recorded it, read from
    the stock model rebuilt from a timm/torchvision spec on the meta device. ``({}, None)`` when neither
    is known (the channel plan alone then decides)."""
    if info.width * 2 != 1.0:
        return {}, None
    if info.original:
        return dict(info.original.get("groups", {})), {k: tuple(v) for k, v in info.original.get("shapes", {}).items()}
    if info.spec is None or info.spec.source == "callable":
        return {}, None  # never import a callable a recorded spec names (it may come from a file)
    from ..zoo import build_model

    try:
        with torch.device("meta"):
            stock = build_model(info.spec.spec, **info.spec.kwargs)
    except NotImplementedError:  # constructors that compute on tensors (torchvision regnet)
        stock = build_model(info.spec.spec, **info.spec.kwargs)
    groups = {n: m.groups for n, m in stock.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    groups.update({n: m.num_groups for n, m in stock.named_modules() if isinstance(m, nn.GroupNorm)})
    return groups, {k: tuple(v.shape) for k, v in stock.state_dict().items()}


def _check_stock(info: MorphInfo, want: dict[str, tuple[int, ...]] | None, full: nn.Module) -> None:
    """The fused model must be the original full-width model: halves must have been exact."""
    if want is None:
        return
    name = info.spec.spec if info.spec is not None else "the original model"
    for k, v in full.state_dict().items():
        if k in want and tuple(v.shape) != want[k]:
            raise MorphError(
                f"{k}: the fused tensor {tuple(v.shape)} differs from {name}'s {want[k]}: two halves "
                "cannot tile it (odd channel counts were rounded at half width, or a 2-channel group halved to "
                "1 channel, which morph cannot tell from a broadcast dim); this model cannot be fused"
            )


def _fuse_weight(
    plan: ChannelPlan, p, ma: nn.Module, mb: nn.Module, mf: nn.Module, growth: str,
    newc: Callable, vectors: dict[int, list[torch.Tensor]], fused: bool, record: dict,
) -> None:
    half_shape = tuple(ma.mix.tile_shape)
    full_shape = tuple(mf.weight.shape)
    rows = full_shape[0] // half_shape[0]
    cols = full_shape[1] // half_shape[1]
    if rows * half_shape[0] != full_shape[0] or cols * half_shape[1] != full_shape[1] or rows > 2 or cols > 2:
        raise MorphError(f"layer {p.name}: cannot tile {half_shape} into {full_shape}")
    ca = ma.mix.coefficients.detach()[0]
    k = ca.shape[0]

    def new(bank: TemplateBank, diag: torch.Tensor) -> torch.Tensor:
        v = newc(vectors[id(bank)], diag, k)
        vectors[id(bank)].append(v)
        return v

    # the two members: a's layer, and b's layer (fusion) or a's templates with new coefficients (growth)
    bank_a = ma.mix.banks[0]
    banks = [bank_a, mb.mix.banks[0]] if fused else [bank_a]
    ib = len(banks) - 1
    cb = mb.mix.coefficients.detach()[0] if fused else None
    member_b = (lambda: cb) if fused else (lambda: new(bank_a, ca))  # noqa: E731
    if rows == 2 and cols == 2:
        if growth == "vertical":  # rows share a set: m2 <- a, m3 <- b
            coef = [ca, new(bank_a, ca), new(banks[ib], cb if fused else ca), member_b()]
            tb, old_tiles = [0, 0, ib, ib], (0, 3)
        else:  # columns share a set: m2 <- b, m3 <- a
            coef = [ca, new(banks[ib], cb if fused else ca), new(bank_a, ca), member_b()]
            tb, old_tiles = [0, ib, 0, ib], (0, 3)
        grid = (2, 2)
    elif rows == 2 or cols == 2:  # stem, depthwise / constant-width grouped conv (2x1); classifier (1x2)
        coef, tb, old_tiles = [ca, member_b()], [0, ib], (0, 1)
        if cols == 2 and fused:  # classifier: the average of the two networks
            coef = [ca * 0.5, cb * 0.5]
        grid = (rows, cols)
    else:  # nothing grows (fixed in and out)
        coef, tb, grid, old_tiles = [ca], [0], (1, 1), (0, None)
    out_perm = layout_perm(plan, p.out_dim) if rows == 2 else None
    in_perm = layout_perm(plan, p.in_dim) if cols == 2 and p.groups == 1 else None
    mix = TemplateMixing(banks, torch.stack(coef).to(ca.dtype), tb, grid, out_perm, in_perm)
    mf._parameters.pop("weight", None)
    attach(mf, mix)
    n_tiles = grid[0] * grid[1]
    for src, tile in enumerate(old_tiles):
        if tile is None or (src == 1 and not fused):
            continue
        idx = torch.full((n_tiles,), -1, dtype=torch.long)
        idx[tile] = 0
        record.setdefault(f"{p.name}.mix.coefficients", []).append((src, f"{p.name}.mix.coefficients", [idx, None]))
        record.setdefault(f"{p.name}.mix.banks.{src}.templates", []).append(
            (src, f"{p.name}.mix.banks.0.templates", [None]))
    if getattr(ma, "bias", None) is not None:
        ba, bb = ma.bias.detach(), mb.bias.detach()
        if rows == 2:
            bias = torch.cat([ba, bb])
            if out_perm is not None:
                bias = bias[out_perm]
            _record_cat(record, f"{p.name}.bias", len(ba), out_perm, 0, 1)
        else:
            bias = (ba + bb) / 2
        mf.bias = nn.Parameter(bias)


def _record_cat(record: dict, name: str, n: int, perm: torch.Tensor | None, axis: int, ndim: int) -> None:
    """Entries of a tensor that concatenates a's (source 0) and b's (source 1) along ``axis``, permuted."""
    src = torch.arange(2 * n)
    if perm is not None:
        src = src[perm]
    for s in (0, 1):
        idx = torch.where((src >= n) == bool(s), src - s * n, torch.full_like(src, -1))
        axes: list[torch.Tensor | None] = [None] * ndim
        axes[axis] = idx
        record.setdefault(name, []).append((s, name, axes))


def _cat_perm(plan: ChannelPlan, dim: Dim, ta: torch.Tensor, tb: torch.Tensor, axis: int = 0) -> torch.Tensor:
    t = torch.cat([ta, tb], dim=axis)
    perm = layout_perm(plan, dim)
    return t.index_select(axis, perm) if perm is not None else t


def _fuse_tensors(plan: ChannelPlan, dim: Dim, ma: nn.Module, mb: nn.Module, mf: nn.Module,
                  exclude: tuple[str, ...] = (), record: dict | None = None, prefix: str = "") -> None:
    for name, tf in list(mf.named_parameters(recurse=False)) + list(mf.named_buffers(recurse=False)):
        if tf is None or name in exclude:
            continue
        ta, tb = getattr(ma, name).detach(), getattr(mb, name).detach()
        if tf.dim() == 0:
            new = ta.clone()
        elif tf.shape[0] == 2 * ta.shape[0]:
            new = _cat_perm(plan, dim, ta, tb)
            if record is not None:
                _record_cat(record, f"{prefix}.{name}", ta.shape[0], layout_perm(plan, dim), 0, tf.dim())
        elif tf.shape == ta.shape:  # the average (a itself when growing alone)
            new = ((ta + tb) / 2).to(ta.dtype)
        else:
            raise MorphError(f"cannot fuse {name} of {type(mf).__name__}: {tuple(ta.shape)} -> {tuple(tf.shape)}")
        if isinstance(tf, nn.Parameter):
            setattr(mf, name, nn.Parameter(new))
        else:
            setattr(mf, name, new)


def _fuse_attr(plan, path: str, dims, a: nn.Module, b: nn.Module, full: nn.Module, record: dict) -> None:
    mod_path, _, name = path.rpartition(".")

    def get(m: nn.Module) -> torch.Tensor:
        return getattr(m.get_submodule(mod_path) if mod_path else m, name)

    ta, tb, tf = get(a).detach(), get(b).detach(), get(full)
    grown = [i for i in range(ta.dim()) if tf.shape[i] != ta.shape[i]]
    if not grown:
        new = ((ta + tb) / 2).to(ta.dtype)
    elif len(grown) == 1:
        new = _cat_perm(plan, dims[grown[0]], ta, tb, grown[0])
        _record_cat(record, path, ta.shape[grown[0]], layout_perm(plan, dims[grown[0]]), grown[0], ta.dim())
    else:
        raise MorphError(f"cannot fuse {path}: more than one of its dims grows")
    owner = full.get_submodule(mod_path) if mod_path else full
    if isinstance(tf, nn.Parameter):
        setattr(owner, name, nn.Parameter(new))
    else:
        setattr(owner, name, new)


def fuse(
    a: nn.Module, b: nn.Module, growth: str = "vertical", init: str = "orthogonal", seed: int | None = None,
    *, noise: float | None = None, inplace: bool = False,
) -> nn.Module:
    """Fuse two half-width template models into the full-width template model (MixtureGrowth).

    Args:
        a, b: models from :func:`morph.convert` of the same architecture and configuration, with
            different template sets.
        growth: ``vertical`` (tiles of one output row share a template set) or ``horizontal``.
        init: coefficients of the new tiles: ``orthogonal`` (paper §3.3, default: orthogonal to every
            vector mixing the same bank, scaled to their mean norm), ``orthogonal-official`` (the
            official code's least-singular direction, unit norm), ``random`` (paper: N(0, 1)),
            ``random-uniform`` (official: U[0, 1)), ``copy`` (the same-bank diagonal tile's vector plus
            noise) or ``zero`` (the fused model computes the average of ``a`` and ``b``).
        seed: seed of the new coefficients.
        noise: norm of the ``copy`` noise (default 1% of the copied vector's norm; official: 1).
        inplace: reuse ``a``'s and ``b``'s template tensors instead of copying them (saves memory;
            ``a`` and ``b`` must not be trained afterwards).

    Returns:
        The full-width template model; every template and coefficient trains.
    """
    return _build(a, b, growth, init, seed, noise, inplace)


def grow(
    a: nn.Module, init: str = "orthogonal", seed: int | None = None, *, noise: float | None = None,
    inplace: bool = False,
) -> nn.Module:
    """MixtureGrowth without fusion: widen one half model, every new tile mixing ``a``'s templates.

    With ``init="zero"`` the grown model computes exactly ``a``'s function.
    """
    return _build(a, None, "vertical", init, seed, noise, inplace)


@register_growth
class MixtureGrowth(GrowthMethod):
    name = "mixturegrowth"
    summary = "MixtureGrowth: new tiles mix the learned templates (fusion with a second half, or growth alone)"
    template = True
    options: ClassVar[dict[str, Any]] = {"init": "orthogonal", "growth": "vertical", "noise": None, "other": None,
                                         "inplace": False}

    def grow(self, model, width, data, gen):
        if float(width) != 2.0:
            raise MorphError(f"mixturegrowth tiles two halves into a model twice as wide: width must be 2, got {width:g}")
        seed = int(gen.initial_seed())
        o = self.opts
        if o["other"] is not None:
            return fuse(model, o["other"], growth=o["growth"], init=o["init"], seed=seed, noise=o["noise"],
                        inplace=o["inplace"])
        return grow(model, init=o["init"], seed=seed, noise=o["noise"], inplace=o["inplace"])
