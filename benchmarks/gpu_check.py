"""The GPU check of the recipes: one script, under 8 minutes on one H100 (an estimate).

Run (GPU): ``python benchmarks/gpu_check.py --data-dir /path/to/cifar10 --out docs/results/gpu_check.json``
Run (CPU, tiny, what ``tests/test_gpu_check.py`` runs): ``python benchmarks/gpu_check.py --device cpu --out X.json``

Parts (each timed; JSON written after every part, so a cut-off run keeps what it finished):

(a) ``smoke``: the ``cifar10-smoke`` recipe (MixtureGrowth, and the reference and growth rows named by
    ``--smoke-methods``) on the device with bf16 autocast and channels_last, once eager and once under
    ``torch.compile`` (MixtureGrowth's stages only, to bound compile time): it checks that every stage
    (template models, fusion, growth, checkpoints) runs on CUDA, and records wall time per variant.
(b) ``throughput``: training images/s (zero_grad, forward, cross-entropy, backward, fused SGD step, as
    ``recipes/trainer.py``), bf16 autocast + channels_last on CUDA: template-mixing half
    (``morph.convert``) against the plain half (``morph.scale_width``), and fused (``morph.fuse`` of two
    halves) against stock, for WRN-28-10 (32x32) and resnet50 (224x224). Median of timed windows after
    warm-up, with ``torch.cuda.synchronize``.
(c) ``rows``: a CIFAR-10 comparison of every row of Table 1 (``recipes/configs/cifar10-gpu-check.yaml``:
    WRN-16-4 from WRN-16-2, 6 epochs = 1X, growth at 6, budget 0.45X, one seed) on the tensor data
    path, post-growth training as in the paper (``growth.after=paper``); then Net2Net and MixtureGrowth
    again with the official code's post-growth training (``growth.after=official``, optimizer state
    carried), and MixtureGrowth with ``growth.init=zero`` (the fused model starts as the ensemble of
    its halves). The growth baselines' growth step runs on the GPU (``growth.device=train``; each row
    records the device, the step's wall time and its cost), and every grown row its top-1 before its
    first step with BatchNorm statistics stale and re-estimated on training batches. Without
    ``--data-dir`` it runs on synthetic data and says so.

``--device cpu`` shrinks everything (WRN-10-1 at 32x32 only, batch 4, two timed steps;
the smoke (Large and MixtureGrowth) and the rows as WRN-10-1 on 32 synthetic 8x8 images) so the whole
script is checked end to end on a CPU (about a minute of CPU time); ``torch.compile`` then uses the ``eager`` backend (dynamo's tracing of the
models, without the C++/Triton code generation that a CPU check cannot afford). The printed table and
the JSON carry the device, torch version and every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:  # morph installed (a wheel, or editable): use it; the source tree alone has no morph.recipes
    import morph.recipes  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

FULL = {
    "models": [("wrn-28-10", 32, 128), ("resnet50", 224, 128)],
    "warmup": 5, "windows": 5, "steps": 10,
    "smoke": [],
    "rows": [],
}
_TINY_DATA = ["data.synthetic=true", "data.image_size=8", "data.train_subset=32", "data.test_subset=16",
              "optim.batch_size=16", "model.depth=10", "model.widen_factor=1", "growth.epochs=2",
              "growth.net1_epochs=1", "growth.net2_epochs=1", "growth.budget=1.0", "growth.firefly_steps=1",
              "growth.growth_batches=1", "run.eval_every=2"]
TINY = {
    "models": [("wrn-10-1", 32, 4)],  # the torchvision branch of _build runs only in the full mode
    "warmup": 1, "windows": 2, "steps": 1,
    "smoke": _TINY_DATA,
    "smoke_methods": ["large", "mixturegrowth"],
    "rows": _TINY_DATA,
}


def _write(out: Path | None, result: dict[str, Any]) -> None:
    if out is None:
        return
    from morph.recipes.checkpoint import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1))


def _run_dir_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished row: final top-1, FLOPs, parameters, the growth step (cost, wall time, the device it ran
    on), the grown model's top-1 before its first step (BatchNorm statistics stale and re-estimated), stages."""
    from morph.recipes.metrics import read_metrics

    starts = {(m.get("method"), m.get("seed")): m for m in read_metrics(run_dir / "metrics.jsonl")
              if isinstance(m, dict) and m.get("kind") == "start" and m.get("stage") == "grown"}
    rows = []
    for p in sorted(run_dir.glob("seed*/*/result.json")):
        r = json.loads(p.read_text())
        growth = [s for s in r["stages"] if s.get("stage") == "growth"]
        record = p.parent / "growth.json"
        start = starts.get((r["method"], r["seed"]), {})
        rows.append({"method": r["method"], "label": r["label"], "seed": r["seed"], "top1": r["top1"],
                     "flops_norm": r["flops_norm"], "params": r["params"],
                     "growth_flops_norm": growth[0].get("growth_flops_norm") if growth else None,
                     "growth_wall_s": growth[0].get("wall_time") if growth else None,
                     "growth_device": json.loads(record.read_text()).get("device") if record.exists() else None,
                     "at_growth": {"stale": start.get("test_top1"), "bn": start.get("test_top1_bn")} if start else None,
                     "stages": [{k: s.get(k) for k in ("stage", "top1", "steps", "wall_time")} for s in r["stages"]]})
    return rows


