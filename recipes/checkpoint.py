"""Training checkpoints: one safetensors file per stage, written atomically.

A checkpoint holds the model's parameters and buffers (``model.*``), the optimizer's tensor state
(``optim.*``) and each rank's torch RNG state (``rng.<rank>.*``) as tensors. Everything else (epoch,
step, FLOPs spent, optimizer hyperparameters, Python and NumPy RNG states) is JSON in the safetensors
header's metadata. Nothing is pickled, so loading a checkpoint never runs code.

Files are written to a temporary name in the same directory, flushed, fsynced and moved into place
with ``os.replace``: a crash or kill leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from morph.errors import CheckpointError
from morph.paths import write_bytes
from morph.safety import parse_json
from morph.text import printable

__all__ = [
    "FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_meta",
    "get_rng_state",
    "load_checkpoint",
    "load_model_tensors",
    "model_tensors",
    "optimizer_state",
    "restore_optimizer",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "morph-recipes-checkpoint/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, never through a symlink (:func:`morph.paths.write_bytes`)."""
    write_bytes(path, data, option="run file")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, never through a symlink."""
    write_bytes(path, text.encode(), option="run file")


# ----------------------------------------------------------------------------------------------
# Model


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each shared tensor once (``named_parameters`` de-duplicates)."""
    out = {name: p.detach() for name, p in model.named_parameters()}
    out.update({name: b.detach() for name, b in model.named_buffers() if b is not None})
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``model`` in place; names and shapes must match exactly.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped tensor, naming the checkpoint ``where``.
    """
    own = model_tensors(model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(
            f"checkpoint {where} does not fit the model ({what}); was the config changed? use a new --out-dir"
        )
    with torch.no_grad():
        for name, t in own.items():
            src = tensors[name]
            if src.shape != t.shape:
                raise CheckpointError(f"checkpoint {where}: {name} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
            t.copy_(src)


# ----------------------------------------------------------------------------------------------
# Optimizer


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON.

    Returns:
        ``({"<param index>.<key>": tensor}, {"param_groups": [...], "scalars": {...}})``.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _same(a: Any, b: Any) -> bool:
    """JSON-equal: a bool is not a number, a number is compared by value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # JSON keeps Adam's betas as a list
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


_ADAM = (torch.optim.Adam, torch.optim.AdamW)  # their state holds a 0-d ``step`` count beside per-entry tensors

