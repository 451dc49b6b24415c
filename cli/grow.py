"""``morph grow``: one checkpoint -> a wider model, by any registered growth method.

A half-width template checkpoint grows the MixtureGrowth way without fusion (the default); a plain
checkpoint (``morph convert --plain``, ``morph bake``) grows with ``--method random | net2net | gradmax |
firefly``. ``gradmax`` and ``firefly`` read one batch of images from an ImageFolder directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import morph
from morph.growth import get_growth_method, list_growth_methods
from morph.images import image_folder
from morph.safety import MAX_WIDTH
from morph.text import markup_safe, printable

from .common import (
    INIT_HELP,
    AttentionOption,
    CoefficientSeed,
    Force,
    Init,
    JsonSummary,
    TrustCode,
    attention_mode,
    bounded,
    count_params,
    grown_summary,
    out,
    print_json,
    status,
)
from .outputs import check_output

__all__ = ["grow", "load_image_batch"]

# ImageNet statistics, the normalization timm and torchvision models are trained with by default
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image_batch(folder: Path, input_size: tuple[int, ...], batch_size: int, seed: int,
                     num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` images drawn (seeded) from an ImageFolder directory, resized to ``input_size``
    (C, H, W), ImageNet-normalized, with their class indices."""
    from torchvision import transforms

    c, h, w = input_size
    tf = transforms.Compose([
        transforms.Resize((h, w)),
        transforms.Grayscale(1) if c == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.ToTensor(),
        transforms.Normalize(_MEAN[:c] if c <= 3 else [0.5] * c, _STD[:c] if c <= 3 else [0.5] * c),
    ])
    try:
        ds = image_folder(folder, transform=tf)  # a corrupt image names its file; looping links cannot hang
    except (FileNotFoundError, RuntimeError) as e:
        raise morph.MorphError(f"--data {printable(folder)}: not an ImageFolder directory (one folder of images per class): "
                               f"{str(e).splitlines()[0]}") from None
    if num_classes is not None and len(ds.classes) > num_classes:
        raise morph.MorphError(f"--data {printable(folder)} has {len(ds.classes)} classes, the model {num_classes} outputs")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:batch_size]
    xs, ys = zip(*(ds[int(i)] for i in order), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _num_classes(model: torch.nn.Module, input_size: tuple[int, ...]) -> int | None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(iter(model.parameters()))
            y = model(torch.zeros((1, *input_size), dtype=p.dtype))
        y = y[0] if isinstance(y, (tuple, list)) else y
        return int(y.shape[-1])
    finally:
        model.train(was)


def grow(
    a: Annotated[Path, typer.Argument(help="A checkpoint: a half-width template model (from morph convert), or a "
                                      "plain one (morph convert --plain, morph bake).", metavar="IN",
                                      exists=True, dir_okay=False, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors of the grown model.",
                                         show_default=False)],
    method: Annotated[str | None, typer.Option(
        help="Growth method: " + ", ".join(list_growth_methods()) + " (default: mixturegrowth for a template "
        "half; a plain checkpoint needs one).", show_default=False)] = None,
    width: Annotated[float, typer.Option(help="Width ratio of the grown model to IN (mixturegrowth: 2; at most "
                                         f"{MAX_WIDTH:g}).", callback=bounded(1, MAX_WIDTH))] = 2.0,
    data: Annotated[Path | None, typer.Option(help="ImageFolder directory (one folder of images per class) for "
                                              "gradmax and firefly; images are resized to the checkpoint's input size.",
                                              exists=True, file_okay=False, show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images read from --data (one batch).", min=1, max=4096)] = 32,
    init: Annotated[Init | None, typer.Option(help="mixturegrowth only. " + INIT_HELP.format(
        zero="the grown model computes IN's function") + " [default: orthogonal]", show_default=False)] = None,
    seed: CoefficientSeed = None,
    attention: AttentionOption = None,
    force: Force = False,
    trust_code: TrustCode = False,
    json_out: JsonSummary = False,
) -> None:
    """Grow a checkpoint to a wider model with a growth method (MixtureGrowth without fusion for a template half).

    Examples:
      morph grow resnet50-half-seed1.safetensors -o resnet50-grown.safetensors --init zero
      morph grow resnet50-half-plain.safetensors -o resnet50-gradmax.safetensors --method gradmax --data imgs/
    """
    check_output(output, force)
    info = morph.read_info(a)[0]
    template = info.kind != "plain"
    name = method or ("mixturegrowth" if template else None)
    if name is None:
        raise typer.BadParameter(f"{a} is a plain checkpoint: choose a growth method ({', '.join(list_growth_methods())})",
                                 param_hint="'--method'")
    cls = get_growth_method(name)
    if init is not None and name != "mixturegrowth":
        raise typer.BadParameter(f"--init sets the coefficients of mixturegrowth's new tiles, not {name}'s",
                                 param_hint="'--init'")
    if cls.needs_data and data is None:
        raise typer.BadParameter(f"{name} reads a batch of images: pass --data DIR (an ImageFolder directory)",
                                 param_hint="'--data'")
    options: dict[str, Any] = {}
    if name == "mixturegrowth":
        options = {"init": (init or Init["orthogonal"]).value, "inplace": True}
    with status(f"loading {a}") as s:
        model = morph.load(a, trust_code=trust_code)
        batch = None
        if data is not None and cls.needs_data:
            s.update(f"reading {batch_size} images from {data}")
            batch = load_image_batch(data, info.input_size, batch_size, seed or 0,
                                     _num_classes(model, info.input_size))
        s.update(f"growing with {name}")
        with attention_mode(attention, model):
            grown = morph.grow(model, name, width, data=batch, seed=seed, **options)
        s.update(f"saving {output}")
        morph.save(grown, output)
    if template:
        summary = grown_summary(grown, output)
    else:
        gi = morph.get_info(grown)
        summary = {"output": str(output), "model": gi.spec.spec, "kind": gi.kind, "method": name, "width": gi.width,
                   "from_width": info.width, "growth": gi.extra.get("growth", {}), "params": count_params(grown),
                   "groups": getattr(grown, "growth_report", [])}
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]grown[/] {markup_safe(a)} -> [bold]{markup_safe(output)}[/]", highlight=False)
    if template:
        out.print(f"  {summary['model']} at width {summary['width']:g}, template set {summary['set_ids'][0]}, "
                  f"init {summary['init']}, {summary['params']:,} parameters", highlight=False, markup=False)
        return
    g = summary["growth"]
    opts = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("method", "from_width", "rules"))
    out.print(f"  {summary['model']} width {info.width:g} -> {summary['width']:g} by {name} ({opts}), "
              f"{summary['params']:,} parameters", highlight=False, markup=False)
    out.print(f"  channel groups grown: {g.get('rules', '')}", highlight=False, markup=False)
