"""Channel analysis: which dims of which tensors and parameters must change width together.

``analyze(model)`` traces the model (:mod:`.trace`), then walks the graph once (:class:`.Analyzer`),
applying the rule of each op (:mod:`.registry`; the built-in rules are in :mod:`.rules`) to the
:data:`~.coupling.Dim` of its inputs. The result, a
:class:`ChannelPlan`, names every parameterized layer by module path and tells, for each of its
dims, which channel groups it is made of. Widening or narrowing a model is then arithmetic on the
plan (:mod:`morph.scale`).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import MorphError
from . import rules as _rules  # noqa: F401  (the built-in rules register themselves on import)
from . import rules_transformer as _rules_transformer  # noqa: F401
from .analyzer import Analyzer
from .forwards import head_count
from .mha import TracedMultiheadAttention, traceable
from .plan import TD, ChannelPlan, ConstSite, LayerPlan
from .trace import trace

__all__ = ["ChannelPlan", "LayerPlan", "ConstSite", "TD", "analyze", "default_input_size"]


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size if it declares one (timm ``pretrained_cfg``), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3:
        return tuple(int(s) for s in size)  # type: ignore[return-value]
    return (3, 224, 224)


def analyze(
    model: nn.Module, input_size: tuple[int, ...] | None = None, *, batch_size: int = 2
) -> ChannelPlan:
    """Trace ``model`` and find its coupled channel groups.

    Args:
        model: any nn.Module that torch.fx can trace (with timm's and torchvision's leaf rules).
        input_size: ``(C, H, W)`` of one input; defaults to :func:`default_input_size`.
        batch_size: batch used for shape propagation.

    Raises:
        UnsupportedOpError: an op the analysis does not understand, naming the node and module path.
    """
    from ..info import get_info

    info = get_info(model)
    mode = info.extra.get("attention_width") if info is not None and info.extra else None
    if mode is not None:  # the mode the model was made in (scale_width, convert record it): halves fuse and grow alike
        with _rules.attention_width(mode):
            return _analyze(model, input_size, batch_size)
    return _analyze(model, input_size, batch_size)


def _analyze(model: nn.Module, input_size: tuple[int, ...] | None, batch_size: int) -> ChannelPlan:
    model = traceable(model)  # nn.MultiheadAttention as Linear modules (the passes call traceable too: same names)
    input_size = tuple(input_size or default_input_size(model))
    p = next(iter(model.parameters()), None)
    example = torch.zeros((batch_size, *input_size), dtype=p.dtype if p is not None else torch.float32,
                          device=p.device if p is not None else None)  # where the model is (a GPU model traces on it)
    gm = trace(model, example)
    _record_heads(model, gm)
    a = Analyzer(gm)
    a.run()
    if not _covered(model, a):
        # heads that run only in training (googlenet and inception aux logits): trace in train mode
        gm = trace(model, example, train=True)
        _record_heads(model, gm)
        a = Analyzer(gm)
        a.run()
        _check_coverage(model, a)
    _drop_traced_constants(model, a)
    node_dims = {n.name: a.env.get(n) for n in gm.graph.nodes}
    return ChannelPlan(a.g, a.layers, a.params, a.consts, gm, input_size, node_dims)


def _drop_traced_constants(model: nn.Module, a: Analyzer) -> None:
    """Tensors the forward builds from constants (Swin's window masks and index tables) are read through
    ``get_attr`` of fx's ``_tensor_constant*`` attributes: not model state, so no pass resizes or fuses them;
    one that would have to change width is an error."""
    state = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for path in [p for p in a.params if p not in state]:
        dims = a.params.pop(path)
        if any(a.g.scales(s.group) for d in dims for s in a.g.atoms(d)):
            raise MorphError(f"{path}: a tensor built inside the forward has channels that change width; "
                             "register it as a buffer of its module")


def _record_heads(model: nn.Module, gm) -> None:
    """The attention modules' head counts by module path (``num_heads``), which the reshape rule reads to tell
    heads from head channels (the traced graph keeps only the leaves, not the attention modules' attributes). A
    graph that :mod:`morph.scale` rewrote (a ``GraphModule``: its attention modules are gone, the module paths
    of its nodes are kept, :func:`.trace.trace`) recorded them in its ``meta["morph_heads"]``."""
    heads = {name: head_count(m) for name, m in model.named_modules()
             if not isinstance(m, nn.MultiheadAttention) or isinstance(m, TracedMultiheadAttention)}
    if isinstance(model, fx.GraphModule):  # a rewritten graph (morph.scale) keeps no attention modules: its record
        heads = {**(model.meta.get("morph_heads") or {}), **{k: v for k, v in heads.items() if v is not None}}
    gm.meta["morph_heads"] = {name: n for name, n in heads.items() if n is not None}
    gm.meta["morph_attention_width"] = _rules.current_attention_width()  # the mode this plan was analyzed in


def _covered(model: nn.Module, a: Analyzer) -> bool:
    try:
        _check_coverage(model, a)
    except MorphError:
        return False
    return True


def _check_coverage(model: nn.Module, a: Analyzer) -> None:
    """Every parameter must belong to an analyzed layer or a get_attr tensor: no silent guesses."""
    covered = set(a.layers)
    for name, _ in model.named_parameters():
        mod, _, pname = name.rpartition(".")
        parts = name.split(".")
        if name in a.params or any(".".join(parts[:i]) in covered for i in range(1, len(parts))):
            continue
        m = model.get_submodule(mod) if mod else model
        raise MorphError(
            f"parameter {name} ({type(m).__name__}) is not used in the traced forward (eval or train mode); "
            "morph cannot tell which channels it belongs to: remove the unused module"
        )
