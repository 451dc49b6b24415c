"""``morph report``: the paper's Table 1 and a top-1 vs training-FLOPs plot from run directories.

Runs are grouped by config name, so seeds trained into separate run directories of the same config
are pooled. Each table cell is the final test top-1, mean ± sample std over seeds (the number of
seeds in parentheses), next to the FLOPs spent relative to the target trained from scratch (1X).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from morph.errors import MorphError

from .checkpoint import atomic_write_text
from .config import METHODS
from .errors import RecipeError, RecipePathError
from .metrics import read_metrics

__all__ = ["ReportFiles", "collect", "main", "markdown_table", "plot"]


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`main` wrote.

    Attributes:
        markdown: the table, ``report.md``.
        plot: the figure, ``top1_vs_flops.png``.
        text: the markdown text (for printing).
    """

    markdown: Path
    plot: Path
    text: str


@dataclass
class _Run:
    name: str
    results: list[dict[str, Any]]
    metrics: list[dict[str, Any]]


def _load_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise RecipePathError(f"run directory {run_dir} does not exist")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise RecipePathError(f"{run_dir} is not a run directory: no config.yaml (made by `morph train`)")
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MorphError(f"{cfg_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    name = cfg.get("name", run_dir.name) if isinstance(cfg, dict) else None
    if not isinstance(name, str) or not name:
        raise MorphError(f"{cfg_path}: 'name' must be a non-empty string")
    results = [_result(p) for p in sorted(run_dir.glob("seed*/*/result.json"))]
    if not results:
        raise RecipePathError(f"no finished method in {run_dir} (no seed*/<method>/result.json yet)")
    metrics = [rec for rec in read_metrics(run_dir / "metrics.jsonl") if isinstance(rec, dict)]
    return _Run(name, results, metrics)


def _result(path: Path) -> dict[str, Any]:
    """A ``result.json``, checked: report inputs are data, and a bad one is a one-line error naming it."""
    try:
        r = json.loads(path.read_text())
    except ValueError as e:
        raise MorphError(f"{path}: not valid JSON ({e}); delete it or rerun that method") from None

    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(r, dict) and isinstance(r.get("method"), str) and num(r.get("top1"))
            and num(r.get("flops_norm"))):
        raise MorphError(f"{path}: a result needs 'method' (a string), 'top1' and 'flops_norm' (numbers); "
                         "delete it or rerun that method")
    return r


