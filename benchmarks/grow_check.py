"""One model's growth, quickly: the function error of each method (float64, eval mode) and, with ``--trains``, the
per-layer new rows still zero or equal to an old row after 3 SGD steps at the lr the trains check chooses for the
un-grown model (the coverage table's trains check, ``benchmarks/coverage.py`` ``check_trains``, per layer; the lr
rule is ``benchmarks/zoo_check.py`` ``choose_trains_lr``, the same lr for every method). The model's attention width mode is
``tests/zoo_list.py`` ``ATTENTION_WIDTH`` unless ``--attention`` is given::

    python benchmarks/grow_check.py timm/visformer_tiny --methods net2net random
    python benchmarks/grow_check.py timm/pvt_v2_b0 --methods random --trains
    python benchmarks/grow_check.py timm/test_maxvit --direct --img-size 64

``--direct`` builds the model with its library's own constructor (``timm.create_model``, torchvision's
``get_model``) instead of ``morph.build_model``: the half records no spec, so growth analyzes the half itself (a
rewritten ``GraphModule`` where morph had to rewrite the forward), not the rebuilt stock model. ``--img-size S``
passes ``img_size=S`` to the constructor and traces at 3xSxS.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--methods", nargs="+", default=["net2net", "random", "gradmax"])
    ap.add_argument("--attention", choices=("heads", "head_dim"), default=None)
    ap.add_argument("--direct", action="store_true", help="build with the library's constructor, not morph.build_model")
    ap.add_argument("--img-size", type=int, default=None, help="img_size= for the constructor; input 3 x S x S")
    ap.add_argument("--trains", action="store_true", help="also train 3 SGD steps (the trains check's lr) and count stuck new rows")
    args = ap.parse_args()
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from zoo_check import attention_mode, build_direct, choose_trains_lr, randomize_norms
    from zoo_list import spec_input_size

    import morph
    from morph.graph import attention_width

    torch.set_num_threads(1)
    size = spec_input_size(args.spec) if args.img_size is None else (3, args.img_size, args.img_size)
    mode = args.attention or attention_mode(args.spec)
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    torch.manual_seed(0)
    with attention_width(mode):
        model = build_direct(args.spec, **kwargs) if args.direct else morph.build_model(args.spec, **kwargs)
        half = morph.scale_width(model, 0.5, input_size=size).double().eval()
    randomize_norms(half)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *size), generator=g, dtype=torch.float64)
    with torch.no_grad():
        y0 = half(x)
    out0 = y0[0] if isinstance(y0, (tuple, list)) else y0
    y = torch.randint(0, out0.shape[-1], (2,), generator=g)
    if args.trains:  # once, on the un-grown model: every method trains at this lr
        rule = choose_trains_lr(copy.deepcopy(half).float(), x.float(), y, 3)
        lr = rule["lr"]
        print(f"{args.spec}: trains lr {lr:g}" + ("" if rule["stable"] else " (no lr of the ladder is stable)")
              + "; the un-grown model's losses: "
              + ", ".join(f"lr {k}: {v[0]:.3g} -> {v[-1]:.3g}" for k, v in rule["losses"].items()), flush=True)
    for m in args.methods:
        t0 = time.perf_counter()
        opts = {"steps": 5} if m == "firefly" else {}
        grown = morph.grow(half, m, 2.0, data=(x, y), seed=0, input_size=size, **opts).eval()
        with torch.no_grad():
            y1 = grown(x)
        y1 = y1[0] if isinstance(y1, (tuple, list)) else y1
        line = f"{args.spec} {mode} {m}: relerr {float((y1 - out0).norm() / out0.norm()):.2e}"
        if args.trains:
            masks = {}
            for k, entries in grown.growth_record.params.items():
                mod = grown.get_submodule(k.rpartition(".")[0]) if "." in k else grown
                rows = entries[0][2][0] if entries[0][2] else None
                if (k.endswith("weight") and isinstance(mod, (nn.Conv2d, nn.Linear)) and rows is not None
                        and not getattr(mod, "transposed", False) and (rows < 0).any()):
                    masks[k] = rows < 0
            grown = grown.float()
            before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in masks}
            grown.train()
            opt = torch.optim.SGD(grown.parameters(), lr=lr)
            for _ in range(3):
                opt.zero_grad()
                o = grown(x.float())
                F.cross_entropy(o[0] if isinstance(o, (tuple, list)) else o, y).backward()
                opt.step()
            sd = grown.state_dict()
            total = zero = same = 0
            for k, new in masks.items():
                w, b = sd[k].detach().flatten(1).double(), before[k].flatten(1).double()
                ref = w[~new].norm(dim=1).mean()
                old = w[~new]
                if torch.equal(old, b[~new]):
                    continue  # a layer the loss does not reach
                moved = (old - b[~new]).norm(dim=1) > 1e-4 * ref
                z = int((w[new].norm(dim=1) <= 1e-12 * ref).sum())
                s = 0
                if moved.any():
                    d = torch.cdist(w[new], old[moved], compute_mode="donot_use_mm_for_euclid_dist").min(1).values
                    s = int((d <= 1e-6 * ref).sum())
                total, zero, same = total + int(new.sum()), zero + z, same + s
                if z or s:
                    print(f"  {m} {k}: {int(new.sum())} new rows, {z} zero, {s} equal to an old row")
            line += f"; trains: {total} new rows, {zero} zero, {same} equal to an old row"
        print(f"{line} ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
