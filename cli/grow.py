"""``morph grow``: one half-width checkpoint -> the full-width model (MixtureGrowth without fusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

import morph

from .common import (
    INIT_HELP,
    CoefficientSeed,
    Force,
    Init,
    JsonSummary,
    TrustCode,
    check_output,
    grown_summary,
    out,
    print_json,
    status,
)

__all__ = ["grow"]


def grow(
    a: Annotated[Path, typer.Argument(help="A half-width checkpoint (from morph convert).", metavar="A",
                                      exists=True, dir_okay=False, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors of the grown model.",
                                         show_default=False)],
    init: Annotated[Init, typer.Option(help=INIT_HELP.format(zero="the grown model computes A's function"))] = Init[
        "orthogonal"],
    seed: CoefficientSeed = None,
    force: Force = False,
    json_out: JsonSummary = False,
    trust_code: TrustCode = False,
) -> None:
    """Widen one half-width template model to full width, every new tile mixing A's own templates.

    Example: morph grow resnet50-half-seed1.safetensors -o resnet50-grown.safetensors --init zero
    """
    check_output(output, force)
    with status(f"loading {a}") as s:
        ma = morph.load(a, trust_code=trust_code)
        s.update("growing")
        model = morph.grow(ma, init=init.value, seed=seed, inplace=True)
        s.update(f"saving {output}")
        morph.save(model, output)
    summary = grown_summary(model, output)
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]grown[/] {escape(str(a))} -> [bold]{escape(str(output))}[/]", highlight=False)
    out.print(f"  {summary['model']} at width {summary['width']:g}, template set {summary['set_ids'][0]}, "
              f"init {summary['init']}, {summary['params']:,} parameters", highlight=False, markup=False)
