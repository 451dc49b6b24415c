"""The ``morph`` command: one module per command, each a thin layer over the library.

User errors (:class:`morph.MorphError`, bad options, unreadable paths) are turned into one ``error: ...``
line on stderr and exit code 2 in one place, :class:`~.common.MorphGroup`.
"""

from __future__ import annotations

import typer

from .bake import bake
from .build_kernels import build_kernels
from .cka import cka_command
from .common import MorphGroup
from .convert import convert
from .fuse import fuse
from .grow import grow
from .inspect import inspect
from .train import report, train

__all__ = ["app"]

app = typer.Typer(
    cls=MorphGroup,
    name="morph",
    help="Grow CNNs the MixtureGrowth way: convert a model to half-width template mixing, fuse two halves (or "
    "grow one) to full width, bake to a plain timm/torchvision model, inspect any checkpoint. Every command "
    "takes --json.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("convert")(convert)
app.command("inspect")(inspect)
app.command("fuse")(fuse)
app.command("grow")(grow)
app.command("bake")(bake)
app.command("train")(train)
app.command("report")(report)
app.command("build-kernels")(build_kernels)
app.command("cka")(cka_command)

if __name__ == "__main__":
    app()
