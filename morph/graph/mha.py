"""``torch.nn.MultiheadAttention`` (torchvision's ViT) as Linear modules that the analysis and every pass work on.

A stock ``nn.MultiheadAttention`` keeps q, k and v in one raw ``in_proj_weight`` parameter ``[3E, E]`` and runs
``F.multi_head_attention_forward``, which fx records as one opaque call. :func:`traceable` gives a model whose
self-attention modules are :class:`TracedMultiheadAttention`: the same instance data, the packed projection moved
(the same Parameter objects) into a Linear submodule ``in_proj``, and a forward in traceable ops, timm's
``Attention`` written out: ``in_proj`` -> ``reshape(B, N, 3, num_heads, head_dim)`` -> scaled dot-product
attention -> ``out_proj``. The analysis then sees the reshape into heads (:func:`.rules.attention_width`), the
templates mix ``in_proj.weight`` like any Linear's, tiling puts a's and b's heads side by side, and growth tiles
the q, k and v rows each as heads. Its ``state_dict`` keeps the stock keys (``in_proj_weight``,
``in_proj_bias``) and it loads stock state dicts; :func:`stock` turns it back into ``nn.MultiheadAttention`` with
``embed_dim`` and ``head_dim`` of its new width (plain results: ``scale_width``, ``bake``, growth).

Only what torchvision's encoder uses is rewritten: self-attention (query, key and value one tensor), no masks,
``need_weights=False``, q/k/v of one embedding size, no ``bias_k``/``bias_v``, no zero attention. Other calls
run the stock forward, which the analysis refuses with one line.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TracedMultiheadAttention", "traceable", "stock", "stock_name", "has_stock_mha"]

_KEYS = (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias"))


class TracedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose packed q/k/v projection is the Linear ``in_proj`` (made by
    :func:`traceable`, never constructed directly)."""

    in_proj: nn.Linear

    @property
    def in_proj_weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.in_proj.bias

    @property
    def embed_dim(self) -> int:  # type: ignore[override]
        return self.in_proj.in_features

    @property
    def kdim(self) -> int:  # type: ignore[override]
        return self.in_proj.in_features

    @property
    def vdim(self) -> int:  # type: ignore[override]
        return self.in_proj.in_features

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key and key is value and key_padding_mask is None and attn_mask is None
                and not need_weights and not is_causal):
            if torch.fx._symbolic_trace.is_fx_tracing():
                raise ValueError(
                    "nn.MultiheadAttention is rewritten for self-attention without masks and need_weights=False "
                    "only (torchvision's encoder); this call has cross-attention, a mask or need_weights=True")
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        b, n = x.shape[0], x.shape[1]
        qkv = self.in_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The stock keys: ``in_proj_weight`` and ``in_proj_bias`` first, as ``nn.MultiheadAttention`` has them."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        mine = [k for k in list(sd) if k.startswith(prefix)]
        items = {k: sd.pop(k) for k in mine}
        for stock_key, key in _KEYS:
            if prefix + key in items:
                sd[prefix + stock_key] = items.pop(prefix + key)
        sd.update(items)
        return sd

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for stock_key, key in _KEYS:
            if prefix + stock_key in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + stock_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _rewritable(m: nn.Module) -> bool:
    return (type(m) is nn.MultiheadAttention and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and m._parameters.get("in_proj_weight") is not None)


def has_stock_mha(model: nn.Module) -> bool:
    """Whether ``model`` has a stock ``nn.MultiheadAttention`` that :func:`traceable` rewrites."""
    return any(_rewritable(m) for m in model.modules())


def _to_traced(m: nn.MultiheadAttention) -> None:
    w, bias = m._parameters.pop("in_proj_weight"), m._parameters.pop("in_proj_bias", None)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = w
    lin.bias = bias
    for name in ("embed_dim", "kdim", "vdim"):
        m.__dict__.pop(name, None)
    m.__class__ = TracedMultiheadAttention
    m._modules = {"in_proj": lin, **m._modules}


def traceable(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no stock self-attention to rewrite, else a deep copy whose
    ``nn.MultiheadAttention`` modules are :class:`TracedMultiheadAttention` (same values, same state_dict keys)."""
    if not has_stock_mha(model):
        return model
    new = copy.deepcopy(model)
    for m in new.modules():
        if _rewritable(m):
            _to_traced(m)
    return new


def stock(model: nn.Module) -> list[str]:
    """Turn every :class:`TracedMultiheadAttention` of ``model`` back into ``nn.MultiheadAttention`` (in place; its
    ``in_proj`` weight must be a plain Parameter, not template-generated), with ``embed_dim``, ``kdim``, ``vdim``
    and ``head_dim`` of its width. Returns the module paths turned back (:func:`stock_name` renames their
    parameters)."""
    done = []
    for path, m in list(model.named_modules()):
        if type(m) is not TracedMultiheadAttention:
            continue
        done.append(path)
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        if parent is not m and isinstance(getattr(parent, "num_heads", None), int):
            parent.num_heads = m.num_heads  # torchvision's EncoderBlock records it too
        lin = m._modules.pop("in_proj")
        e = lin.in_features
        m.__class__ = nn.MultiheadAttention
        m._parameters = {"in_proj_weight": lin.weight, **m._parameters, "in_proj_bias": lin.bias}
        m.embed_dim = m.kdim = m.vdim = e
        m.head_dim = e // m.num_heads
    return done


def stock_name(name: str, paths: list[str] | set[str]) -> str:
    """The stock parameter name of ``name`` (``<mha>.in_proj.weight`` -> ``<mha>.in_proj_weight``) for the
    attention modules at ``paths``."""
    for stock_key, key in _KEYS:
        if name.endswith("." + key) and name[: -len(key) - 1] in paths:
            return name[: -len(key)] + stock_key
        if name == key and "" in paths:
            return stock_key
    return name
