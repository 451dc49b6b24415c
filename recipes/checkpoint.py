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
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

__all__ = [
    "FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
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
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


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
        ValueError: a missing, unexpected or mis-shaped tensor, naming the checkpoint ``where``.
    """
    own = model_tensors(model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(
            f"checkpoint {where} does not fit the model ({what}); was the config changed? use a new --out-dir"
        )
    with torch.no_grad():
        for name, t in own.items():
            src = tensors[name]
            if src.shape != t.shape:
                raise ValueError(f"checkpoint {where}: {name} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
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


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


# ----------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Write tensor groups (``{"model": {...}, "optim": {...}}``) and JSON ``meta`` to one file atomically."""
    flat: dict[str, torch.Tensor] = {}
    for prefix, tensors in groups.items():
        for name, t in tensors.items():
            # a copy: safetensors refuses tensors that share storage (views, tied weights)
            flat[f"{prefix}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    header = {"format": FORMAT, "meta": json.dumps(meta)}
    atomic_write_bytes(path, st_save(flat, metadata=header))


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(groups, meta)`` with tensors on the CPU, grouped by their first name component.

    Raises:
        ValueError: the file is not a readable recipes checkpoint.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a morph recipes checkpoint (format {header.get('format')!r})")
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                prefix, name = key.split(".", 1)
                groups.setdefault(prefix, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}; delete it to restart that stage") from e
    return groups, json.loads(header["meta"])
