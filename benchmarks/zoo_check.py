"""One model through every morph pass, with the measurements the coverage table and the zoo test share."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import morph
from morph.graph.analyze import analyze, default_input_size


@dataclass
class ZooResult:
    spec: str
    status: str = "ok"
    error: str = ""
    params: int = 0
    params_half: int = 0
    params_predicted: int = 0
    params_ratio: float = 0.0
    flops: float = 0.0
    flops_half: float = 0.0
    flops_ratio: float = 0.0
    flops_input: tuple[int, ...] = ()
    linear_share: float = 0.0  # share of the original's FLOPs in ops whose cost scales linearly with width
    flops_expected: float = 0.0  # 0.25 * (1 - linear_share) + 0.5 * linear_share
    ensemble_relerr: float = float("nan")
    bake_relerr: float = float("nan")
    half_bake_relerr: float = float("nan")
    strict_load: bool = False
    save_load_exact: bool = False
    output_shape_ok: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return asdict(self)


def _relerr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def predicted_params(plain: nn.Module, templates: int) -> int:
    """Parameters of the template model, predicted from the plain half model's shapes: conv/linear
    weights become ``templates`` templates of the same shape plus ``templates`` coefficients."""
    n = 0
    for mod in plain.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "weight" and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                n += templates * p.numel() + templates
            else:
                n += p.numel()
    return n


def linear_share(model: nn.Module, plan, input_size: tuple[int, ...]) -> float:
    """Share of ``model``'s fvcore FLOPs outside dense convs/linears whose input and output both scale:
    depthwise and group-width-keeping convs, the stem, the classifier, norms and pooling all cost
    linearly in the width, so halving gives 0.5 there instead of 0.25."""
    from fvcore.nn import FlopCountAnalysis

    from morph.scale import layer_shapes

    p = next(iter(model.parameters()))
    fca = FlopCountAnalysis(model.eval(), torch.zeros((1, *input_size), dtype=p.dtype))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    total = float(fca.total())
    by_mod = fca.by_module()
    shapes = layer_shapes(plan, model, 0.5)
    quadratic = 0.0
    for lp in plan.conv_layers():
        s = shapes[lp.name]
        if plan.scales(lp.in_dim) and plan.scales(lp.out_dim) and (s.groups == 1 or not s.constant_group_width):
            quadratic += float(by_mod.get(lp.name, 0))
    return 1.0 - quadratic / total if total else 0.0


def check_model(spec: str, input_size: tuple[int, ...], *, dtype=torch.float64, flops_size=None,
                tmpdir=None, full: bool = True) -> ZooResult:
    """Convert, scale, fuse (zero init), bake and reload ``spec``; measure everything."""
    t0 = time.perf_counter()
    r = ZooResult(spec)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        m = morph.build_model(spec).eval()
        plan = analyze(m, input_size)
        plain = morph.scale_width(m, 0.5, plan=plan)
        a = morph.convert(m, 0.5, seed=1, plan=plan).eval()
        x = torch.randn(2, *input_size)
        with torch.no_grad():
            y0 = m(x)
            ya = a(x)
            r.output_shape_ok = tuple(ya.shape) == tuple(y0.shape) and tuple(plain(x).shape) == tuple(y0.shape)
        r.params = sum(p.numel() for p in m.parameters())
        r.params_half = sum(p.numel() for p in a.parameters())
        r.params_predicted = predicted_params(plain, 2)
        r.params_ratio = r.params_half / r.params
        fs = tuple(flops_size or default_input_size(m))
        r.flops_input = fs
        r.flops = morph.flops(m, fs).per_image
        r.flops_half = morph.flops(a, fs, batch_size=64).per_image
        r.flops_ratio = r.flops_half / r.flops
        r.linear_share = linear_share(m, plan, fs)
        r.flops_expected = 0.25 * (1 - r.linear_share) + 0.5 * r.linear_share
        with torch.no_grad():
            r.half_bake_relerr = _relerr(morph.bake(a).eval()(x), ya)
        if not full:
            return r
        b = morph.convert(m, 0.5, seed=2, plan=plan).eval()
        f = morph.fuse(a, b, init="zero").eval()
        with torch.no_grad():
            yb, yf = b(x), f(x)
            r.ensemble_relerr = _relerr(yf, (ya + yb) / 2)
            baked = morph.bake(f).eval()
            r.bake_relerr = _relerr(baked(x), yf)
        stock = morph.build_model(spec)
        stock.load_state_dict(baked.state_dict(), strict=True)
        r.strict_load = True
        if tmpdir is not None:
            path = morph.save(a, f"{tmpdir}/{spec.replace('/', '_')}.safetensors")
            re = morph.load(path).eval()
            with torch.no_grad():
                r.save_load_exact = bool(torch.equal(re(x), ya))
    except morph.MorphError as e:
        r.status, r.error = "error", str(e).splitlines()[0]
    finally:
        torch.set_default_dtype(old)
        r.seconds = time.perf_counter() - t0
    if r.status == "ok" and not math.isfinite(r.flops_ratio):
        r.notes.append("no FLOPs")
    return r
