"""``morph inspect``: layers, template banks, tiles, parameters and FLOPs of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch.nn as nn
import typer
from rich.table import Table

import morph
from morph.templates import mixed_layers

from .common import out, print_json, status, user_errors


def _layer_rows(model: nn.Module) -> list[dict]:
    mixed = dict(mixed_layers(model))
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        w = m.weight
        row = {"layer": name, "weight_shape": list(w.shape), "params": int(w.numel())}
        if name in mixed:
            mix = m.mix
            banks = [f"{b.set_id}:{b.name}" for b in mix.banks]
            row.update({
                "grid": list(mix.grid),
                "tiles": [banks[b] for b in mix.tile_banks],
                "banks": banks,
                "templates": int(mix.banks[0].templates.shape[0]),
                "coefficients": [[round(float(v), 4) for v in r] for r in mix.coefficients.detach()],
                "params": int(sum(p.numel() for p in mix.parameters())),
            })
        if getattr(m, "bias", None) is not None:
            row["params"] += int(m.bias.numel())
        rows.append(row)
    return rows


@user_errors
def inspect(
    file: Annotated[Path, typer.Argument(help="A morph .safetensors checkpoint.")],
    flops: Annotated[bool, typer.Option(help="Count FLOPs (fvcore) against the full-width original.")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch over which weight generation is amortized in FLOPs.")] = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a checkpoint's layers (shape, template bank, tiles, coefficients, parameters), totals and FLOPs."""
    with status(f"loading {file}", not json_out):
        model = morph.load(file)
    info = morph.get_info(model)
    rows = _layer_rows(model)
    total = sum(p.numel() for p in model.parameters())
    banks = {id(b) for _, m in mixed_layers(model) for b in m.mix.banks}
    result = {
        "file": str(file), "model": info.spec.spec, "kind": info.kind, "width": info.width * info.factor,
        "templates": info.templates, "share": info.share, "set_ids": list(info.set_ids), "growth": info.growth,
        "init": info.init, "input_size": list(info.input_size), "params": total, "banks": len(banks),
        "mixed_layers": len(mixed_layers(model)), "layers": rows,
    }
    if flops:
        with status("counting FLOPs", not json_out):
            r = morph.flops(model, info.input_size, batch_size=batch_size)
            orig = morph.build_model(info.spec.spec, **info.spec.kwargs)
            ro = morph.flops(orig, info.input_size)
        result["flops"] = {
            "per_image": r.per_image, "forward": r.forward, "generation": r.generation, "batch_size": batch_size,
            "original": ro.per_image, "ratio": r.per_image / ro.per_image,
            "params_original": sum(p.numel() for p in orig.parameters()),
            "note": "fvcore: one multiply-add = one flop; generation amortized over batch_size",
        }
    if json_out:
        print_json(result)
        return
    t = Table(title=f"{file} — {info.spec.spec}, {info.kind}, width {info.width * info.factor:g}")
    for col in ("layer", "weight shape", "bank", "tiles", "coefficients", "params"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        if "grid" in r:
            bank = ", ".join(r["banks"])
            tiles = f"{r['grid'][0]}x{r['grid'][1]}: " + " ".join(
                str(r["banks"].index(x)) for x in r["tiles"]) if r["grid"] != [1, 1] else "1x1"
            coefs = "; ".join(" ".join(f"{v:+.3f}" for v in c) for c in r["coefficients"])
        else:
            bank, tiles, coefs = "—", "—", "—"
        t.add_row(r["layer"], "x".join(map(str, r["weight_shape"])), bank, tiles, coefs, f"{r['params']:,}")
    out.print(t)
    out.print(f"parameters: {total:,}   template banks: {len(banks)}   template-mixed layers: {result['mixed_layers']}")
    if flops:
        f = result["flops"]
        out.print(
            f"FLOPs/image: {f['per_image'] / 1e9:.4g} G (generation {f['generation'] / 1e6:.3g} M per batch of "
            f"{batch_size}) vs full-width original {f['original'] / 1e9:.4g} G = {f['ratio']:.3f}x; "
            f"parameters {total / f['params_original']:.3f}x. fvcore counts one multiply-add as one flop."
        )
