"""Test top-1 of every grown model right after its growth step, from the checkpoints of finished runs.

``morph train`` now tests each grown stage before its first step (``kind: start`` records); this script gives
the same figure for runs made before it did, by redoing each growth step exactly as the recipe did it (the
same checkpoints, seeds, growth batches and options; every method is deterministic) and testing the result
on the run's test set::

    python benchmarks/at_growth.py runs/cmp-s0 runs/cmp-s1 --data-dir data/cifar10 --out at_growth.json

Per seed it reports the test top-1 of the models growth starts from (the plain small model at the growth
point, nets 1 and 2) and of each grown model before training, as growth left it and (``<row>-bn``) with its
BatchNorm statistics re-estimated on ``run.bn_batches`` training batches, as ``morph train`` records both: Random, Net2Net, Firefly, GradMax, MixtureGrowth
(fusion of nets 1 and 2) and MixtureGrowth without fusion (net 1 grown alone). Nothing is written into the run
directories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def at_growth(run_dir: Path, data_dir: str | None) -> dict[int, dict[str, float]]:
    from morph.recipes.checkpoint import load_checkpoint, load_model_tensors
    from morph.recipes.config import load_config
    from morph.recipes.data import build_data, derive_seed
    from morph.recipes.distributed import setup
    from morph.recipes.schedule import Planner, _cpu, _growth_options
    from morph.recipes.trainer import Trainer

    import morph

    overrides = [f"data.root={data_dir}"] if data_dir else []
    cfg = load_config(run_dir / "config.yaml", overrides)
    g = cfg.growth
    data = build_data(cfg.data, say=None)
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's own files go here, not into the run
        trainer = Trainer(cfg, data, setup("cpu"), Path(tmp))
        p = Planner(cfg, trainer, data.num_classes, data.input_size)
        trainer.flops_unit = p.unit

        def loaded(model, key):
            groups, _ = load_checkpoint(run_dir / key / "checkpoint.safetensors")
            load_model_tensors(model, groups["model"], key)
            return model.eval()

        def top1(model) -> float:
            return float(trainer.evaluate(model.to(trainer.device).eval())["top1"])

        def top1_bn(model, seed: int, method: str) -> float:
            """With BatchNorm statistics re-estimated as ``morph train`` does it for the grown stage."""
            stage_seed = derive_seed(seed, f"seed{seed}/{method}/grown")
            fresh = trainer.reestimate_bn(model.to(trainer.device), derive_seed(stage_seed, "bn-batches"),
                                          cfg.run.bn_batches)
            return float(trainer.evaluate(fresh)["top1"])

        for seed_dir in sorted(run_dir.glob("seed*")):
            seed = int(seed_dir.name[4:])
            row: dict[str, float] = {}
            methods = set(g.methods)
            if methods & {"random", "net2net", "firefly", "gradmax"}:
                small = loaded(p.small(seed), f"seed{seed}/grow-from-small/train")
                row["small"] = top1(small)
                for method in ("random", "net2net", "firefly", "gradmax"):
                    if method not in methods:
                        continue
                    batches = trainer.growth_batches(derive_seed(seed, "growth-data"), g.growth_batches)
                    grown = morph.grow(_cpu(small), method=method, width=1.0 / g.width,
                                       data=batches if method in ("gradmax", "firefly") else None,
                                       seed=derive_seed(seed, method, "grow"), **_growth_options(p, method))
                    row[method] = top1(grown)
                    row[f"{method}-bn"] = top1_bn(grown, seed, method)
            if methods & {"mixturegrowth", "mixturegrowth-nofusion"}:
                net1 = loaded(p.half(seed, "net1"), f"seed{seed}/net1")
                row["net1"] = top1(net1)
                if "mixturegrowth-nofusion" in methods:
                    grown = morph.grow(_cpu(net1), init=g.init, seed=derive_seed(seed, "grow"))
                    row["mixturegrowth-nofusion"] = top1(grown)
                    row["mixturegrowth-nofusion-bn"] = top1_bn(grown, seed, "mixturegrowth-nofusion")
                if "mixturegrowth" in methods:
                    net2 = loaded(p.half(seed, "net2"), f"seed{seed}/mixturegrowth/net2")
                    row["net2"] = top1(net2)
                    fused = morph.fuse(_cpu(net1), _cpu(net2), growth=g.growth, init=g.init,
                                       seed=derive_seed(seed, "fuse"))
                    row["mixturegrowth"] = top1(fused)
                    row["mixturegrowth-bn"] = top1_bn(fused, seed, "mixturegrowth")
                    if g.init != "zero":  # what the zero-initialized fusion (the ensemble) would start from
                        row["mixturegrowth-zero-init"] = top1(morph.fuse(_cpu(net1), _cpu(net2), growth=g.growth,
                                                                          init="zero", seed=0))
            out[seed] = row
            print(f"{run_dir} seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    rows: dict[str, dict[str, float]] = {}
    for run in args.runs:
        for seed, row in at_growth(run, args.data_dir).items():
            rows[f"{run.name}/seed{seed}"] = row
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" if k in r else "–" for k in keys) + " |")
    mean = {k: [r[k] for r in rows.values() if k in r] for k in keys}
    print("| mean ± std | " + " | ".join(
        f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}" for v in mean.values())
        + " |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
