"""``morph fuse`` and ``morph grow``: MixtureGrowth growth of half-width checkpoints."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import morph
from morph.fuse import INIT_MODES

from .common import check_output, out, print_json, status, user_errors

Init = Enum("Init", {m.replace("-", "_"): m for m in INIT_MODES}, type=str)  # type: ignore[misc]


class Growth(str, Enum):
    vertical = "vertical"
    horizontal = "horizontal"


def _summary(model, path: Path) -> dict:
    info = morph.get_info(model)
    return {"output": str(path), "model": info.spec.spec, "kind": info.kind, "width": info.width * info.factor,
            "set_ids": list(info.set_ids), "growth": info.growth, "init": info.init,
            "params": sum(p.numel() for p in model.parameters())}


@user_errors
def fuse(
    a: Annotated[Path, typer.Argument(help="First half-width checkpoint (from morph convert).")],
    b: Annotated[Path, typer.Argument(help="Second half-width checkpoint, another template set.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors.")],
    growth: Annotated[Growth, typer.Option(help="vertical: a row's tiles share a template set; horizontal: a column's.")] = Growth.vertical,
    init: Annotated[Init, typer.Option(help="New tiles' coefficients (paper default: orthogonal; zero = ensemble).")] = Init.orthogonal,
    seed: Annotated[int | None, typer.Option(help="Seed of the new coefficients.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Fuse two half-width template models into the full-width model by tiling (MixtureGrowth)."""
    check_output(output, force)
    with status("fusing", not json_out):
        ma, mb = morph.load(a), morph.load(b)
        model = morph.fuse(ma, mb, growth=growth.value, init=init.value, seed=seed, inplace=True)
        morph.save(model, output)
    s = _summary(model, output)
    if json_out:
        print_json(s)
    else:
        out.print(f"[green]fused[/] {a} + {b} -> {output}: {s['model']} width {s['width']:g}, "
                  f"growth {s['growth']}, init {s['init']}, {s['params']:,} parameters")


@user_errors
def grow(
    a: Annotated[Path, typer.Argument(help="A half-width checkpoint (from morph convert).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors.")],
    init: Annotated[Init, typer.Option(help="New tiles' coefficients (zero keeps the function).")] = Init.orthogonal,
    seed: Annotated[int | None, typer.Option(help="Seed of the new coefficients.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Widen one half-width model, every new tile mixing its own templates (MixtureGrowth w/o fusion)."""
    check_output(output, force)
    with status("growing", not json_out):
        model = morph.grow(morph.load(a), init=init.value, seed=seed, inplace=True)
        morph.save(model, output)
    s = _summary(model, output)
    if json_out:
        print_json(s)
    else:
        out.print(f"[green]grown[/] {a} -> {output}: {s['model']} width {s['width']:g}, init {s['init']}, "
                  f"{s['params']:,} parameters")
