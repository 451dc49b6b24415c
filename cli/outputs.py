"""The CLI's side of the output rule (:mod:`morph.paths`): an output option refused before any work, worded as
a bad option (``error: Invalid value for '-o' / '--output': ...``)."""

from __future__ import annotations

from pathlib import Path

import typer

from morph.paths import OutputError
from morph.paths import check_output as _check_output

__all__ = ["check_output"]


def check_output(path: Path, force: bool, suffix: str | tuple[str, ...] | None = ".safetensors",
                 param_hint: str = "'-o' / '--output'") -> Path:
    """Refuse an output that has the wrong suffix, is a symbolic link (even with ``--force``), a folder or
    a special file, or exists (unless ``--force``)."""
    try:
        return _check_output(path, force=force, suffix=suffix, option="")
    except OutputError as e:
        raise typer.BadParameter(str(e), param_hint=param_hint) from None