def collect(run_dirs: Sequence[str | Path]) -> dict[str, _Run]:
    """Load run directories and pool them by config name."""
    if not run_dirs:
        raise RecipeError("no run directory given")
    pooled: dict[str, _Run] = {}
    for d in run_dirs:
        run = _load_run(Path(d))
        if run.name in pooled:
            pooled[run.name].results += run.results
            pooled[run.name].metrics += run.metrics
        else:
            pooled[run.name] = run
    return pooled


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f} (1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def markdown_table(runs: dict[str, _Run]) -> str:
    """The results as a markdown table: one row per method, two columns per config."""
    header = ["Method"]
    for name in runs:
        header += [f"{name} top-1 (%)", f"{name} FLOPs", f"{name} params"]
    lines = [
        "Top-1 test accuracy (%), mean ± std over seeds (number of seeds), in the order of the paper's Table 1. "
        "FLOPs: training FLOPs relative to the target trained from scratch (1X); training FLOPs = 3 × forward "
        "FLOPs per image (fvcore, 1 multiply-add = 1 flop) × images seen; small network 1 is not counted; "
        "the growth step's own cost (GradMax, Firefly) is counted and listed below the table. "
        "params: parameters of the final model.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    growth_lines = []
    for method, label in METHODS.items():
        row, any_result = [label], False
        for name, run in runs.items():
            rs = [r for r in run.results if r["method"] == method]
            if rs:
                any_result = True
                params = sorted({r.get("params") for r in rs if isinstance(r.get("params"), int)})
                row += [_cell([r["top1"] for r in rs]), f"{statistics.fmean(r['flops_norm'] for r in rs):.2f}X",
                        "/".join(f"{n:,}" for n in params) or "–"]
                costs = [st.get("growth_flops_norm") for r in rs for st in r.get("stages", [])
                         if isinstance(st, dict) and st.get("stage") == "growth"]
                costs = [c for c in costs if isinstance(c, (int, float))]
                if costs:
                    growth_lines.append(f"- {name}, {label}: growth step {statistics.fmean(costs):.4f}X "
                                        f"(included in its {statistics.fmean(r['flops_norm'] for r in rs):.2f}X)")
            else:
                row += ["–", "–", "–"]
        if any_result:
            lines.append("| " + " | ".join(row) + " |")
    if growth_lines:
        lines += ["", "Cost of the growth step itself (training FLOPs relative to 1X):", "", *growth_lines]
    lines += ["", *stage_table(runs)]
    return "\n".join(lines) + "\n"


def stage_table(runs: dict[str, _Run]) -> list[str]:
    """Top-1 at the end of every stage of every row (net 1, net 2 or the small model at the growth point,
    then the grown model), mean ± std over seeds, with the stage's optimizer steps."""
    lines = ["Per stage: test top-1 (%) at the end of each stage, mean ± std (seeds), [optimizer steps]; "
             "`small` is the plain small model at the growth point that the four baselines share; "
             "`at growth`: the grown model's test top-1 before its first step (runs since it was recorded).", "",
             "| Method | config | stages |", "|---|---|---|"]
    for method, label in METHODS.items():
        for name, run in runs.items():
            rs = [r for r in run.results if r["method"] == method]
            if not rs:
                continue
            order: list[str] = []
            for r in rs:
                order += [st["stage"] for st in r.get("stages", []) if isinstance(st, dict) and "top1" in st
                          and st.get("stage") not in order]
            seeds = {r.get("seed") for r in rs}
            cells = []
            for stage in order:
                sts = [st for r in rs for st in r.get("stages", []) if isinstance(st, dict)
                       and st.get("stage") == stage and isinstance(st.get("top1"), (int, float))]
                steps = sorted({st.get("steps") for st in sts if isinstance(st.get("steps"), int)})
                start = [m["test_top1"] for m in run.metrics if m.get("kind") == "start" and m.get("method") == method
                         and m.get("stage") == stage and m.get("seed") in seeds
                         and isinstance(m.get("test_top1"), (int, float))]
                at = f"(at growth {_cell(start)}) " if start else ""
                cells.append(f"{stage} {at}{_cell([st['top1'] for st in sts])} [{'/'.join(map(str, steps))}]")
            lines.append(f"| {label} | {name} | {' → '.join(cells)} |")
    return lines


def plot(runs: dict[str, _Run], path: Path) -> None:
    """Test top-1 against cumulative training FLOPs, one panel per config, one colour per method;
    curves are the evaluated epochs of each seed, markers the final mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors, strict=False))  # 10 colours, 6 methods
    for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
        curves: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for rec in run.metrics:
            if (
                rec.get("kind") == "epoch"
                and rec.get("method") in colors
                and isinstance(rec.get("test_top1"), (int, float))
                and isinstance(rec.get("flops_norm"), (int, float))
            ):
                curves[(rec["method"], rec["seed"])].append((rec["flops_norm"], rec["test_top1"]))
        for (method, _), pts in curves.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[method], alpha=0.35, linewidth=1)
        for method, label in METHODS.items():
            rs = [r for r in run.results if r["method"] == method]
            if not rs:
                continue
            top1 = [r["top1"] for r in rs]
            err = statistics.stdev(top1) if len(top1) > 1 else 0.0
            x = statistics.fmean(r["flops_norm"] for r in rs)
            ax.errorbar(
                [x], [statistics.fmean(top1)], yerr=[err], fmt="o", color=colors[method], capsize=3, label=label
            )
        ax.set_title(name)
        ax.set_xlabel("training FLOPs (× target from scratch)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(run_dirs: Sequence[str | Path], out: str | Path = "report") -> ReportFiles:
    """Entry point of ``morph report RUN_DIR... [--out DIR]``.

    Args:
        run_dirs: run directories written by ``morph train``.
        out: directory for ``report.md`` and ``top1_vs_flops.png`` (created).

    Raises:
        RecipePathError: a run directory is missing or has no finished method.
        RecipeError: no run directory given.
    """
    runs = collect(run_dirs)
    out = Path(out)
    text = markdown_table(runs)
    md, png = out / "report.md", out / "top1_vs_flops.png"
    plot(runs, png)
    atomic_write_text(md, text)
    return ReportFiles(markdown=md, plot=png, text=text)
