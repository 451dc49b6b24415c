"""benchmarks/coverage.py ``rows_near``: the "trains" column's replica count, screened in a random projection,
equals the count from every pairwise distance measured in full."""

import importlib.util
from pathlib import Path

import pytest
import torch

# by path: "coverage" is also the name of coverage.py's package
_spec = importlib.util.spec_from_file_location(
    "coverage_table", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_table)
rows_near = _table.rows_near


def _full_count(new, old, tol):
    return int((torch.cdist(new, old, compute_mode="donot_use_mm_for_euclid_dist").min(1).values <= tol).sum())


@pytest.mark.parametrize("dim", [7, 32, 33, 900])
def test_rows_near_equals_the_full_distance_count(dim):
    g = torch.Generator().manual_seed(dim)
    old = torch.randn(60, dim, generator=g, dtype=torch.float64)
    tol = 1e-6 * float(old.norm(dim=1).mean())
    pick = torch.randint(0, 60, (40,), generator=g)
    direction = torch.randn(40, dim, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    # copies of old rows at distance 0, 0.5, 0.999, 1.001 and 2 x tol, and fresh rows
    steps = torch.tensor([0.0, 0.5, 0.999, 1.001, 2.0], dtype=torch.float64).repeat(8)[:, None]
    new = torch.cat([old[pick] + direction * steps * tol, torch.randn(25, dim, generator=g, dtype=torch.float64)])
    got = rows_near(new, old, tol)
    assert got == _full_count(new, old, tol) == 24  # 8 each at 0, 0.5 and 0.999 x tol
    assert rows_near(new[40:], old, tol) == 0
    # a loose tolerance: many candidate pairs per row, still the exact count
    loose = float(torch.cdist(new, old).min(1).values.median())
    assert rows_near(new, old, loose) == _full_count(new, old, loose)


def test_rows_near_in_float32_rows():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(30, 500, generator=g)
    new = torch.cat([old[:10].clone(), torch.randn(10, 500, generator=g)])
    assert rows_near(new, old, 1e-6) == _full_count(new, old, 1e-6) == 10


def test_sgd_in_backward_is_torch_sgd_bit_for_bit():
    """The trains check's memory-saving step: the same parameters as ``torch.optim.SGD(lr)`` after each backward,
    with a weight used twice (its gradient accumulated from both uses before the step) and a BatchNorm."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.mid = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x)))
            h = F.relu(self.mid(F.relu(self.mid(h))))  # the same weight twice
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    a = Net().train()
    b = Net().train()
    b.load_state_dict(a.state_dict())
    init = a.mid.weight.detach().clone()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    hooks = _table.sgd_in_backward(b, 0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt.step()
        F.cross_entropy(b(x), y).backward()
    for h in hooks:
        h.remove()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert all(p.grad is None for p in b.parameters())
    assert not torch.equal(a.mid.weight, init)  # the steps moved it
