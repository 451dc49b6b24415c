"""Cost of one growth step from half to full width: every method on the same batch, MixtureGrowth fuse included.

Run::

    python benchmarks/bench_growth.py                      # resnet50 (224x224) and WRN-28-10 (32x32)
    python benchmarks/bench_growth.py --models wrn28_10 --batch 32 --firefly-steps 100 --out /tmp/g.json
    python benchmarks/bench_growth.py --models wrn28_10 --methods random net2net gradmax firefly --device cuda

Each (model, method) runs in its own process (``--threads`` threads): it builds the stock model, the plain
half (``morph.scale_width``) and, for MixtureGrowth, two template halves (``morph.convert``), writes ``--batch``
random images as PNGs to an ImageFolder directory, then times **data loading** (reading that folder at the
model's input size, as ``morph grow --data`` does) and the **growth step** (``morph.grow`` / ``morph.fuse``)
separately. Peak memory is the growth step's resident-set high-water mark above the resident set before it
(Linux ``/proc/self/clear_refs`` resets the mark). Methods that read no data are charged no loading.

``--device cuda``: the plain half is moved to the GPU before the step, so the plain methods grow there
(``morph.grow`` grows a model on its device); the time ends with ``torch.cuda.synchronize``, and the row also
records the GPU's peak allocated memory during the step. MixtureGrowth's fusion and growth stay on the CPU (as
in the recipes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mixturegrowth-fuse", "mixturegrowth", "random", "net2net", "gradmax", "firefly"]
MODELS = {"resnet50": ("timm/resnet50", (3, 224, 224), 1000), "wrn28_10": ("wrn", (3, 32, 32), 100)}
# a tiny model to check the script quickly
MODELS["wrn16_2"] = ("wrn16_2", (3, 32, 32), 10)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _child(model_name: str, method: str, batch: int, firefly_steps: int, threads: int, device: str = "cpu") -> dict:
    import torch
    from morph.cli.grow import load_image_batch

    import morph

    torch.set_num_threads(threads)
    spec, size, classes = MODELS[model_name]
    if spec == "wrn":  # the CIFAR WRN of the recipes (BatchNorm before each block, as MixtureGrowth and GradMax)
        base = morph.build_model("morph.recipes.models:wrn", depth=28, widen_factor=10, num_classes=classes)
    elif spec == "wrn16_2":
        base = morph.build_model("morph.recipes.models:wrn", depth=16, widen_factor=2, num_classes=classes)
    else:
        base = morph.build_model(spec)
    g = torch.Generator().manual_seed(0)
    load_s = 0.0
    data = None
    if method in ("gradmax", "firefly"):
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            for i in range(batch):
                cls = Path(d) / f"c{i % 2}"
                cls.mkdir(exist_ok=True)
                px = (torch.rand(size[1], size[2], 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(cls / f"{i}.png")
            t = time.perf_counter()
            data = load_image_batch(Path(d), size, batch, 0, classes)
            load_s = time.perf_counter() - t
    if method.startswith("mixturegrowth"):
        a = morph.convert(base, width=0.5, seed=1, input_size=size)
        b = morph.convert(base, width=0.5, seed=2, input_size=size) if method == "mixturegrowth-fuse" else None
    else:
        half = morph.scale_width(base, 0.5, input_size=size).to(device)
    cuda = device != "cpu" and not method.startswith("mixturegrowth")
    del base
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so the step's own allocations count
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    if method == "mixturegrowth-fuse":
        out = morph.fuse(a, b, seed=0)
    elif method == "mixturegrowth":
        out = morph.grow(a, seed=0)
    else:
        opts = {"steps": firefly_steps} if method == "firefly" else {}
        out = morph.grow(half, method, 2.0, data=data, seed=0, input_size=size, **opts)
    if cuda:
        torch.cuda.synchronize(device)
    grow_s = time.perf_counter() - t
    peak = _rss_kb("VmHWM") - before
    gpu_peak = (torch.cuda.max_memory_allocated(device) - gpu_before) / 2**20 if cuda else None
    rules = getattr(out, "growth_report", None)
    return {"model": model_name, "method": method, "batch": batch if data is not None else 0, "load_s": load_s,
            "grow_s": grow_s, "total_s": load_s + grow_s, "peak_mb": peak / 1024,
            "params": sum(p.numel() for p in out.parameters()),
            "rules": None if rules is None else sorted({r["rule"].split(" (")[0] for r in rules}),
            "firefly_steps": firefly_steps if method == "firefly" else None,
            "device": str(next(out.parameters()).device), "gpu_peak_mb": gpu_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--firefly-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_growth.json")
    ap.add_argument("--device", default="cpu", help="where the plain methods grow (cpu, cuda, cuda:1 ...)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], args.child[1], args.batch, args.firefly_steps,
                                            args.threads, args.device)), flush=True)
        return
    rows = []
    for model in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", model, method, "--batch", str(args.batch),
                   "--firefly-steps", str(args.firefly_steps), "--threads", str(args.threads), "--device", args.device]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(line[0][7:]) if line else {"model": model, "method": method,
                                                         "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, args.out)
    print(table(rows))


def table(rows: list[dict]) -> str:
    out = ["| model | method | data loading (s) | growth step (s) | total (s) | peak memory (MB) | rules |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['method']} | error: {r['error'][:80]} | | | | |")
            continue
        name = r["method"] + (f" ({r['firefly_steps']} steps)" if r.get("firefly_steps") else "")
        name += f" on {r['device']}" if r.get("device", "cpu") != "cpu" else ""
        out.append(f"| {r['model']} | {name} | {r['load_s']:.2f} | {r['grow_s']:.2f} | {r['total_s']:.2f} | "
                   f"{r['peak_mb']:.0f} | {', '.join(r['rules'] or [])} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
