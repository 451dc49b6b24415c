"""``morph train``: run a recipe's methods for every seed, resuming whatever a previous run finished.

Launch lines (the same code under both)::

    morph train cifar10-smoke                                  # one process
    torchrun --standalone --nproc_per_node=4 $(which morph) train imagenet-resnet50 --data-dir /data/imagenet

Rerunning the same command after a crash or kill resumes from the last checkpoint of every stage.
The run directory (``--out-dir``, default ``runs/<config name>``) holds the resolved ``config.yaml``,
``metrics.jsonl``, one checkpoint per stage and ``seed<S>/<method>/result.json`` per finished method.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from morph.inputs import InputError, read_yaml
from morph.text import markup_safe, printable

from .checkpoint import atomic_write_text
from .config import MAX_CONFIG_BYTES, Config, load_config, save_config
from .data import build_data
from .distributed import DistInfo, setup, teardown
from .errors import RecipeError
from .schedule import MethodResult, Planner, run_method
from .trainer import Trainer

__all__ = ["check_run_dir", "main", "train"]

# Keys that may differ between the first run and a resumed one: they do not change what is trained.
_FREE_KEYS = {"name", "data.root", "data.format", "data.num_workers", "data.cache_dir", "growth.methods",
              "superweights.rows"}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}" if isinstance(k, str) else k
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run directory that was trained with a different config.

    Only settings that change what is trained are compared: ``run.*`` (seeds, device, logging),
    the data root and the method list may change between invocations, and an option the recipes gained
    after the run was started is accepted at its default value.

    Raises:
        RecipeError: naming the first differing key.
    """
    path = run_dir / "config.yaml"
    if not os.path.lexists(path):
        return
    try:  # the run directory's own file: read as data, never through a link, no YAML aliases
        data = read_yaml(path, limit=MAX_CONFIG_BYTES, follow=False, what="the run's config")
    except InputError as e:
        raise RecipeError(f"{e}; pass another --out-dir to start a new run") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{printable(path)}: not a config (a mapping of sections); pass another --out-dir")
    old = _flatten(data)
    new = _flatten(cfg.to_dict())
    defaults = _flatten(Config().to_dict())
    for key in sorted(set(old) | set(new), key=str):
        if not isinstance(key, str):
            raise RecipeError(f"{printable(path)}: config key {printable(repr(key))[:40]} is not a name")
        if key in _FREE_KEYS or key.startswith("run."):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # an option added to the recipes after the run started, at its default: nothing changed
        if old.get(key) != new.get(key):
            raise RecipeError(
                f"{printable(run_dir)} holds a run with {printable(key)[:80]}={printable(repr(old.get(key)))[:80]}, "
                f"not {printable(repr(new.get(key)))[:80]}; pass another --out-dir to start a new run"
            )


def _provenance(cfg: Config) -> dict[str, str | None]:
    """Config name, git commit (if the code is a checkout) and library versions."""
    import torch

    import morph

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        sha = None
    return {"config": cfg.name, "git": sha, "morph": str(morph.__version__), "torch": str(torch.__version__)}


def train(cfg: Config, run_dir: Path, dist: DistInfo) -> list[MethodResult]:
    """Run every method of ``cfg`` for every seed, in an already set-up process group."""
    from morph.graph import attention_width

    with attention_width(cfg.model.attention):  # every pass of the run analyzes attention in the config's mode
        return _train(cfg, run_dir, dist)


def _train(cfg: Config, run_dir: Path, dist: DistInfo) -> list[MethodResult]:
    check_run_dir(run_dir, cfg)
    console = Console(stderr=True, soft_wrap=True)
    data = build_data(cfg.data, say=(lambda text: console.print(text, markup=False, highlight=False))
                      if dist.is_main else None)
    trainer = Trainer(cfg, data, dist, run_dir)
    planner = Planner(cfg, trainer, data.num_classes, data.input_size)
    trainer.flops_unit = planner.unit  # builds and counts the target: a bad model spec fails here
    if cfg.superweights.rows:  # every budget fits its rows, before anything trains
        from .superweights import check_budgets

        check_budgets(planner)
    if dist.is_main:  # written only once the config, the data and the model are known to be good
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_text(run_dir / "provenance.yaml", yaml.safe_dump(_provenance(cfg)))
    results = [run_method(planner, method, seed, run_dir) for seed in cfg.run.seeds for method in cfg.growth.methods]
    if cfg.superweights.rows:
        from .superweights import run_rows

        sw = [r for seed in cfg.run.seeds for r in run_rows(planner, seed, run_dir)]
        if dist.is_main:
            _print_sw(sw, run_dir)
    if dist.is_main and results:
        _print_results(results, run_dir)
    return results


def _print_sw(results: list, run_dir: Path) -> None:
    table = Table(title=f"SuperWeights rows in {markup_safe(run_dir)}")
    for col in ("row", "seed", "top-1 (%)", "NLL", "ECE", "template params", "params"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        s = r.superweights
        table.add_row(markup_safe(r.label), str(r.seed), f"{r.top1:.2f}", f"{s['nll']:.3f}", f"{s['ece']:.3f}",
                      f"{s['template_params']:,}", f"{r.params:,}")
    Console(stderr=True).print(table)


def _print_results(results: list[MethodResult], run_dir: Path) -> None:
    table = Table(title=f"results in {markup_safe(run_dir)}")
    for col in ("method", "seed", "top-1 (%)", "FLOPs norm", "params"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(markup_safe(r.label), str(r.seed), f"{r.top1:.2f}", f"{r.flops_norm:.3f}X", f"{r.params:,}")
    console = Console(stderr=True)
    console.print(table)
    for r in results:
        for st in r.stages:
            if st["stage"] == "growth":
                console.print(
                    f"{markup_safe(r.label)} seed {r.seed}: growth step {st['growth_flops_norm']:.4f}X of the "
                    f"{r.flops_norm:.3f}X ({st['wall_time']:.1f} s)"
                )


def main(
    config: str,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Entry point of ``morph train CONFIG [--data-dir DIR] [--out-dir DIR] [key=value ...]``.

    Works under ``python`` and under ``torchrun`` (DistributedDataParallel when ``RANK`` is set).

    Args:
        config: path to a YAML config, or the name of one in ``recipes/configs``.
        data_dir: dataset root (overrides ``data.root``).
        out_dir: run directory (default ``runs/<config name>``); rerunning into it resumes.
        overrides: ``key=value`` settings, e.g. ``["optim.lr=0.05", "run.seeds=[0,1,2]"]``.

    Returns:
        The run directory.

    Raises:
        RecipeError: unknown config, bad override or value, a run dir holding another config.
        RecipePathError: missing data.
    """
    cfg = load_config(config, list(overrides or []))
    if data_dir is not None:
        cfg.data.root = str(data_dir)
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    import torch.distributed as torch_dist

    owns_group = not torch_dist.is_initialized()
    dist = setup(cfg.run.device)
    try:
        train(cfg, run_dir, dist)
    finally:
        if owns_group:
            teardown()
    return run_dir
