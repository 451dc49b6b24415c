"""``morph cka``: linear CKA heatmaps between layers of two models, or of one layer across a run's epochs."""

from __future__ import annotations

import itertools
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn as nn
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import morph
from morph.cka import ESTIMATORS, PRESETS, REDUCTIONS, CKAResult, cka, cka_series, plot_cka

from .common import TrustCode, err, out, print_json, status

__all__ = ["cka_command", "load_model", "run_epochs"]

Estimator = Enum("Estimator", {e: e for e in ESTIMATORS}, type=str)  # type: ignore[misc]
Reduce = Enum("Reduce", {r: r for r in REDUCTIONS}, type=str)  # type: ignore[misc]
Stats = Enum("Stats", {s: s for s in ("auto", "cifar10", "cifar100", "imagenet", "none")}, type=str)  # type: ignore[misc]

# Per-channel statistics the recipes normalize with (recipes/data.py).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Stages of a recipe method in training order, as (stage directory under seed<S>/, label); the growth point
# lies between the first and the second.
_METHOD_STAGES = {
    "mixturegrowth": (("mixturegrowth/net2", "net2"), ("mixturegrowth/grown", "grown")),
    "mixturegrowth-nofusion": (("net1", "net1"), ("mixturegrowth-nofusion/grown", "grown")),
    # the growth baselines (Random, Net2Net, Firefly, GradMax: the paper's Fig. 4b) share a small model
    **{m: (("grow-from-small/train", "small"), (f"{m}/grown", "grown")) for m in morph.growth.baseline_methods()},
}


def load_model(spec: str, trust_code: bool = False) -> nn.Module:
    """A morph checkpoint (``.safetensors`` path) through :func:`morph.load`, else a model name through
    :func:`morph.build_model` (fresh weights, never downloaded)."""
    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        return morph.load(path, trust_code=trust_code)  # the recipes' WRN is one of morph's trusted factories
    return morph.build_model(spec)


def _input_size(model: nn.Module, image_size: int | None) -> int:
    if image_size is not None:
        return image_size
    info = morph.get_info(model)
    size = getattr(info, "input_size", None) if info is not None else None
    return int(size[-1]) if size else 224