# how the optimizer runs, not what it computes: the file's values are never used, the running optimizer's are
_IMPLEMENTATION_KEYS = {"fused", "foreach", "differentiable", "capturable"}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      where: str = "the checkpoint") -> None:
    """Inverse of :func:`optimizer_state`, every field checked against ``optimizer`` (built from the config)
    before any is used: the same groups holding the same parameters, every hyperparameter but the learning
    rate (set at every step) equal to the config's (``maximize``, ``momentum``, ``nesterov``, ``weight_decay``
    ...), and every state tensor of its parameter's shape and dtype, finite.

    Raises:
        CheckpointError: naming the first field that does not fit ``optimizer``.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: the optimizer state does not fit this config's optimizer: {what}; was "
                               "the config changed, or the file edited? use a new --out-dir or delete the file")

    own = optimizer.state_dict()["param_groups"]
    saved = meta.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(own):
        raise bad(f"{len(saved) if isinstance(saved, list) else 'no'} parameter groups, the optimizer {len(own)}")
    for i, (g, o) in enumerate(zip(saved, own, strict=True)):
        if not isinstance(g, dict) or set(g) - _IMPLEMENTATION_KEYS != set(o) - _IMPLEMENTATION_KEYS:
            extra = sorted(set(g) - set(o)) if isinstance(g, dict) else []
            missing = sorted(set(o) - set(g) - _IMPLEMENTATION_KEYS) if isinstance(g, dict) else []
            raise bad(f"param_groups[{i}] has keys {printable(extra)[:80]} it should not" if extra
                      else f"param_groups[{i}] lacks {missing}")
        for key, value in o.items():
            if key == "lr":
                lr = g[key]
                if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)):
                    raise bad(f"param_groups[{i}].lr is {printable(repr(lr))[:40]}, not a finite number")
            elif key in _IMPLEMENTATION_KEYS:
                continue
            elif key == "params":
                if g[key] != value:
                    raise bad(f"param_groups[{i}].params lists other parameters")
            elif not _same(g[key], value):
                raise bad(f"param_groups[{i}].{key} is {printable(repr(g[key]))[:40]}, the config's optimizer has "
                          f"{value!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    scalars = meta.get("scalars")
    if not isinstance(scalars, dict):
        raise bad("scalars is not an object")
    for name, value in list(tensors.items()) + list(scalars.items()):
        idx, dot, key = name.partition(".")
        if not dot or not idx.isascii() or not idx.isdigit() or len(idx) > 9 or int(idx) >= len(params):
            raise bad(f"state entry {printable(name)[:60]!r} names no parameter of the optimizer")
        p = params[int(idx)]
        if isinstance(value, torch.Tensor) and key == "step" and value.dim() == 0 and isinstance(optimizer, _ADAM):
            if not (value.is_floating_point() and bool(torch.isfinite(value)) and float(value) >= 0):
                raise bad(f"state {printable(name)[:60]} is not a finite non-negative step count")
        elif isinstance(value, torch.Tensor):
            if value.shape != p.shape or value.dtype != p.dtype:
                raise bad(f"state {printable(name)[:60]} is {value.dtype} {tuple(value.shape)}, its parameter "
                          f"{p.dtype} {tuple(p.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise bad(f"state {printable(name)[:60]} holds NaN or infinite values")
        elif value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and math.isfinite(value)):
            raise bad(f"state {printable(name)[:60]} is {printable(repr(value))[:40]}, not a finite number")
        state.setdefault(int(idx), {})[key] = value
    try:
        groups = [{**o, "lr": float(g["lr"])} for g, o in zip(saved, own, strict=True)]  # nothing else from the file
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise bad(printable(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]) from e


# ----------------------------------------------------------------------------------------------
# RNG


def get_rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch CPU (and CUDA) as tensors; Python and NumPy as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {
        "python": [version, list(words), gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`get_rng_state`.

    Raises:
        CheckpointError: a saved state that the RNGs refuse.
    """
    try:
        torch.set_rng_state(tensors["torch"])
        if device.type == "cuda" and "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"], device)
        version, words, gauss = meta["python"]
        random.setstate((version, tuple(words), gauss))
        np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
        np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's RNG state is corrupt ({str(e).splitlines()[0]})") from e


