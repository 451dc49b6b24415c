"""FLOPs through fvcore.

fvcore counts one multiply-add as one flop (so its "flops" are MACs; multiply by 2 for the
arithmetic count). It counts convolutions, matmuls/linears, einsum, batch-norm and upsampling; it
skips elementwise ops (activations, adds), which :class:`FlopReport` lists in ``unsupported``.
fvcore has no handle for ``scaled_dot_product_attention`` (timm's fused attention path); morph adds
one: the two matmuls ``q k^T`` and ``attn v``, ``B x heads x L x S x (E + Ev)`` multiply-adds, as
fvcore counts the same products written out with ``@`` (softmax and scaling are elementwise, not counted).

Template mixing generates each weight once per forward pass, whatever the batch: the report counts
the generation (``generation``: ``K`` multiply-adds per element of every tile, which fvcore sees as the
per-bank matmuls of :func:`morph.templates.grid_reference`) once per batch and amortizes it over
``batch_size`` images in ``per_image``, as in training (MixtureGrowth §3.1).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .graph.mha import traceable
from .info import get_info
from .templates import mixed_layers

__all__ = ["FlopReport", "flops", "generation_flops", "sdpa_flops"]


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass, fvcore convention (1 multiply-add = 1 flop).

    Attributes:
        per_image: forward FLOPs per image at ``batch_size``, template generation amortized.
        forward: FLOPs per image of the network ops alone (no generation).
        generation: FLOPs of generating all weights once (per batch).
        batch_size: batch the generation is amortized over.
        by_module: per-image forward FLOPs by top-level module.
        unsupported: op -> count of ops fvcore skipped.
    """

    per_image: float
    forward: float
    generation: float
    batch_size: int
    by_module: dict[str, float] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.per_image


def generation_flops(model: nn.Module) -> float:
    """FLOPs of generating every template-mixed weight once: ``tiles * K * tile numel`` per layer."""
    total = 0
    for _, m in mixed_layers(model):
        mix = m.mix
        if hasattr(mix, "generation_flops"):  # shared banks (morph.superweights)
            total += mix.generation_flops()
            continue
        for b in mix.tile_banks:
            bank = mix.banks[b].templates
            total += bank.shape[0] * bank[0].numel()
    return float(total)


def sdpa_flops(query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...]) -> int:
    """Multiply-adds of ``scaled_dot_product_attention`` on these shapes: ``q k^T`` (``L x S x E`` per batch
    and head) plus ``attn v`` (``L x S x Ev``); the leading (batch, head) dims broadcast."""
    lead = torch.broadcast_shapes(tuple(query[:-2]), tuple(key[:-2]), tuple(value[:-2]))
    n = 1
    for d in lead:
        n *= int(d)
    length, source, e, ev = int(query[-2]), int(key[-2]), int(query[-1]), int(value[-1])
    return n * length * source * (e + ev)


def _sdpa_handle(inputs: list, outputs: list) -> int:
    """fvcore op handle for ``aten::scaled_dot_product_attention`` (shapes of q, k and v from the trace)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(i) for i in inputs[:3])
    return sdpa_flops(tuple(q), tuple(k), tuple(v))


def flops(model: nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 1) -> FlopReport:
    """Count forward FLOPs of ``model`` on one ``input_size`` image with fvcore.

    Args:
        model: any model (plain or template-mixing).
        input_size: ``(C, H, W)``; defaults to the size recorded by morph, else 3x224x224.
        batch_size: training batch over which weight generation is amortized.
    """
    with warnings.catch_warnings():  # fvcore scripts helpers with torch.jit.script at import (deprecated)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    info = get_info(model)
    if input_size is None:
        input_size = info.input_size if info else (3, 224, 224)
    # nn.MultiheadAttention's fused kernel (aten::_native_multi_head_attention) has no fvcore handle: count its
    # traceable form (the same projections and scaled_dot_product_attention), as the template models run it
    model = traceable(model)
    p = next(iter(model.parameters()))
    x = torch.zeros((1, *input_size), dtype=p.dtype, device=p.device)
    was = model.training
    model.eval()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    try:
        # fvcore scripts its handles with torch.jit.script, which newer torch deprecates: not the user's concern
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            fca = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = float(fca.total())
            by_module = {k: float(v) for k, v in fca.by_module().items() if k and "." not in k}
            unsupported = dict(Counter(fca.unsupported_ops()))
    finally:
        model.train(was)
    gen = generation_flops(model)
    fwd = total - gen
    return FlopReport(fwd + gen / max(batch_size, 1), fwd, gen, batch_size, by_module, unsupported)
