"""``morph report`` on hand-made run directories: mean ± std over seeds, pooling, plot, errors."""

from __future__ import annotations

import json

import pytest
import yaml
from morph.recipes import report


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
