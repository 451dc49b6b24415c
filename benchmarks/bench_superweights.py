"""Training-step time of SuperWeights models against the plain model, side by side in one process.

Run: ``python benchmarks/bench_superweights.py [--model resnet50] [--rounds 31] [--out docs/results/superweights_bench.json]``

The arms, interleaved as in ``benchmarks/bench_core.py`` (:func:`step_time_ratios`: each round runs every
arm in turn, one untimed then one timed step; the figure is the median of the per-round ratios to the
plain model, with IQR and a bootstrap 95% CI), batch 32, 3x64x64, CPU, fused SGD with momentum:

- ``plain``: the stock model (width 1);
- ``templates``: ``morph.convert(width=1, templates=2)``, MixtureGrowth template mixing, one bank per layer;
- ``shared_layer``: ``share="learned"``, one cluster per layer (``clusters="layer"``), 2 templates per bank:
  one piece per layer, the same op as a MixtureGrowth tile, from a flat bank;
- ``shared_bins``: ``share="learned"`` with the depth-bin clusters (nested blocks: pieces concatenated) under a
  budget of half the stock layers' parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from bench_core import step_time_ratios

    import morph
    from morph import native
    from morph.superweights import superweight_layers

    torch.manual_seed(0)
    base = morph.build_model(a.model, num_classes=10)
    plan = morph.analyze(base, (3, 64, 64))
    stock = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d))
    budget = stock // 2
    arms = {
        "plain": (lambda: morph.build_model(a.model, num_classes=10), contextlib.nullcontext),
        "templates": (lambda: morph.convert(base, 1.0, templates=2, seed=0, plan=plan), contextlib.nullcontext),
        "shared_layer": (lambda: morph.convert(base, share="learned", clusters="layer", templates=2, seed=0, plan=plan),
                         contextlib.nullcontext),
        "shared_bins": (lambda: morph.convert(base, share="learned", budget=budget, seed=0, plan=plan),
                        contextlib.nullcontext),
    }
    bins = arms["shared_bins"][0]()
    nested = sum(1 for _, m in superweight_layers(bins) if m.mix.levels > 1)
    out = step_time_ratios(arms, "plain", rounds=a.rounds)
    out.update(model=a.model, budget=budget, stock_conv_params=stock, native_kernels=native.enabled() and native.is_built(),
               nested_layers=nested, layers=len(superweight_layers(bins)),
               params={k: sum(p.numel() for p in f().parameters()) for k, (f, _) in arms.items()},
               command=" ".join(["python", *sys.argv]))
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
