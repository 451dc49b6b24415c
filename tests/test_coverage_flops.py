"""The coverage table's FLOPs columns can be rerun alone (``python benchmarks/coverage.py --add flops``,
``benchmarks/zoo_check.py`` ``check_flops``): the same figures as the main part's, attention products included
(``scaled_dot_product_attention``, which fvcore does not count by itself: ``morph.flops`` and the breakdown of the
original register a handle)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

import morph

_spec = importlib.util.spec_from_file_location(  # by path: "coverage" is also the name of coverage.py's package
    "coverage_table", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_table)
import zoo_check  # noqa: E402  (benchmarks/ is on sys.path once coverage.py is loaded)

SPEC, SIZE = "timm/test_vit", (3, 160, 160)  # 6 blocks, 2 heads of 32, 1 + 10 x 10 tokens


@pytest.mark.slow
def test_the_flops_part_alone_gives_the_main_parts_figures_with_attention():
    f = zoo_check.check_flops(SPEC, SIZE)
    assert f["status"] == "ok", f
    row = zoo_check.check_model(SPEC, SIZE, flops_size=SIZE).row()
    for k in zoo_check.FLOPS_FIELDS:
        assert f[k] == pytest.approx(list(row[k]) if k == "flops_input" else row[k], rel=1e-12), k
    # the original's count = fvcore's without SDPA + q k^T and attn v of every block (multiply-adds)
    m = morph.build_model(SPEC).eval()
    fca = FlopCountAnalysis(m, torch.zeros((1, *SIZE)))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        without = float(fca.total())
    n, dim, depth = 1 + (160 // 16) ** 2, 64, 6
    assert f["flops"] == without + depth * 2 * n * n * dim
    # head_dim mode: each head's size halves, tokens and heads stay, so the products halve
    assert f["flops_ratio"] == pytest.approx(f["flops_expected"], abs=1e-12)
