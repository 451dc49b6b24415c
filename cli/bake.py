"""``morph bake``: a template checkpoint -> the plain model, its generated weights materialized."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import morph
from morph.info import MorphInfo
from morph.text import markup_safe

from .common import Force, JsonSummary, TrustCode, count_params, out, print_json, status
from .outputs import check_output

__all__ = ["bake", "load_hint"]


def load_hint(info: MorphInfo, path: Path) -> str:
    """Python that loads the baked file into the stock model (full width) or through morph (other widths)."""
    spec = info.spec
    if info.width != 1 or spec is None:
        return f"model = morph.load({str(path)!r})"
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(spec.kwargs.items()))
    if spec.source == "timm":
        ctor = f"timm.create_model({', '.join(filter(None, (repr(spec.name), args)))})"
    elif spec.source == "torchvision":
        ctor = f"torchvision.models.get_model({', '.join(filter(None, (repr(spec.name), args)))})"
    else:
        module, fn = spec.name.split(":", 1)
        ctor = f"{module}.{fn}({args})"
    return f"model = {ctor}; model.load_state_dict(safetensors.torch.load_file({str(path)!r}))"


def bake(
    file: Annotated[Path, typer.Argument(help="A half, fused or grown morph checkpoint.", metavar="FILE",
                                         exists=True, dir_okay=False, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors of the plain model.",
                                         show_default=False)],
    force: Force = False,
    json_out: JsonSummary = False,
    trust_code: TrustCode = False,
) -> None:
    """Materialize the generated weights: a plain model with the stock model's state_dict keys.

    A model fused or grown from width-0.5 halves bakes to the stock full-width model: OUT loads with
    load_state_dict(safetensors.torch.load_file(OUT), strict=True) into timm.create_model(NAME) or
    torchvision.models.get_model(NAME) (same num_classes), and into
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT)) at the default num_classes.
    Other widths load with morph.load(OUT).

    Example: morph bake resnet50-fused.safetensors -o resnet50-fused-plain.safetensors
    """
    check_output(output, force)
    with status(f"loading {file}") as s:
        model = morph.load(file, trust_code=trust_code)
        s.update("baking")
        baked = morph.bake(model)
        s.update(f"saving {output}")
        morph.save(baked, output)
    info = morph.get_info(baked)
    summary = {
        "output": str(output), "model": info.spec.spec, "kwargs": info.spec.kwargs, "kind": info.kind,
        "width": info.width, "from_kind": morph.get_info(model).kind, "params": count_params(baked),
        "tensors": len(baked.state_dict()), "load_with": load_hint(info, output),
    }
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]baked[/] {markup_safe(file)} ({summary['from_kind']}) -> [bold]{markup_safe(output)}[/]",
              highlight=False)
    out.print(f"  plain {summary['model']} at width {info.width:g}, {summary['params']:,} parameters in "
              f"{summary['tensors']} tensors", highlight=False, markup=False)
    out.print(f"  load it with: {summary['load_with']}", highlight=False, markup=False, soft_wrap=True)
