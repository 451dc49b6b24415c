"""``morph report`` on hand-made run directories: mean ± std over seeds, pooling, plot, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from morph.recipes import report

from morph.errors import MorphError


def make_run(root, name, rows):
    """A run directory with ``rows`` = [(method, seed, top1, flops_norm)]."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"name": name}))
    lines = []
    for method, seed, top1, norm in rows:
        d = root / f"seed{seed}" / method
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"method": method, "seed": seed, "top1": top1, "flops_norm": norm}))
        for i in range(1, 4):
            lines.append(
                json.dumps(
                    {
                        "kind": "epoch",
                        "seed": seed,
                        "method": method,
                        "flops_norm": norm * i / 3,
                        "test_top1": top1 * i / 3,
                    }
                )
            )
    lines.append(json.dumps({"kind": "epoch", "seed": 0, "method": None, "flops_norm": 0.0, "test_top1": 5.0}))  # net 1
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_mean_std_over_seeds_pooled_across_run_dirs(tmp_path):
    a = make_run(tmp_path / "a", "c10", [("large", 0, 96.0, 1.0), ("mixturegrowth", 0, 96.5, 0.45)])
    b = make_run(tmp_path / "b", "c10", [("large", 1, 97.0, 1.0), ("mixturegrowth", 1, 96.7, 0.45)])
    c = make_run(tmp_path / "c", "c100", [("mixturegrowth", 0, 81.5, 0.45)])
    files = report.main([a, b, c], tmp_path / "out")
    main_table = files.text.split("Per stage")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    assert rows["Method"] == (
        "| Method | c10 top-1 (%) | c10 FLOPs | c10 params | c100 top-1 (%) | c100 FLOPs | c100 params |"
    )
    assert rows["Large"] == "| Large | 96.50 ± 0.71 (2) | 1.00X | – | – | – | – |"  # no params recorded
    assert rows["MixtureGrowth"] == "| MixtureGrowth | 96.60 ± 0.14 (2) | 0.45X | – | 81.50 (1) | 0.45X | – |"
    assert "Small" not in rows  # methods nobody ran are left out
    assert list(rows)[1:] == ["Large", "MixtureGrowth"]  # the paper's row order
    assert files.plot.stat().st_size > 1000 and files.plot.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*missing does not exist"):
        report.main([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a run directory: no config.yaml"):
        report.main([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty" / "config.yaml").write_text("name: x\n")
    with pytest.raises(FileNotFoundError, match="no finished method in"):
        report.main([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ValueError, match="no run directory given"):
        report.main([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_per_stage_accuracies(tmp_path):
    """The report lists every row's stages in order with top-1 mean ± std and optimizer steps."""
    a = make_run(tmp_path / "a", "c10", [("mixturegrowth", 0, 60.0, 0.45), ("random", 0, 58.0, 0.45)])
    b = make_run(tmp_path / "b", "c10", [("mixturegrowth", 1, 62.0, 0.45)])
    stages = {"mixturegrowth": [("net1", 50.0, 780), ("net2", 52.0, 780), ("grown", 60.0, 156)],
              "random": [("small", 51.0, 780), ("growth", None, 0), ("grown", 58.0, 156)]}
    for root, seed, shift in ((a, 0, 0.0), (b, 1, 2.0)):
        for method, sts in stages.items():
            f = root / f"seed{seed}" / method / "result.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            r["stages"] = [{"stage": n, "steps": k, **({"top1": t + shift} if t is not None else {})} for n, t, k in sts]
            f.write_text(json.dumps(r))
    with open(a / "metrics.jsonl", "a") as f:  # the grown model tested before its first step (seed 0)
        f.write(json.dumps({"kind": "start", "seed": 0, "method": "mixturegrowth", "stage": "grown", "step": 0,
                            "test_top1": 55.0}) + "\n")
    text = report.main([a, b], tmp_path / "out").text
    assert "| MixtureGrowth | c10 | net1 51.00 ± 1.41 (2) [780] → net2 53.00 ± 1.41 (2) [780] → grown (at growth 55.00 (1)) 61.00 ± 1.41 (2) [156] |" in text
    assert "| Random | c10 | small 51.00 (1) [780] → grown 58.00 (1) [156] |" in text  # the growth step has no top-1


def test_comparison_paired_by_seed(tmp_path):
    """Per-seed values, mean ± std and the paired 95% t-intervals against MixtureGrowth and Small Match
    of the base config, against a float64 computation by hand; report.json holds the same figures."""
    mg = {0: 50.0, 1: 51.5, 2: 49.0, 3: 52.5, 4: 50.5}
    sm = {0: 51.0, 1: 51.0, 2: 50.5, 3: 51.5, 4: 52.0}
    rnd = {0: 48.0, 1: 50.0, 2: 47.5, 3: 49.0, 4: 48.5}
    var = {0: 53.0, 1: 52.0, 2: 51.0}  # another config (a MixtureGrowth variant), three seeds
    rows = [(m, s, v, 0.45) for m, vals in (("mixturegrowth", mg), ("small-match", sm), ("random", rnd))
            for s, v in vals.items()]
    a = make_run(tmp_path / "a", "base", [r for r in rows if r[1] < 3])
    b = make_run(tmp_path / "b", "base", [r for r in rows if r[1] >= 3])
    c = make_run(tmp_path / "c", "base-zero", [("mixturegrowth", s, v, 0.45) for s, v in var.items()])
    with open(c / "metrics.jsonl", "a") as f:  # at growth: stale, then BN re-estimated; seed 1 recorded twice
        for seed, stale, bn in ((0, 40.0, 50.0), (1, 10.0, 11.0), (1, 42.0, 51.0), (2, 44.0, 49.0)):
            f.write(json.dumps({"kind": "start", "seed": seed, "method": "mixturegrowth", "stage": "grown",
                                "test_top1": stale, "test_top1_bn": bn}) + "\n")
    files = report.main([a, b, c], tmp_path / "out")
    data = json.loads(files.json.read_text())
    assert data == json.loads(json.dumps(files.data)) and data["base"] == "base"
    by = {r["label"]: r for r in data["rows"]}
    assert list(by) == ["Small Match", "Random", "MixtureGrowth", "MixtureGrowth [base-zero]"]  # Table 1 order

    def interval(x, y):
        seeds = sorted(set(x) & set(y))
        d = np.array([x[s] - y[s] for s in seeds], dtype=np.float64)
        t = {2: 4.302652729749464, 4: 2.7764451051977987}[len(d) - 1]  # t(0.975, n - 1)
        h = t * d.std(ddof=1) / np.sqrt(len(d))
        return d.mean(), d.mean() - h, d.mean() + h, len(d)

    for label, vals in (("Random", rnd), ("Small Match", sm), ("MixtureGrowth", mg), ("MixtureGrowth [base-zero]", var)):
        r = by[label]
        assert r["top1"]["per_seed"] == {str(s): v for s, v in vals.items()}
        assert r["top1"]["mean"] == pytest.approx(np.mean(list(vals.values())), abs=1e-12)
        assert r["top1"]["std"] == pytest.approx(np.std(list(vals.values()), ddof=1), abs=1e-12)
        for ref, ref_vals in (("mixturegrowth", mg), ("small-match", sm)):
            p = r["vs"][ref]
            if ref_vals is vals:
                assert p is None  # a reference is not compared with itself
                continue
            mean, low, high, n = interval(vals, ref_vals)
            assert (p["mean"], p["low"], p["high"], p["n"]) == (pytest.approx(mean, abs=1e-12),
                                                               pytest.approx(low, abs=1e-9),
                                                               pytest.approx(high, abs=1e-9), n)
    at = by["MixtureGrowth [base-zero]"]["at_growth"]
    assert at["stale"]["per_seed"] == {"0": 40.0, "1": 42.0, "2": 44.0}  # the later record of seed 1 wins
    assert at["bn"]["mean"] == pytest.approx(50.0)
    assert by["Random"]["at_growth"] == {"stale": None, "bn": None}
    # the markdown row, and the interval as printed
    m, lo, hi, _ = interval(rnd, mg)
    line = next(x for x in files.text.splitlines() if x.startswith("| Random | 0: 48.00"))
    assert line == (f"| Random | 0: 48.00, 1: 50.00, 2: 47.50, 3: 49.00, 4: 48.50 | 48.60 ± 0.96 (5) | 0.45X | – | "
                    f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] (5) | {interval(rnd, sm)[0]:+.2f} [{interval(rnd, sm)[1]:+.2f}, "
                    f"{interval(rnd, sm)[2]:+.2f}] (5) |")
    assert "| MixtureGrowth [base-zero] | 0: 53.00, 1: 52.00, 2: 51.00 | 52.00 ± 1.00 (3) | 0.45X | 42.00 ± 2.00 (3) / 50.00 ± 1.00 (3) |" in files.text
    assert (tmp_path / "out" / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"
    # another base; a base that is not a config; one seed twice
    assert report.main([a, b, c], tmp_path / "out2", base="base-zero").data["base"] == "base-zero"
    with pytest.raises(ValueError, match="base='nope' is not one of the configs"):
        report.main([a, c], tmp_path / "out3", base="nope")
    with pytest.raises(MorphError, match="seed 0 is in two run directories"):
        report.main([a, a], tmp_path / "out4")


def test_comparison_rows_in_table_order_base_first(tmp_path):
    v = make_run(tmp_path / "v", "variant", [("mixturegrowth", 0, 40.0, 0.45)])
    b = make_run(tmp_path / "b", "base", [("mixturegrowth", 0, 41.0, 0.45), ("small", 0, 39.0, 0.25)])
    data = report.main([v, b], tmp_path / "out", base="base").data
    assert [r["label"] for r in data["rows"]] == ["Small", "MixtureGrowth", "MixtureGrowth [variant]"]
    assert data["rows"][2]["vs"]["mixturegrowth"]["mean"] == pytest.approx(-1.0)
