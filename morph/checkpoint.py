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
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from .errors import CheckpointError, MorphError
from .info import FORMAT_VERSION, MorphInfo, get_info
from .safety import check_info

__all__ = ["save", "load", "read_info", "atomic_save_file"]


def atomic_save_file(write, path: str | os.PathLike) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``: no partial file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` to a safetensors file at ``path`` (atomically).

    Any model can be saved. The file records how to rebuild it: the spec of a model from
    :func:`morph.build_model` or morph's transforms, of a timm or torchvision model built directly when
    :func:`morph.zoo.infer_spec` can establish it, and otherwise none, in which case :func:`load` needs
    the caller's ``model_fn``.
    """
    from safetensors.torch import save_model

    info = get_info(model)
    if info is None:  # a plain model: from build_model, or built directly (then its spec is inferred if certain)
        from .zoo import get_spec

        info = MorphInfo(kind="plain", spec=get_spec(model), width=1.0)
    meta = {"format": "morph", "format_version": str(FORMAT_VERSION), "morph_info": info.to_json()}
    meta.update(metadata or {})
    return atomic_save_file(lambda tmp: save_model(model, tmp, metadata=meta), path)


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The safetensors header of ``path``: metadata and tensor shapes. No tensor is read."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    return meta, shapes


def _parse_info(path: Path, meta: dict[str, str]) -> MorphInfo:
    if meta.get("format") != "morph" or "morph_info" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without morph metadata; it was not written by morph.save")
    version = str(meta.get("format_version", "0"))
    if not version.isdigit() or len(version) > 6:
        raise CheckpointError(f"{path}: corrupt format_version {version[:20]!r} in morph metadata")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this morph's; upgrade morph")
    return MorphInfo.from_json(meta["morph_info"], where=str(path))


def read_info(path: str | os.PathLike) -> tuple[MorphInfo, dict[str, str]]:
    """Read and check a checkpoint's :class:`MorphInfo` and raw metadata without loading tensors.

    Raises:
        CheckpointError: missing, unreadable or foreign file, or metadata that fails
            :func:`morph.safety.check_info_json` or does not fit the tensors in the file.
    """
    path = Path(path)
    meta, shapes = _header(path)
    info = _parse_info(path, meta)
    check_info(info, shapes, str(path))
    return info, meta


def rebuild(info: MorphInfo, *, model_fn: Callable[..., nn.Module] | None = None, trust_code: bool = False,
            where: str = "") -> nn.Module:
    """Build the (untrained) model a :class:`MorphInfo` describes (its base model through
    :func:`morph.zoo.build_recorded`: see there what a record may name)."""
    from .convert import convert
    from .fuse import fuse, grow
    from .scale import scale_width
    from .zoo import build_recorded

    if info.spec is None:
        if model_fn is None:
            raise CheckpointError(f"{where}: the model records no spec (it was not built by morph.build_model, nor "
                                  "is it a timm or torchvision model): load it from Python with morph.load(path, "
                                  "model_fn=<a function that builds it>)")
        base = model_fn()
        if not isinstance(base, nn.Module):
            raise CheckpointError(f"{where}: model_fn returned {type(base).__name__}, not an nn.Module")
    else:
        base = build_recorded(info.spec, model_fn=model_fn, trust_code=trust_code, where=where)

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
            return _with_info(layout.skeleton(), info)
        if info.width == 1:
            return _with_info(base, info)
        return _with_info(scale_width(base, info.width, input_size=info.input_size), info)
    if info.kind == "half":
        return half(info.set_ids[0])
    if info.kind == "fused":
        return fuse(half(info.set_ids[0]), half(info.set_ids[1]), growth=info.growth, init="zero", inplace=True)
    if info.kind == "grown":
        return grow(half(info.set_ids[0]), init="zero", inplace=True)
    raise CheckpointError(f"unknown model kind {info.kind!r} in checkpoint")


def _with_info(model: nn.Module, info: MorphInfo) -> nn.Module:
    from .growth.activation import restore
    from .info import set_info

    return restore(set_info(model, info), info.extra.get("growth"))  # a grown model's activations


def load_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file into ``model`` strictly. A tensor the model shares between several keys
    (a template bank used by two layers) is stored once and fills all of them; the model's own
    state-dict metadata (module versions, e.g. torchvision's MNASNet) is kept."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = model.state_dict(keep_vars=True)
    by_id: dict[int, str] = {}
    for k, v in own.items():
        if k in sd:
            by_id.setdefault(id(v), k)
    for k, v in own.items():
        if k not in sd and id(v) in by_id:
            sd[k] = sd[by_id[id(v)]]
    sd_meta = getattr(own, "_metadata", None)
    if sd_meta is not None:
        sd = type(own)(sd)
        sd._metadata = sd_meta  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=True)


def load(path: str | os.PathLike, *, model_fn: Callable[..., nn.Module] | None = None,
         trust_code: bool = False) -> nn.Module:
    """Rebuild the model a morph checkpoint describes and load its tensors strictly.

    Reading a checkpoint runs no code that the file names (see :mod:`morph.safety`): the model is
    rebuilt from timm or torchvision by name, with checked constructor arguments, under an allocation
    budget set by the file's own size. A model of your own is rebuilt only if you say how.

    Args:
        path: a file written by :func:`save`.
        model_fn: your model factory: called with the constructor kwargs recorded in the file for a
            model built from a ``package.module:callable``, with none for a model that records no spec
            (one you built yourself and saved with :func:`save`).
        trust_code: import and call the ``package.module:callable`` the file names. Only for files you trust.

    Raises:
        CheckpointError: missing, truncated, corrupt, foreign or hostile file, a callable you did not
            allow, or tensors that do not match.
    """
    from .safety import AllocationBudget, rebuild_budget

    path = Path(path)
    meta, shapes = _header(path)
    info = _parse_info(path, meta)
    check_info(info, shapes, str(path))
    name = info.spec.spec if info.spec is not None else "the model"
    try:
        with AllocationBudget(rebuild_budget(shapes), str(path)):
            model = rebuild(info, model_fn=model_fn, trust_code=trust_code, where=str(path))
    except CheckpointError:
        raise
    except MorphError as e:
        raise CheckpointError(f"{path}: cannot rebuild {name}: {e}") from e
    except Exception as e:  # the file's record does not describe a model that can be built
        raise CheckpointError(f"{path}: cannot rebuild {name} ({info.kind}) from its metadata: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    try:
        load_state(model, path)
    except Exception as e:
        raise CheckpointError(f"{path}: tensors do not match {name} ({info.kind}): "
                              f"{str(e).splitlines()[0][:300]}") from e
    from .info import set_info

    return set_info(model, info)  # the recorded provenance (fusion init, ...), not the rebuild's
