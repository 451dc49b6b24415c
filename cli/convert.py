"""``morph convert``: a model name -> half-width template-mixing checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import morph

from .common import check_output, out, parse_size, print_json, status, user_errors


class Share(str, Enum):
    none = "none"
    consecutive = "consecutive"


def default_output(name: str, width: float, seed: int | None) -> Path:
    stem = name.split(":")[-1].split("/")[-1].replace(".", "_")
    tag = "half" if width == 0.5 else f"w{width:g}"
    return Path(f"{stem}-{tag}" + (f"-s{seed}" if seed is not None else "") + ".safetensors")


@user_errors
def convert(
    name: Annotated[str, typer.Argument(help="Model: timm/NAME, torchvision/NAME, NAME (timm first) or pkg.module:fn.")],
    half: Annotated[bool, typer.Option("--half", help="Half width (same as --width 0.5; the default).")] = False,
    width: Annotated[float, typer.Option(help="Width multiplier of the template model.")] = 0.5,
    templates: Annotated[int, typer.Option(help="Templates per bank (paper: 2).")] = 2,
    share: Annotated[Share, typer.Option(help="none: a bank per layer; consecutive: same-shape neighbours share one.")] = Share.none,
    num_classes: Annotated[int | None, typer.Option(help="Number of classes (model default if omitted).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of templates and coefficients; also names the template set.")] = None,
    set_id: Annotated[str | None, typer.Option(help="Template-set id (default: from --seed, else random).")] = None,
    train_edge_coefficients: Annotated[bool, typer.Option(help="Train the stem's and classifier's coefficients (official CIFAR code).")] = False,
    input_size: Annotated[str | None, typer.Option(help="Input C,H,W used for tracing (default: the model's).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors (default: NAME-half[-sSEED].safetensors).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of text.")] = False,
) -> None:
    """Convert a CNN to a reduced-width template-mixing model (W = sum_k a_k T_k) and save it."""
    if half:
        width = 0.5
    path = output or default_output(name, width, seed)
    check_output(path, force)
    size = parse_size(input_size)
    with status(f"converting {name}", not json_out):
        base = morph.build_model(name, num_classes=num_classes)
        model = morph.convert(base, width=width, templates=templates, share=share.value, seed=seed, set_id=set_id,
                              train_edge_coefficients=train_edge_coefficients, input_size=size)
        morph.save(model, path)
        reloaded = morph.load(path)
    info = morph.get_info(reloaded)
    n_base = sum(p.numel() for p in base.parameters())
    n_new = sum(p.numel() for p in reloaded.parameters())
    summary = {
        "output": str(path), "model": info.spec.spec, "resolved_from": base.morph_spec.source, "width": width,
        "templates": templates, "share": share.value, "set_id": info.set_ids[0], "params": n_new,
        "params_original": n_base, "params_ratio": n_new / n_base, "reloaded": True,
    }
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]converted[/] {info.spec.spec} ({base.morph_spec.source}) -> {path}")
    out.print(f"  width {width:g}, {templates} templates/bank, share={share.value}, template set {info.set_ids[0]!r}")
    out.print(f"  parameters {n_new:,} vs {n_base:,} original ({n_new / n_base:.3f}x); reloaded and checked")