def part_smoke(device: str, tiny: bool, methods: list[str], tmp: Path, compile_backend: str | None) -> dict:
    import torch
    from morph.recipes.run import main as train

    out = {}
    for compiled in (False, True):
        # compiled: MixtureGrowth only (3 compiled models: two template halves and the fused one), to
        # keep compile time inside the budget
        rows = ["mixturegrowth"] if compiled else (TINY["smoke_methods"] if tiny else methods)
        over = [f"run.device={device}", "run.amp=true", "run.channels_last=true", f"run.compile={str(compiled).lower()}",
                f"growth.methods=[{','.join(rows)}]", *(TINY["smoke"] if tiny else [])]
        real_compile = torch.compile
        if compiled and compile_backend:
            torch.compile = lambda m, _c=real_compile, **kw: _c(m, backend=compile_backend, **kw)  # noqa: E731
        t0 = time.perf_counter()
        try:
            run_dir = train("cifar10-smoke", out_dir=tmp / f"smoke-{'compile' if compiled else 'eager'}", overrides=over)
        finally:
            torch.compile = real_compile
        out["compile" if compiled else "eager"] = {"wall_s": time.perf_counter() - t0, "results": _run_dir_results(run_dir)}
    return out


def _build(name: str, size: int):
    from morph.recipes.config import ModelConfig
    from morph.recipes.models import build_model

    if name.startswith("wrn-"):
        _, d, k = name.split("-")
        return build_model(ModelConfig(depth=int(d), widen_factor=float(k), norm="block"), 10, (3, size, size))
    return build_model(ModelConfig(arch=f"torchvision/{name}"), 1000, (3, size, size))


def _images_per_s(model, size: int, batch: int, device, cfg: dict) -> float:
    import torch
    import torch.nn as nn
    from morph.recipes.config import OptimConfig
    from morph.recipes.trainer import build_optimizer, to_channels_last

    cuda = device.type == "cuda"
    model = model.to(device).train()
    if cuda:
        to_channels_last(model)
    opt = build_optimizer(model, OptimConfig(lr=0.01))
    crit = nn.CrossEntropyLoss()
    classes = model.fc.out_features if hasattr(model, "fc") else 10
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(cfg["warmup"]):
        step()
    rates = []
    for _ in range(cfg["windows"]):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        rates.append(cfg["steps"] * batch / (time.perf_counter() - t0))
    model.to("cpu")
    opt.state.clear()  # free the momentum buffers before the next model
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(rates)


