"""``morph report``: the paper's Table 1 and a top-1 vs training-FLOPs plot from run directories.

Runs are grouped by config name, so seeds trained into separate run directories of the same config
are pooled. Each table cell is the final test top-1, mean ± sample std over seeds (the number of
seeds in parentheses), next to the FLOPs spent relative to the target trained from scratch (1X).

The comparison section lists every row of every config with its per-seed values, mean ± std, and its
difference from the base config's MixtureGrowth and Small Match rows, paired by seed, with a two-sided
95% Student-t interval (:mod:`recipes.stats`); the base config is the first run directory's, or
``base=``. The same figures, and the at-growth accuracies (stale and re-estimated BatchNorm
statistics), go to ``report.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morph.errors import MorphError
from morph.inputs import read_json, read_yaml
from morph.paths import Outputs, check_output
from morph.text import printable

from . import swreport
from .config import METHODS
from .errors import RecipeError, RecipePathError
from .metrics import read_metrics
from .stats import paired, summary

__all__ = ["ReportFiles", "collect", "comparison", "comparison_table", "main", "markdown_table", "plot"]

#: The rows every other row is compared with (paired by seed), in the base config.
REFERENCES = ("mixturegrowth", "small-match")


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`main` wrote.

    Attributes:
        markdown: the table, ``report.md``.
        plot: the figure, ``top1_vs_flops.png``.
        text: the markdown text (for printing).
        json: the statistics, ``report.json`` (:func:`comparison`).
        data: what ``report.json`` holds.
    """

    markdown: Path
    plot: Path
    text: str
    json: Path
    data: dict[str, Any]
    params_plot: Path | None = None


@dataclass
class _Run:
    name: str
    results: list[dict[str, Any]]
    metrics: list[dict[str, Any]]


MAX_RESULT_BYTES = 1 << 20  # a result.json is about 2 KiB
MAX_RUN_CONFIG_BYTES = 1 << 20
MAX_RESULTS = 10_000
MAX_FLOPS_NORM = 1e6


def _load_run(run_dir: Path) -> _Run:
    """A run directory's name, results and metrics, every file read as data (:mod:`morph.inputs`): regular
    files inside the directory, never through a link, bounded in size, YAML without aliases, JSON without
    NaN, each field type-checked and bounded before it is used."""
    shown = printable(run_dir)
    if not run_dir.is_dir():
        raise RecipePathError(f"run directory {shown} does not exist")
    cfg_path = run_dir / "config.yaml"
    if not os.path.lexists(cfg_path):
        raise RecipePathError(f"{shown} is not a run directory: no config.yaml (made by `morph train`)")
    cfg = read_yaml(cfg_path, limit=MAX_RUN_CONFIG_BYTES, follow=False, what="the run's config") or {}
    if not isinstance(cfg, dict):
        raise MorphError(f"{printable(cfg_path)}: not a config (a mapping of sections)")
    name = cfg.get("name", run_dir.name)
    if not isinstance(name, str) or not name or len(name) > 200:
        raise MorphError(f"{printable(cfg_path)}: 'name' must be a non-empty string of at most 200 characters")
    paths = []
    for seed_dir in sorted(run_dir.glob("seed*")):
        if not _SEED_DIR.fullmatch(seed_dir.name) or not seed_dir.is_dir() or seed_dir.is_symlink():
            continue
        paths += [p for p in sorted(seed_dir.glob("*/result.json")) if not p.parent.is_symlink()]
    if len(paths) > MAX_RESULTS:
        raise MorphError(f"{shown}: {len(paths):,} result.json files; at most {MAX_RESULTS:,}")
    results = [_result(p) for p in paths]
    if not results:
        raise RecipePathError(f"no finished method in {shown} (no seed*/<method>/result.json yet)")
    metrics = [rec for rec in read_metrics(run_dir / "metrics.jsonl") if _metric_ok(rec)]
    return _Run(name, results, metrics)


_SEED_DIR = re.compile(r"seed[0-9]{1,19}")


