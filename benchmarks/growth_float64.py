"""The growth check of the coverage table (``zoo_check.check_growth``: net2net, random, gradmax) in float64, for
models the table runs in float32 (over 30M parameters)::

    python benchmarks/growth_float64.py timm/inception_v4 torchvision/resnet152 --out docs/results/growth_float64.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from zoo_check import check_growth  # noqa: E402
from zoo_list import spec_input_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("growth_float64.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for spec in args.specs:
        r = check_growth(spec, spec_input_size(spec), dtype=torch.float64, methods=("net2net", "random", "gradmax"))
        out[spec] = r
        print(spec, {m: (v["status"], f"eval {v.get('eval', float('nan')):.0e}",
                         f"train {v.get('train', float('nan')):.0e}", f"strict {v.get('strict')}")
                     for m, v in r.items()}, flush=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