def part_throughput(device, cfg: dict) -> dict:
    import torch

    import morph

    out = {}
    for name, size, batch in cfg["models"]:
        torch.manual_seed(0)
        stock = _build(name, size)
        inp = (3, size, size)
        plain_half = morph.scale_width(stock, 0.5, input_size=inp)
        h1 = morph.convert(stock, width=0.5, templates=2, seed=1, input_size=inp)
        h2 = morph.convert(stock, width=0.5, templates=2, seed=2, input_size=inp)
        fused = morph.fuse(h1, h2, seed=0)
        r = {}
        for key, m in (("plain_half", plain_half), ("template_half", h1), ("stock", stock), ("fused", fused)):
            r[key] = _images_per_s(m, size, batch, device, cfg)
        r["template_half_vs_plain_half"] = r["template_half"] / r["plain_half"]
        r["fused_vs_stock"] = r["fused"] / r["stock"]
        out[name] = {"input": size, "batch": batch, **r}
    return out


def part_rows(device: str, tiny: bool, data_dir: str | None, tmp: Path, save=lambda rows: None,
              metrics_dir: Path | None = None) -> dict:
    """Every row with ``growth.after=paper``, then Net2Net and MixtureGrowth again with ``growth.after=official``
    (the official code's post-growth schedule, optimizer state carried), as a second config name, then
    MixtureGrowth with ``growth.init=zero``. ``save`` gets the rows so far after each of the three runs (a run cut
    off by a time limit keeps what it finished); a run that fails is recorded under ``errors`` and the next one
    still runs. ``metrics_dir``: each run's ``metrics.jsonl`` is copied there as ``<run>.metrics.jsonl``."""
    from morph.recipes.run import main as train

    over = [f"run.device={device}"]
    if tiny:
        over += TINY["rows"]
    elif data_dir is None:
        over += ["data.synthetic=true"]
    out: dict[str, Any] = {"synthetic": tiny or data_dir is None}
    runs = [("rows", None, []),
            ("rows-official", "official", ["name=cifar10-gpu-check-official", "growth.after=official",
                                           "growth.methods=[net2net,mixturegrowth]"]),
            ("rows-init-zero", "init_zero", ["name=cifar10-gpu-check-init-zero", "growth.init=zero",
                                             "growth.methods=[mixturegrowth]"])]
    for sub, key, extra in runs:
        t0 = time.perf_counter()
        try:
            run_dir = train("cifar10-gpu-check", data_dir=None if tiny else data_dir, out_dir=tmp / sub,
                            overrides=[*over, *extra])
        except Exception:  # noqa: BLE001 - recorded; the next run still gets its device time
            out.setdefault("errors", {})[sub] = traceback.format_exc()
            print(out["errors"][sub], file=sys.stderr, flush=True)
            continue
        got = {"wall_s": time.perf_counter() - t0, "results": _run_dir_results(run_dir)}
        if key is None:
            out.update(got)
        else:
            out[key] = got
        if metrics_dir is not None:
            metrics_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / "metrics.jsonl", metrics_dir / f"{sub}.metrics.jsonl")
        save(out)
    return out


def _at(r: dict) -> str:
    at = r.get("at_growth")
    if not at:
        return ""
    bn = f"{at['bn']:.2f}" if at.get("bn") is not None else "–"
    return f"{at['stale']:.2f} / {bn}"


