"""The SuperWeights part of ``morph report``: rows written by :mod:`recipes.superweights`.

For every config, one row per SuperWeights row key (``stock``, ``learned-22000`` ...): test top-1, NLL and ECE
(15 bins) of the network or of the ensemble's mean softmax, mean ± sample std over seeds with the per-seed
values, template parameters (what a budget counts) and all parameters, forward FLOPs per image (fvcore, all
members), diversity, and the members' top-1. Then paired differences by seed with two-sided 95% Student-t
intervals (:mod:`recipes.stats`): every row minus the stock network, the sharing modes against each other at
each budget, and the SuperWeight ensemble against the deep ensemble. The plot is test top-1 (and NLL) against
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .stats import paired, summary

__all__ = ["check_result", "has_rows", "sw_comparison", "sw_table", "plot_params"]

ROW_ORDER = ("stock", "learned", "shape", "none", "sw-ensemble", "deep-ensemble")
MAX_MEMBERS = 16
MAX_COUNT = 1 << 50


def _num(v: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _int(v: Any, hi: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi


def check_result(r: dict[str, Any], need: Callable[[bool, str], None]) -> None:
    """The ``superweights`` field of a result, checked (each failure is ``need(False, what)``)."""
    s = r.get("superweights")
    need(isinstance(s, dict), "'superweights' is not an object")
    need(s.get("row") in ROW_ORDER, f"superweights.row is not one of {', '.join(ROW_ORDER)}")
    need(s.get("budget") is None or _int(s["budget"]), "superweights.budget is not a parameter count")
    need(_num(s.get("top1"), 0, 100), "superweights.top1 is not a percentage")
    need(_num(s.get("nll"), 0, 1e6), "superweights.nll is not a finite non-negative number")
    need(_num(s.get("ece"), 0, 1), "superweights.ece is not in [0, 1]")
    need(_num(s.get("diversity"), 0, 1e6), "superweights.diversity is not a finite non-negative number")
    for key in ("template_params", "params"):
        need(_int(s.get(key)), f"superweights.{key} is not a parameter count")
    need(_num(s.get("flops_forward"), 0, 1e18), "superweights.flops_forward is not a FLOP count")
    members = s.get("members")
    need(isinstance(members, list) and 1 <= len(members) <= MAX_MEMBERS, "superweights.members is not a list of 1 "
         f"to {MAX_MEMBERS} members")
    for i, m in enumerate(members):
        need(isinstance(m, dict) and _num(m.get("top1"), 0, 100) and _num(m.get("nll"), 0, 1e6)
             and _num(m.get("ece"), 0, 1), f"superweights.members[{i}] needs top1, nll and ece in range")


def has_rows(results: list[dict[str, Any]]) -> bool:
    return any("superweights" in r for r in results)


def _key_order(key: str, row: str, budget: int | None) -> tuple:
    return (ROW_ORDER.index(row), budget or 0, key)


def sw_comparison(runs: dict[str, Any]) -> dict[str, Any]:
    """Every SuperWeights row of every config over seeds, and the paired differences (JSON-able)."""
    configs = []
    for name, run in runs.items():
        rs = [r for r in run.results if "superweights" in r]
        if not rs:
            continue
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            by.setdefault(r["method"], []).append(r)
        rows = []
        for key, group in by.items():
            sw = group[0]["superweights"]
            seeds: dict[int, dict[str, Any]] = {}
            for r in group:
                seed = r.get("seed")
                if not isinstance(seed, int) or isinstance(seed, bool) or seed in seeds:
                    from morph.errors import MorphError

                    raise MorphError(f"{name}, {key}: a result without an integer seed, or a seed given twice")
                seeds[seed] = r["superweights"]

            def stat(f: Callable[[dict[str, Any]], float], seeds=seeds) -> dict[str, Any]:
                return summary({s: f(v) for s, v in seeds.items()}).to_dict()

            n_members = max(len(v["members"]) for v in seeds.values())
            rows.append({
                "key": key, "row": sw["row"], "budget": sw.get("budget"), "label": group[0].get("label", key),
                "top1": stat(lambda v: v["top1"]), "nll": stat(lambda v: v["nll"]),
                "ece": stat(lambda v: 100.0 * v["ece"]), "diversity": stat(lambda v: v["diversity"]),
                "template_params": sorted({v["template_params"] for v in seeds.values()}),
                "params": sorted({v["params"] for v in seeds.values()}),
                "flops_forward": sorted({v["flops_forward"] for v in seeds.values()}),
                "members_top1": [stat(lambda v, i=i: v["members"][i]["top1"] if i < len(v["members"]) else math.nan)
                                 for i in range(n_members)] if n_members > 1 else [],
                "clusters": sorted({v["clusters"] for v in seeds.values() if _int(v.get("clusters"))}),
                "untied": sorted({v["untied"] for v in seeds.values() if _int(v.get("untied"))}),
                "_top1": {s: v["top1"] for s, v in seeds.items()}, "_nll": {s: v["nll"] for s, v in seeds.items()},
            })
        rows.sort(key=lambda r: _key_order(r["key"], r["row"], r["budget"]))
        keyed = {r["key"]: r for r in rows}
        pairs = []

        def pair(a: dict[str, Any], b: dict[str, Any], pairs: list[dict[str, Any]] = pairs) -> None:
            t = paired(a["_top1"], b["_top1"])
            n = paired(a["_nll"], b["_nll"])
            if t is not None:
                pairs.append({"a": a["key"], "b": b["key"], "top1": t.to_dict(), "nll": n.to_dict()})

        stock = keyed.get("stock")
        for r in rows:
            if stock is not None and r is not stock:
                pair(r, stock)
        budgets = sorted({r["budget"] for r in rows if r["row"] in ("learned", "shape", "none")})
        for b in budgets:
            at = {r["row"]: r for r in rows if r["budget"] == b and r["row"] in ("learned", "shape", "none")}
            for x, y in (("learned", "shape"), ("learned", "none"), ("shape", "none")):
                if x in at and y in at:
                    pair(at[x], at[y])
        if "sw-ensemble" in keyed and "deep-ensemble" in keyed:
            pair(keyed["sw-ensemble"], keyed["deep-ensemble"])
        for r in rows:
            del r["_top1"], r["_nll"]
        configs.append({"config": name, "rows": rows, "pairs": pairs})
    return {
        "statistic": "test top-1 (%), NLL and ECE (%, 15 bins) of the network or of the ensemble's mean softmax, "
                     "over seeds: mean and sample std; differences paired by seed with the two-sided 95% Student-t "
                     "interval mean ± t(0.975, n-1) · std / sqrt(n)",
        "configs": configs,
    }


def _fmt(s: dict[str, Any], digits: int = 2) -> str:
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} (1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['n']})"


def _fmt_pair(p: dict[str, Any], digits: int = 2) -> str:
    if p["low"] is None:
        return f"{p['mean']:+.{digits}f} (1 pair)"
    return f"{p['mean']:+.{digits}f} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}] ({p['n']})"


def _counts(values: list[int]) -> str:
    return "/".join(f"{v:,}" for v in values)


def sw_table(data: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """The SuperWeights rows and paired differences as markdown lines (``label`` makes names table-safe)."""
    lines: list[str] = []
    for cfg in data["configs"]:
        lines += [
            f"SuperWeights rows of `{label(cfg['config'])}`: test top-1 (%), NLL and ECE (%, 15 equal-width bins) of "
            "the network, or of the ensemble's mean softmax; mean ± sample std (seeds). Template params: the shared "
            "banks (what a budget counts), or the stock layers' weights of a plain network (deep ensemble: all "
            "members'); params: every parameter (coefficients, norms, heads). FLOPs: forward multiply-adds per image "
            "(fvcore), all members.",
            "",
            "| Row | top-1 (%) | top-1 per seed | NLL | ECE (%) | template params | params | FLOPs (M) | "
            "diversity | members' top-1 (%) |",
            "|" + "---|" * 10,
        ]
        for r in cfg["rows"]:
            per_seed = ", ".join(f"{k}: {v:.2f}" for k, v in r["top1"]["per_seed"].items())
            members = " / ".join(f"{m['mean']:.2f}" for m in r["members_top1"]) or "–"
            div = _fmt(r["diversity"], 3) if r["members_top1"] else "–"
            flops = "/".join(f"{f / 1e6:.2f}" for f in r["flops_forward"])
            lines.append(f"| {label(r['label'])} | {_fmt(r['top1'])} | {per_seed} | {_fmt(r['nll'], 3)} | "
                         f"{_fmt(r['ece'])} | {_counts(r['template_params'])} | {_counts(r['params'])} | {flops} | "
                         f"{div} | {members} |")
        if cfg["pairs"]:
            names = {r["key"]: label(r["label"]) for r in cfg["rows"]}
            lines += ["", "Paired by seed: row A minus row B, mean [two-sided 95% Student-t interval] (pairs).", "",
                      "| A | B | top-1 (points) | NLL |", "|---|---|---|---|"]
            for p in cfg["pairs"]:
                lines.append(f"| {names[p['a']]} | {names[p['b']]} | {_fmt_pair(p['top1'])} | "
                             f"{_fmt_pair(p['nll'], 3)} |")
        lines.append("")
    return lines


def plot_params(data: dict[str, Any], path: Any, label: Callable[[str], str]) -> None:
    """Test top-1 and NLL against parameters (all of them), one pair of panels per config: the single-network
    rows of one sharing mode joined across budgets, ensembles and the stock network as single markers, mean ±
    std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = data["configs"]
    fig, axes = plt.subplots(len(configs), 2, figsize=(12, 4.5 * len(configs)), squeeze=False)
    style = {"stock": ("black", "*"), "learned": ("tab:blue", "o"), "shape": ("tab:orange", "s"),
             "none": ("tab:green", "^"), "sw-ensemble": ("tab:red", "D"), "deep-ensemble": ("tab:purple", "P")}
    names = {"stock": "stock network", "learned": "learned sharing", "shape": "one bank per shape",
             "none": "no sharing (narrowed)", "sw-ensemble": "SuperWeight ensemble", "deep-ensemble": "deep ensemble"}
    for (ax_t, ax_n), cfg in zip(axes, configs, strict=True):
        for ax, metric, ylabel in ((ax_t, "top1", "test top-1 (%)"), (ax_n, "nll", "test NLL")):
            for row in ROW_ORDER:
                rs = [r for r in cfg["rows"] if r["row"] == row]
                if not rs:
                    continue
                color, marker = style[row]
                xs = [sum(r["params"]) / len(r["params"]) for r in rs]
                ys = [r[metric]["mean"] for r in rs]
                err = [r[metric]["std"] or 0.0 for r in rs]
                ax.errorbar(xs, ys, yerr=err, fmt=marker + ("-" if len(rs) > 1 else ""), color=color, capsize=3,
                            label=names[row])
            ax.set_xlabel("parameters (all)")
            ax.set_ylabel(ylabel)
            ax.set_title(label(cfg["config"]).replace("$", r"\$"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)
