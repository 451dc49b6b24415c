"""The ``morph`` command: one module per command, each a thin layer over a library call."""

from __future__ import annotations

import typer

from .bake import bake
from .convert import convert
from .fuse import fuse, grow
from .inspect import inspect
from .train import report, train

app = typer.Typer(
    name="morph",
    help="Grow CNNs the MixtureGrowth way: convert to template mixing, fuse, grow, bake, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(convert)
app.command()(inspect)
app.command()(fuse)
app.command()(grow)
app.command()(bake)
app.command()(train)
app.command()(report)

if __name__ == "__main__":
    app()
