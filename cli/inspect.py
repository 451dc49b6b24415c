"""``morph inspect``: layers, template banks, tiles, coefficients, parameters and FLOPs of a checkpoint."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any

import torch.nn as nn
import typer
from rich import box
from rich.table import Table

import morph
from morph.safety import AllocationBudget
from morph.templates import mixed_layers
from morph.text import markup_safe, printable
from morph.zoo import build_recorded

from .common import TrustCode, count_params, out, print_json, status

__all__ = ["inspect", "layer_rows", "si"]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per conv/linear layer. ``params`` counts each parameter once, at its first layer, so that a
    bank shared by two layers (``--share consecutive``) is not counted twice and the rows add up."""
    mixed = {n: m for n, m in mixed_layers(model) if hasattr(m.mix, "grid")}  # shared banks: superweights_table
    seen: set[int] = set()
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, _LAYERS):
            continue
        own = [p for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        row: dict[str, Any] = {"layer": name, "type": type(m).__name__.removeprefix("Mixed"),
                               "weight_shape": list(m.weight.shape), "mixed": name in mixed,
                               "params": sum(p.numel() for p in own)}
        if name in mixed:
            mix = m.mix
            row.update({
                "grid": list(mix.grid),
                "banks": [{"set_id": b.set_id, "name": b.name, "templates": b.num_templates,
                           "template_shape": list(b.templates.shape[1:])} for b in mix.banks],
                "tiles": list(mix.tile_banks),
                "coefficients": mix.coefficients.detach().float().tolist(),
                "coefficients_train": bool(mix.coefficients.requires_grad),
            })
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    # Fits 80 columns: only the short columns refuse to wrap, the long ones fold.
    t = Table(title=title, title_justify="left", show_footer=True, highlight=False, box=box.SIMPLE_HEAD,
              show_edge=False, pad_edge=False, collapse_padding=True)
    t.add_column("layer", footer=f"{len(rows)} layers", overflow="fold",
                 min_width=min(max((len(r["layer"]) for r in rows), default=5), 16))
    t.add_column("weight", no_wrap=True)
    t.add_column("bank", overflow="fold")
    t.add_column("tiles", no_wrap=True)
    # a coefficient line is "A " (several banks) + K numbers of 6 chars
    longest = max((2 * (len(r["banks"]) > 1) + 7 * len(r["coefficients"][0]) - 1 for r in rows if r["mixed"]),
                  default=1)
    t.add_column("coefficients", min_width=min(longest, 24))
    t.add_column("params", justify="right", footer=f"{sum(r['params'] for r in rows):,}", no_wrap=True)
    for r in rows:
        shape = "x".join(map(str, r["weight_shape"]))
        if not r["mixed"]:
            t.add_row(markup_safe(r["layer"]), shape, "-", "-", "-", f"{r['params']:,}")
            continue
        many = len(r["banks"]) > 1  # then banks are keyed A, B, ... and tiles/coefficients name their bank

        def key(i: int, many: bool = many) -> str:
            return f"{string.ascii_uppercase[i]} " if many else ""

        banks = "\n".join(markup_safe(key(i) + b["set_id"] + ("" if b["name"] == r["layer"] else f"/{b['name']}"))
                          for i, b in enumerate(r["banks"]))
        rr, cc = r["grid"]
        tiles = f"{rr}x{cc}"
        if many:  # the grid, row by row: which bank each tile mixes
            grid = [" ".join(key(b).strip() for b in r["tiles"][i * cc:(i + 1) * cc]) for i in range(rr)]
            tiles = "\n".join([f"{tiles} {grid[0]}"] + [" " * (len(tiles) + 1) + x for x in grid[1:]])
        coefs = "\n".join(key(b) + " ".join(f"{v:+.3f}" for v in c)
                          for b, c in zip(r["tiles"], r["coefficients"], strict=True))
        fixed = "" if r["coefficients_train"] else "\n(fixed)"
        t.add_row(markup_safe(r["layer"]), shape, banks, tiles, coefs + fixed, f"{r['params']:,}")
    return t


def inspect(
    file: Annotated[Path, typer.Argument(help="A morph .safetensors checkpoint (convert, fuse, grow or bake).",
                                         metavar="FILE", exists=True, dir_okay=False, show_default=False)],
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs (fvcore) at the checkpoint's "
                                        "input size, against the full-width original model.")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch over which template weight generation (once per forward "
                                            "pass) is amortized in FLOPs per image.", min=1)] = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout instead of "
                                           "tables.")] = False,
    trust_code: TrustCode = False,
) -> None:
    """Show a checkpoint's layers (weight shape, template bank, tiles, coefficients, parameters), totals and FLOPs.

    Example: morph inspect resnet50-half.safetensors
    """
    with status(f"loading {file}") as s:
        info, _ = morph.read_info(file)  # the recorded provenance (init, growth, ...) as written
        model = morph.load(file, trust_code=trust_code)
        rows = layer_rows(model)
        if flops:
            s.update("counting FLOPs")
            report = morph.flops(model, info.input_size, batch_size=batch_size)
            s.update(f"counting FLOPs of the full-width {info.spec.spec}")
            with AllocationBudget(4 * count_params(model) + (1 << 26), str(file)):
                original = build_recorded(info.spec, trust_code=trust_code, where=str(file))
            report_original = morph.flops(original, info.input_size)
    mixed = [r for r in rows if r["mixed"]]
    banks = {id(b) for _, m in mixed_layers(model) for b in m.mix.banks}
    total = count_params(model)
    in_layers = sum(r["params"] for r in rows)
    result: dict[str, Any] = {
        "file": str(file), "model": info.spec.spec, "kwargs": info.spec.kwargs, "kind": info.kind,
        "width": info.width * info.factor, "templates": info.templates, "share": info.share,
        "set_ids": list(info.set_ids), "growth": info.growth, "init": info.init, "input_size": list(info.input_size),
        "params": total, "params_layers": in_layers, "params_other": total - in_layers,
        "template_banks": len(banks), "template_layers": len(mixed), "layers": rows,
        "grown_by": info.extra.get("growth"),
    }
    if flops:
        n_orig = count_params(original)
        result["flops"] = {
            "per_image": report.per_image, "forward": report.forward, "generation": report.generation,
            "batch_size": batch_size, "original": report_original.per_image,
            "ratio": report.per_image / report_original.per_image, "params_original": n_orig,
            "params_ratio": total / n_orig,
            "convention": "fvcore: one multiply-add = one flop; weights are generated once per batch, amortized "
                          "over batch_size in per_image",
        }
    if info.kind in ("shared", "ensemble"):
        from morph.superweights.record import describe

        result["superweights"] = describe(model)
    if json_out:
        print_json(result)
        return

    what = f"{info.spec.spec}, {info.kind}, width {result['width']:g}"
    if info.kind != "plain":
        what += f", {info.templates} templates per bank, share {info.share}, template sets {', '.join(info.set_ids)}"
    if info.kind in ("fused", "grown"):
        what += f", growth {info.growth}, init {info.init}" if info.kind == "fused" else f", init {info.init}"
    grown_by = info.extra.get("growth")
    if isinstance(grown_by, dict):  # a plain model grown by morph.grow: the method and its options
        opts = ", ".join(f"{k} {v}" for k, v in grown_by.items() if k not in ("method", "rules"))
        what += f", grown by {grown_by.get('method')} ({opts})"
    out.print(_table(f"{markup_safe(file)}: {markup_safe(what)}", rows))
    if mixed:
        out.print("bank: template set (/bank name, when the bank is another layer's); tiles: grid out x in (and each "
                  "tile's bank); coefficients: one vector per tile, (fixed) = not trained", highlight=False)
    out.print(f"parameters: {total:,} = {in_layers:,} in {len(rows)} conv/linear layers + {total - in_layers:,} in "
              f"other modules; {len(banks)} template banks in {len(mixed)} template-mixed layers", highlight=False)
    if "superweights" in result:
        superweights_print(result["superweights"])
    if flops:
        f = result["flops"]
        size = "x".join(map(str, info.input_size))
        gen = f" = forward {si(f['forward'])} + weight generation {si(f['generation'])} / batch {batch_size}"
        out.print(f"FLOPs per {size} image (fvcore: 1 multiply-add = 1 flop):\n"
                  f"  this model  {si(f['per_image'])}{gen if f['generation'] else ''}\n"
                  f"  original    {si(f['original'])} ({printable(info.spec.spec)} at full width, "
                  f"{f['params_original']:,} parameters)\n"
                  f"  ratio       {f['ratio']:.3f}x FLOPs, {f['params_ratio']:.3f}x parameters", highlight=False,
                  markup=False)


