"""How much of what a layer learned MixtureGrowth's new tiles receive at fusion, per layer and init rule.

Net 1 and net 2 learn their templates: ``ΔT_k = T_k(end) - T_k(start)`` for each bank. A fused 2x2 layer
keeps the two old tiles (``W_old = Σ_k c_old,k T_k``) and adds two new tiles mixing the same banks with new
coefficients (``W_new = Σ_k c_new,k T_k``). This script reports, per layer and new tile::

    share     = ||Σ_k c_new,k ΔT_k|| / ||Σ_k c_old,k ΔT_k||   (the learned change the new tile carries,
                                                               relative to the old tile of the same bank)
    magnitude = ||W_new|| / ||W_old||                         (the new tile's size)

for each coefficient rule of ``morph.fuse`` asked for (``orthogonal``, ``orthogonal-official``, ``zero`` ...),
from a finished MixtureGrowth run's net 1 and net 2 checkpoints (``T(start)`` is rebuilt from the run's seed,
as the recipe built it). Nothing is written into the run directory::

    python benchmarks/tile_share.py runs/cmp/base/s* --out docs/results/cifar10-wrn10-1-cpu/tile_share.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _half(cfg, seed: int, role: str, num_classes: int, input_size: tuple[int, int, int]):
    """The half network as :meth:`recipes.schedule.Planner.half` builds it (same seeds)."""
    from morph.recipes.data import derive_seed
    from morph.recipes.models import build_model

    import morph

    g = cfg.growth
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, role, "init"))
        target = build_model(cfg.model, num_classes, input_size)
    return morph.convert(target, width=g.width, templates=g.templates, share=g.share, seed=derive_seed(seed, role),
                         train_edge_coefficients=g.train_edge_coefficients, input_size=input_size)


def _loaded(model, path: Path):
    from morph.recipes.checkpoint import load_checkpoint, load_model_tensors

    groups, _ = load_checkpoint(path)
    load_model_tensors(model, groups["model"], str(path))
    return model


def tile_shares(fused, start: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, list[float]]]:
    """Per 2x2 layer of ``fused`` (``morph.fuse``), the share and magnitude of each new tile (see above).

    Args:
        fused: the fused template model.
        start: for bank 0 (net 1) and bank 1 (net 2), each layer's templates at the start of training.
    """
    from morph.templates import mixed_layers

    layers: dict[str, dict[str, list[float]]] = {}
    for name, mod in mixed_layers(fused):
        mix = mod.mix
        if tuple(mix.grid) != (2, 2):
            continue  # edge layers get no new tiles
        c = mix.coefficients.detach().double()
        tb = list(mix.tile_banks)
        old = {tb[0]: 0, tb[3]: 3}  # the two carried tiles, one per bank
        rec: dict[str, list[float]] = {"share": [], "magnitude": []}
        for t in (1, 2):
            bank = tb[t]
            t_end = mix.banks[bank].templates.detach().double()
            delta = t_end - start[0 if bank == tb[0] else 1][name].double()
            learned_old = torch.tensordot(c[old[bank]], delta, dims=1).norm()
            learned_new = torch.tensordot(c[t], delta, dims=1).norm()
            w_old = torch.tensordot(c[old[bank]], t_end, dims=1).norm()
            w_new = torch.tensordot(c[t], t_end, dims=1).norm()
            rec["share"].append(float(learned_new / learned_old))
            rec["magnitude"].append(float(w_new / w_old))
        layers[name] = rec
    return layers


def templates_of(model) -> dict[str, torch.Tensor]:
    """Each mixed layer's templates (a half network: one bank per layer)."""
    from morph.templates import mixed_layers

    return {name: mod.mix.banks[0].templates.detach().clone() for name, mod in mixed_layers(model)}


def layer_shares(run_dir: Path, seed: int, inits: list[str]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{init: {layer: {"share": [...], "magnitude": [...]}}}``, one value per new tile of the layer."""
    from morph.recipes.config import load_config
    from morph.recipes.data import derive_seed

    import morph

    cfg = load_config(run_dir / "config.yaml")
    num_classes = 100 if cfg.data.dataset == "cifar100" else 1000 if cfg.data.dataset == "imagenet" else 10
    size = cfg.data.image_size or (224 if cfg.data.dataset == "imagenet" else 32)
    shape = (3, size, size)
    start = {i: templates_of(_half(cfg, seed, role, num_classes, shape)) for i, role in enumerate(("net1", "net2"))}
    end = {"net1": _loaded(_half(cfg, seed, "net1", num_classes, shape), run_dir / f"seed{seed}/net1/checkpoint.safetensors"),
           "net2": _loaded(_half(cfg, seed, "net2", num_classes, shape),
                           run_dir / f"seed{seed}/mixturegrowth/net2/checkpoint.safetensors")}
    out = {}
    for init in inits:
        fused = morph.fuse(end["net1"], end["net2"], growth=cfg.growth.growth, init=init,
                           seed=derive_seed(seed, "fuse"))
        out[init] = tile_shares(fused, start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+",
                    help="run directories with MixtureGrowth's net 1 and net 2 checkpoints (every seed in them)")
    ap.add_argument("--inits", nargs="+", default=["orthogonal", "orthogonal-official", "zero"])
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    per_seed = {}
    for run in args.runs:
        for net2 in sorted(run.glob("seed*/mixturegrowth/net2/checkpoint.safetensors")):
            seed = int(net2.parents[2].name[4:])
            if seed in per_seed:
                raise SystemExit(f"error: seed {seed} is in two run directories")
            per_seed[seed] = layer_shares(run, seed, args.inits)
    if not per_seed:
        raise SystemExit("error: no seed*/mixturegrowth/net2/checkpoint.safetensors in the run directories")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    print("| init | layer | share of the learned change (mean over seeds and new tiles) | magnitude ||W_new|| / ||W_old|| |")
    print("|---|---|---|---|")
    for init in args.inits:
        summary[init] = {}
        layers = list(next(iter(per_seed.values()))[init])
        for layer in [*layers, "all layers"]:
            pick = layers if layer == "all layers" else [layer]
            share = [v for s in per_seed.values() for ly in pick for v in s[init][ly]["share"]]
            mag = [v for s in per_seed.values() for ly in pick for v in s[init][ly]["magnitude"]]
            summary[init][layer] = {"share": statistics.fmean(share), "magnitude": statistics.fmean(mag)}
            print(f"| {init} | {layer} | {statistics.fmean(share):.3f} | {statistics.fmean(mag):.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python benchmarks/tile_share.py " + " ".join(sys.argv[1:]),
            "definition": {"share": "||sum_k c_new,k dT_k|| / ||sum_k c_old,k dT_k||, dT = templates at fusion minus "
                                    "at the start of the half network's training, old = the carried tile of the same bank",
                           "magnitude": "||sum_k c_new,k T_k|| / ||sum_k c_old,k T_k|| at fusion"},
            "summary": summary,
            "seeds": sorted(per_seed),
            "per_seed": {str(k): v for k, v in per_seed.items()},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
