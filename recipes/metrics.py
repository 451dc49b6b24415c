"""Metrics as JSON lines in ``RUN_DIR/metrics.jsonl``.

Each record is one JSON object with ``kind`` (``step`` or ``epoch``), ``seed``, ``method``, ``stage``,
``stage_key`` (the stage's directory under the run dir), ``epoch`` (1-based), ``step``, ``loss``, ``top1``, ``lr``, ``flops`` (cumulative training FLOPs of the method),
``flops_norm``, ``images_per_s`` and ``wall_time``; epoch records add ``test_loss`` and ``test_top1``
when the epoch was evaluated. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from morph.inputs import read_text

from .checkpoint import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


MAX_METRICS_BYTES = 1 << 30  # a 200-epoch run logs a few MiB


def _parse(line: str) -> dict[str, Any] | None:
    """One record, or ``None`` for a line that is not a JSON object (cut short by a crash, or hostile)."""
    try:
        rec = json.loads(line)  # NaN stays: a diverged loss is a record too (the report plots finite values only)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(path: Path, *, follow: bool = False) -> list[dict[str, Any]]:
    """All records of a metrics file (an empty list if it does not exist). A line that is not a JSON object
    (cut short by a crash) is skipped, as :meth:`MetricsLog.truncate` drops it. The file is read as data
    (:func:`morph.inputs.read_text`): a regular file, not a symbolic link, at most 1 GiB.

    Raises:
        morph.inputs.InputError: the file is a folder, a link, a FIFO, too large or not UTF-8.
    """
    if not os.path.lexists(path):
        return []
    text = read_text(path, limit=MAX_METRICS_BYTES, follow=follow, what="metrics")
    return [rec for rec in map(_parse, text.splitlines()) if rec is not None]


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
        text = read_text(self.path, limit=MAX_METRICS_BYTES, follow=False, what="metrics")
        lines = [line for line in text.splitlines() if line.strip()]
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
