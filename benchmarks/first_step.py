"""Do grown models train? The first SGD steps after each growth method, on CIFAR-10 images (CPU).

For each model, the plain half (``morph.scale_width(model, 0.5)``) is trained for ``--pretrain`` SGD steps, then
grown back to full width with every method, with the ReLUs' sub-gradient at 0 set to 1 (``relu_grad=one``,
morph's default) and PyTorch's 0 (``stock``). Per grown model it reports:

- the loss right after growth on a held-out batch in eval mode and in train mode, and the small model's;
- the first SGD step (lr ``--lr``, no momentum, no weight decay): per conv/linear layer with new neurons, the
  norm of the update of the new neurons' incoming rows and of the old rows, each relative to the mean norm of
  the old rows (median and max over layers): the 1/sqrt(eps) amplification of BatchNorm behind an all-zero
  channel (GradMax App. C) shows here;
- after ``--steps`` steps: the training loss, the eval loss on the held-out batch, and how many new rows of
  grown layers are still exactly zero or still equal to an old row (a replica that never parted).

    python benchmarks/first_step.py --data-dir ../shared/data/cifar10 --out docs/results/first_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_images(root: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(files), generator=g)[:n].tolist()
    xs, ys = [], []
    for i in idx:
        f, c = files[i]
        img = torch.frombuffer(bytearray(Image.open(f).convert("RGB").tobytes()), dtype=torch.uint8)
        xs.append(img.view(32, 32, 3).permute(2, 0, 1).float() / 255)
        ys.append(c)
    x = (torch.stack(xs) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(ys)


def build(name: str) -> nn.Module:
    import morph

    if name == "wrn10_2":
        from morph.recipes.models import WideResNet

        return WideResNet(depth=10, widen_factor=2, num_classes=10)
    return morph.build_model(name, num_classes=10)


def grown_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv/linear layers with new rows: name -> mask of the old rows, from the growth record."""
    out = {}
    for k, entries in model.growth_record.params.items():
        if not k.endswith(".weight"):
            continue
        mod = model.get_submodule(k[: -len(".weight")])
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or (isinstance(mod, nn.Conv2d) and mod.groups > 1):
            continue
        rows = entries[0][2][0]
        if rows is None:
            continue
        if (rows < 0).any():
            out[k] = rows >= 0
    return out


def row_stats(model: nn.Module, layers: dict[str, torch.Tensor], replicas: bool) -> tuple[int, int, int]:
    """(new rows, still exactly zero, still equal to an old row)."""
    total = zero = same = 0
    sd = model.state_dict()
    for k, old in layers.items():
        w = sd[k].flatten(1)
        new, old_rows = w[~old], w[old]
        total += len(new)
        zero += int((new.abs().sum(1) == 0).sum())
        if replicas:
            same += int((torch.cdist(new.double(), old_rows.double(), compute_mode="donot_use_mm_for_euclid_dist").min(1).values == 0).sum())
    return total, zero, same


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> float:
    was = model.training
    model.train(train)
    state = {k: v.clone() for k, v in model.state_dict().items()} if train else None
    with torch.no_grad():
        out = float(F.cross_entropy(model(x), y))
    if state is not None:  # a train-mode evaluation must not move the running statistics
        model.load_state_dict(state)
    model.train(was)
    return out


def run(name: str, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, args) -> list[dict]:
    import morph

    torch.manual_seed(0)
    small = morph.scale_width(build(name), 0.5, input_size=(3, 32, 32), seed=0)
    opt = torch.optim.SGD(small.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    b = args.batch
    small.train()
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(args.pretrain):
        i = torch.randint(0, len(x), (b,), generator=g)
        opt.zero_grad()
        F.cross_entropy(small(x[i]), y[i]).backward()
        opt.step()
    print(f"{name}: small model trained {args.pretrain} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    base = {"eval": loss_of(small, xt, yt, False), "train": loss_of(small, xt, yt, True)}
    grow_batch = (x[:b], y[:b])
    rows = []
    for method in args.methods:
        for relu, gamma in [("one", g) for g in args.new_gamma] + [("stock", 1.0)]:
            opts = {"relu_grad": relu, "new_gamma": gamma}
            if method == "firefly":
                opts["steps"] = args.firefly_steps
            t0 = time.perf_counter()
            grown = morph.grow(small, method, 2.0, data=grow_batch, seed=0, **opts)
            wall = time.perf_counter() - t0
            layers = grown_layers(grown)
            at = {"eval": loss_of(grown, xt, yt, False), "train": loss_of(grown, xt, yt, True)}
            grown.train()
            opt2 = torch.optim.SGD(grown.parameters(), lr=args.lr)
            g2 = torch.Generator().manual_seed(2)
            before = {k: v.detach().clone() for k, v in grown.state_dict().items() if k in layers}
            new_r, old_r, losses = [], [], []
            for step in range(args.steps):
                i = torch.randint(0, len(x), (b,), generator=g2)
                opt2.zero_grad()
                loss = F.cross_entropy(grown(x[i]), y[i])
                loss.backward()
                opt2.step()
                losses.append(float(loss.detach()))
                if step == 0:
                    sd = grown.state_dict()
                    for k, old in layers.items():
                        d = (sd[k] - before[k]).flatten(1)
                        ref = before[k].flatten(1)[old].norm(dim=1).mean().clamp_min(1e-30)
                        new_r.append(float(d[~old].norm(dim=1).mean() / ref))
                        old_r.append(float(d[old].norm(dim=1).mean() / ref))
            total, zero, same = row_stats(grown, layers, replicas=True)
            row = {
                "model": name, "method": method, "relu_grad": relu, "new_gamma": gamma, "grow_s": round(wall, 2),
                "small_eval": base["eval"], "small_train": base["train"],
                "at_growth_eval": at["eval"], "at_growth_train": at["train"],
                "step1_new_update_median": statistics.median(new_r) if new_r else None,
                "step1_new_update_max": max(new_r) if new_r else None,
                "step1_old_update_median": statistics.median(old_r) if old_r else None,
                "loss_first": losses[0], "loss_last": losses[-1], "loss_max": max(losses),
                "eval_after": loss_of(grown, xt, yt, False), "new_rows": total, "zero_rows": zero,
                "replica_rows": same, "layers": len(layers),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--models", nargs="+", default=["wrn10_2", "torchvision/resnet18"])
    ap.add_argument("--methods", nargs="+", default=["random", "gradmax", "net2net", "firefly"])
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--test-images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pretrain", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--firefly-steps", type=int, default=100)
    ap.add_argument("--new-gamma", type=float, nargs="+", default=[1.0],
                    help="BatchNorm weight of new channels (new_gamma) to compare, with relu_grad=one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data_dir)
    x, y = load_images(root / "train", args.train_images, 0)
    xt, yt = load_images(root / "test", args.test_images, 0)
    rows = []
    for name in args.models:
        rows += run(name, x, y, xt, yt, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
