"""Template mixing: a layer's weight generated as ``W = sum_k alpha_k T_k`` (MixtureGrowth Eq. 1).

A :class:`TemplateBank` holds ``K`` templates of one tile shape and belongs to a template *set* (one
set per trained network, told apart by ``set_id``). A :class:`TemplateMixing` generates a layer's
weight as a grid of tiles, each tile mixing one bank's templates with its own coefficient vector:
a half-width model has a 1x1 grid; a fused model has 2x2 grids (1x2 or 2x1 at the stem, the
classifier and grouped convolutions), optionally permuted into the full model's channel layout.

:func:`attach` makes ``module.weight`` a property that calls ``module.mix()``, the same class swap
``torch.nn.utils.parametrize`` does, so every standard module (and subclasses such as timm's
``StdConv2d``) works unchanged. Parameters live at ``<layer>.mix.coefficients`` and
``<layer>.mix.banks.<i>.templates``; a bank shared by two layers is one Parameter object.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from morph import native

__all__ = ["TemplateBank", "TemplateMixing", "attach", "detach", "generate", "grid_reference", "is_mixed", "mixed_layers"]


class TemplateBank(nn.Module):
    """``K`` templates of one shape, ``templates[k]``.

    Args:
        templates: tensor ``[K, *tile_shape]``.
        set_id: the template set (trained network) the bank belongs to.
        name: a readable name (the module path of the first layer that uses it).
    """

    def __init__(self, templates: torch.Tensor, set_id: str = "", name: str = "") -> None:
        super().__init__()
        self.templates = nn.Parameter(templates)
        self.set_id = set_id
        self.name = name

    @property
    def num_templates(self) -> int:
        return self.templates.shape[0]

    def extra_repr(self) -> str:
        return f"K={self.num_templates}, shape={tuple(self.templates.shape[1:])}, set={self.set_id!r}"


def grid_reference(
    coefficients: torch.Tensor, banks: list[torch.Tensor], grid: tuple[int, int], tile_banks
) -> torch.Tensor:
    """The template formula, once: tile ``t`` of an ``R x C`` grid is
    ``sum_k coefficients[t, k] * banks[tile_banks[t]][k]``, at row ``t // C``, column ``t % C`` of the weight.

    Plain autograd ops: one matmul per bank (all the tiles that mix it at once), then one copy into the
    grid layout (none for a 1x1 or Rx1 grid). This is the reference the fast paths are tested against,
    what fvcore traces (one multiply-add per template element and tile), and the path on CUDA, where a
    weight's generation is these few large kernels rather than one launch per tile and template.
    """
    r, c = grid
    shape = banks[0].shape[1:]
    used = sorted(set(tile_banks))
    per_bank = [[t for t, tb in enumerate(tile_banks) if tb == b] for b in used]
    order = [t for idx in per_bank for t in idx]  # tile indices, in the order the matmuls produce them
    in_order = order == list(range(len(order)))
    coef = coefficients if in_order else coefficients[order]  # a gather only where a bank's tiles are apart
    rows = coef.split([len(idx) for idx in per_bank]) if len(used) > 1 else (coef,)
    parts = [a @ banks[b].flatten(1) for a, b in zip(rows, used, strict=True)]  # [tiles of the bank, out * in * k...]
    tiles = torch.cat(parts) if len(parts) > 1 else parts[0]
    if not in_order:
        tiles = tiles[[order.index(t) for t in range(len(order))]]
    o = shape[0]
    w = tiles.view(r, c, o, -1)
    w = w.transpose(1, 2) if c > 1 else w  # [R, out, C, in * k...]: a copy only when tiles sit side by side
    return w.reshape(r * o, c * shape[1], *shape[2:])


def _mix_into(out: torch.Tensor, templates, alpha) -> torch.Tensor:
    """``out = sum_k alpha[k] * templates[k]`` in place (``out`` may be a strided view), as elementwise
    multiply-adds in a fixed order (the native kernels use the same order)."""
    torch.mul(templates[0], alpha[0], out=out)
    for k in range(1, len(templates)):
        out.addcmul_(templates[k], alpha[k])
    return out


def _tile_views(w: torch.Tensor, grid: tuple[int, int], tile_shape: torch.Size) -> list[torch.Tensor]:
    """Views of the ``R x C`` tiles of ``w``, row-major, each ``[out, in * k...]`` (strided when C > 1)."""
    r, c = grid
    o = tile_shape[0]
    wv = w.view(r, o, c, -1)
    return [wv[i, :, j, :] for i in range(r) for j in range(c)]


class _Grid(torch.autograd.Function):
    """The CPU fast path of :func:`grid_reference` in PyTorch (and the fallback of the native kernels).

    Every tile is written straight into its (strided) place in the weight by elementwise multiply-adds,
    and the backward reads each tile's gradient in place: ``dT_k = sum_t alpha_tk dW_t`` per bank and
    ``dalpha_tk = <dW_t, T_k>``. No ``cat``, no gathered copies, no zero-filled buffers: on CPU, where this
    is memory-bound, that is less traffic than the reference's matmuls and copy (docs/benchmarks.md).
    It launches one op per tile and template, which is why CUDA takes the reference instead."""

    @staticmethod
    def forward(ctx, coefficients, grid, tile_banks, *banks):
        r, c = grid
        shape = banks[0].shape[1:]
        w = banks[0].new_empty((r * shape[0], c * shape[1], *shape[2:]))
        cs = coefficients.unbind(0)
        for t, view in enumerate(_tile_views(w, grid, shape)):
            _mix_into(view, banks[tile_banks[t]].reshape(-1, *view.shape), cs[t])
        ctx.grid, ctx.tile_banks = grid, tile_banks
        ctx.save_for_backward(coefficients, *banks)
        return w

    @staticmethod
    def backward(ctx, grad):
        coefficients, *banks = ctx.saved_tensors
        grad = grad.contiguous()  # a no-op unless a conv backward returned another memory format
        views = _tile_views(grad, ctx.grid, banks[0].shape[1:])
        cs = coefficients.unbind(0)
        d_coef: list[torch.Tensor | None] = [None] * len(views)
        d_banks: list[torch.Tensor | None] = []
        for b, bank in enumerate(banks):
            idx = [t for t, tb in enumerate(ctx.tile_banks) if tb == b]
            flat = bank.reshape(bank.shape[0], *views[0].shape)
            if ctx.needs_input_grad[0]:  # one batched gemv over the tile's rows: reads dW_t in place
                lhs = flat.permute(1, 2, 0)  # [out, in * k..., K]
                for t in idx:
                    d_coef[t] = torch.bmm(views[t].unsqueeze(1), lhs).sum((0, 1))
            if not ctx.needs_input_grad[3 + b]:
                d_banks.append(None)
            elif not idx:
                d_banks.append(torch.zeros_like(bank))
            else:
                d_bank = torch.empty_like(flat)
                for k in range(flat.shape[0]):
                    _mix_into(d_bank[k], [views[t] for t in idx], [cs[t][k] for t in idx])
                d_banks.append(d_bank.view_as(bank))
        d_alpha = torch.stack(d_coef) if ctx.needs_input_grad[0] else None
        return (d_alpha, None, None, *d_banks)


_NATIVE_DTYPES = (torch.float32, torch.float64)


def generate(coefficients: torch.Tensor, banks: list[torch.Tensor], grid: tuple[int, int], tile_banks) -> torch.Tensor:
    """The tiled weight with autograd, the same values (to rounding) whichever path computes it:

    - CPU, float32/float64, native kernels built (:mod:`morph.native`): ``torch.ops.morph.grid``;
    - CPU otherwise: :class:`_Grid`;
    - CUDA and other devices, and under ``torch.jit`` tracing (fvcore): :func:`grid_reference`.
    """
    if coefficients.device.type == "cpu" and not torch.jit.is_tracing():
        if coefficients.dtype in _NATIVE_DTYPES and native.enabled() and native.loaded():
            return torch.ops.morph.grid(coefficients, banks, grid[0], grid[1], list(tile_banks))
        return _Grid.apply(coefficients, tuple(grid), tuple(tile_banks), *banks)
    return grid_reference(coefficients, banks, grid, tile_banks)


class TemplateMixing(nn.Module):
    """Generates a weight from a grid of template-mixed tiles.

    Args:
        banks: the banks the tiles mix (shared modules are fine).
        coefficients: ``[R*C, K]``, row ``t`` mixes tile ``t`` (row-major).
        tile_banks: index into ``banks`` of each tile.
        grid: ``(R, C)``: tiles stacked along the output (dim 0) and input (dim 1) channels.
        out_perm, in_perm: optional index permutations from tile layout to the model's layout.
    """

    def __init__(
        self,
        banks: list[TemplateBank],
        coefficients: torch.Tensor,
        tile_banks: list[int] | None = None,
        grid: tuple[int, int] = (1, 1),
        out_perm: torch.Tensor | None = None,
        in_perm: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.banks = nn.ModuleList(banks)
        self.coefficients = nn.Parameter(coefficients)
        self.grid = tuple(grid)
        self.tile_banks = list(tile_banks if tile_banks is not None else [0] * (grid[0] * grid[1]))
        assert len(self.tile_banks) == grid[0] * grid[1] == coefficients.shape[0]
        self.register_buffer("out_perm", out_perm, persistent=False)
        self.register_buffer("in_perm", in_perm, persistent=False)

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return tuple(self.banks[0].templates.shape[1:])

    def forward(self) -> torch.Tensor:
        banks = [b._parameters["templates"] for b in self.banks._modules.values()]
        w = generate(self.coefficients, banks, self.grid, self.tile_banks)
        if self.out_perm is not None:
            w = w.index_select(0, self.out_perm)
        if self.in_perm is not None:
            w = w.index_select(1, self.in_perm)
        return w

    def extra_repr(self) -> str:
        return f"grid={self.grid}, tiles->banks={self.tile_banks}"


_MIXED_CLASSES: dict[type, type] = {}


def _mixed_class(cls: type) -> type:
    if cls not in _MIXED_CLASSES:

        def weight(self: nn.Module) -> torch.Tensor:
            return self.mix()

        _MIXED_CLASSES[cls] = type(f"Mixed{cls.__name__}", (cls,), {"weight": property(weight), "_morph_base": cls})
    return _MIXED_CLASSES[cls]


def attach(module: nn.Module, mixing: TemplateMixing) -> nn.Module:
    """Replace ``module.weight`` by ``mixing()`` (in place)."""
    if is_mixed(module):
        raise ValueError(f"{type(module).__name__} already generates its weight from templates")
    module._parameters.pop("weight", None)
    module.mix = mixing
    module.__class__ = _mixed_class(type(module))
    return module


def detach(module: nn.Module) -> nn.Module:
    """Materialize the generated weight as a plain Parameter and restore the module's class."""
    if not is_mixed(module):
        return module
    with torch.no_grad():
        w = module.mix()  # a new tensor, not a view of the templates: no copy needed
    module.__class__ = module._morph_base
    del module.mix
    module.weight = nn.Parameter(w)
    return module


def is_mixed(module: nn.Module) -> bool:
    return hasattr(type(module), "_morph_base")


def mixed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every template-mixed layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_mixed(m)]
