"""Process-group setup: one code path for ``python`` and ``torchrun``.

Under ``torchrun`` (``RANK`` set in the environment) the process joins a process group, gloo on CPU
and nccl on GPU, and wraps models in DistributedDataParallel. Under plain ``python`` it is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import RecipeError

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "broadcast_buffers", "setup", "teardown"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs.

    Attributes:
        rank: global rank (0 under plain ``python``).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this rank trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main rank logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RecipeError("run.device=cuda but CUDA is not available; use run.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun``; pick the device.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, _pick_device(device, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process); returns ``t``."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Without SyncBatchNorm each rank's running statistics drift apart after its last batch; evaluation
    and checkpoints use rank 0's, so every rank must evaluate that same model.
    """
    if not dist.is_initialized():
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)
