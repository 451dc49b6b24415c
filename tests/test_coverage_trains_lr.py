"""The coverage table's trains check chooses one learning rate per model, before any growth method runs and
from the un-grown model alone (``benchmarks/zoo_check.py`` ``choose_trains_lr``), and trains every method's
grown model at that lr: a model whose plain SGD steps explode at lr 0.1 gets a smaller one, the same for all
methods (the check used lr 0.1 for every model before, which diverged on the VGGs)."""

import copy
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import morph

# by path: "coverage" is also the name of coverage.py's package
_spec = importlib.util.spec_from_file_location(
    "coverage_table", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_table)
import zoo_check  # noqa: E402  (benchmarks/ is on sys.path once coverage.py is loaded)

SIZE = (3, 8, 8)


class _Plain(nn.Module):
    """A BatchNorm-free ReLU net (VGG's kind) whose weights are ``k`` times PyTorch's init: at k = 5 three SGD steps
    at lr 0.1 send the loss from 29 to 128 and back down as its ReLUs go off; at lr 0.03 it only falls."""

    def __init__(self, k: float):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(k)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 4).flatten(1))))


def _half(k: float):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, *SIZE), generator=g)
    return _Plain(k).eval(), x, torch.randint(0, 5, (4,), generator=g)


def _sgd_losses(model, x, y, lr, steps=3):
    """The definition, independently: torch.optim.SGD in train mode, the loss at each step and after the last."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(F.cross_entropy(model(x), y)))
    return losses


def _stable(losses):
    return all(math.isfinite(v) and v <= 2.0 * losses[0] for v in losses)


def test_a_model_that_explodes_at_lr_0_1_trains_every_method_at_the_same_smaller_lr():
    half, x, y = _half(5.0)
    # the definition, measured on the un-grown model with an ordinary optimizer
    assert not _stable(_sgd_losses(copy.deepcopy(half), x, y, 0.1))
    assert _stable(_sgd_losses(copy.deepcopy(half), x, y, 0.03))
    before = copy.deepcopy(half.state_dict())
    rng = torch.get_rng_state()
    out, rec = _table.trains_of(half, x, y, SIZE)
    assert rec["lr"] == 0.03 and rec["stable"]
    assert rec["losses"]["0.1"] == _sgd_losses(copy.deepcopy(half), x, y, 0.1)
    assert rec["losses"]["0.03"] == _sgd_losses(copy.deepcopy(half), x, y, 0.03)
    assert set(out) == set(zoo_check.GROWTH_METHODS)
    assert {r["lr"] for r in out.values()} == {0.03}  # one lr for every method
    assert all(r["status"] == "ok" for r in out.values()), out
    # the probe left the un-grown model as it was (and the random state the methods' steps draw from)
    assert all(torch.equal(v, half.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())
    # the grown model really trained at that lr: net2net's recorded losses, reproduced with torch.optim.SGD
    grown = morph.grow(half, "net2net", 2.0, data=(x, y), seed=0, input_size=SIZE)
    losses = _sgd_losses(grown, x, y, 0.03)
    assert out["net2net"]["loss"] == [losses[0], losses[2]]
    assert out["net2net"]["loss"] != [float(v) for v in _sgd_losses(
        morph.grow(half, "net2net", 2.0, data=(x, y), seed=0, input_size=SIZE), x, y, 0.1)[0:3:2]]


def test_a_model_stable_at_lr_0_1_keeps_it():
    half, x, y = _half(1.0)
    assert _stable(_sgd_losses(copy.deepcopy(half), x, y, 0.1))
    rec = zoo_check.choose_trains_lr(half, x, y, 3)
    assert rec == {"lr": 0.1, "stable": True, "losses": {"0.1": _sgd_losses(copy.deepcopy(half), x, y, 0.1)}}


def test_no_stable_lr_on_the_ladder_is_marked():
    half, x, y = _half(5.0)
    rec = zoo_check.choose_trains_lr(half, x, y, 3, ladder=(0.3, 0.1))
    assert rec["lr"] == 0.1 and rec["stable"] is False and list(rec["losses"]) == ["0.3", "0.1"]


def test_a_fixed_lr_is_used_as_given():
    half, x, y = _half(5.0)
    out, rec = _table.trains_of(half, x, y, SIZE, methods=("random",), lr=0.1)
    assert rec["lr"] == 0.1 and rec["fixed"] and out["random"]["lr"] == 0.1


def test_the_table_prints_each_rows_lr():
    t = {m: {"status": "ok", "rows": 10, "zero": 0, "replica": 0, "loss": [2.0, 1.0], "seconds": 1.0}
         for m in zoo_check.GROWTH_METHODS}
    rows = [{"spec": "timm/a", "status": "ok", "trains": t,
             "trains_lr": {"lr": 0.03, "stable": True, "losses": {"0.1": [2.0, 9.0], "0.03": [2.0, 1.5]},
                           "seconds": 1.0}},
            {"spec": "timm/b", "status": "ok", "trains": t},
            {"spec": "timm/c", "status": "ok", "trains": t,
             "trains_lr": {"lr": 0.003, "stable": False, "losses": {"0.003": [2.0, 5.0]}, "seconds": 1.0}},
            # run before the rule at lr 0.1, the rule alone run since (--add lr)
            {"spec": "timm/d", "status": "ok", "trains": t,
             "trains_lr_rule": {"lr": 0.1, "stable": True, "losses": {"0.1": [2.0, 1.2]}, "seconds": 1.0}},
            {"spec": "timm/e", "status": "ok", "trains": t,
             "trains_lr_rule": {"lr": 0.03, "stable": True, "losses": {"0.1": [2.0, 9.0], "0.03": [2.0, 1.0]}}}]
    summary = {}
    lines = _table._trains_table(rows, summary)
    row = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines if ln.startswith("| timm/")}
    assert row["timm/a"][1] == "0.03" and row["timm/a"][7] == "2.00 -> 1.50"
    assert row["timm/b"][1] == "0.1*" and row["timm/b"][7] == ""
    assert row["timm/c"][1] == "0.003 **unstable**"
    assert row["timm/d"][1] == "0.1" and row["timm/d"][7] == "2.00 -> 1.20"
    assert row["timm/e"][1] == "0.1* (rule: 0.03)" and row["timm/e"][7] == ""
    assert summary["trains_lr"] == {"0.03": 1, "0.003": 1}
    assert summary["trains_lr_before"] == {"rows": 3, "rule_checked": 2, "rule_same": 1}
