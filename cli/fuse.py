"""``morph fuse``: two half-width checkpoints -> the full-width model (MixtureGrowth fusion by tiling)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import morph
from morph.fuse import GROWTH_MODES
from morph.text import markup_safe

from .common import (
    INIT_HELP,
    AttentionOption,
    CoefficientSeed,
    Force,
    Init,
    JsonSummary,
    TrustCode,
    attention_mode,
    grown_summary,
    out,
    print_json,
    status,
)
from .outputs import check_output

__all__ = ["fuse"]

Growth = Enum("Growth", {m: m for m in GROWTH_MODES}, type=str)  # type: ignore[misc]

_HALF = dict(exists=True, dir_okay=False, show_default=False)  # typer checks these before the command runs


def fuse(
    a: Annotated[Path, typer.Argument(help="First half-width checkpoint (from morph convert).", metavar="A", **_HALF)],
    b: Annotated[Path, typer.Argument(help="Second half-width checkpoint: same model and options, another "
                                      "template set (convert it with another --seed).", metavar="B", **_HALF)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors of the fused model.",
                                         show_default=False)],
    growth: Annotated[Growth, typer.Option(help="vertical: the tiles of one output row mix one template set; "
                                           "horizontal: the tiles of one input column do.")] = Growth["vertical"],
    init: Annotated[Init, typer.Option(help=INIT_HELP.format(zero="the fused model averages A and B"))] = Init[
        "orthogonal"],
    seed: CoefficientSeed = None,
    attention: AttentionOption = None,
    force: Force = False,
    json_out: JsonSummary = False,
    trust_code: TrustCode = False,
) -> None:
    """Fuse two half-width template models into the full-width model by tiling (MixtureGrowth).

    Every weight becomes a 2x2 grid of tiles: A's and B's layers on the diagonal, new tiles mixing A's or B's
    templates off it. Example: morph fuse resnet50-half-seed1.safetensors resnet50-half-seed2.safetensors
    -o resnet50-fused.safetensors
    """
    check_output(output, force)
    with status(f"loading {a}") as s:
        ma = morph.load(a, trust_code=trust_code)
        s.update(f"loading {b}")
        mb = morph.load(b, trust_code=trust_code)
        s.update("fusing")
        # inplace: the fused model takes over the loaded templates instead of copying them.
        with attention_mode(attention, ma, mb):
            model = morph.fuse(ma, mb, growth=growth.value, init=init.value, seed=seed, inplace=True)
        s.update(f"saving {output}")
        morph.save(model, output)
    summary = grown_summary(model, output)
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]fused[/] {markup_safe(a)} + {markup_safe(b)} -> [bold]{markup_safe(output)}[/]",
              highlight=False)
    out.print(f"  {summary['model']} at width {summary['width']:g}, template sets {' + '.join(summary['set_ids'])}, "
              f"growth {summary['growth']}, init {summary['init']}, {summary['params']:,} parameters",
              highlight=False, markup=False)
