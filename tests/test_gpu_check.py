"""benchmarks/gpu_check.py end to end in its CPU form (``--device cpu``): the same code the GPU run
takes (smoke recipe eager and compiled, training images/s of template/plain halves and fused/stock,
every row of Table 1 with its growth step on the training device, the official schedule, the zero-init fusion),
at tiny sizes. About a minute and a half of CPU time: the long tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from morph.recipes.config import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MORPH_DATA_CACHE=str(tmp_path / "cache"))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out",
                           str(out), "--work-dir", str(tmp_path / "work")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tiny"] and set(r["timings_s"]) == {"smoke", "throughput", "rows", "total"}
    assert [x["method"] for x in r["smoke"]["eager"]["results"]] and r["smoke"]["compile"]["results"]
    t = r["throughput"]["wrn-10-1"]
    assert all(t[k] > 0 for k in ("plain_half", "template_half", "stock", "fused"))
    assert sorted(x["method"] for x in r["rows"]["results"]) == sorted(METHODS)
    assert sorted(x["method"] for x in r["rows"]["official"]["results"]) == ["mixturegrowth", "net2net"]
    assert [x["method"] for x in r["rows"]["init_zero"]["results"]] == ["mixturegrowth"]
    rows = {x["method"]: x for x in r["rows"]["results"]}
    for method in ("random", "net2net", "firefly", "gradmax"):
        assert rows[method]["growth_device"] == "cpu" and rows[method]["growth_wall_s"] >= 0  # the training device
    for method in ("random", "net2net", "firefly", "gradmax", "mixturegrowth", "mixturegrowth-nofusion"):
        at = rows[method]["at_growth"]  # the grown model tested before its first step, stale and re-estimated BN
        assert 0 <= at["stale"] <= 100 and 0 <= at["bn"] <= 100, method
    assert rows["large"]["at_growth"] is None and rows["large"]["growth_device"] is None
    assert "(b) training images/s" in proc.stdout and "(c) rows" in proc.stdout and "growth.init=zero" in proc.stdout