def _num(v: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _int(v: Any, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi


def _metric_ok(rec: dict[str, Any]) -> bool:
    """A metrics record the report can use: the fields it reads have their types (others are ignored)."""
    kinds = {"kind": str, "method": (str, type(None)), "stage": str}
    for key, tp in kinds.items():
        if key in rec and not isinstance(rec[key], tp):
            return False
    if "seed" in rec and not _int(rec["seed"]):
        return False
    return all(_num(rec[k], 0, MAX_FLOPS_NORM) for k in ("test_top1", "flops_norm") if rec.get(k) is not None)


def _result(path: Path) -> dict[str, Any]:
    """A ``result.json``, checked: report inputs are data, and a bad one is a one-line error naming it and the
    field."""
    r = read_json(path, limit=MAX_RESULT_BYTES, follow=False, what="a method's result", max_depth=6)
    shown = printable(path)

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise MorphError(f"{shown}: {what}; delete it or rerun that method")

    need(isinstance(r, dict) and isinstance(r.get("method"), str) and _num(r.get("top1"))
         and _num(r.get("flops_norm")),
         "a result needs 'method' (a string), 'top1' and 'flops_norm' (numbers)")
    need(len(r["method"]) <= 64, "'method' is longer than a method name")
    need(0 <= r["top1"] <= 100, f"'top1' {r['top1']!r} is not a percentage")
    need(0 <= r["flops_norm"] <= MAX_FLOPS_NORM, f"'flops_norm' {r['flops_norm']!r} is out of range")
    need(r.get("seed") is None or _int(r["seed"]), "'seed' is not a non-negative integer")
    need(r.get("params") is None or _int(r["params"]), "'params' is not a non-negative integer")
    stages = r.get("stages", [])
    need(isinstance(stages, list) and len(stages) <= 100, "'stages' is not a list of at most 100 stages")
    for i, st in enumerate(stages):
        need(isinstance(st, dict), f"stages[{i}] is not an object")
        need(isinstance(st.get("stage"), str) and len(st["stage"]) <= 64, f"stages[{i}].stage is not a stage name")
        need("top1" not in st or _num(st["top1"], 0, 100), f"stages[{i}].top1 is not a percentage")
        need("steps" not in st or _int(st["steps"]), f"stages[{i}].steps is not a non-negative integer")
        need("growth_flops_norm" not in st or _num(st["growth_flops_norm"], 0, MAX_FLOPS_NORM),
             f"stages[{i}].growth_flops_norm is out of range")
    if "superweights" in r:  # a SuperWeights row (recipes/superweights.py)
        swreport.check_result(r, need)
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


def _label(text: str) -> str:
    """A name from a run's files, as text in the markdown table: printable, and no cell separator."""
    return printable(text).replace("|", "\\|")


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f} (1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def markdown_table(runs: dict[str, _Run]) -> str:
    """The results as a markdown table: one row per method, two columns per config."""
    header = ["Method"]
    for name in runs:
        header += [f"{_label(name)} top-1 (%)", f"{_label(name)} FLOPs", f"{_label(name)} params"]
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
                    growth_lines.append(f"- {_label(name)}, {label}: growth step {statistics.fmean(costs):.4f}X "
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
             "`at growth`: the grown model's test top-1 before its first step (runs since it was recorded), with the "
             "BatchNorm statistics growth left and (`BN re-estimated`) re-estimated on training batches.", "",
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
                starts = [m for m in run.metrics if m.get("kind") == "start" and m.get("method") == method
                          and m.get("stage") == stage and m.get("seed") in seeds]
                start = [m["test_top1"] for m in starts if isinstance(m.get("test_top1"), (int, float))]
                bn = [m["test_top1_bn"] for m in starts if isinstance(m.get("test_top1_bn"), (int, float))]
                bn_cell = f"; BN re-estimated {_cell(bn)}" if bn else ""
                at = f"(at growth {_cell(start)}{bn_cell}) " if start else ""
                cells.append(f"{_label(stage)} {at}{_cell([st['top1'] for st in sts])} [{'/'.join(map(str, steps))}]")
            lines.append(f"| {label} | {_label(name)} | {' → '.join(cells)} |")
    return lines


def _row_label(config: str, method: str, base: str) -> str:
    return METHODS[method] if config == base else f"{METHODS[method]} [{config}]"


def _per_seed(values: list[tuple[Any, float]], where: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for seed, v in values:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise MorphError(f"{where}: a result without an integer 'seed'; delete it or rerun that method")
        if seed in out:
            raise MorphError(f"{where}: seed {seed} is in two run directories; give each seed once")
        out[seed] = v
    return out


def comparison(runs: dict[str, _Run], base: str | None = None) -> dict[str, Any]:
    """Every row of every config: final top-1 per seed, mean ± std, at-growth top-1 (stale and
    re-estimated BatchNorm statistics), and the paired difference from the base config's
    MixtureGrowth and Small Match rows with its 95% Student-t interval. Rows follow the paper's
    Table 1 order; a method's row of the base config comes first, then the other configs' in the
    order given.

    Args:
        runs: from :func:`collect`.
        base: the config whose MixtureGrowth and Small Match rows are the references (default: the first).

    Raises:
        RecipeError: ``base`` is not one of the configs.
        MorphError: a result without a seed, or one seed of a row in two run directories.
    """
    names = list(runs)
    base = names[0] if base is None else base
    if base not in runs:
        raise RecipeError(f"base={base!r} is not one of the configs reported: {', '.join(names)}")
    tops: dict[tuple[str, str], dict[int, float]] = {}
    for name, run in runs.items():
        for method in METHODS:
            rs = [(r.get("seed"), float(r["top1"])) for r in run.results if r["method"] == method]
            if rs:
                tops[(name, method)] = _per_seed(rs, f"{name}, {METHODS[method]}")
    refs = {m: tops.get((base, m)) for m in REFERENCES}
    rows = []
    for (name, method), top in tops.items():
        run = runs[name]
        starts = [m for m in run.metrics if m.get("kind") == "start" and m.get("method") == method
                  and m.get("stage") == "grown" and isinstance(m.get("seed"), int)]
        at: dict[str, Any] = {}
        for key, field_ in (("stale", "test_top1"), ("bn", "test_top1_bn")):
            # a rerun's record replaces an earlier one of the same seed
            vals = {m["seed"]: float(m[field_]) for m in starts if isinstance(m.get(field_), (int, float))
                    and m["seed"] in top}
            at[key] = summary(vals).to_dict() if vals else None
        flops = [r["flops_norm"] for r in run.results if r["method"] == method]
        vs = {}
        for ref, ref_top in refs.items():
            same = name == base and method == ref
            p = None if ref_top is None or same else paired(top, ref_top)
            vs[ref] = p.to_dict() if p is not None else None
        rows.append({"config": name, "method": method, "label": _row_label(name, method, base),
                     "flops_norm": statistics.fmean(flops), "top1": summary(top).to_dict(), "at_growth": at,
                     "vs": vs})
    order = list(METHODS)
    rows.sort(key=lambda r: (order.index(r["method"]), r["config"] != base, names.index(r["config"])))
    return {
        "statistic": "final test top-1 (%) over seeds: mean and sample std; each row minus a reference row "
                     "(the base config's MixtureGrowth and Small Match), paired by seed, with the two-sided 95% "
                     "Student-t interval mean ± t(0.975, n-1) · std / sqrt(n) over the n common seeds",
        "base": base,
        "references": {m: METHODS[m] for m in REFERENCES},
        "rows": rows,
    }


def _fmt_summary(s: dict[str, Any] | None) -> str:
    if s is None:
        return "–"
    if s["std"] is None:
        return f"{s['mean']:.2f} (1)"
    return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['n']})"


def _fmt_paired(p: dict[str, Any] | None) -> str:
    if p is None:
        return "–"
    if p["low"] is None:
        return f"{p['mean']:+.2f} (1 pair, no interval)"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] ({p['n']})"


def comparison_table(data: dict[str, Any]) -> list[str]:
    """The :func:`comparison` as markdown lines."""
    refs = data["references"]
    lines = [
        f"Comparison: final test top-1 (%) per seed and mean ± std (seeds); at growth: the grown model before its "
        f"first step, BatchNorm statistics stale / re-estimated on training batches; the last columns: the row minus "
        f"{' and minus '.join(refs.values())} of `{_label(data['base'])}`, paired by seed, mean "
        f"[two-sided 95% Student-t interval] (pairs).",
        "",
        "| Row | top-1 per seed | mean ± std | FLOPs | at growth: stale / BN re-estimated | "
        + " | ".join(f"− {label}" for label in refs.values()) + " |",
        "|" + "---|" * (5 + len(refs)),
    ]
    for row in data["rows"]:
        per_seed = ", ".join(f"{k}: {v:.2f}" for k, v in row["top1"]["per_seed"].items())
        at = row["at_growth"]
        at_cell = "–" if at["stale"] is None else f"{_fmt_summary(at['stale'])} / {_fmt_summary(at['bn'])}"
        cells = [_label(row["label"]), per_seed, _fmt_summary(row["top1"]), f"{row['flops_norm']:.2f}X", at_cell]
        cells += [_fmt_paired(row["vs"][m]) for m in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_paired(data: dict[str, Any], path: Path) -> None:
    """The paired differences from each reference with their 95% intervals, one panel per reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = data["references"]
    rows = data["rows"]
    fig, axes = plt.subplots(1, len(refs), figsize=(6 * len(refs), 0.35 * len(rows) + 1.5), squeeze=False)
    for ax, (ref, label) in zip(axes[0], refs.items(), strict=True):
        ys = list(range(len(rows)))[::-1]
        for y, row in zip(ys, rows, strict=True):
            p = row["vs"][ref]
            if p is None:
                continue
            if p["low"] is not None:
                ax.plot([p["low"], p["high"]], [y, y], color="tab:blue", linewidth=2)
            ax.plot([p["mean"]], [y], "o", color="tab:blue")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [row["label"] for row in rows], fontsize=7)
        ax.set_xlabel(f"minus {label} (top-1 points, by seed; 95% t-interval)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` (a temporary name of :class:`morph.paths.Outputs`, whatever its suffix)."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


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
                curves[(rec["method"], rec.get("seed"))].append((rec["flops_norm"], rec["test_top1"]))
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
        ax.set_title(_label(name).replace("$", r"\$"))
        ax.set_xlabel("training FLOPs (× target from scratch)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def main(run_dirs: Sequence[str | Path], out: str | Path = "report", base: str | None = None, *,
         force: bool = False) -> ReportFiles:
    """Entry point of ``morph report RUN_DIR... [--out DIR] [--base CONFIG] [--force]``.

    The files are written all or nothing (:class:`morph.paths.Outputs`): atomically, never through a
    symbolic link, never over an existing file unless ``force``; a failure leaves no file and no new folder.

    Args:
        run_dirs: run directories written by ``morph train``.
        out: directory for ``report.md``, ``report.json``, ``top1_vs_flops.png`` and
            ``paired_differences.png`` (created); with SuperWeights rows also their table and
            ``top1_vs_params.png`` (:mod:`recipes.swreport`).
        base: the config whose MixtureGrowth and Small Match rows the comparison pairs every row with
            (default: the first run directory's).
        force: replace existing report files.

    Raises:
        RecipePathError: a run directory is missing or has no finished method.
        RecipeError: no run directory given, or ``base`` is not among the configs.
        MorphError: a run's file that is not what ``morph train`` writes (one line naming it and the field);
            an output that is a symbolic link, or exists without ``force``.
    """
    out = Path(out)
    md, js, png, paired = out / "report.md", out / "report.json", out / "top1_vs_flops.png", out / "paired_differences.png"
    params_png = out / "top1_vs_params.png"
    for path in (md, js, png, paired, params_png):  # before any work
        check_output(path, force=force, option="'-o' / '--out'")
    runs = collect(run_dirs)
    growth = any(r["method"] in METHODS for run in runs.values() for r in run.results)
    sw = any(swreport.has_rows(run.results) for run in runs.values())
    data: dict[str, Any] = {}
    text = ""
    if growth or not sw:
        data = comparison(runs, base)
        text = markdown_table(runs) + "\n" + "\n".join(comparison_table(data)) + "\n"
    if sw:  # SuperWeights rows (recipes/superweights.py): their table and top-1 against parameters
        data["superweights"] = swreport.sw_comparison(runs)
        text += ("\n" if text else "") + "\n".join(swreport.sw_table(data["superweights"], _label))
    with Outputs(force=force, option="'-o' / '--out'") as files:
        if growth or not sw:
            files.write(png, lambda tmp: plot(runs, tmp))
            files.write(paired, lambda tmp: plot_paired(data, tmp))
        if sw:
            files.write(params_png, lambda tmp: swreport.plot_params(data["superweights"], tmp, _label))
        files.write_bytes(js, (json.dumps(data, indent=1) + "\n").encode())
        files.write_bytes(md, text.encode())
    return ReportFiles(markdown=md, plot=png if growth or not sw else params_png, text=text, json=js, data=data,
                       params_plot=params_png if sw else None)