def _loader(data: Path, size: int, stats: str, batch_size: int, batches: int, seed: int) -> Any:
    """A fixed, class-mixed sample of ``batches x batch_size`` images of the ImageFolder at ``data`` (its
    ``test`` or ``val`` split if it has one), resized for the model and normalized."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset

    root = data
    for split in ("test", "val"):
        if (data / split).is_dir():
            root = data / split
            break
    try:
        ds = D.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise morph.MorphError(f"{root}: not an ImageFolder (expected {root}/<class>/<image>): {e}") from None
    if stats == "auto":
        stats = "cifar10" if size <= 64 else "imagenet"
    resize = [T.Resize((size, size), antialias=True)] if size <= 64 else [
        T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size)]
    norm = [] if stats == "none" else [T.Normalize(*_STATS[stats])]
    ds.transform = T.Compose([*resize, T.ToTensor(), *norm])
    want = batches * batch_size
    if len(ds) < batch_size:
        raise morph.MorphError(f"{root} holds {len(ds)} images, fewer than one batch of {batch_size}; lower --batch-size")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:want].tolist()
    # the same images in the same order on every pass (cka_series iterates once per model)
    return DataLoader(Subset(ds, order), batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0)


def _progress(total: int, what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{escape(what)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


def _split(values: list[str] | None) -> str | list[str] | None:
    """``--layers`` values: comma-separated or repeated names, or one preset."""
    if not values:
        return None
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return names[0] if len(names) == 1 and names[0] in PRESETS else names


def run_epochs(run_dir: Path, method: str, seed: int | None) -> tuple[list[tuple[str, Path]], int | None, int]:
    """The kept epoch models of one method of a ``morph train`` run, in training order.

    Returns:
        ``[(label, path)]``, the index of the first model after the growth point (None without one), and the seed.
    """
    def epochs(stage_dir: Path) -> list[tuple[int, Path]]:
        files = sorted((stage_dir / "epochs").glob("epoch-*.safetensors"))
        return [(int(p.stem.split("-")[1]), p) for p in files]

    if (run_dir / "epochs").is_dir():  # a stage directory
        return [(f"{e}", p) for e, p in epochs(run_dir)], None, -1
    seeds = sorted(int(p.name[4:]) for p in run_dir.glob("seed*") if p.name[4:].isdigit())
    if not seeds:
        raise morph.MorphError(f"{run_dir}: no seed<S> folders; pass the run directory of 'morph train' (--out-dir)")
    seed = seeds[0] if seed is None else seed
    base = run_dir / f"seed{seed}"
    stages = _METHOD_STAGES.get(method, ((f"{method}/train", method),))
    found: list[tuple[str, Path]] = []
    growth = None
    offset = 0
    for k, (stage, label) in enumerate(stages):
        kept = epochs(base / stage)
        if not kept:
            raise morph.MorphError(
                f"{base / stage}: no kept epochs; train with run.keep_every=1 (morph train CONFIG run.keep_every=1) "
                f"and check --method ({method}) and --seed ({seed})"
            )
        if k == 1:
            growth = len(found)
        found += [(f"{label} {offset + e}", p) for e, p in kept]
        offset += kept[-1][0]
    return found, growth, seed


def _last_conv(model: nn.Module) -> str:
    """The conv layer that runs last (in the traced graph; in module order if fx cannot trace the model)."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        from morph.cka import _trace

        graph = _trace(model).graph
        convs = [str(n.target) for n in graph.nodes if n.op == "call_module" and str(n.target) in set(convs)]
    except morph.MorphError:
        pass
    if not convs:
        raise morph.MorphError(f"{type(model).__name__} has no conv layer; name one with --layer")
    return convs[-1]


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def cka_command(
    a: Annotated[str | None, typer.Argument(help="Model A: a morph .safetensors checkpoint or a model name "
                                            "(timm/NAME, torchvision/NAME; fresh weights).", metavar="A",
                                            show_default=False)] = None,
    b: Annotated[str | None, typer.Argument(help="Model B (default: A itself).", metavar="B", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", help="ImageFolder of images (its test/ or val/ split if it "
                                              "has one); with --run, default: the run's data.root.",
                                              show_default=False)] = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Layers of A (and of B without --layers-b): "
                                                     "module paths or fx node names, comma-separated or repeated, or "
                                                     "a preset: blocks (residual blocks; the default) or convs.",
                                                     show_default=False)] = None,
    layers_b: Annotated[list[str] | None, typer.Option("--layers-b", help="Layers of B (default: as A).",
                                                       show_default=False)] = None,
    batches: Annotated[int, typer.Option(min=1, help="Batches of images to use.")] = 10,
    batch_size: Annotated[int, typer.Option(min=4, help="Images per batch (at least 4 for the unbiased estimator).")] = 200,
    estimator: Annotated[Estimator, typer.Option(help="unbiased: minibatch HSIC_1 (Nguyen et al. 2021); biased: "
                                                 "all images at once (the MixtureGrowth paper).")] = Estimator.unbiased,
    reduce: Annotated[Reduce, typer.Option(help="Conv maps: flatten them, or average over space (mean).")] = Reduce.flatten,
    image_size: Annotated[int | None, typer.Option(help="Image side (default: the checkpoint's input size, else 224).",
                                                   show_default=False)] = None,
    stats: Annotated[Stats, typer.Option(help="Normalization: auto is cifar10 for images of 64 px or less, else "
                                         "imagenet.")] = Stats.auto,
    seed: Annotated[int, typer.Option(help="Seed of the image sample.")] = 0,
    run: Annotated[Path | None, typer.Option("--run", help="A 'morph train' run directory trained with "
                                             "run.keep_every: epoch x epoch CKA of one layer.", file_okay=False,
                                             exists=True, show_default=False)] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="With --run: the layer (default: the last conv "
                                              "layer, as in the paper's Fig. 4).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="With --run: the method whose epochs to compare.")] = "mixturegrowth",
    run_seed: Annotated[int | None, typer.Option("--run-seed", help="With --run: the run's seed (default: the first).",
                                                 show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Heatmap PNG to write.", show_default=False)] = None,
    title: Annotated[str | None, typer.Option(help="Title of the heatmap.", show_default=False)] = None,
    label_a: Annotated[str | None, typer.Option(help="Axis label of A's layers (default: its file or name).",
                                                show_default=False)] = None,
    label_b: Annotated[str | None, typer.Option(help="Axis label of B's layers (default: its file or name).",
                                                show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print {layers_a, layers_b, matrix, ...} as JSON on stdout.")] = False,
    trust_code: TrustCode = False,
) -> None:
    """Linear CKA between the layers of two models (A B), or of one layer across a training run's epochs (--run).

    Examples:
      morph cka half-seed1.safetensors fused.safetensors --data cifar10/ --layers convs -o half-vs-fused.png
      morph cka --run runs/cifar --layer group3.1.conv2 -o epochs.png
    """
    if output is not None and output.suffix.lower() != ".png":
        raise typer.BadParameter(f"{output} must end in .png", param_hint="'-o' / '--output'")
    if run is not None:
        if a is not None or b is not None:
            raise typer.BadParameter("give either models A [B] or --run, not both", param_hint="'--run'")
        result, marks, xlabel, default_title = _epochs(run, layer, method, run_seed, data, batches, batch_size,
                                                       estimator.value, reduce.value, image_size, stats.value, seed)
        ylabel = xlabel
    else:
        if a is None:
            raise typer.BadParameter("name model A (and B), or pass --run RUN_DIR", param_hint="'A'")
        if data is None:
            raise typer.BadParameter("the images to compare on: --data DIR (an ImageFolder)", param_hint="'--data'")
        if layer is not None:
            raise typer.BadParameter("--layer goes with --run; compare models' layers with --layers", param_hint="'--layer'")
        with status(f"loading {a}" + (f" and {b}" if b else "")):
            model_a = load_model(a, trust_code)
            model_b = model_a if b is None else load_model(b, trust_code)
        size = _input_size(model_a, image_size)
        loader = _loader(data, size, stats.value, batch_size, batches, seed)
        la = _split(layers)
        lb = _split(layers_b) if layers_b else la
        total = min(batches, len(loader))
        with _progress(total, "CKA") as bar:
            task = bar.add_task("cka", total=total)
            result = cka(model_a, model_b, loader, la, lb, estimator=estimator.value, reduce=reduce.value,
                         batches=batches, progress=lambda k: bar.update(task, completed=k))
        marks, xlabel, ylabel = [], label_b or f"B: {_short(b or a)}", label_a or f"A: {_short(a)}"
        default_title = f"linear CKA, {result.estimator}, {result.images:,} images"
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        plot_cka(result, output, title=title or default_title, xlabel=xlabel, ylabel=ylabel, marks=marks,
                 mark_label="growth" if marks else None)
    if json_out:
        print_json({**result.to_dict(), "output": str(output) if output else None})
        return
    _print_summary(result, output)


def _epochs(run: Path, layer: str | None, method: str, run_seed: int | None, data: Path | None, batches: int,
            batch_size: int, estimator: str, reduce: str, image_size: int | None, stats: str,
            seed: int) -> tuple[CKAResult, list[float], str, str]:
    found, growth, run_seed = run_epochs(run, method, run_seed)
    cfg = _run_config(run)
    data_cfg = cfg.get("data") or {}
    if data is None:
        root = data_cfg.get("root")
        if not root:
            raise typer.BadParameter(f"{run}/config.yaml names no data.root; pass --data DIR", param_hint="'--data'")
        data = Path(root)
    if stats == "auto" and data_cfg.get("dataset") in _STATS:
        stats = data_cfg["dataset"]
    first = load_model(str(found[-1][1]))
    layer = layer or _last_conv(first)
    size = _input_size(first, image_size)
    del first
    loader = _loader(data, size, stats, batch_size, batches, seed)
    per_model = min(batches, len(loader))
    if per_model * batch_size * 3 * size * size * 4 <= 2**30:  # decode the images once, not once per model
        with status(f"decoding {per_model * batch_size:,} images"):
            loader = [x for x, _ in itertools.islice(loader, per_model)]
    labels = [label for label, _ in found]
    with _progress(per_model * len(found), f"CKA of {layer} over {len(found)} epochs") as bar:
        task = bar.add_task("cka", total=per_model * len(found))
        result = cka_series([lambda p=p: load_model(str(p)) for _, p in found], loader, layer, labels,
                            estimator=estimator, reduce=reduce, batches=batches,
                            progress=lambda k: bar.update(task, completed=k))
    marks = [] if growth is None else [growth - 0.5]
    where = f"{method} seed {run_seed}" if run_seed >= 0 else str(run)
    grow = "" if growth is None else f", growth after {found[growth - 1][0]}"
    title = f"{where}: CKA of {layer} across epochs{grow}"
    return result, marks, "epoch", title


def _short(spec: str) -> str:
    """A model name, or the last three parts of a checkpoint path (``net1/epochs/epoch-008.safetensors``)."""
    path = Path(spec)
    return "/".join(path.parts[-3:]) if path.suffix == ".safetensors" else spec


def _print_summary(result: CKAResult, output: Path | None) -> None:
    m = result.matrix
    what = f"{len(result.layers_a)} x {len(result.layers_b)} layers"
    out.print(f"linear CKA ({result.estimator}, {result.reduce}) of {what} over {result.images:,} images in "
              f"{result.batches} batches" + (f" -> [bold]{escape(str(output))}[/]" if output else ""), highlight=False)
    finite = m[torch.isfinite(m)]
    if finite.numel():
        out.print(f"  min {float(finite.min()):.3f}  mean {float(finite.mean()):.3f}  max {float(finite.max()):.3f}",
                  highlight=False)
    if result.layers_a == result.layers_b:
        diag = [float(v) for v in torch.diagonal(m)]
        off = [float(m[i, i + 1]) for i in range(len(diag) - 1)]
        if off:
            out.print(f"  neighbours (i, i+1): {', '.join('nan' if math.isnan(v) else f'{v:.2f}' for v in off)}",
                      highlight=False)
    nan_rows = [result.layers_a[i] for i in range(m.shape[0]) if torch.isnan(m[i]).all()]
    if nan_rows:
        err.print(f"[yellow]warning:[/] constant features (CKA undefined) at {', '.join(nan_rows)}", highlight=False)

