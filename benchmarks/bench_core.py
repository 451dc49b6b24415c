"""Benchmarks of the core passes: convert, fuse, bake, and training-step overhead of template mixing.

Run: ``python benchmarks/bench_core.py [--model resnet50] [--large regnet_y_128gf] [--out docs/benchmarks.json]``

- convert / fuse / bake time and peak memory run each in a fresh subprocess; peak memory is the
  process's peak RSS (VmHWM) and its growth over the RSS right after ``import morph``.
- training-step ratios run side by side in one process, interleaved (A, B, C, then C, B, A, ...; each
  turn one untimed step, then one timed step), and report the median of the per-round ratios with their interquartile range and a bootstrap
  95% confidence interval of the median, because the machines are noisy: template-mixing half vs
  plain half (batch 32, 64x64, CPU), fused vs stock full-width (same), each template model both with
  the native kernels (morph/native.py) and with the PyTorch implementation, and fused vs stock at the
  model's training resolution (``--full-size``, default 224; native kernels only); one step = zero_grad,
  forward, cross-entropy, backward, fused SGD step (momentum 0.9), as in ``recipes/trainer.py``,
  under ``morph.allocator.keep_freed_memory()`` as the trainer sets on CPU (``--default-malloc``: not);
- the breakdown times the template model's weight generation (forward + backward of every layer's
  ``mix()``, no convolution) and each model's optimizer step the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("passes", "half", "fused", "full-size")
sys.path.insert(0, str(ROOT))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _child(task: str, model: str, tmp: str) -> dict:
    """Runs in a fresh process: one measured operation."""
    import torch

    import morph
    from morph import native

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size = (3, 64, 64)
    out: dict = {"task": task, "model": model}
    t = time.perf_counter()  # loading the (already built) kernels is once per process: timed apart
    native.available()
    out["native_load_seconds"] = time.perf_counter() - t
    if task == "convert":
        m = morph.build_model(model)
        base = _rss_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        h = morph.convert(m, 0.5, seed=0, input_size=size)
        out["seconds"] = time.perf_counter() - t
        morph.save(h, Path(tmp) / "a.safetensors")
        morph.save(morph.convert(m, 0.5, seed=1, input_size=size), Path(tmp) / "b.safetensors")
        out["model_mb"] = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
    elif task == "fuse":
        # what `morph fuse A B -o OUT` does; memory is counted from the loaded inputs on
        out["import_rss_mb"] = _rss_kb("VmRSS") / 1024
        t0 = time.perf_counter()
        a, b = morph.load(Path(tmp) / "a.safetensors"), morph.load(Path(tmp) / "b.safetensors")
        out["load_seconds"] = time.perf_counter() - t0
        base = _rss_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        f = morph.fuse(a, b, seed=0, inplace=True)
        out["seconds"] = time.perf_counter() - t
        path = morph.save(f, Path(tmp) / "fused.safetensors")
        out["seconds_with_save"] = time.perf_counter() - t
        out["checkpoint_mb"] = path.stat().st_size / 2**20
    elif task == "bake":
        f = morph.load(Path(tmp) / "fused.safetensors")
        base = _rss_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        morph.bake(f)
        out["seconds"] = time.perf_counter() - t
    else:
        raise SystemExit(f"unknown task {task}")
    out["peak_rss_mb"] = _rss_kb("VmHWM") / 1024
    out["rss_growth_mb"] = (_rss_kb("VmHWM") - base) / 1024
    if task == "fuse":  # loading both inputs + fusing + saving, over the bare runtime
        out["rss_after_import_to_end_mb"] = _rss_kb("VmRSS") / 1024 - out["import_rss_mb"]
    return out


def _run_child(task: str, model: str, tmp: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", task, "--model", model, "--tmp", tmp],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed_child(task: str, model: str, tmp: str, repeats: int) -> dict:
    """``task`` in ``repeats`` fresh processes: the run with the median time, and every run's time
    (``seconds_runs``), because one run on a noisy machine can take several times the usual."""
    runs = sorted((_run_child(task, model, tmp) for _ in range(repeats)), key=lambda r: r["seconds"])
    out = dict(runs[len(runs) // 2])
    out["seconds_runs"] = [r["seconds"] for r in runs]
    return out


def median_ci(values: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap confidence interval of the median (percentile method, fixed seed)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def step_time_ratios(arms: dict, baseline: str, *, batch: int = 32, size: int = 64, rounds: int = 201) -> dict:
    """Time of one SGD training step of each arm over the baseline arm, interleaved in one process.

    ``arms`` maps a name to ``(make_model, context)``; each step of that arm runs inside ``context()``
    (e.g. :func:`morph.native.disabled`). Every round runs each arm in turn, in an order that reverses
    from round to round: one untimed step, then one timed step, so that every timed step follows a step
    of its own model, as in training (the first step after another model's would start with this
    model's weights and optimizer state out of cache); each arm's ratio is taken to the baseline step of the same round. Step times here vary by +-20% from step to step (other tenants share the memory
    bandwidth), independently between neighbouring steps, so the figure is the median of many per-round
    ratios, with their interquartile range as the spread and a bootstrap 95% confidence interval of the
    median as its precision."""
    import torch
    import torch.nn.functional as F

    models = {k: make() for k, (make, _) in arms.items()}
    # the optimizer the recipes use (recipes/trainer.py): fused SGD with momentum, the same for every model
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True) for k, m in models.items()}
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        classes = {k: m.eval()(x[:1]).shape[1] for k, m in models.items()}
    ys = {k: torch.randint(0, n, (batch,)) for k, n in classes.items()}
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(k: str) -> None:
        m, o = models[k], opts[k]
        with arms[k][1]():
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), ys[k]).backward()
            o.step()

    for k in models:  # warm-up
        models[k].train()
        step(k)
        step(k)
    order = list(models)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            step(k)
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    out: dict = {"rounds": rounds}
    out.update({f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()})
    for k in models:
        if k == baseline:
            continue
        ratios = sorted(a / b for a, b in zip(times[k], times[baseline], strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out[f"{k}_over_{baseline}"] = statistics.median(ratios)
        out[f"{k}_over_{baseline}_iqr"] = [q1, q3]
        out[f"{k}_over_{baseline}_ci95"] = list(median_ci(ratios))
    return out


@contextlib.contextmanager
def reference_path():
    """Generate weights with :func:`morph.templates.grid_reference` (matmul per bank, the CUDA path) on CPU."""
    from unittest import mock

    from morph import templates

    with mock.patch.object(templates, "generate", templates.grid_reference):
        yield


def overhead_breakdown(make_a, make_b, *, rounds: int = 9) -> dict:
    """Where model A's extra step time goes, timed the same way (interleaved medians): the weight
    generation of every template-mixed layer alone (forward + backward, gradients set to None first as
    in training), with the native kernels and with the PyTorch implementation, and each model's optimizer
    step."""
    import torch

    from morph import native
    from morph.templates import mixed_layers

    models = {"a": make_a(), "b": make_b()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True) for k, m in models.items()}
    for m in models.values():
        for p in m.parameters():
            p.grad = torch.randn_like(p)
    layers = [m for _, m in mixed_layers(models["a"])]
    grads = [torch.randn_like(m.weight) for m in layers]
    params = [p for m in layers for p in m.mix.parameters()]

    def generation() -> None:
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        torch.autograd.backward([m.weight for m in layers], grads)
        for p, g in zip(params, saved, strict=True):
            p.grad = g

    def generation_torch() -> None:
        with native.disabled():
            generation()

    times: dict[str, list[float]] = {"gen_native": [], "gen_torch": [], "opt_a": [], "opt_b": []}
    work = {"gen_native": generation, "gen_torch": generation_torch, "opt_a": opts["a"].step, "opt_b": opts["b"].step}
    for f in work.values():
        f()
    for _ in range(rounds):
        for k, f in work.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}


# (label, result key, ratio key) of every step-time ratio the plot shows, top to bottom
RATIOS = (
    ("half, native kernels\ntemplate / plain half, 64x64", "step_half", "template_over_plain"),
    ("half, PyTorch _Grid\ntemplate / plain half, 64x64", "step_half", "template_torch_over_plain"),
    ("fused, native kernels\nfused / stock, 64x64", "step_fused", "fused_over_stock"),
    ("fused, PyTorch _Grid\nfused / stock, 64x64", "step_fused", "fused_torch_over_stock"),
    ("fused, native kernels\nfused / stock, {size}x{size}", "step_fused_full_size", "fused_over_stock"),
)


def plot_ratios(res: dict, path: Path, target: float = 1.05) -> None:
    """The step-time ratios as a chart: per ratio the median (dot), its bootstrap 95% CI (thick bar)
    and the interquartile range of the per-round ratios (thin bar), against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label.format(size=res[key].get("size", "")), res[key], r) for label, key, r in RATIOS
            if key in res and r in res[key]]
    fig, ax = plt.subplots(figsize=(7.5, 0.75 * len(rows) + 1.2))
    for y, (label, part, r) in enumerate(reversed(rows)):
        (q1, q3), (lo, hi), med = part[f"{r}_iqr"], part[f"{r}_ci95"], part[r]
        color = "tab:blue" if "native" in label else "tab:gray"
        ax.hlines(y, q1, q3, color=color, linewidth=1.5, alpha=0.5)
        ax.hlines(y, lo, hi, color=color, linewidth=6)
        ax.plot(med, y, "o", color="white", markeredgecolor=color, markersize=7, zorder=3)
        ax.annotate(f"{med:.3f}  ({part['rounds']} rounds)", (q3, y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)], fontsize=8)
    ax.set_xlabel("training-step time / baseline step time (median of per-round ratios)")
    ax.set_title(f"template-mixing step overhead, {res.get('model', 'resnet50')}, batch 32, "
                 f"{res.get('threads')}-thread CPU\nthick bar: 95% CI of the median; thin bar: IQR of the rounds",
                 fontsize=9)
    ax.set_xlim(right=ax.get_xlim()[1] + 0.06)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--large", default="", help="also time convert on this (largest) model")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    ap.add_argument("--rounds", type=int, default=201,
                    help="interleaved rounds (one timed step of each model) of the half-model step timing; the "
                         "fused models get a third as many")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time the steps with glibc's default allocator settings (see morph/allocator.py)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run, of: " + ", ".join(PARTS) + " (default: all). The figures of "
                         "the parts not run stay as they are in --out")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per convert / fuse / bake measurement (the median is reported)")
    ap.add_argument("--full-size", type=int, default=224,
                    help="input size of the full-size part: fused vs stock at the model's training resolution "
                         "(a tenth as many rounds)")
    ap.add_argument("--plot-only", action="store_true",
                    help="only redraw the chart (--out with .png) from the figures in --out")
    ap.add_argument("--child", default="")
    ap.add_argument("--tmp", default="")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.tmp)))
        return

    out = Path(args.out)
    if args.plot_only:
        plot_ratios(json.loads(out.read_text()), out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
        return

    import torch

    import morph
    from morph import native
    from morph.allocator import keep_freed_memory

    if not args.default_malloc:
        keep_freed_memory()
    native.build()  # build the kernels now (once per source and CPU) if needed, not inside a timed child
    res: dict = json.loads(out.read_text()) if out.exists() and set(parts) != set(PARTS) else {}
    res.update({"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    res.setdefault("parts_run", {}).update({p: time.strftime("%Y-%m-%d %H:%M") for p in parts})
    if "passes" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            res["convert"] = timed_child("convert", args.model, tmp, args.repeats)
            print("convert", res["convert"], flush=True)
            res["fuse"] = timed_child("fuse", args.model, tmp, args.repeats)
            res["fuse"]["rss_growth_over_checkpoint"] = res["fuse"]["rss_growth_mb"] / res["fuse"]["checkpoint_mb"]
            print("fuse", res["fuse"], flush=True)
            res["bake"] = timed_child("bake", args.model, tmp, args.repeats)
            print("bake", res["bake"], flush=True)
            if args.large:
                with tempfile.TemporaryDirectory() as tmp2:
                    res["convert_large"] = timed_child("convert", args.large, tmp2, args.repeats)
                    print("convert_large", res["convert_large"], flush=True)

    torch.manual_seed(0)
    base = morph.build_model(args.model, num_classes=10)
    size = (3, 64, 64)
    res["native_kernels"] = native.loaded()
    res["allocator"] = "glibc defaults" if args.default_malloc else "morph.allocator.keep_freed_memory()"
    nullctx = contextlib.nullcontext
    if "half" in parts:
        res["step_half"] = step_time_ratios({
            "template": (lambda: morph.convert(base, 0.5, seed=0, input_size=size), nullctx),
            "template_torch": (lambda: morph.convert(base, 0.5, seed=0, input_size=size), native.disabled),
            "plain": (lambda: morph.scale_width(base, 0.5, input_size=size), nullctx),
        }, "plain", rounds=args.rounds)
        print("half: template / plain half", res["step_half"], flush=True)
        res["breakdown_half"] = overhead_breakdown(
            lambda: morph.convert(base, 0.5, seed=0, input_size=size),
            lambda: morph.scale_width(base, 0.5, input_size=size),
        )
        print("  breakdown", res["breakdown_half"], flush=True)
    if {"fused", "full-size"} & set(parts):  # the two halves that both fused parts fuse
        a = morph.convert(base, 0.5, seed=0, input_size=size)
        b = morph.convert(base, 0.5, seed=1, input_size=size)
    if "fused" in parts:
        res["step_fused"] = step_time_ratios({
            "fused": (lambda: morph.fuse(a, b, seed=0), nullctx),
            "fused_torch": (lambda: morph.fuse(a, b, seed=0), native.disabled),
            "fused_reference": (lambda: morph.fuse(a, b, seed=0), reference_path),
            "stock": (lambda: morph.build_model(args.model, num_classes=10), nullctx),
        }, "stock", rounds=max(5, args.rounds // 3))
        print("fused / stock full", res["step_fused"], flush=True)
        res["breakdown_fused"] = overhead_breakdown(
            lambda: morph.fuse(a, b, seed=0), lambda: morph.build_model(args.model, num_classes=10)
        )
        print("  breakdown", res["breakdown_fused"], flush=True)
    if "full-size" in parts:
        # the same pair at the model's own training resolution: the generation costs the same per step,
        # the convolutions grow with the pixels, so this is the ratio that training at that size sees
        res["step_fused_full_size"] = step_time_ratios({
            "fused": (lambda: morph.fuse(a, b, seed=0), nullctx),
            "stock": (lambda: morph.build_model(args.model, num_classes=10), nullctx),
        }, "stock", size=args.full_size, rounds=max(5, args.rounds // 10))
        res["step_fused_full_size"]["size"] = args.full_size
        print(f"fused / stock full, {args.full_size}x{args.full_size}", res["step_fused_full_size"], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.json")  # no half-written figures if interrupted
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    plot_ratios(res, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
