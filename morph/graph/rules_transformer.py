"""The built-in channel rules of attention and token-mixing models (timm's ViT, DeiT, Swin, MLP-Mixer
families and their hybrids, torchvision's ViT and Swin).

What they add to :mod:`.rules` (which holds the reshape into heads, :func:`~.rules.attention_width`):

- ``F.scaled_dot_product_attention``: q and k share their head channels, k and v their tokens, and the
  batch and head dims of all three couple (the explicit ``q @ k.transpose(-2, -1)`` path couples the same
  through the matmul rule);
- timm's ``resample_abs_pos_embed``: the position table keeps its channels, its token count follows the grid.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from .analyzer import Analyzer
from .plan import TD
from .registry import register_function_rule as _function
from .rules import broadcast, couple

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
