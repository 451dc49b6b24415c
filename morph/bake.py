"""``bake``: materialize template-generated weights into a plain model."""

from __future__ import annotations

import copy
import dataclasses

import torch.nn as nn

from .errors import MorphError
from .graph.mha import stock as mha_stock
from .info import get_info, set_info
from .templates import detach, mixed_layers

__all__ = ["bake"]


def bake(model: nn.Module) -> nn.Module:
    """Return a plain copy of a template model: every generated weight becomes a Parameter.

    The result has the module paths and state_dict keys of the original timm/torchvision model at
    that width: a fused or grown model bakes to the stock full-width model (``strict=True`` loads),
    a half model to ``morph.scale_width(original, 0.5)``.
    """
    info = get_info(model)
    if info is not None and info.kind == "ensemble":
        raise MorphError("bake makes one plain model; bake an ensemble's members with "
                         "morph.superweights.ensemble.bake_members")
    if info is None or info.kind == "plain":
        raise MorphError("bake needs a template model (from morph.convert, fuse or grow); this one is plain")
    # copy everything but the template banks, which the copy only reads (each weight is generated
    # from them once) and then drops: they share the original's tensors instead of being copied
    memo = {id(m.mix): m.mix for _, m in mixed_layers(model)}
    new = copy.deepcopy(model, memo)
    for _, m in mixed_layers(new):
        detach(m)
    for p in new.parameters():
        p.requires_grad_(True)
    mha_stock(new)  # in_proj back into nn.MultiheadAttention's in_proj_weight
    return set_info(new, dataclasses.replace(info, kind="plain", width=info.width * info.factor, templates=0, share="none",
                                      set_ids=(), factor=1, growth="", init="",
                                      extra={k: v for k, v in info.extra.items() if k != "superweights"}))
