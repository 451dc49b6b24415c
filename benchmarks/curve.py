"""Test top-1 along training (the saturation curve), per method, from committed run summaries.

Reads the ``kind: epoch`` records with a test top-1 from every ``metrics.jsonl`` under the given run
directories and prints, per method and evaluated epoch, the mean ± std over seeds, with the training
FLOPs spent (relative to 1X)::

    python benchmarks/curve.py docs/results/cifar10-wrn10-1-cpu/base/s* --methods small small-match \\
        --out docs/results/cifar10-wrn10-1-cpu/curve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curves(run_dirs: list[Path], methods: list[str]) -> dict[str, list[dict]]:
    from morph.recipes.metrics import read_metrics

    points: dict[str, dict[int, dict[int, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for run in run_dirs:
        for r in read_metrics(run / "metrics.jsonl"):
            if (isinstance(r, dict) and r.get("kind") == "epoch" and r.get("method") in methods
                    and isinstance(r.get("test_top1"), (int, float)) and r.get("stage") == "train"):
                points[r["method"]][r["epoch"]][r["seed"]] = (r["test_top1"], r.get("flops_norm") or 0.0)
    out: dict[str, list[dict]] = {}
    for method in methods:
        rows = []
        for epoch, by_seed in sorted(points[method].items()):
            top = [v[0] for v in by_seed.values()]
            rows.append({"epoch": epoch, "flops_norm": statistics.fmean(v[1] for v in by_seed.values()),
                         "seeds": sorted(by_seed), "mean": statistics.fmean(top),
                         "std": statistics.stdev(top) if len(top) > 1 else None})
        out[method] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--methods", nargs="+", default=["small", "small-match"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = curves(args.runs, args.methods)
    print("| method | epoch | FLOPs | test top-1 (%), mean ± std (seeds) |\n|---|---|---|---|")
    for method, rows in data.items():
        for r in rows:
            std = f" ± {r['std']:.2f}" if r["std"] is not None else ""
            print(f"| {method} | {r['epoch']} | {r['flops_norm']:.3f}X | {r['mean']:.2f}{std} ({len(r['seeds'])}) |")
    if args.out:
        args.out.write_text(json.dumps({"command": "python benchmarks/curve.py " + " ".join(sys.argv[1:]),
                                        "curves": data}, indent=1) + "\n")


if __name__ == "__main__":
    main()
