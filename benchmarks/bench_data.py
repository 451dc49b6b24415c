"""Data path benchmark: the ``stream`` path (per-image decoding and torchvision transforms in a
DataLoader) against the ``tensor`` path (a decoded ``uint8`` cache, batched augmentation with tensor
ops), side by side in one process, on the same CPU.

Run: ``python benchmarks/bench_data.py --data-dir data/cifar10 [--out docs/results/bench_data.json]`` (CIFAR-10 as an
ImageFolder: docs/recipes.md, "CIFAR-10 on disk")

What it measures, per path (CIFAR-10 ImageFolder, batch 128, crop 32 + pad 4, flip, cutout 16):

- ``data``: images/s of the data path alone: every training batch of ``--epochs`` epochs is produced
  (augmented, normalized, in ``float32``) and dropped; the stream path with ``--workers`` DataLoader
  workers (each count given is timed), the tensor path in the training process;
- ``train``: images/s of training a WRN-16-1 (``norm=block``, the recipes' CPU small model) for
  ``--steps`` steps with each path: SGD step as ``recipes/trainer.py`` makes it. It also times how
  long each step waited for its batch (``next(loader)``) against the step itself, which says whether
  the step waits on data.

The paths alternate in rounds (stream, tensor, tensor, stream, ...) so that a neighbour's load on a
shared machine hits both; the figure of each path is the median over rounds. The tensor path's cache
is built (or found) before timing starts; its build time is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data(data_dir: str, loader: str, cache_dir: str, workers: int):
    from morph.recipes.config import DataConfig
    from morph.recipes.data import build_data

    cfg = DataConfig(dataset="cifar10", format="imagefolder", root=data_dir, cutout=16, num_workers=workers,
                     loader=loader, cache_dir=cache_dir)
    return cfg, build_data(cfg, say=None)


def _stream_epoch(data, epoch: int, batch: int, workers: int):
    from morph.recipes.data import EpochBatches, make_loader

    batches = EpochBatches(len(data.train), batch, epoch=epoch, seed=0)
    return make_loader(data.train, batches, workers, pin_memory=False)


def _tensor_epoch(data, epoch: int, batch: int):
    import torch
    from morph.recipes.data import EpochBatches, tensor_batches

    batches = EpochBatches(len(data.train), batch, epoch=epoch, seed=0)
    return tensor_batches(data.tensors.train, batches, data.tensors.augment, torch.device("cpu"))


def _time_data(make, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for x, _ in make(e):
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def _time_train(make, steps: int, batch: int) -> dict[str, float]:
    import torch
    import torch.nn as nn
    from morph.recipes.config import ModelConfig, OptimConfig
    from morph.recipes.models import build_model
    from morph.recipes.trainer import build_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=16, widen_factor=1, norm="block"), 10, (3, 32, 32))
    opt = build_optimizer(model, OptimConfig(lr=0.05))
    crit = nn.CrossEntropyLoss()
    model.train()
    wait = work = 0.0
    n, epoch = 0, 0
    it = iter(make(epoch))
    done = -2  # two untimed warm-up steps
    while done < steps:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            epoch += 1
            it = iter(make(epoch))
            x, y = next(it)
        t1 = time.perf_counter()
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if done >= 0:
            wait += t1 - t0
            work += t2 - t1
            n += x.shape[0]
        done += 1
    return {"images_per_s": n / (wait + work), "wait_s_per_step": wait / steps, "step_s": work / steps,
            "wait_fraction": wait / (wait + work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 ImageFolder (train/ and test/)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the data-only timing per round")
    ap.add_argument("--steps", type=int, default=20, help="WRN-16-1 training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="stream-path DataLoader workers")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-dir", default=None, help="tensor cache (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    cache_dir = args.cache_dir or tmp.name
    t0 = time.perf_counter()
    _, tdata = _data(args.data_dir, "tensor", cache_dir, 0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _data(args.data_dir, "tensor", cache_dir, 0)
    reuse_s = time.perf_counter() - t0
    sdata = {w: _data(args.data_dir, "stream", cache_dir, w)[1] for w in args.workers}
    n_train = len(tdata.train)
    print(f"{n_train} training images; tensor cache built in {build_s:.1f} s, reloaded in {reuse_s:.2f} s")

    paths = {f"stream ({w} workers)": (lambda e, w=w: _stream_epoch(sdata[w], e, args.batch, w)) for w in args.workers}
    paths["tensor"] = lambda e: _tensor_epoch(tdata, e, args.batch)
    data_ips: dict[str, list[float]] = {k: [] for k in paths}
    train: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            data_ips[k].append(_time_data(paths[k], args.epochs))
        for k in order:
            train[k].append(_time_train(paths[k], args.steps, args.batch))
        print(f"round {r + 1}: " + ", ".join(f"{k} {data_ips[k][-1]:,.0f} img/s data, "
                                              f"{train[k][-1]['images_per_s']:.0f} img/s train" for k in order))

    base = f"stream ({args.workers[0]} workers)"
    out = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
           "settings": vars(args) | {"train_images": n_train, "cache_build_s": build_s, "cache_reload_s": reuse_s},
           "paths": {}}
    rows = []
    for k in names:
        med = {f: statistics.median(t[f] for t in train[k]) for f in train[k][0]}
        d = statistics.median(data_ips[k])
        out["paths"][k] = {"data_images_per_s": d, "data_rounds": data_ips[k], "train": med, "train_rounds": train[k]}
        rows.append((k, d, med))
    print(f"\n| path | data path alone (img/s) | vs {base} | WRN-16-1 training (img/s) | waiting for data |")
    print("|---|---|---|---|---|")
    bd = out["paths"][base]["data_images_per_s"]
    for k, d, med in rows:
        print(f"| {k} | {d:,.0f} | {d / bd:.1f}x | {med['images_per_s']:.0f} | "
              f"{100 * med['wait_fraction']:.1f}% ({1000 * med['wait_s_per_step']:.1f} ms of {1000 * (med['wait_s_per_step'] + med['step_s']):.0f} ms/step) |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
