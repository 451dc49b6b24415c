"""Shared CLI plumbing: consoles, errors, JSON output, option parsing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

import morph

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one line to stderr and return the exit (code 2) to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn morph's user errors (and bad paths) into one stderr line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (morph.MorphError, FileNotFoundError, ValueError) as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper  # type: ignore[return-value]


def parse_size(text: str | None) -> tuple[int, ...] | None:
    """``3,224,224`` or ``224`` -> ``(3, 224, 224)``."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--input-size must be C,H,W or H (e.g. 3,224,224), got {text!r}") from None
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"--input-size must be C,H,W or H (e.g. 3,224,224), got {text!r}")
    return tuple(parts)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def status(message: str, enabled: bool = True):
    """A rich spinner on stderr for long work."""
    if not enabled:
        yield
        return
    with err.status(message):
        yield


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")
    if path.suffix != ".safetensors":
        raise ValueError(f"output {path} must end in .safetensors")
