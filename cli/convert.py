"""``morph convert``: a model name -> a reduced-width template-mixing checkpoint, saved and verified."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import typer
from rich.markup import escape

import morph
from morph.convert import SHARE_MODES
from morph.safety import MAX_KWARG_NUMBER, MAX_TEMPLATES, MAX_WIDTH
from morph.templates import mixed_layers

from .common import (
    AttentionOption,
    Force,
    JsonSummary,
    attention_mode,
    bounded,
    count_params,
    fail,
    out,
    parse_size,
    print_json,
    status,
)
from .outputs import check_output

__all__ = ["convert", "default_output", "parse_budget"]

Share = Enum("Share", {m: m for m in SHARE_MODES}, type=str)  # type: ignore[misc]


def default_output(name: str, width: float, seed: int | None, plain: bool = False,
                   budget: str | None = None) -> Path:
    """``resnet50`` -> ``resnet50-half.safetensors``; ``timm/resnet18``, width 0.25, seed 1 ->
    ``resnet18-w0.25-seed1.safetensors``; with ``plain``, ``resnet50-half-plain.safetensors``; shared banks
    (``--share learned``) under ``--budget 2M`` -> ``resnet50-shared-2M.safetensors``."""
    stem = name.strip().split(":")[-1].split("/")[-1]
    tag = "half" if width == 0.5 else f"w{width:g}"
    if budget is not None:
        tag = ("shared" if width == 1 else f"shared-w{width:g}") + ("" if not budget else f"-{budget.strip()}")
    return Path(f"{stem}-{tag}" + ("-plain" if plain else "") + (f"-seed{seed}" if seed is not None else "")
                + ".safetensors")


def _first(y: object) -> torch.Tensor:
    """A model's first output: itself, the first of a tuple, or a segmentation model's ``out``."""
    while isinstance(y, (tuple, list, dict)):
        y = next(iter(y.values())) if isinstance(y, dict) else y[0]
    return y  # type: ignore[return-value]


def parse_budget(text: str | None) -> int | None:
    """``2M`` -> 2000000, ``500K``/``500k`` -> 500000, ``1.5e6`` -> 1500000, ``1G``; ``None`` -> ``None``."""
    if text is None:
        return None
    t = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value < 1e15 and value == int(value)):
        raise typer.BadParameter(f"expected a number of template parameters such as 2M, 500K or 1500000, got {text!r}",
                                 param_hint="'--budget'")
    return int(value)


def verify(model: nn.Module, reloaded: nn.Module, input_size: tuple[int, ...]) -> dict:
    """Compare the reloaded model with the one that was saved: every tensor, and one forward pass."""
    a, b = model.state_dict(), reloaded.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        y, y2 = _first(model(x)), _first(reloaded(x))
        diff = float((y - y2).abs().max())
    # identical tensors give identical outputs on CPU; the tolerance only absorbs nondeterministic kernels
    ok = same and diff <= 1e-5 * max(1.0, float(y.abs().max()))
    return {"tensors": len(a), "tensors_equal": same, "output_max_abs_diff": diff, "ok": ok}


def convert(
    name: Annotated[str, typer.Argument(
        help="Model: NAME (timm first, then torchvision), timm/NAME, torchvision/NAME or package.module:callable.",
        metavar="NAME", show_default=False)],
    half: Annotated[bool, typer.Option("--half", help="Half width, the paper's setting (same as --width 0.5, "
                                       "the default).")] = False,
    width: Annotated[float | None, typer.Option(help="Width multiplier of the template model (> 0, <= "
                                                f"{MAX_WIDTH:g}; default 0.5, or 1 with --share learned or --budget).",
                                                callback=bounded(0, MAX_WIDTH, low_open=True),
                                                show_default=False)] = None,
    templates: Annotated[int, typer.Option(help="Templates per bank (paper: 2; with sharing, without --budget, at "
                                           "most 8).", min=1, max=MAX_TEMPLATES)] = 2,
    share: Annotated[Share, typer.Option(help="none: every layer has its own bank; consecutive: consecutive "
                                         "same-shape layers share one bank (at most two per bank); learned: "
                                         "SuperWeights, layers of any shape share banks in clusters (depth bins per "
                                         "kernel shape, to refine with morph.superweights.learn_clusters).")
                     ] = Share["none"],
    budget: Annotated[str | None, typer.Option(help="Template parameters allowed (e.g. 2M, 500K, 1.5e6): templates "
                                               "per bank are allocated under it (with --share learned or none).",
                                               show_default=False)] = None,
    bins: Annotated[int, typer.Option(help="Depth bins per kernel shape of --share learned (official 4).",
                                      min=1, max=64)] = 4,
    num_classes: Annotated[int | None, typer.Option(help="Classes of the classifier (default: the model's).",
                                                    min=1, max=MAX_KWARG_NUMBER, show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the templates and coefficients; also names the "
                                             "template set (seedN) and the default output.",
                                             show_default=False)] = None,
    set_id: Annotated[str | None, typer.Option(help="Template-set id (default: seedN with --seed, else random). "
                                               "Two halves fused later need different ids.",
                                               show_default=False)] = None,
    train_edge_coefficients: Annotated[bool, typer.Option(
        "--train-edge-coefficients", help="Let the stem's and classifier's coefficients train (official CIFAR "
        "code; the paper fixes them).")] = False,
    input_size: Annotated[str | None, typer.Option(help="Input C,H,W used to trace the model, e.g. 3,64,64 "
                                                   "(default: the model's, else 3,224,224).",
                                                   show_default=False)] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Write a plain model at that width (morph.scale_width: stock modules, no templates), to grow "
        "with 'morph grow --method'.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors (default: "
                                                "NAME-half.safetensors, NAME-half-seedN.safetensors with --seed, "
                                                "NAME-wW.safetensors at other widths).", show_default=False)] = None,
    attention: AttentionOption = None,
    force: Force = False,
    json_out: JsonSummary = False,
) -> None:
    """Convert a CNN to a reduced-width template-mixing model (W = sum_k a_k T_k), save it, reload and verify it.

    Example: morph convert resnet50 --half --seed 1  (writes resnet50-half-seed1.safetensors)
    """
    if half and width is not None and width != 0.5:
        raise typer.BadParameter(f"--half means --width 0.5; drop one of them (got --width {width:g})",
                                 param_hint="'--half'")
    n_budget = parse_budget(budget)
    shared = share.value == "learned" or n_budget is not None
    if shared and plain:
        raise typer.BadParameter("--plain writes a model without templates; drop --share learned / --budget",
                                 param_hint="'--plain'")
    if width is None:
        width = 0.5 if half or not shared else 1.0
    size = parse_size(input_size)
    path = output if output is not None else default_output(name, width, seed, plain, (budget or "") if shared else None)
    check_output(path, force)
    with status(f"building {name}") as s:
        base = morph.build_model(name, num_classes=num_classes)
        s.update(f"converting {name} to width {width:g}")
        with attention_mode(attention):
            if plain:
                model = morph.scale_width(base, width, input_size=size, seed=seed)
            else:
                model = morph.convert(base, width=width, templates=templates, share=share.value, seed=seed,
                                      set_id=set_id, train_edge_coefficients=train_edge_coefficients, input_size=size,
                                      budget=n_budget, bins=bins)
        s.update(f"saving {path}")
        morph.save(model, path)
        s.update(f"reloading {path}")
        try:
            # the file was just written from the spec typed on this command line: rebuild it with that spec
            reloaded = morph.load(path, model_fn=lambda **kw: morph.build_model(name, **kw))
            check = verify(model, reloaded, morph.get_info(reloaded).input_size)
        except BaseException:
            path.unlink(missing_ok=True)  # a checkpoint that does not load back is no output
            raise
    if not check["ok"]:
        path.unlink(missing_ok=True)
        raise fail(f"{path} reloads differently from the converted model ({check}); removed it. This is a morph "
                   "bug: please report it with this command line", code=1)
    info = morph.get_info(reloaded)
    n_new, n_base = count_params(reloaded), count_params(base)
    summary = {
        "output": str(path), "model": info.spec.spec, "kwargs": info.spec.kwargs, "kind": info.kind,
        "width": info.width, "templates": info.templates, "share": info.share,
        "set_id": info.set_ids[0] if info.set_ids else None,
        "input_size": list(info.input_size), "template_layers": len(mixed_layers(reloaded)),
        "params": n_new, "params_original": n_base, "params_ratio": n_new / n_base, "verified": check,
    }
    if shared:
        from morph.superweights.record import describe

        d = describe(reloaded)
        summary["superweights"] = {k: d[k] for k in ("budget", "template_params", "coefficient_params", "params")}
        summary["superweights"].update(clusters=len(d["clusters"]), banks=len(d["banks"]))
    if json_out:
        print_json(summary)
        return
    out.print(f"[green]converted[/] {escape(name)} ({info.spec.spec}) -> [bold]{escape(str(path))}[/]",
              highlight=False)
    size_text = f"  width {info.width:g}, input {'x'.join(map(str, info.input_size))}"
    if plain:
        out.print(f"{size_text}, plain (no templates)", highlight=False, markup=False)
    elif shared:
        sw = summary["superweights"]
        bud = "no budget" if sw["budget"] is None else f"budget {sw['budget']:,}"
        out.print(f"{size_text}, template set {info.set_ids[0]!r}", highlight=False, markup=False)
        out.print(f"  {summary['template_layers']} layers in {sw['clusters']} clusters share {sw['banks']} banks; "
                  f"template parameters {sw['template_params']:,} ({bud}), coefficients "
                  f"{sw['coefficient_params']:,}", highlight=False)
    else:
        out.print(f"{size_text}, template set {info.set_ids[0]!r}", highlight=False, markup=False)
        out.print(f"  {summary['template_layers']} template-mixed layers, {info.templates} templates per bank, share "
                  f"{info.share}", highlight=False)
    out.print(f"  parameters {n_new:,} = {n_new / n_base:.3f}x the original's {n_base:,}", highlight=False)
    out.print(f"  verified: reloaded it; {check['tensors']} tensors identical, same outputs (max |diff| "
              f"{check['output_max_abs_diff']:g})", highlight=False)
