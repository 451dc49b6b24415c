"""The model zoo: every morph pass on the cheapest torchvision model of each family and one small model
of each of the timm CNN families in ``tests/zoo_list.py`` (float64, 3x64x64 inputs; FLOPs at the model's
default input in float32). ``benchmarks/coverage.py`` runs the full list and writes docs/coverage.md.

Per model (``benchmarks/zoo_check.py``):

- ``convert`` and ``scale_width`` succeed; plain, half, fused and baked outputs have the original's shape;
- parameter counts equal the prediction from layer shapes: half (``share="none"`` and ``"consecutive"``)
  from the plain half model, fused from the stock model;
- FLOPs per image at batch 64 (generation amortized) match the prediction from the model's FLOPs
  breakdown within 0.03; they are 0.25 +- 0.03 of the original, except exactly the models in
  ``FLOPS_DEVIATIONS`` (depthwise convs, stem and classifier cost linearly in the width): a listed model
  whose prediction comes back to 0.25 fails, and so does an unlisted one far from 0.25;
- ``bake`` equals the template model (half and fused); save/load of the half model is bit-exact;
- all of it twice: the model built by ``morph.build_model`` and built directly by timm's or torchvision's
  own constructor (then the stock model of the strict load is built that way too);
- a zero-initialized fusion equals the ensemble ``(a(x) + b(x)) / 2`` within 1e-5, except the
  architectures in ``NOT_BLOCKWISE`` (named with their reason); for all of them the baked fused model
  loads with ``strict=True`` into the stock full-width model, which then computes the fused function.
"""

import sys
from pathlib import Path

import pytest
from zoo_list import (
    FLOPS_DEVIATIONS,
    NOT_BLOCKWISE,
    TIMM_CI,
    TIMM_MODELS,
    TIMM_REFUSED,
    TORCHVISION_MODELS,
    all_specs,
    ci_specs,
    flops_input_size,
    spec_input_size,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo_check import check_model  # noqa: E402

TOL = 1e-5


@pytest.mark.zoo
@pytest.mark.parametrize("build", ["morph", "direct"])
@pytest.mark.parametrize("spec", ci_specs())
def test_zoo(spec, build, tmp_path):
    """``build``: through ``morph.build_model``, or by the library's own constructor (no morph spec: the
    spec is inferred where certain, the layout to fuse back to is the one convert recorded)."""
    r = check_model(spec, spec_input_size(spec), flops_size=flops_input_size(spec), tmpdir=tmp_path,
                    direct=build == "direct")
    assert r.status == "ok", f"{r.stage}: {r.error}"
    assert r.output_shape_ok
    # parameters: predicted from layer shapes, not counted on the converted model
    assert r.params_half == r.params_half_predicted
    assert r.params_consecutive == r.params_consecutive_predicted
    assert r.params_fused == r.params_fused_predicted
    # FLOPs per image at batch 64, against the prediction from the model's FLOPs breakdown (depthwise convs,
    # stem and classifier cost linearly in the width), and against 0.25 unless the model is listed as deviating
    assert abs(r.flops_ratio - r.flops_expected) <= 0.03, (r.flops_ratio, r.flops_expected)
    if spec in FLOPS_DEVIATIONS:
        assert abs(r.flops_expected - 0.25) > 0.03, "its FLOPs ratio is 0.25 now: move it out of FLOPS_DEVIATIONS"
    else:
        assert abs(r.flops_ratio - 0.25) <= 0.03, (r.flops_ratio, "far from 0.25: list it in FLOPS_DEVIATIONS")
    # bake and checkpoints
    assert r.half_bake_relerr <= TOL and r.bake_relerr <= TOL
    assert r.save_load_exact
    assert r.strict_load and r.stock_relerr <= TOL
    # zero-initialized fusion is the ensemble where channel ops compose block-wise
    if spec in NOT_BLOCKWISE:
        assert r.ensemble_relerr > TOL, "now exact: move it out of NOT_BLOCKWISE"
    else:
        assert r.ensemble_relerr <= TOL, r.ensemble_relerr


@pytest.mark.parametrize("spec", sorted(TIMM_REFUSED))
def test_refused_family_says_why(spec):
    """A family morph cannot grow is refused at analysis, by a MorphError that gives the reason."""
    r = check_model(spec, spec_input_size(spec), direct=True)
    assert (r.status, r.stage) == ("error", "analyze") and TIMM_REFUSED[spec] in r.error, r.error


def test_zoo_covers_issue_lists():
    assert len(set(TIMM_CI)) >= 25 and set(TIMM_CI) <= set(TIMM_MODELS)
    for prefix in ("alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet", "googlenet", "inception_v3",
                   "mobilenet_v2", "mobilenet_v3", "mnasnet", "shufflenet_v2", "squeezenet", "efficientnet_b",
                   "efficientnet_v2", "regnet", "convnext"):
        assert any(n.startswith(prefix) for n in TORCHVISION_MODELS), prefix
    everything = set(all_specs())
    assert set(NOT_BLOCKWISE) <= everything and set(FLOPS_DEVIATIONS) <= everything
    assert len([s for s in ci_specs() if s not in NOT_BLOCKWISE]) >= 25