# ----------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Write tensor groups (``{"model": {...}, "optim": {...}}``) and JSON ``meta`` to one file atomically."""
    flat: dict[str, torch.Tensor] = {}
    for prefix, tensors in groups.items():
        for name, t in tensors.items():
            # a copy: safetensors refuses tensors that share storage (views, tied weights)
            flat[f"{prefix}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    header = {"format": FORMAT, "meta": json.dumps(finite_json(meta), allow_nan=False)}
    atomic_write_bytes(path, st_save(flat, metadata=header))


def finite_json(v: Any) -> Any:
    """``v`` with every non-finite float (NaN, +-inf) replaced by ``None``: the metadata is strict JSON, which has
    no such numbers, and the test loss of a diverged run is NaN. :func:`check_meta` accepts ``null`` exactly where
    a diverged run can put it (``result.test_loss``) and :func:`load_checkpoint` reads it back as NaN; a NaN
    literal in the file is still refused as the JSON is parsed."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    return v


MAX_META_CHARS = 64 << 20
MAX_STEPS = 1 << 40

_PROGRESS_KEYS = {"epoch", "step", "images", "flops", "wall_time"}
_RESULT_KEYS = {"top1", "test_loss", "flops", "epochs", "steps", "wall_time"}
_NULLABLE_RESULT_KEYS = {"test_loss"}  # not finite (a diverged run): written as null (finite_json)


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """The JSON of a recipes checkpoint, checked field by field before the trainer uses any of it.

    Raises:
        CheckpointError: naming the first field that is missing, mistyped or out of range.
    """

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CheckpointError(f"{where}: corrupt recipes checkpoint: {what}; delete it to restart that stage")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e300

    need(isinstance(meta, dict), "its metadata is not a JSON object")
    need(isinstance(meta.get("stage"), str), "stage is not a string")
    need(is_int(meta.get("steps")) and 0 <= meta["steps"] <= MAX_STEPS, "steps is not a non-negative integer")
    need(isinstance(meta.get("done"), bool), "done is not true/false")
    prog = meta.get("progress")
    need(isinstance(prog, dict) and set(prog) <= _PROGRESS_KEYS, f"progress must map {sorted(_PROGRESS_KEYS)} to "
         "numbers")
    for key in sorted(_PROGRESS_KEYS):
        v = prog.get(key)
        if key in ("epoch", "step", "images"):
            need(is_int(v) and 0 <= v <= MAX_STEPS * (1 << 24), f"progress.{key} is not a non-negative integer "
                 f"(got {printable(repr(v))[:40]})")
        else:
            need(is_num(v) and v >= 0, f"progress.{key} is not a finite non-negative number (got "
                 f"{printable(repr(v))[:40]})")
    need(prog["step"] <= meta["steps"], f"progress.step {prog['step']} is past the stage's {meta['steps']} steps")
    need(is_int(meta.get("world_size")) and 1 <= meta["world_size"] <= 1 << 16, "world_size is not a process count")
    optim = meta.get("optim")
    need(isinstance(optim, dict) and isinstance(optim.get("param_groups"), list)
         and all(isinstance(g, dict) for g in optim["param_groups"]) and isinstance(optim.get("scalars"), dict),
         "optim must hold param_groups (a list of objects) and scalars (an object)")
    rng = meta.get("rng")
    need(isinstance(rng, list) and all(isinstance(r, dict) and isinstance(r.get("python"), list)
                                       and isinstance(r.get("numpy"), list) for r in rng),
         "rng must be a list of per-rank states")
    need(len(rng) == meta["world_size"], f"rng holds {len(rng)} rank states for world_size {meta['world_size']}")
    result = meta.get("result")
    need(result is None or (isinstance(result, dict) and set(result) <= _RESULT_KEYS
                            and all(is_num(v) or (v is None and k in _NULLABLE_RESULT_KEYS)
                                    for k, v in result.items())),
         f"result must be null or map {sorted(_RESULT_KEYS)} to numbers (test_loss: null where it was not finite)")
    need(not meta["done"] or (isinstance(result, dict) and set(result) == _RESULT_KEYS), "a done stage has no result")
    if isinstance(result, dict):
        for key in ("epochs", "steps"):
            if key in result:
                need(is_int(result[key]) and result[key] >= 0, f"result.{key} is not a non-negative integer")
        if "top1" in result:
            need(0 <= result["top1"] <= 100, f"result.top1 {result['top1']!r} is not a percentage")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`. Like :func:`morph.load`, it runs no code and
    follows nothing the file names: it reads the tensors the file holds and JSON checked by :func:`check_meta`.

    Returns:
        ``(groups, meta)`` with tensors on the CPU, grouped by their first name component.

    Raises:
        CheckpointError: the file is not a readable recipes checkpoint.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a morph recipes checkpoint (format {header.get('format')!r}); "
                                      "delete it to restart that stage")
            meta = parse_json(header.get("meta", ""), str(path), "recipes checkpoint metadata", MAX_META_CHARS)
            check_meta(meta, str(path))
            if isinstance(meta["result"], dict) and meta["result"].get("test_loss", 0.0) is None:
                meta["result"]["test_loss"] = float("nan")  # a diverged run (finite_json)
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                if "." not in key:
                    raise CheckpointError(f"{path}: tensor name {key!r} has no group prefix; not a recipes checkpoint")
                prefix, name = key.split(".", 1)
                groups.setdefault(prefix, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}; delete it to restart that "
                              "stage") from e
    if "model" not in groups:
        raise CheckpointError(f"{path}: the recipes checkpoint holds no model tensors; delete it to restart that stage")
    return groups, meta
