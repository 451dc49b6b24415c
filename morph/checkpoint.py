"""safetensors checkpoints with morph metadata; never pickle.

A checkpoint holds the model's state dict (a bank shared by two layers is stored once) and, in the
safetensors header metadata, ``format=morph``, ``format_version`` and ``morph_info`` (a JSON
:class:`~morph.info.MorphInfo`: model spec and kwargs, kind, width, templates, sharing, template-set
ids, input size, fusion options). :func:`load` rebuilds the model from that recipe and loads every
tensor strictly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError, MorphError
from .info import FORMAT_VERSION, MorphInfo, get_info
from .paths import write_file
from .safety import (
    SHARED_KINDS,
    AllocationBudget,
    BuildError,
    ModuleBudget,
    base_limits,
    check_info,
    no_weights,
    rebuild_budget,
    show,
)
from .text import printable

__all__ = ["save", "load", "read_info", "atomic_save_file"]


def _check_tensors(info: MorphInfo, shapes: dict, where: str, dtypes: dict) -> None:
    """The record against the tensors in the file: SuperWeights' sharing record, or template banks."""
    if info.kind in SHARED_KINDS:
        from .superweights.record import check_record

        check_record(info, shapes, where)
    else:
        check_info(info, shapes, where, dtypes)


def atomic_save_file(write, path: str | os.PathLike) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``: no partial file on failure, never through a
    symlink (:func:`morph.paths.write_file`, the one output rule)."""
    return write_file(path, lambda tmp: write(str(tmp)))


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` to a safetensors file at ``path`` (atomically).

    Any model can be saved. The file records how to rebuild it: the spec of a model from
    :func:`morph.build_model` or morph's transforms, of a timm or torchvision model built directly when
    :func:`morph.zoo.infer_spec` can establish it, and otherwise none, in which case :func:`load` needs
    the caller's ``model_fn``.
    """
    from safetensors.torch import save_model

    info = get_info(model)
    if info is not None and info.kind in ("shared", "ensemble"):  # the sharing as it is now (after untying)
        from .superweights.record import refresh

        refresh(model)
    if info is None:  # a plain model: from build_model, or built directly (then its spec is inferred if certain)
        from .zoo import get_spec

        info = MorphInfo(kind="plain", spec=get_spec(model), width=1.0)
    meta = {"format": "morph", "format_version": str(FORMAT_VERSION), "morph_info": info.to_json()}
    meta.update(metadata or {})
    return atomic_save_file(lambda tmp: save_model(model, tmp, metadata=meta), path)


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """The safetensors header of ``path``: metadata, tensor shapes and dtype names. No tensor is read."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{printable(path)}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes, dtypes = {}, {}
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k], dtypes[k] = tuple(sl.get_shape()), str(sl.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:  # what safetensors raises for a file it cannot read
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{printable(path)}: not a readable safetensors file ({printable(first)})") from e
    return meta, shapes, dtypes


_VERSION = re.compile(r"[0-9]{1,6}")


def _parse_info(path: Path, meta: dict[str, str]) -> MorphInfo:
    where = printable(path)
    if meta.get("format") != "morph" or "morph_info" not in meta:
        raise CheckpointError(f"{where}: a safetensors file without morph metadata; it was not written by morph.save")
    version = meta.get("format_version", "0")
    if not isinstance(version, str) or _VERSION.fullmatch(version) is None:  # ASCII digits: int() takes "١" too
        raise CheckpointError(f"{where}: corrupt format_version {show(version, 20)} in morph metadata")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {version} is newer than this morph's; upgrade morph")
    return MorphInfo.from_json(meta["morph_info"], where=where)


def read_info(path: str | os.PathLike) -> tuple[MorphInfo, dict[str, str]]:
    """Read and check a checkpoint's :class:`MorphInfo` and raw metadata without loading tensors.

    Raises:
        CheckpointError: missing, unreadable or foreign file, or metadata that fails
            :func:`morph.safety.check_info_json` or does not fit the tensors in the file.
    """
    path = Path(path)
    meta, shapes, dtypes = _header(path)
    info = _parse_info(path, meta)
    _check_tensors(info, shapes, printable(path), dtypes)
    return info, meta


def _build_base(info: MorphInfo, shapes: dict[str, tuple[int, ...]] | None, build: Callable[[], nn.Module],
                where: str) -> nn.Module:
    """The base model of a record, bounded by what the file's tensors account for (:func:`base_limits`):
    first on the meta device (no memory: refused by module and element count before anything is
    allocated), then for real under the same module budget. A model that cannot be built on the meta
    device (it computes on its tensors while it is built, as torchvision's RegNets do) is built for real
    under the module budget and an allocation budget of twice the elements the file accounts for."""
    if shapes is None:
        return build()
    limits = base_limits(shapes, info.width)
    try:
        with ModuleBudget(limits.modules, where), torch.device("meta"):
            meta = build()
    except BuildError:
        meta = None  # it may build for real: the real build, under its budgets, decides
    except MorphError:
        raise
    except Exception:  # noqa: BLE001  (a constructor that reads tensor values cannot run on meta)
        meta = None
    if meta is not None:
        seen: set[int] = set()
        n = 0
        for t in (*meta.parameters(), *meta.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        if n > limits.elements:
            raise CheckpointError(
                f"{printable(where)}: the model it describes ({info.spec.spec if info.spec else 'model_fn'}) has "
                f"{n:,} parameter and buffer elements, far more than the {limits.held:,} the file holds account "
                f"for (at most {limits.elements:,}); its metadata is inconsistent")
        del meta
        with ModuleBudget(limits.modules, where):
            return build()
    # not buildable on meta: the real build allocates at most twice the elements the file accounts for
    with ModuleBudget(limits.modules, where), AllocationBudget(2 * limits.elements, where):
        return build()


def rebuild(info: MorphInfo, *, model_fn: Callable[..., nn.Module] | None = None, trust_code: bool = False,
            where: str = "", shapes: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """Build the (untrained) model a :class:`MorphInfo` describes (its base model through
    :func:`morph.zoo.build_recorded`: see there what a record may name). With ``shapes`` (the file's tensors),
    the base model is bounded as :func:`_build_base` says. An attention model is rebuilt in the attention
    width mode it records (heads of 16 and twice the heads of 8 have the same tensor shapes: only the
    record tells them apart)."""
    from .graph.rules import ATTENTION_WIDTHS, attention_width

    mode = info.extra.get("attention_width") if info.extra else None
    if mode is None:
        return _rebuild(info, model_fn=model_fn, trust_code=trust_code, where=where, shapes=shapes)
    if mode not in ATTENTION_WIDTHS:
        raise CheckpointError(f"{where}: unknown attention width {show(mode)} in checkpoint")
    with attention_width(mode):
        return _rebuild(info, model_fn=model_fn, trust_code=trust_code, where=where, shapes=shapes)


def _rebuild(info: MorphInfo, *, model_fn: Callable[..., nn.Module] | None, trust_code: bool, where: str,
             shapes: dict[str, tuple[int, ...]] | None) -> nn.Module:
    from .convert import convert
    from .fuse import fuse, grow
    from .graph.mha import stock as mha_stock
    from .scale import scale_width
    from .zoo import build_recorded

    if info.kind in ("shared", "ensemble"):  # morph.superweights: members and banks from the sharing record
        from .superweights.record import rebuild as rebuild_shared

        return rebuild_shared(info, model_fn=model_fn, trust_code=trust_code, where=where)
    if info.spec is None:
        if model_fn is None:
            raise CheckpointError(f"{where}: the model records no spec (it was not built by morph.build_model, nor "
                                  "is it a timm or torchvision model): load it from Python with morph.load(path, "
                                  "model_fn=<a function that builds it>)")
        with ModuleBudget(base_limits(shapes, info.width).modules, where) if shapes is not None else nullcontext():
            base = model_fn()
        if not isinstance(base, nn.Module):
            raise CheckpointError(f"{where}: model_fn returned {type(base).__name__}, not an nn.Module")
    elif model_fn is not None:  # the caller's factory: its own code, built once
        with ModuleBudget(base_limits(shapes, info.width).modules, where) if shapes is not None else nullcontext():
            base = build_recorded(info.spec, model_fn=model_fn, trust_code=trust_code, where=where)
    else:
        spec = info.spec
        base = _build_base(info, shapes, lambda: build_recorded(spec, trust_code=trust_code, where=where), where)

    def half(set_id: str) -> nn.Module:
        return convert(base, info.width, info.templates, info.share, seed=0, set_id=set_id,
                       train_edge_coefficients=info.train_edge_coefficients, input_size=info.input_size)

    if info.kind == "plain":
        grown = info.extra.get("growth", {})
        if grown.get("which", "all") == "internal":  # not a width of the architecture: the growth layout's shapes
            from .growth.layout import build_layout

            fw = float(grown["from_width"])
            small = _with_info(base, dataclasses.replace(info, width=1.0, extra={})) if fw == 1 else \
                scale_width(base, fw, input_size=info.input_size)
            layout = build_layout(small, info.width / fw, which="internal", input_size=info.input_size)
            skeleton = layout.skeleton()
            mha_stock(skeleton)  # nn.MultiheadAttention as the grown model has it
            return _with_info(skeleton, info)
        if info.width == 1:
            return _with_info(base, info)
        return _with_info(scale_width(base, info.width, input_size=info.input_size), info)
    if info.kind == "half":
        return half(info.set_ids[0])
    if info.kind == "fused":
        return fuse(half(info.set_ids[0]), half(info.set_ids[1]), growth=info.growth, init="zero", inplace=True)
    if info.kind == "grown":
        return grow(half(info.set_ids[0]), init="zero", inplace=True)
    raise CheckpointError(f"{where}: unknown model kind {show(info.kind)} in checkpoint")


def _with_info(model: nn.Module, info: MorphInfo) -> nn.Module:
    from .growth.activation import restore
    from .info import set_info

    return restore(set_info(model, info), info.extra.get("growth"))  # a grown model's activations


def _kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "floating point" if t.is_floating_point() else \
        "bool" if t.dtype == torch.bool else "integer"


def load_state(model: nn.Module, path: str | os.PathLike, name: str = "the model") -> None:
    """Load a safetensors file into ``model`` strictly. A tensor the model shares between several keys
    (a template bank used by two layers) is stored once and fills all of them; the model's own
    state-dict metadata (module versions, e.g. torchvision's MNASNet) is kept.

    Raises:
        CheckpointError: the file cannot be read, or a tensor is missing, unexpected, or of another shape
            or kind of dtype (an integer or bool tensor where the model has floating point) than the model's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = printable(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot read its tensors ({printable(str(e).splitlines()[0] if str(e) else e)})"
                              ) from e
    own = model.state_dict(keep_vars=True)
    by_id: dict[int, str] = {}
    for k, v in own.items():
        if k in sd:
            by_id.setdefault(id(v), k)
    for k, v in own.items():
        if k not in sd and id(v) in by_id:
            sd[k] = sd[by_id[id(v)]]

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: tensors do not match {name}: {what}")

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = [f"{len(names)} {what} (first {show(names[0], 120)})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        raise bad(", ".join(parts))
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise bad(f"{show(k, 120)} has shape {list(sd[k].shape)} in the file, {list(v.shape)} in the model")
        if _kind(sd[k]) != _kind(v):
            raise bad(f"{show(k, 120)} is stored as {_kind(sd[k])} ({sd[k].dtype}), the model's is {_kind(v)}")
    sd_meta = getattr(own, "_metadata", None)
    if sd_meta is not None:
        sd = type(own)(sd)
        sd._metadata = sd_meta  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=True)


def load(path: str | os.PathLike, *, model_fn: Callable[..., nn.Module] | None = None,
         trust_code: bool = False) -> nn.Module:
    """Rebuild the model a morph checkpoint describes and load its tensors strictly.

    Reading a checkpoint runs no code that the file names, downloads nothing and unpickles nothing (see
    :mod:`morph.safety`): the model is rebuilt from timm or torchvision by name, without weights, with
    checked constructor arguments, bounded by what the file holds. A model of your own is rebuilt only if
    you say how.

    Args:
        path: a file written by :func:`save`.
        model_fn: your model factory: called with the constructor kwargs recorded in the file for a
            model built from a ``package.module:callable``, with none for a model that records no spec
            (one you built yourself and saved with :func:`save`).
        trust_code: import and call the ``package.module:callable`` the file names. Only for files you trust.

    Raises:
        CheckpointError: missing, truncated, corrupt, foreign or hostile file, a callable you did not
            allow, or tensors that do not match. Any other exception is a bug (in morph, or in your
            ``model_fn``) and propagates as it is.
    """
    path = Path(path)
    where = printable(path)
    meta, shapes, dtypes = _header(path)
    info = _parse_info(path, meta)
    _check_tensors(info, shapes, where, dtypes)
    name = f"{info.spec.spec if info.spec is not None else 'the model'} ({info.kind})"
    try:
        with no_weights(where), AllocationBudget(rebuild_budget(shapes), where):
            model = rebuild(info, model_fn=model_fn, trust_code=trust_code, where=where, shapes=shapes)
    except CheckpointError:
        raise
    except MorphError as e:  # the record describes a model morph cannot convert, fuse or grow
        raise CheckpointError(f"{where}: cannot rebuild {name}: {e}") from e
    except MemoryError:
        raise CheckpointError(f"{where}: not enough memory to rebuild {name}") from None
    load_state(model, path, name)
    from .info import set_info

    return set_info(model, info)  # the recorded provenance (fusion init, ...), not the rebuild's
