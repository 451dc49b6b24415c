"""Metrics as JSON lines in ``RUN_DIR/metrics.jsonl``.

Each record is one JSON object with ``kind`` (``step`` or ``epoch``), ``seed``, ``method``, ``stage``,
``stage_key`` (the stage's directory under the run dir), ``epoch`` (1-based), ``step``, ``loss``, ``top1``, ``lr``, ``flops`` (cumulative training FLOPs of the method),
``flops_norm``, ``images_per_s`` and ``wall_time``; epoch records add ``test_loss`` and ``test_top1``
when the epoch was evaluated. Only rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (an empty list if it does not exist). A line that is not JSON (cut
    short by a crash) is skipped, as :meth:`MetricsLog.truncate` drops it."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, stage: str, step: int) -> None:
        """Drop the records of ``stage`` after ``step``, and lines cut short: they come from work
        lost in a crash, about to be redone from the checkpoint at ``step``."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (rec.get("stage_key") == stage and rec.get("step", 0) > step):
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