def _table(result: dict) -> str:
    lines = [f"device: {result['device']} | torch {result['torch']}"]
    for part, t in result["timings_s"].items():
        lines.append(f"  part {part}: {t:.1f} s")
    if "smoke" in result:
        for k, v in result["smoke"].items():
            lines.append(f"(a) smoke {k}: {v['wall_s']:.1f} s, {len(v['results'])} rows")
    if "throughput" in result:
        lines.append("(b) training images/s | plain half | template half | ratio | stock | fused | ratio")
        for name, r in result["throughput"].items():
            lines.append(f"    {name} {r['input']}px b{r['batch']} | {r['plain_half']:.0f} | {r['template_half']:.0f} | "
                         f"{r['template_half_vs_plain_half']:.2f} | {r['stock']:.0f} | {r['fused']:.0f} | {r['fused_vs_stock']:.2f}")
    for part, err in result.get("errors", {}).items():
        lines.append(f"{part} FAILED: {err.strip().splitlines()[-1] if err.strip() else ''}")
    if "rows" in result and "results" in result["rows"]:
        syn = " (synthetic data)" if result["rows"]["synthetic"] else ""
        lines.append(f"(c) rows{syn}, {result['rows']['wall_s']:.0f} s | top-1 | FLOPs | params | growth step")
        lines[-1] += " | at growth: stale / BN re-estimated"
        for r in result["rows"]["results"]:
            g = (f"{r['growth_flops_norm']:.4f}X, {r['growth_wall_s']:.1f} s on {r['growth_device']}"
                 if r["growth_flops_norm"] is not None else "")
            lines.append(f"    {r['label']} | {r['top1']:.2f} | {r['flops_norm']:.3f}X | {r['params']:,} | {g} | "
                         f"{_at(r)}")
        for key, what in (("official", "growth.after=official (optimizer state carried)"),
                          ("init_zero", "MixtureGrowth with growth.init=zero (the ensemble start)")):
            part = result["rows"].get(key)
            if part is None:
                continue
            lines.append(f"(c) {what}, {part['wall_s']:.0f} s")
            for r in part["results"]:
                lines.append(f"    {r['label']} | {r['top1']:.2f} | {r['flops_norm']:.3f}X | {r['params']:,} | {_at(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 (torchvision or ImageFolder) for part (c)")
    ap.add_argument("--parts", default="smoke,throughput,rows")
    ap.add_argument("--smoke-methods", default="large,random,gradmax,mixturegrowth")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; eager on --device cpu)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--metrics-dir", default=None, help="copy the rows' metrics.jsonl files here")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a temporary directory)")
    args = ap.parse_args(argv)

    import torch

    tiny = args.device == "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the tiny check")
    backend = args.compile_backend or ("eager" if tiny else None)
    device = torch.device(args.device)
    cfg = TINY if tiny else FULL
    out = Path(args.out) if args.out else None
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "tiny": tiny, "settings": vars(args),
                              "timings_s": {}}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(args.work_dir or tmpd)
        t_all = time.perf_counter()
        for part in args.parts.split(","):
            if part not in ("smoke", "throughput", "rows"):
                raise SystemExit(f"unknown part {part!r}: smoke, throughput, rows")
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            try:  # a part that fails is recorded and the next one still runs: device time is scarce
                if part == "smoke":
                    result["smoke"] = part_smoke(args.device, tiny, args.smoke_methods.split(","), tmp, backend)
                elif part == "throughput":
                    result["throughput"] = part_throughput(device, cfg)
                else:
                    def save(rows: dict) -> None:
                        result["rows"] = rows
                        _write(out, result)
                    result["rows"] = part_rows(args.device, tiny, args.data_dir, tmp, save,
                                               Path(args.metrics_dir) if args.metrics_dir else None)
                    if result["rows"].get("errors"):
                        result.setdefault("errors", {}).update(result["rows"]["errors"])
            except Exception:  # noqa: BLE001 - reported in the JSON and the table, and the exit code is 1
                result.setdefault("errors", {})[part] = traceback.format_exc()
                print(result["errors"][part], file=sys.stderr, flush=True)
            result["timings_s"][part] = time.perf_counter() - t0
            _write(out, result)
        result["timings_s"]["total"] = time.perf_counter() - t_all
    _write(out, result)
    print(_table(result))
    if result.get("errors"):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
