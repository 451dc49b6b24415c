"""The growth baselines of Table 1 (Random, Net2Net, Firefly, GradMax) in ``morph train``, budgets, the
post-growth options and resuming a killed baseline row (CPU, synthetic data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from morph.recipes import run
from morph.recipes.checkpoint import load_checkpoint
from morph.recipes.config import GROWTH_BASELINES, METHODS, OptimConfig
from morph.recipes.metrics import read_metrics
from morph.recipes.trainer import LRSchedule, _set_optimizer_state, build_optimizer, optimizer_state_by_name
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "data.train_subset=64", "data.test_subset=32", "optim.batch_size=16",
        "growth.firefly_steps=1"]


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("seed0/*/result.json")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows") / "run"
    run.main("cifar10-smoke", out_dir=out, overrides=TINY)
    return out


@pytest.mark.slow
def test_every_row_runs_end_to_end_in_the_smoke_config(smoke, tmp_path):
    results = _results(smoke)
    assert sorted(results) == sorted(METHODS)
    for m in GROWTH_BASELINES:
        stages = {s["stage"]: s for s in results[m]["stages"]}
        assert list(stages) == ["small", "growth", "grown"]
        assert stages["small"]["steps"] == results["mixturegrowth"]["stages"][1]["steps"]  # = net 2's epochs
        cost = stages["growth"]["growth_flops"]
        assert (cost > 0) == (m in ("firefly", "gradmax"))
        assert stages["growth"]["flops"] == pytest.approx(stages["small"]["flops"] + cost)
        assert results[m]["params"] == results["large"]["params"]  # grown to the target
    growth = [r for r in read_metrics(smoke / "metrics.jsonl") if r["kind"] == "growth"]
    assert sorted(r["method"] for r in growth) == sorted(GROWTH_BASELINES)
    # every grown stage is tested before its first step; the function-preserving methods start where the small
    # model ended (the same function: top-1 within one test image)
    start = {r["method"]: r for r in read_metrics(smoke / "metrics.jsonl") if r["kind"] == "start"}
    assert sorted(start) == sorted([*GROWTH_BASELINES, "mixturegrowth", "mixturegrowth-nofusion"])
    for m in ("random", "net2net", "gradmax"):
        small = {s["stage"]: s for s in results[m]["stages"]}["small"]["top1"]
        assert abs(start[m]["test_top1"] - small) <= 100 / 32 + 1e-9, (m, start[m]["test_top1"], small)  # 32 test images
    report = run_report(smoke, tmp_path)
    main_table = report.split("Per stage")[0]
    rows = [line.split("|")[1].strip() for line in main_table.splitlines() if line.startswith("| ") and "Method" not in line]
    assert rows == list(METHODS.values())  # the paper's order
    assert "growth step" in report and "Firefly" in report.split("Cost of the growth step")[1]
    assert "| Random | " in report.split("Per stage")[1] and "grown (at growth" in report


def run_report(run_dir: Path, tmp: Path) -> str:
    from morph.recipes import report

    return report.main([run_dir], tmp / "report").text


def test_budgets_match_across_rows_within_one_optimizer_step(smoke):
    results = _results(smoke)
    budgeted = [m for m in METHODS if m not in ("large", "small")]
    budget = 0.45
    for m in budgeted:
        r = results[m]
        last = r["stages"][-1]
        before = r["stages"][-2]["flops"] if len(r["stages"]) > 1 and r["stages"][-2]["stage"] != "net1" else 0.0
        per_step = (last["flops"] - before) / last["steps"] / r["flops"] * r["flops_norm"]  # one step, in X
        assert r["flops_norm"] <= budget + 1e-9, (m, r["flops_norm"])
        assert budget - r["flops_norm"] < per_step, (m, r["flops_norm"], per_step)


def test_official_schedule_after_growth():
    lr = LRSchedule(base_lr=1e-4, total_steps=40, kind="cycles", cycles=4, cycle_decay=0.5, min_lr=3e-5)
    vals = [lr(t) for t in range(40)]
    assert vals[0] == pytest.approx(1e-4) and vals[10] == pytest.approx(5e-5)  # each peak halved
    assert vals[20] == pytest.approx(2.5e-5) and vals[30] == pytest.approx(1.25e-5)  # below lr_min: timm's formula
    assert min(vals[:10]) > 3e-5 and vals[9] < vals[1] and vals[39] > vals[30]  # later cycles rise to lr_min


def test_grown_stage_follows_growth_after_official(tmp_path):
    out = tmp_path / "official"
    run.main("cifar10-smoke", out_dir=out, overrides=[*TINY, "growth.methods=[net2net]", "growth.after=official",
                                                        "run.log_every=1"])
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step" and r["stage"] == "grown"]
    assert recs and recs[0]["lr"] == pytest.approx(1e-4) and max(r["lr"] for r in recs) <= 1e-4
    # the grown stage started from the small model's momentum (carried), so its optimizer state
    # differs from a fresh start's at the first step: the checkpoint holds a momentum buffer per weight
    groups, meta = load_checkpoint(out / "seed0/net2net/grown/checkpoint.safetensors")
    assert any(k.endswith("momentum_buffer") for k in groups["optim"])


def test_optimizer_state_is_carried_by_parameter_name():
    import morph
    from morph.growth import carry_optimizer_state

    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    opt = build_optimizer(small, OptimConfig(lr=0.1))
    x = torch.randn(2, 3, 8, 8)
    small(x).sum().backward()
    opt.step()
    grown = morph.grow(small, method="net2net", width=2.0, seed=0, input_size=(3, 8, 8))
    carried = optimizer_state_by_name(carry_optimizer_state(opt, small, grown), grown)
    fresh = build_optimizer(grown, OptimConfig(lr=0.1))
    _set_optimizer_state(fresh, grown, carried, torch.device("cpu"))
    old = opt.state[small[0].weight]["momentum_buffer"]
    new = fresh.state[grown.get_submodule("0").weight]["momentum_buffer"]
    assert new.shape == (8, 3, 3, 3) and torch.equal(new[:4], old)
    assert int((new[4:] != 0).sum()) == 0  # new entries start at zero



def test_carried_adam_state_gives_new_parameters_a_step():
    """A parameter the growth created gets zero moments and step 0 next to carried Adam state: AdamW steps
    (it raised KeyError 'step' in `growth.after=official` with `optim.optimizer=adamw`), and the new parameter's
    first update equals a fresh AdamW's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    cfg = OptimConfig(optimizer="adamw", lr=0.1, weight_decay=0.0)
    opt = build_optimizer(model, cfg)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    carried = optimizer_state_by_name(opt, model)
    del carried["1.weight"], carried["1.bias"]  # as if layer 1 were new
    fresh = build_optimizer(model, cfg)
    _set_optimizer_state(fresh, model, carried, torch.device("cpu"))
    assert float(fresh.state[model[1].weight]["step"]) == 0 and float(fresh.state[model[0].weight]["step"]) == 1
    ref_model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ref_model.load_state_dict(model.state_dict())
    ref = build_optimizer(ref_model, cfg)
    x = torch.randn(5, 4)
    for m, o in ((model, fresh), (ref_model, ref)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.allclose(model[1].weight, ref_model[1].weight, atol=1e-7)
    assert not torch.allclose(model[0].weight, ref_model[0].weight)  # carried moments and step differ

SCRIPT = """
import sys
from morph.recipes.run import main
out = sys.argv[1]
main("cifar10-smoke", out_dir=out, overrides=sys.argv[2:])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_baseline_row_killed_midway_resumes_to_the_same_weights(tmp_path):
    """Killed in the grown stage of the Random row: the rerun reloads the grown stage's checkpoint
    without redoing the growth step, and ends with the weights of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    overrides = [*TINY, "growth.methods=[random]", "growth.epochs=4", "growth.net2_epochs=1", "growth.budget=1.5"]
    ref = tmp_path / "ref"
    proc = subprocess.run([sys.executable, str(script), str(ref), *overrides], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    ckpt = out / "seed0/random/grown/checkpoint.safetensors"
    proc = subprocess.Popen([sys.executable, str(script), str(out), *overrides], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            meta = load_checkpoint(ckpt)[1]
            if meta["progress"]["epoch"] >= 1 and not meta["done"]:
                proc.send_signal(signal.SIGKILL)
                killed = meta["progress"]["epoch"]
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed is not None, "the run ended before it could be killed"
    proc = subprocess.run([sys.executable, str(script), str(out), *overrides], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at epoch" in proc.stderr
    a = load_file(str(ref / "seed0/random/model.safetensors"))
    b = load_file(str(out / "seed0/random/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((ref / "seed0/random/result.json").read_text()), json.loads(
        (out / "seed0/random/result.json").read_text())
    assert ra["flops"] == rb["flops"] and ra["top1"] == rb["top1"]
