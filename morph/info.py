"""``MorphInfo``: what morph did to a model, recorded on it and in its checkpoint metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .zoo import ModelSpec

__all__ = ["MorphInfo", "get_info", "set_info", "original_layout", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class MorphInfo:
    """Provenance of a morph model.

    Attributes:
        kind: ``plain`` (scale_width), ``half`` (convert), ``fused`` (fuse) or ``grown`` (grow).
        spec: the model spec (``timm/resnet50``) and constructor kwargs, if morph built the model.
        width: width of the template model's sets relative to the original (0.5 for halves).
        templates: templates per bank.
        share: ``none`` or ``consecutive``.
        set_ids: template-set ids, one per trained network (two after fusion).
        input_size: ``(C, H, W)`` used for tracing.
        train_edge_coefficients: whether the first conv's and the classifier's coefficients train.
        growth, init: fusion options (fused/grown models).
        factor: growth factor of a fused/grown model relative to its sets (2).
        original: the layout of the model it came from, as :func:`original_layout` records it, so that
            fusing or growing back to it needs no rebuild from the spec (and works without one).
    """

    kind: str
    spec: ModelSpec | None
    width: float
    templates: int = 0
    share: str = "none"
    set_ids: tuple[str, ...] = ()
    input_size: tuple[int, ...] = (3, 224, 224)
    train_edge_coefficients: bool = False
    growth: str = ""
    init: str = ""
    factor: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    original: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["spec"] = None if self.spec is None else {"source": self.spec.source, "name": self.spec.name,
                                                     "kwargs": self.spec.kwargs}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "checkpoint") -> MorphInfo:
        """Parse and check (types, bounds: :func:`morph.safety.check_info_json`) a ``morph_info`` record.

        Raises:
            CheckpointError: the record is not valid JSON or a field is missing, mistyped or out of bounds.
        """
        from .safety import check_info_json, parse_json

        d = parse_json(text, where, "morph metadata")
        check_info_json(d, where)
        spec = d.pop("spec")
        d["spec"] = None if spec is None else ModelSpec(spec["source"], spec["name"], dict(spec.get("kwargs", {})))
        d["set_ids"] = tuple(d.get("set_ids", ()))
        d["input_size"] = tuple(d.get("input_size", (3, 224, 224)))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def original_layout(model: nn.Module) -> dict[str, Any]:
    """What fusion and growth need to rebuild ``model``'s architecture at its own width: the groups of
    every grouped conv and GroupNorm, and every state-dict tensor's shape. A model that already records
    its original (a half converted again) passes that on."""
    info = get_info(model)
    if info is not None and info.original:
        return info.original
    groups = {n: m.groups for n, m in model.named_modules()
              if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1}
    groups.update({n: m.num_groups for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)})
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if hasattr(v, "shape")}
    return {"groups": groups, "shapes": shapes}


def get_info(model: nn.Module) -> MorphInfo | None:
    info = getattr(model, "morph_info", None)
    return info if isinstance(info, MorphInfo) else None


def set_info(model: nn.Module, info: MorphInfo) -> nn.Module:
    model.morph_info = info  # type: ignore[assignment]
    if info.spec is not None:
        model.morph_spec = info.spec  # type: ignore[assignment]
    if isinstance(model, fx.GraphModule):  # GraphModule.__deepcopy__ keeps only these extra attributes
        from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

        kept = model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
        kept["morph_info"] = info
        if info.spec is not None:
            kept["morph_spec"] = info.spec
    return model