def si(x: float) -> str:
    """``37120000`` -> ``37.12 M``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g}"


def superweights_print(d: dict[str, Any]) -> None:
    """The sharing of a shared model or ensemble: one row per bank, then clusters and the budget."""
    t = Table(title="shared template banks (SuperWeights)", title_justify="left", highlight=False,
              box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for col in ("cluster", "level", "piece", "K", "templates", "coef. vectors", "pieces"):
        t.add_column(col, justify="right", no_wrap=True)
    for b in d["banks"]:
        t.add_row(str(b["cluster"]), str(b["level"]), f"{b['piece']:,}", str(b["templates"]),
                  f"{b['template_params']:,}", str(b["coefficient_vectors"]), str(b["pieces"]))
    out.print(t)
    for c in d["clusters"]:
        env = " < ".join("x".join(map(str, e)) for e in c["envelopes"])
        names = ", ".join(markup_safe(f"{x['member']}:{x['layer']}" if d["kind"] == "ensemble" else x["layer"])
                          + (f" (L{x['levels'] - 1})" if x["levels"] > 1 else "") for x in c["layers"])
        out.print(f"cluster {c['cluster']}: {len(c['layers'])} layers, envelopes {env}: {names}", highlight=False)
    budget = "no budget" if d["budget"] is None else f"budget {d['budget']:,}"
    out.print(f"sharing: {len(d['clusters'])} clusters, {len(d['banks'])} banks; template parameters "
              f"{d['template_params']:,} ({budget}); coefficients {d['coefficient_params']:,}; other "
              f"{d['other_params']:,}; total {d['params']:,}", highlight=False)
