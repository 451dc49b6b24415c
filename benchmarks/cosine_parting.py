"""Do the rotated query copies of cosine attention part? (morph.growth.cosine, docs/design.md)

A small torchvision Swin-V2 (3 and 6 heads, head_dim mode, float64, the model of
tests/test_growth_trains_transformers.py) grown 2x from its half; the new queries of the first block are
regressed on the old ones over the growth batch (relative least-squares residual: 0 while they are a linear
copy), at growth and after 1, 3 and 10 plain SGD steps (lr 0.1). ``--no-split`` drops the split of the new
rows' columns on replicated inputs, to show that without it the copy stays a copy::

    python benchmarks/cosine_parting.py [--no-split]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--methods", nargs="+", default=["random", "gradmax", "net2net"])
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    from test_growth_trains_transformers import SIZE, _linear_residual, _queries, _swin_v2

    import morph
    import morph.growth.cosine as cosine
    from morph.graph import attention_width

    if args.no_split:
        cosine._split = lambda *a, **k: None
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7, 2, 3])
    layer = "features.1.0.attn.qkv"
    new_q = torch.zeros(24, dtype=torch.bool)
    for h in range(3):  # 3 heads of 4 -> 8: each head's last 4 query channels are new
        new_q[h * 8 + 4:(h + 1) * 8] = True
    for method in args.methods:
        with attention_width("head_dim"):
            half = morph.scale_width(_swin_v2(), 0.5, input_size=SIZE).eval()
            g = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=SIZE).eval()
        q = _queries(g, x, layer)
        res = [_linear_residual(q[:, ~new_q], q[:, new_q])]
        g.train()
        opt = torch.optim.SGD(g.parameters(), lr=0.1)
        for i in range(10):
            xi = x if i == 0 else torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(100 + i))
            opt.zero_grad()
            F.cross_entropy(g(xi), y).backward()
            opt.step()
            if i in (0, 2, 9):
                g.eval()
                q = _queries(g, x, layer)
                res.append(_linear_residual(q[:, ~new_q], q[:, new_q]))
                g.train()
        print(f"{method}{' (no split)' if args.no_split else ''}: residual at growth, after 1, 3, 10 steps: "
              + " ".join(f"{r:.1e}" for r in res))


if __name__ == "__main__":
    main()
