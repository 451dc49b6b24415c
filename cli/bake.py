"""``morph bake``: a template checkpoint -> the plain timm/torchvision model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import morph

from .common import check_output, out, print_json, status, user_errors


@user_errors
def bake(
    file: Annotated[Path, typer.Argument(help="A half, fused or grown morph checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors of the plain model.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Materialize generated weights: the output has the stock model's state_dict keys and shapes.

    A baked fused model loads into the stock model, e.g.
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), num_classes=N).
    """
    check_output(output, force)
    with status("baking", not json_out):
        model = morph.load(file)
        baked = morph.bake(model)
        morph.save(baked, output)
    info = morph.get_info(baked)
    s = {"output": str(output), "model": info.spec.spec, "width": info.width,
         "params": sum(p.numel() for p in baked.parameters()), "keys": len(baked.state_dict())}
    if json_out:
        print_json(s)
    else:
        out.print(f"[green]baked[/] {file} -> {output}: plain {s['model']} at width {s['width']:g}, "
                  f"{s['params']:,} parameters")
