"""Metrics as JSON lines in ``RUN_DIR/metrics.jsonl``.

Each record is one JSON object with ``kind`` (``step`` or ``epoch``), ``seed``, ``method``, ``stage``,
``stage_key`` (the stage's directory under the run dir), ``epoch`` (1-based), ``step``, ``loss``, ``top1``, ``lr``, ``flops`` (cumulative training FLOPs of the method),
``flops_norm``, ``images_per_s`` and ``wall_time``; epoch records add ``test_loss`` and ``test_top1``
when the epoch was evaluated. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


MAX_METRICS_BYTES = 64 << 20  # a 200-epoch CIFAR run logs about 1 MiB, a 90-epoch ImageNet run a few MiB


def _parse(line: bytes | str) -> dict[str, Any] | None:
    """One record, or ``None`` for a line that is not a JSON object (cut short by a crash, or hostile)."""
    try:
        rec = json.loads(line)  # NaN stays: a diverged loss is a record too (the report plots finite values only)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a metrics file read as data: a regular file, never through a symbolic link, at most
    :data:`MAX_METRICS_BYTES`, streamed (one line in memory at a time)."""
    from morph.inputs import open_regular

    with open_regular(path, limit=MAX_METRICS_BYTES, follow=False, what="metrics") as f:
        yield from f


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (an empty list if it does not exist). A line that is not a JSON object
    (cut short by a crash) is skipped, as :meth:`MetricsLog.truncate` drops it.

    Raises:
        morph.inputs.InputError: the file is a folder, a link, a FIFO or larger than 64 MiB.
    """
    if not os.path.lexists(path):
        return []
    return [rec for rec in map(_parse, _lines(path)) if rec is not None]


class MetricsLog:
    """Appends records to a JSON-lines file.

    Args:
        path: the file (created on first write).
        enabled: ``False`` on ranks other than 0: every call is a no-op.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # appended in place (a crash loses at most the line being written), never through a symbolic link
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, stage: str, step: int) -> None:
        """Drop the records of ``stage`` after ``step``, and lines cut short: they come from work
        lost in a crash, about to be redone from the checkpoint at ``step``."""
        if not self.enabled or not os.path.lexists(self.path):
            return
        lines = [line.rstrip(b"\r\n").decode("utf-8", "replace") for line in _lines(self.path) if line.strip()]
        keep = []
        for line in lines:
            rec = _parse(line)
            if rec is None:
                continue
            later = isinstance(rec.get("step"), (int, float)) and rec["step"] > step
            if not (rec.get("stage_key") == stage and later):
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
