"""Do the plain growth methods grow the same weights on the CPU as an earlier revision of morph?

Run: ``python benchmarks/cpu_identity.py --rev REV`` (in a git checkout; REV: a commit, e.g. the one before a
change of the growth code). The ``morph`` package of REV is extracted with ``git archive`` into a temporary
directory and run in a subprocess; this checkout's morph runs the same growths in another. Every method (random,
net2net, gradmax, firefly with 5 Adam steps) grows every model below with two seeds, on the CPU, and the grown
state dicts are compared bit for bit. Prints one line per model and method; exit code 1 if any differs.

Models: a conv-BN-ReLU net, timm resnet18 and convnext_atto halves (``morph.scale_width``), WRN-10-1 (the recipes'
model), and a ViT half (``vit_tiny_patch16_224`` at 32x32, patch 8, depth 2) in both attention-width modes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["random", "net2net", "gradmax", "firefly"]
SEEDS = (1, 2)

_GROW = r'''
import contextlib, sys
import timm, torch, torch.nn as nn
import morph
from morph.graph import attention_width
from morph.recipes.models import WideResNet

def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

def half(name, **kw):
    return lambda: morph.scale_width(timm.create_model(name, num_classes=5, **kw), 0.5, input_size=(3, 32, 32))

vit = half("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
MODELS = {"cnn": (cnn, (3, 16, 16), None), "resnet18_half": (half("resnet18"), (3, 32, 32), None),
          "wrn10_1": (lambda: WideResNet(depth=10, widen_factor=1, num_classes=5), (3, 32, 32), None),
          "vit_half": (vit, (3, 32, 32), None), "vit_half_head_dim": (vit, (3, 32, 32), "head_dim"),
          "convnext_atto_half": (half("convnext_atto"), (3, 32, 32), None)}
out = {}
for name, (build, size, mode) in MODELS.items():
    with attention_width(mode) if mode else contextlib.nullcontext():
        torch.manual_seed(0)
        m = build()
        x, y = torch.randn(4, *size, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
        for method in METHODS:
            for seed in SEEDS:
                opts = {"steps": 5} if method == "firefly" else {}
                g = morph.grow(m, method=method, data=(x, y) if method in ("gradmax", "firefly") else None,
                               seed=seed, input_size=size, **opts)
                out[f"{name}/{method}/{seed}"] = {k: v.detach().clone() for k, v in g.state_dict().items()}
torch.save(out, sys.argv[1])
'''


def _grow(src: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = f"METHODS = {METHODS!r}\nSEEDS = {SEEDS!r}\n" + _GROW
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=tempfile.gettempdir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the revision to compare against (a git commit)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "old"
        old_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev, "morph"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
        _grow(old_src, Path(tmp) / "old.pt")
        _grow(ROOT, Path(tmp) / "new.pt")
        old, new = torch.load(Path(tmp) / "old.pt", weights_only=True), torch.load(Path(tmp) / "new.pt", weights_only=True)
    bad = 0
    for key in old:
        a, b = old[key], new.get(key, {})
        diff = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k])) + sorted(b.keys() - a.keys())
        bad += bool(diff)
        print(f"{key:40s} {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff[:4])}")
    print(f"{len(old) - bad} of {len(old)} growths bit-identical to {args.rev}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
