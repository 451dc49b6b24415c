"""Benchmark of ``morph.cka`` against torch_cka: a 20 x 20 layer matrix of two resnet18s on CIFAR-10 images.

Run: ``python benchmarks/bench_cka.py [--data data/cifar10] [--images 2000] [--batch-size 200]
[--size 32] [--out docs/cka/bench_cka.json]``

- Two torchvision resnet18 with different random initializations (weights are never downloaded), 20 layers
  each: ``conv1``, ``maxpool``, every block's ``conv2`` and output, ``avgpool``, ``fc``.
- The images (the first ``--images`` of a seeded shuffle of the ImageFolder's test split, at ``--size``
  pixels, CIFAR-10 normalization) are decoded into memory first, so both tools time only the forward
  passes and the CKA arithmetic, on the same batches, in the same process, one after the other (the
  order alternates with ``--repeats``).
- torch_cka (AntixK/PyTorch-Model-Compare, ``torch_cka.CKA.compare``) is not a morph dependency: install
  it apart, ``pip install --target /tmp/tcka torch_cka --no-deps`` (it needs tqdm and matplotlib), and
  point ``--torch-cka-path`` (default ``/tmp/tcka``) at it. Without it the benchmark times morph alone and
  says so.
- The two models' forward passes alone over the same batches are timed too: the floor under both.
- Agreement: the largest absolute difference between the two matrices, and morph's unbiased estimator
  in float64 against torch_cka's in float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = [
    "conv1", "maxpool",
    *[f"layer{s}.{b}{suffix}" for s in range(1, 5) for b in range(2) for suffix in (".conv2", "")],
    "avgpool", "fc",
]


def load_images(data: Path, n: int, size: int, seed: int):
    import torch
    import torchvision.datasets as D
    import torchvision.transforms as T

    root = data / "test" if (data / "test").is_dir() else data
    ds = D.ImageFolder(str(root), transform=T.Compose([
        T.Resize((size, size), antialias=True), T.ToTensor(),
        T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs, ys = zip(*(ds[i] for i in order), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def import_torch_cka(path: str):
    if path and Path(path).is_dir():
        sys.path.insert(0, path)
    try:
        from torch_cka import CKA
    except ImportError as e:
        return None, f"torch_cka is not installed ({e}); pip install --target {path} torch_cka --no-deps"
    return CKA, None


def run_morph(a, b, loader) -> tuple[float, object]:
    import morph

    t0 = time.perf_counter()
    r = morph.cka(a, b, loader, LAYERS, LAYERS)
    return time.perf_counter() - t0, r.matrix


def run_torch_cka(CKA, a, b, loader) -> tuple[float, object]:
    import warnings

    # torch_cka never removes its hooks: give it copies
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(a, b, model1_name="resnet18 A", model2_name="resnet18 B", model1_layers=LAYERS,
                  model2_layers=LAYERS, device="cpu")
        cka.compare(loader)
    seconds = time.perf_counter() - t0
    # torch_cka fills row i with the i-th layer whose hook *fired* (execution order: a block's conv2 before the
    # block) but labels its rows in named_modules order (the block first): its matrix is in LAYERS order (the
    # execution order), its "model1_layers" labels are not.
    return seconds, cka.export()["CKA"].double()


def run_forward(a, b, loader) -> tuple[float, None]:
    """The two models' forward passes alone over the same batches: the floor under both tools."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            a(x)
            b(x)
    return time.perf_counter() - t0, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--torch-cka-first", action="store_true", help="time torch_cka first (and alternate from there)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--torch-cka-path", default="/tmp/tcka")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    if args.threads:
        torch.set_num_threads(args.threads)
    CKA, missing = import_torch_cka(args.torch_cka_path)
    if missing:
        print(f"NOTE: {missing}; timing morph alone", flush=True)

    t0 = time.perf_counter()
    x, y = load_images(args.data, args.images, args.size, seed=0)
    print(f"{len(x)} images at {args.size}x{args.size} decoded in {time.perf_counter() - t0:.1f} s", flush=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False, drop_last=True)
    torch.manual_seed(1)
    a = torchvision.models.resnet18(num_classes=10).eval()
    torch.manual_seed(2)
    b = torchvision.models.resnet18(num_classes=10).eval()

    times: dict[str, list[float]] = {"forward": [], "morph": [], "torch_cka": []}
    matrices: dict[str, torch.Tensor] = {}
    runners = {"forward": run_forward, "morph": run_morph, "torch_cka": lambda *m: run_torch_cka(CKA, *m)}
    for rep in range(args.repeats):
        order = ["forward", "morph", "torch_cka"]
        if (rep % 2 == 0) == args.torch_cka_first:
            order.reverse()
        for tool in order:
            if tool == "torch_cka" and CKA is None:
                continue
            s, m = runners[tool](a, b, loader)
            times[tool].append(s)
            if m is not None:
                matrices[tool] = m
            print(f"  {tool:9s} {s:7.1f} s", flush=True)

    result = {
        "what": f"20 x 20 layer CKA matrix, two torchvision resnet18 (random init), {len(loader) * args.batch_size} "
                f"CIFAR-10 test images at {args.size}x{args.size}, batches of {args.batch_size}, unbiased minibatch HSIC",
        "layers": LAYERS,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "order": "torch_cka first" if args.torch_cka_first else "morph first",
        "forward_only_s": times["forward"],
        "morph_s": times["morph"],
        "torch_cka_s": times["torch_cka"] or None,
        "torch_cka": "absent" if CKA is None else "torch_cka 0.21 (float32, per-pair Gram matrices)",
    }
    print(f"forward passes alone: {min(times['forward']):.1f} s")
    print(f"morph.cka:  {min(times['morph']):.1f} s (best of {len(times['morph'])})")
    if CKA is not None:
        diff = (matrices["morph"] - matrices["torch_cka"]).abs()
        finite = torch.isfinite(diff)
        result.update({
            "speedup": min(times["torch_cka"]) / min(times["morph"]),
            "max_abs_diff": float(diff[finite].max()) if finite.any() else None,
            "mean_abs_diff": float(diff[finite].mean()) if finite.any() else None,
            "torch_cka_nans": int((~torch.isfinite(matrices["torch_cka"])).sum()),
        })
        print(f"torch_cka:  {min(times['torch_cka']):.1f} s -> morph is {result['speedup']:.1f}x faster")
        print(f"agreement:  max |diff| {result['max_abs_diff']:.2e}, mean |diff| {result['mean_abs_diff']:.2e}")
    else:
        print("torch_cka:  ABSENT, not compared (install it as the docstring says)")
    result["morph_matrix"] = matrices["morph"].tolist()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
