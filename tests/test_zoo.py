"""The model zoo: every pass of morph on torchvision's CNNs and one model of each of 32 timm families.

Per model (float64, small inputs): convert and scale_width succeed and keep the output shape; the
parameter count equals the prediction from the plain half model's shapes; FLOPs (per image at a
training batch of 64, generation amortized) are 0.25 +- 0.03 of the original, or, where depthwise
convs, stem, classifier and norms (costs linear in the width) weigh more, match the prediction
0.25 (1 - s) + 0.5 s within 0.03 (s: their FLOPs share); bake equals the template model; save/load
is bit-exact; a zero-initialized fusion is exactly the ensemble (block-wise architectures) and its
bake loads strictly into the stock full-width model.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo_check import check_model  # noqa: E402
from zoo_list import ci_specs, spec_input_size  # noqa: E402

# channel ops that do not compose block-wise: the fused model is not the ensemble (docs/mixturegrowth.md)
NOT_BLOCKWISE = {
    "torchvision/shufflenet_v2_x0_5": "channel shuffle interleaves a's and b's channels",
    "torchvision/squeezenet1_1": "ReLU after the conv classifier: the average is taken before it",
    "torchvision/regnet_x_400mf": "grouped convs keep their group count (half widths not multiples of 16)",
    "torchvision/regnet_y_400mf": "grouped convs keep their group count (half widths not multiples of 8)",
    "torchvision/convnext_tiny": "LayerNorm over channels",
    "timm/convnext_atto": "LayerNorm over channels",
    "timm/inception_next_tiny": "its token mixer splits channels with sizes rounded per width",
    "timm/poolformer_s12": "GroupNorm with one group (LayerNorm over channels)",
    "timm/rdnet_tiny": "LayerNorm over channels",
}


@pytest.mark.zoo
@pytest.mark.parametrize("spec", ci_specs())
def test_zoo(spec, tmp_path):
    r = check_model(spec, spec_input_size(spec), tmpdir=tmp_path)
    assert r.status == "ok", r.error
    assert r.output_shape_ok
    assert r.params_half == r.params_predicted
    assert r.half_bake_relerr <= 1e-5 and r.bake_relerr <= 1e-5
    assert r.save_load_exact
    assert r.strict_load
    assert abs(r.flops_ratio - r.flops_expected) <= 0.03, (r.flops_ratio, r.flops_expected)
    if r.linear_share < 0.12:
        assert abs(r.flops_ratio - 0.25) <= 0.03, r.flops_ratio
    if spec in NOT_BLOCKWISE:
        assert r.ensemble_relerr > 1e-5, "now exact: move it out of NOT_BLOCKWISE"
    else:
        assert r.ensemble_relerr <= 1e-5, r.ensemble_relerr


def test_zoo_covers_issue_lists():
    specs = ci_specs()
    timm_families = [s for s in specs if s.startswith("timm/")]
    assert len(timm_families) >= 25
    for prefix in ("alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet", "googlenet", "inception_v3",
                   "mobilenet_v2", "mobilenet_v3", "mnasnet", "shufflenet_v2", "squeezenet", "efficientnet_b",
                   "efficientnet_v2", "regnet", "convnext"):
        assert any(s.startswith(f"torchvision/{prefix}") for s in specs), prefix
    blockwise = [s for s in specs if s not in NOT_BLOCKWISE]
    assert len(blockwise) >= 10
