"""Shared CLI plumbing: consoles, the one error wrapper, JSON output, option checks."""

from __future__ import annotations

import importlib
import json
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch.nn as nn
import typer
from rich.console import Console
from rich.status import Status
from rich.text import Text
from typer.core import TyperGroup

import morph
import morph.graph
from morph.fuse import INIT_MODES
from morph.safety import MAX_INPUT_CHANNELS, MAX_INPUT_PIXELS, MAX_INPUT_SIDE
from morph.text import printable

__all__ = [
    "AttentionOption", "CoefficientSeed", "Force", "TrustCode", "Init", "JsonSummary", "attention_mode", "MorphGroup", "count_params", "bounded", "err", "fail", "grown_summary", "out", "parse_size",
    "print_json", "status",
]

out = Console()
err = Console(stderr=True)

# Recent typer releases vendor click as typer._click, older ones use click: reach click's UsageError through
# typer.BadParameter, which is public in both.
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)
UsageError: type[Exception] = _click_exceptions.UsageError

# fvcore (imported by morph.flops) calls torch.jit.script at import time; torch >= 2.10 warns about it.
_FVCORE_WARNING = r"`torch\.jit\.script` is deprecated"


# Choices of --init, in the library's order (orthogonal, orthogonal-official, random, random-uniform, copy, zero).
Init = Enum("Init", {m.replace("-", "_"): m for m in INIT_MODES}, type=str)  # type: ignore[misc]

# options shared by the commands that write a checkpoint
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
JsonSummary = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of text.")]
TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="Let a checkpoint of a model built by a package.module:callable import and call that "
    "callable. Off by default: reading a checkpoint runs no code the file names. Only for files you trust.")]
CoefficientSeed = Annotated[int | None, typer.Option(help="Seed of the new coefficients (default: random).",
                                                     show_default=False)]

# --attention: how attention projections change width (morph.graph.attention_width)
Attention = Enum("Attention", {m: m for m in morph.graph.ATTENTION_WIDTHS}, type=str)  # type: ignore[misc]
AttentionOption = Annotated[Attention | None, typer.Option(
    "--attention", help="Attention models (ViT, Swin...): heads (the number of heads scales, each head keeps its "
    "size; DeiT-Tiny 3 heads -> DeiT-Small 6) or head_dim (every head keeps its place, its size scales; for "
    "models whose heads cannot halve, e.g. 3 heads). A checkpoint records the mode it was converted in; "
    "fuse and grow use that one. [default: heads, or the checkpoint's]", show_default=False)]


@contextmanager
def attention_mode(option: Any, *models: nn.Module) -> Iterator[None]:
    """Analyses inside run in ``--attention``'s mode; a loaded model that records another mode is refused (its
    heads were cut the other way: fusing or growing it in this mode would not be the model it is)."""
    if option is None:
        yield
        return
    mode = option.value
    for m in models:
        info = morph.get_info(m)
        made = info.extra.get("attention_width") if info is not None and info.extra else None
        if made is not None and made != mode:
            raise morph.MorphError(f"--attention {mode}: the checkpoint was made with attention width {made!r}; "
                                   f"drop --attention or pass --attention {made}")
    with morph.graph.attention_width(mode):
        yield


INIT_HELP = ("Coefficients of the new tiles: orthogonal (paper; orthogonal to the vectors mixing the same bank), "
             "orthogonal-official (official code), random (N(0,1)), random-uniform (U[0,1)), copy (the diagonal "
             "tile's plus noise) or zero ({zero}).")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` as one line on stderr and return the exit to raise.

    The message is printed as text: whitespace runs become one space (one line, whatever it holds), any
    other control or format character (a terminal escape sequence from a file's metadata, a path) is shown
    escaped (:func:`morph.text.printable`), and rich markup in it (``[/]``, ``[link=...]``) is not parsed.
    """
    message = printable(" ".join(str(message).split()))
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False, markup=False)
    return typer.Exit(code=code)


class MorphGroup(TyperGroup):
    """The ``morph`` group: the one place where user errors become ``error: ...`` and exit code 2.

    Catches :class:`morph.MorphError` (bad model names, checkpoints, fusion pairs), click usage errors
    raised while parsing a command's arguments or by its option checks (``typer.BadParameter``), and
    file-system errors on a named path. Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_FVCORE_WARNING, category=FutureWarning)
                return super().invoke(ctx)
        except morph.MorphError as e:
            raise fail(str(e) or type(e).__name__) from None
        except UsageError as e:
            sub = getattr(e, "ctx", None)
            if sub is not None:
                path = sub.command_path
            else:  # raised by a command's own option checks
                path = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
            raise fail(f"{e.format_message().rstrip('.')}; see '{path} --help'") from None
        except OSError as e:
            if e.filename is None:  # not about a path the user gave (e.g. a closed pipe): not ours to word
                raise
            raise fail(f"{printable(e.filename)}: {e.strerror or e}") from None


def bounded(low: float, high: float, *, low_open: bool = False):
    """A typer callback: the option's number is finite and within ``[low, high]`` (``(low, high]`` with
    ``low_open``); NaN, infinities and absurd sizes are refused before any work, with the option named."""
    def check(ctx: typer.Context, param: Any, value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            lo = f"{'>' if low_open else '>='} {low:g}"
            raise typer.BadParameter(f"{value!r} is not a number {lo} and <= {high:g}")
        return value
    return check


def parse_size(text: str | None) -> tuple[int, int, int] | None:
    """``3,224,224`` (or ``3x224x224``, or ``224`` for 3x224x224) -> ``(3, 224, 224)``."""
    if text is None:
        return None
    bad = typer.BadParameter(f"expected C,H,W such as 3,224,224 (or one size such as 224), got {text!r}",
                             param_hint="'--input-size'")
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise bad from None
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    if len(parts) != 3 or min(parts) < 1:
        raise bad
    c, h, w = parts
    if c > MAX_INPUT_CHANNELS or max(h, w) > MAX_INPUT_SIDE or c * h * w > MAX_INPUT_PIXELS:
        raise typer.BadParameter(f"{text!r} is too large (at most {MAX_INPUT_CHANNELS} channels, sides of "
                                 f"{MAX_INPUT_SIDE}, {MAX_INPUT_PIXELS:,} values)", param_hint="'--input-size'")
    return c, h, w


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, a bank shared by two layers counted once."""
    return sum(p.numel() for p in model.parameters())


def grown_summary(model: nn.Module, path: Path) -> dict[str, Any]:
    """JSON summary of a fused or grown model written to ``path``."""
    info = morph.get_info(model)
    return {
        "output": str(path), "model": info.spec.spec, "kind": info.kind, "width": info.width * info.factor,
        "set_ids": list(info.set_ids), "growth": info.growth, "init": info.init, "params": count_params(model),
    }


def print_json(data: Any) -> None:
    """One JSON document on stdout (nothing else goes to stdout under ``--json``)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


class _StatusText:
    """The spinner's message, updated as text: a path holding ``[/]`` or an escape sequence is shown as it is."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def update(self, message: str) -> None:
        self._status.update(Text(printable(message)))


@contextmanager
def status(message: str) -> Iterator[_StatusText]:
    """A rich spinner on stderr while long work runs (silent when stderr is not a terminal). Messages are
    text, never markup (they name files)."""
    with err.status(Text(printable(message))) as s:
        yield _StatusText(s)
