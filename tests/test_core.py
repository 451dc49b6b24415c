"""Exact invariants of analysis, scaling, template mixing, checkpoints, fusion and bake on tiny models."""

import contextlib
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from motifs import BLOCKWISE, MOTIFS, HardCodedView, Residual, Unsupported, residual
from safetensors import safe_open

import morph
from morph.graph.analyze import analyze
from morph.templates import mixed_layers

SIZE = (3, 8, 8)


def _relerr(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def _pair(model, share="none", **kw):
    a = morph.convert(model, seed=1, share=share, input_size=SIZE, **kw)
    b = morph.convert(model, seed=2, share=share, input_size=SIZE, **kw)
    return a, b


# ---------------------------------------------------------------------------------------------
# analysis and plain scaling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MOTIFS))
def test_scale_half_shapes_and_output(name):
    """Every channel count halves except the image's and the classes; nothing else changes; the half model
    runs and keeps the output shape, with under 0.6x the parameters."""
    m = MOTIFS[name]()
    h = morph.scale_width(m, 0.5, input_size=SIZE)
    x = torch.randn(2, *SIZE)
    assert h(x).shape == m(x).shape
    old, new = dict(m.named_parameters()), dict(h.named_parameters())
    assert old.keys() == new.keys()
    first, last = _first_conv(m), _last_linear_name(m)
    halved = 0
    for n, mod in m.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        w0, w1 = mod.weight.shape, h.get_submodule(n).weight.shape
        out_expect = w0[0] if n == last else w0[0] // 2
        # a grouped or depthwise conv keeps its group width (its groups halve); the image keeps its 3 channels
        in_expect = w0[1] if n == first or (isinstance(mod, nn.Conv2d) and mod.groups > 1) else w0[1] // 2
        assert tuple(w1) == (out_expect, in_expect, *w0[2:]), (n, tuple(w0), tuple(w1))
        halved += 1
    assert halved >= 2
    for n, p0 in old.items():  # every other parameter: each dim unchanged or halved (norms, layer scales)
        p1 = new[n]
        assert all(b in (a, a // 2) for a, b in zip(p0.shape, p1.shape, strict=True)), (n, p0.shape, p1.shape)
    assert h.get_submodule(first).in_channels == 3
    assert _last_linear(h).out_features == 5
    assert sum(p.numel() for p in h.parameters()) < 0.6 * sum(p.numel() for p in m.parameters())


def _last_linear_name(m):
    return [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]


def _first_conv(m):
    return next(n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d))


def _last_linear(m):
    return [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]


def test_residual_predicted_shapes():
    h = morph.scale_width(Residual(c=8), 0.5, input_size=SIZE)
    assert tuple(h.stem.weight.shape) == (4, 3, 3, 3)
    assert tuple(h.conv1.weight.shape) == (4, 4, 3, 3)
    assert tuple(h.down.weight.shape) == (8, 4, 1, 1)
    assert tuple(h.fc.weight.shape) == (5, 8)
    assert h.bn.num_features == 4 and h.bn.running_mean.shape == (4,)


def test_concat_and_flatten_and_grouped_shapes():
    h = morph.scale_width(MOTIFS["concat"](), 0.5, input_size=SIZE)
    assert (h.a.out_channels, h.b.out_channels, h.bn.num_features, h.mix.in_channels) == (2, 6, 12, 12)
    assert h.fc.in_features == 4  # chunk of 8 -> 4
    f = morph.scale_width(MOTIFS["flatten_spatial"](), 0.5, input_size=SIZE)
    assert f.fc1.in_features == 4 * 4  # 4 channels x 2 x 2, in blocks
    d = morph.scale_width(MOTIFS["depthwise_se"](), 0.5, input_size=SIZE)
    assert (d.dw.groups, d.dw.in_channels) == (8, 8)  # depthwise stays depthwise
    assert (d.grouped.groups, d.grouped.in_channels, d.grouped.out_channels) == (1, 4, 8)  # group width kept
    n = morph.scale_width(MOTIFS["norms"](), 0.5, input_size=SIZE)
    assert (n.gn.num_groups, n.gn.num_channels) == (2, 8)
    assert n.ln.normalized_shape == (8,) and n.gamma.shape == (8,)


def test_hardcoded_view_is_rewritten():
    h = morph.scale_width(HardCodedView(), 0.5, input_size=SIZE)
    assert isinstance(h, torch.fx.GraphModule)
    assert h(torch.randn(2, *SIZE)).shape == (2, 5)
    assert h.conv.out_channels == 8


def test_unknown_op_names_node_and_module():
    with pytest.raises(morph.UnsupportedOpError, match=r"fft_fft2.*no channel rule"):
        analyze(Unsupported(), SIZE)


class _SpectralGate(nn.Module):
    """A user's module the analysis cannot see through (FFTs have no channel rule); keeps its input's shape."""

    def forward(self, x):
        return torch.fft.ifft2(torch.fft.fft2(x)).real


def channel_mix(x, y):
    """A user's function, also opaque to the analysis: adds two maps channel by channel."""
    return torch.fft.ifft2(torch.fft.fft2(x) + torch.fft.fft2(y)).real


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _SpectralGate()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(self.gate(x))
        return self.fc(channel_mix(x, y).mean((2, 3)))


def test_user_rules_teach_the_analysis():
    """A user teaches the analysis a module and a function through the public registry; the errors
    before point to it; afterwards scale_width and convert handle the model like any other."""
    from morph.graph import TD, register_function_rule, register_module_rule

    with pytest.raises(morph.UnsupportedOpError, match=r"fft_fft2.*morph\.graph\.register_function_rule"):
        analyze(_UserNet(), SIZE)

    @register_module_rule(_SpectralGate)
    def _gate(a, node):
        x = a.value(node.args[0])
        return TD(x.dims, a.shape())

    with pytest.raises(morph.UnsupportedOpError, match=r"fft.*morph\.graph\.register_function_rule"):
        analyze(_UserNet(), SIZE)

    @register_function_rule(channel_mix)
    def _mix(a, node):
        x, y = a.value(node.args[0]), a.value(node.args[1])
        a.g.unify(x.dims[1], y.dims[1])  # the two maps' channels change width together
        return TD(x.dims, a.shape())

    plan = analyze(_UserNet(), SIZE)
    assert plan.layers["stem"].out_dim is not None and set(plan.layers) == {"stem", "conv", "fc"}
    assert any(n.op == "call_module" and n.target == "gate" for n in plan.gm.graph.nodes)  # a leaf now
    assert any(n.op == "call_function" and n.target is channel_mix for n in plan.gm.graph.nodes)
    m = _UserNet()
    h = morph.scale_width(m, 0.5, input_size=SIZE)
    assert (h.stem.out_channels, h.conv.in_channels, h.conv.out_channels, h.fc.in_features) == (4, 4, 4, 4)
    x = torch.randn(2, *SIZE)
    assert h(x).shape == (2, 5)
    t = morph.convert(m, seed=0, input_size=SIZE)
    assert len(mixed_layers(t)) == 3 and t(x).shape == (2, 5)


def test_width_validation():
    with pytest.raises(morph.MorphError, match="width must be a positive number"):
        morph.scale_width(Residual(), 0.0, input_size=SIZE)
    with pytest.raises(morph.MorphError, match="share must be one of"):
        morph.convert(Residual(), share="all", input_size=SIZE)


# ---------------------------------------------------------------------------------------------
# template mixing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MOTIFS))
def test_generated_weight_is_exact_mixture(name):
    h = morph.convert(MOTIFS[name](), seed=0, input_size=SIZE)
    layers = mixed_layers(h)
    assert layers
    for _, m in layers:
        t = m.mix.banks[0].templates
        a = m.mix.coefficients[0]
        expect = sum(a[k] * t[k] for k in range(t.shape[0]))
        torch.testing.assert_close(m.weight, expect, rtol=1e-6, atol=1e-7)


def test_convert_parameter_count_predicted():
    m = Residual(c=8)
    plain = morph.scale_width(m, 0.5, input_size=SIZE)
    for k, share in [(2, "none"), (3, "none"), (2, "consecutive")]:
        h = morph.convert(m, templates=k, share=share, input_size=SIZE)
        weights = {n: tuple(mod.weight.shape) for n, mod in plain.named_modules()
                   if isinstance(mod, (nn.Conv2d, nn.Linear))}
        others = sum(p.numel() for n, p in plain.named_parameters() if n.rsplit(".", 1)[0] not in weights
                     or not n.endswith("weight"))
        if share == "none":
            banks = [[n] for n in weights]
        else:  # stem, conv1+conv2 (same shape), down, fc
            banks = [["stem"], ["conv1", "conv2"], ["down"], ["fc"]]
        predicted = others + sum(k * math.prod(weights[b[0]]) for b in banks) + k * len(weights)
        assert sum(p.numel() for p in h.parameters()) == predicted, share


def test_consecutive_sharing_is_one_parameter():
    h = morph.convert(Residual(c=8), share="consecutive", seed=0, input_size=SIZE)
    assert h.conv1.mix.banks[0] is h.conv2.mix.banks[0]
    assert h.conv1.mix.banks[0].templates is h.conv2.mix.banks[0].templates
    c = torch.cat([h.conv1.mix.coefficients, h.conv2.mix.coefficients]).detach()
    torch.testing.assert_close(c @ c.T, torch.eye(2), atol=1e-6, rtol=0)  # orthogonal init


def test_edge_coefficients_frozen_by_default():
    h = morph.convert(Residual(), input_size=SIZE)
    assert not h.stem.mix.coefficients.requires_grad and not h.fc.mix.coefficients.requires_grad
    assert h.conv1.mix.coefficients.requires_grad
    h = morph.convert(Residual(), input_size=SIZE, train_edge_coefficients=True)
    assert h.stem.mix.coefficients.requires_grad


def test_template_model_trains():
    h = morph.convert(Residual(), seed=0, input_size=SIZE)
    opt = torch.optim.SGD(h.parameters(), lr=0.1)
    x, y = torch.randn(8, *SIZE), torch.randint(0, 5, (8,))
    before = h.conv1.mix.banks[0].templates.detach().clone()
    nn.functional.cross_entropy(h(x), y).backward()
    assert h.conv1.mix.coefficients.grad is not None and h.conv1.mix.banks[0].templates.grad is not None
    opt.step()
    assert not torch.equal(before, h.conv1.mix.banks[0].templates)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _spec_model():
    return morph.build_model("motifs:residual", num_classes=5)


@pytest.mark.parametrize("share", ["none", "consecutive"])
def test_save_load_bit_identical(tmp_path, share):
    h = morph.convert(_spec_model(), share=share, seed=3, input_size=SIZE)
    path = morph.save(h, tmp_path / "h.safetensors")
    r = morph.load(path, model_fn=residual)
    h.eval(), r.eval()
    x = torch.randn(2, *SIZE)
    assert torch.equal(h(x), r(x))
    assert morph.get_info(r).set_ids == ("seed3",) and morph.get_info(r).share == share
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["morph_info"])
    assert meta["spec"]["name"] == "motifs:residual" and meta["kind"] == "half" and meta["width"] == 0.5
    bank_keys = [k for k in keys if k.endswith("templates")]
    assert len(bank_keys) == (4 if share == "consecutive" else 5)  # a shared bank is stored once


def test_checkpoint_errors(tmp_path):
    with pytest.raises(morph.CheckpointError, match="no such file"):
        morph.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(morph.CheckpointError, match="not a readable safetensors"):
        morph.load(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(morph.CheckpointError, match="without morph metadata"):
        morph.load(tmp_path / "foreign.safetensors")
    good = morph.save(morph.convert(_spec_model(), input_size=SIZE), tmp_path / "good.safetensors")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(morph.CheckpointError):
        morph.load(trunc)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way (here: the safetensors writer, after writing part of the file) leaves
    nothing behind, and an existing file is untouched."""
    import safetensors.torch

    h = morph.convert(_spec_model(), input_size=SIZE)

    def broken(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        morph.save(h, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# fusion, growth, bake
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BLOCKWISE)
def test_zero_fusion_is_ensemble(name):
    torch.set_default_dtype(torch.float64)
    try:
        m = MOTIFS[name]()
        a, b = _pair(m)
        f = morph.fuse(a, b, init="zero")
        for z in (a, b, f):
            z.eval()
        x = torch.randn(4, *SIZE)
        assert _relerr(f(x), (a(x) + b(x)) / 2) < 1e-12
    finally:
        torch.set_default_dtype(torch.float32)


GRIDS = [((1, 1), (0,)), ((2, 2), (0, 0, 1, 1)), ((2, 2), (0, 1, 0, 1)), ((2, 1), (0, 1)), ((1, 2), (0, 1)),
         ((3, 3), (0, 0, 0, 1, 1, 1, 2, 2, 2)), ((2, 2), (0, 0, 0, 0)), ((1, 2), (1, 1))]


def _loop_reference(coef, banks, grid, tile_banks):
    """The template formula as written in the paper, one tile at a time: the check on the reference."""
    r, c = grid
    tiles = [sum(coef[t, k] * banks[b][k] for k in range(coef.shape[1])) for t, b in enumerate(tile_banks)]
    return torch.cat([torch.cat(tiles[i * c : (i + 1) * c], dim=1) for i in range(r)], dim=0)


def _impl(name, request):
    from morph.templates import _Grid, grid_reference

    if name == "native":
        ops = request.getfixturevalue("native_kernels")
        return lambda c, grid, tb, *bs: ops.grid(c, list(bs), grid[0], grid[1], list(tb))
    if name == "torch":
        return lambda c, grid, tb, *bs: _Grid.apply(c, grid, tuple(tb), *bs)
    return lambda c, grid, tb, *bs: grid_reference(c, list(bs), grid, tb)


@pytest.mark.parametrize("impl", ["native", "torch", "reference"])
@pytest.mark.parametrize("num_templates", [2, 5])
@pytest.mark.parametrize("grid,tile_banks", GRIDS)
@pytest.mark.parametrize("tile_shape", [(3, 4, 3, 3), (6, 5)])
def test_grid_generation_matches_formula(impl, num_templates, grid, tile_banks, tile_shape, request):
    """Every implementation of the tiled generation (the reference of matmuls per bank, the CPU fast path
    ``_Grid``, the native kernels) against the formula tile by tile, and their gradients against the
    formula's autograd and finite differences. Covers the native kernels' specialized paths (K <= 4
    templates, <= 2 tiles per bank) and their generic path (K = 5, 3 or 4 tiles per bank), and a bank no
    tile uses."""
    gen = _impl(impl, request)
    torch.manual_seed(0)
    banks = [torch.randn(num_templates, *tile_shape, dtype=torch.float64, requires_grad=True)
             for _ in range(max(tile_banks) + 1)]
    coef = torch.randn(len(tile_banks), num_templates, dtype=torch.float64, requires_grad=True)
    w = gen(coef, grid, tile_banks, *banks)
    ref = _loop_reference(coef, banks, grid, tile_banks)
    assert w.shape == ref.shape == (grid[0] * tile_shape[0], grid[1] * tile_shape[1], *tile_shape[2:])
    torch.testing.assert_close(w, ref, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(w)
    ref_grad = torch.autograd.grad(ref, [coef, *banks], g, allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad(w, [coef, *banks], g, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, ref_grad, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda c, *bs: gen(c, grid, tile_banks, *bs), (coef, *banks))
    if len(tile_shape) == 4:  # a weight gradient in channels_last (as a conv backward may return it)
        g_cl = g.contiguous(memory_format=torch.channels_last)
        again = gen(coef, grid, tile_banks, *banks)
        for x, y in zip(torch.autograd.grad(again, [coef, *banks], g_cl, allow_unused=True, materialize_grads=True),
                        ref_grad, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_native_kernels_float32_deterministic_and_partial_grads(native_kernels):
    """float32 on the native path: close to the reference, bit-identical whatever the number of threads
    (row partial sums are added in a fixed order), and only the gradients that are asked for."""
    from morph.templates import grid_reference

    def gen(c, grid, tb, *bs):
        return native_kernels.grid(c, list(bs), grid[0], grid[1], list(tb))

    torch.manual_seed(0)
    banks = [torch.randn(2, 64, 48, 3, 3, requires_grad=True) for _ in range(2)]
    coef = torch.randn(4, 2, requires_grad=True)
    g = torch.randn(128, 96, 3, 3)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w = gen(coef, (2, 2), (0, 0, 1, 1), *banks)
            runs.append((w, *torch.autograd.grad(w, [coef, *banks], g)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other, strict=True))
    wide = [coef.double(), *(b.double() for b in banks)]  # the reference in float64
    ref = grid_reference(wide[0], wide[1:], (2, 2), [0, 0, 1, 1])
    torch.testing.assert_close(runs[0][0], ref.float(), rtol=1e-6, atol=1e-6)
    for x, y in zip(runs[0][1:], torch.autograd.grad(ref, wide, g.double()), strict=True):
        torch.testing.assert_close(x, y.float(), rtol=2e-5, atol=1e-4)  # float32 sums of 27k products
    frozen = [b.detach() for b in banks]  # only the coefficients train
    (d_coef,) = torch.autograd.grad(gen(coef, (2, 2), (0, 0, 1, 1), *frozen), [coef], g)
    torch.testing.assert_close(d_coef, runs[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("row", [24, 21, 4096 + 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_template_gradient_stores(row, dtype, native_kernels):
    """The backward writes each template gradient with streaming stores where its rows are aligned for
    them (rows of 24 elements; x86 with AVX) and plainly elsewhere (21; a row longer than one 2048-element
    block with a tail): either way dT_k = a_k * dW exactly (one tile: a single product per element)."""
    torch.manual_seed(0)
    bank = torch.randn(3, 7, row, dtype=dtype, requires_grad=True)
    coef = torch.randn(1, 3, dtype=dtype, requires_grad=True)
    g = torch.randn(7, row, dtype=dtype)
    (d_bank,) = torch.autograd.grad(native_kernels.grid(coef, [bank], 1, 1, [0]), [bank], g)
    for k in range(3):
        assert torch.equal(d_bank[k], g * coef[0, k].detach())


def test_native_op_is_one_op_for_profiler_and_compile(native_kernels):
    """``morph::grid`` is one registered op: the profiler shows it (and its backward) once per weight,
    and torch.compile traces it whole (fake implementations registered by morph.native)."""
    from torch.profiler import profile

    bank = torch.randn(2, 8, 4, 3, 3, requires_grad=True)
    coef = torch.randn(2, 2, requires_grad=True)

    def gen(c, b):
        return native_kernels.grid(c, [b], 2, 1, [0, 0])

    with profile() as prof:
        gen(coef, bank).sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("morph::grid") == 1 and names.count("morph::grid_backward") == 1
    compiled = torch.compile(gen, backend="aot_eager", fullgraph=True)
    w = compiled(coef, bank)
    torch.testing.assert_close(w, gen(coef, bank), rtol=0, atol=0)
    (d,) = torch.autograd.grad(w.sum(), [coef])
    torch.testing.assert_close(d, torch.autograd.grad(gen(coef, bank).sum(), [coef])[0], rtol=0, atol=0)


def test_generate_dispatch(request):
    """CPU: the native op where it is built (and not disabled), else ``_Grid``, also for low-precision
    dtypes; under tracing (fvcore) and on other devices: the reference (matmul per bank)."""
    from morph import native
    from morph.templates import generate

    bank = torch.randn(2, 4, 3, requires_grad=True)
    coef = torch.randn(1, 2, requires_grad=True)
    with native.disabled():
        assert type(generate(coef, [bank], (1, 1), (0,)).grad_fn).__name__ == "_GridBackward"
    if native.loaded():
        assert "GridFunction" in generate(coef, [bank], (1, 1), (0,)).grad_fn.name()
    else:  # nothing built: the PyTorch implementation, silently
        assert type(generate(coef, [bank], (1, 1), (0,)).grad_fn).__name__ == "_GridBackward"
    half = generate(coef.bfloat16(), [bank.bfloat16()], (1, 1), (0,))
    assert type(half.grad_fn).__name__ == "_GridBackward" and half.dtype == torch.bfloat16
    traced = torch.jit.trace(lambda c, b: generate(c, [b], (1, 1), (0,)), (coef, bank), check_trace=False)
    assert "aten::matmul" in str(traced.graph)


# views and allocations: no kernel runs for them (a reshape that copies has a copy_ child, which counts)
_METADATA_OPS = {f"aten::{n}" for n in (
    "as_strided", "view", "_unsafe_view", "_reshape_alias", "reshape", "flatten", "transpose", "t", "permute",
    "slice", "select", "narrow", "split", "split_with_sizes", "unbind", "expand", "squeeze", "unsqueeze", "detach",
    "alias", "resolve_conj", "resolve_neg", "empty", "empty_like", "empty_strided", "lift_fresh")}


def _generation_ops(model, device):
    """Ops of one training step of ``model`` that belong to weight generation: the profiler's op counts
    of the step minus those of the same step of the baked (stock) model."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    def count(m):
        m = m.to(device)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x = torch.randn(4, *SIZE, device=device)
        y = torch.randint(0, 5, (4,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

        step()  # warm up (lazy inits) outside the profile
        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.events()
        if cuda:  # kernel launches on the GPU
            return Counter("kernel" for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        # ops that do work (no aten children: what runs a kernel), not views or allocations
        parents = {id(e.cpu_parent) for e in events
                   if e.cpu_parent is not None and e.name.startswith("aten::") and e.name not in _METADATA_OPS}
        return Counter(e.name for e in events
                       if e.name.startswith("aten::") and id(e) not in parents and e.name not in _METADATA_OPS)

    return count(model), count(morph.bake(model))


# CUDA is collected only where a device exists (no test is skipped on a CPU machine)
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_generation_is_a_few_ops_per_layer(device):
    """The device path of weight generation (CUDA, and the reference everywhere): a fused model's
    training step costs a few ops per template-mixed layer more than the stock model's, and that number
    does not grow with the number of templates or tiles (one matmul per bank, not one op per tile and
    template). On CPU the reference is forced (``_Grid`` is the CPU fast path); on CUDA it is the default."""
    from unittest import mock

    from morph import templates

    dev = torch.device(device)
    per_layer = {}
    for k in (2, 4):
        m = _spec_model()
        a = morph.convert(m, seed=1, templates=k, input_size=SIZE)
        b = morph.convert(m, seed=2, templates=k, input_size=SIZE)
        f = morph.fuse(a, b, seed=0)
        layers = len(mixed_layers(f))
        forced = mock.patch.object(templates, "generate", templates.grid_reference)
        with forced if device == "cpu" else contextlib.nullcontext():
            fused, stock = _generation_ops(f, dev)
        extra = sum(fused.values()) - sum(stock.values())
        per_layer[k] = extra / layers
    # the same count for K = 2 and K = 4 templates, and a handful of ops per layer (2x2 grids of 2 banks:
    # forward 2 matmuls, 1 cat, 1 copy into the grid; backward 4 matmuls and the copies of the views)
    assert per_layer[2] == per_layer[4], per_layer
    assert per_layer[2] <= (14 if device == "cpu" else 24), per_layer


def test_cpu_fast_path_counts_ops_per_tile():
    """The counterpart of the test above on CPU's default path (``_Grid``, no native kernels): it does
    launch ops per tile and template (cheap on CPU, where it saves memory passes), which is why CUDA
    does not take it."""
    from morph import native

    m = _spec_model()
    counts = {}
    for k in (2, 4):
        f = morph.fuse(morph.convert(m, seed=1, templates=k, input_size=SIZE),
                       morph.convert(m, seed=2, templates=k, input_size=SIZE), seed=0)
        with native.disabled():
            fused, stock = _generation_ops(f, torch.device("cpu"))
        counts[k] = sum(fused.values()) - sum(stock.values())
    assert counts[4] > counts[2]


# ---------------------------------------------------------------------------------------------
# no process-wide side effects
# ---------------------------------------------------------------------------------------------
_WATCH_MALLOPT = """
import ctypes, json, sys
sys.path.insert(0, {tests!r})
seen = []
_getattr, _getitem = ctypes.CDLL.__getattr__, ctypes.CDLL.__getitem__
def _watch(name):
    if name == "mallopt":
        seen.append(name)
ctypes.CDLL.__getattr__ = lambda self, name: (_watch(name), _getattr(self, name))[1]
ctypes.CDLL.__getitem__ = lambda self, name: (_watch(name), _getitem(self, name))[1]
import torch
threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
import morph
import morph.recipes.trainer  # the trainer module too: only a run that asks calls it
from motifs import residual
m = morph.build_model("motifs:residual", num_classes=5)
a = morph.convert(m, seed=1, input_size=(3, 8, 8))
b = morph.convert(m, seed=2, input_size=(3, 8, 8))
f = morph.fuse(a, b, seed=0)
f(torch.randn(2, 3, 8, 8)).sum().backward()
morph.load(morph.save(morph.bake(f), {path!r}), model_fn=residual)
morph.flops(f)
before = list(seen)
from morph.allocator import keep_freed_memory
keep_freed_memory()  # the control: the watch sees an explicit call
print(json.dumps({{"library": before, "explicit": seen[len(before):],
                  "threads": torch.get_num_threads() == threads, "dtype": torch.get_default_dtype() == dtype}}))
"""


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.slow
@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_library_changes_no_allocator_setting(tmp_path):
    """Importing morph and calling convert, fuse, a training step, bake, save, load and flops never calls
    glibc's ``mallopt`` (the only process-wide allocator setting morph has); an explicit call does."""
    code = _WATCH_MALLOPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "b.safetensors"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["library"] == [] and "mallopt" in out["explicit"], out
    assert out["threads"] and out["dtype"], out


_MMAP_CHECK = """
import ctypes, importlib.util, json
spec = importlib.util.spec_from_file_location("allocator", {path!r})  # no torch: glibc's thresholds untouched
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
def mmapped_by(n):  # bytes glibc serves from mmap for one allocation of n bytes
    before = libc.mallinfo2().hblkhd
    libc.malloc(n)  # kept: freeing it would move glibc's dynamic threshold
    return libc.mallinfo2().hblkhd - before
default = mmapped_by(8 << 20)
ok = allocator.keep_freed_memory()
after = mmapped_by(8 << 20)
print(json.dumps({{"default": default, "ok": ok, "after": after}}))
"""


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_keep_freed_memory_sets_the_mmap_threshold():
    """In a process of its own (the setting is process-wide): with glibc's defaults an 8 MB allocation
    is mmapped (and unmapped when freed); after ``keep_freed_memory()`` it comes from the heap."""
    import morph.allocator

    code = _MMAP_CHECK.format(path=morph.allocator.__file__)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["default"] >= 8 << 20 and out["ok"] is True and out["after"] == 0, out


@pytest.mark.parametrize("growth", ["vertical", "horizontal"])
def test_tiles(growth):
    a, b = _pair(Residual(c=8))
    f = morph.fuse(a, b, growth=growth, init="orthogonal", seed=0)
    w = f.conv1.weight
    torch.testing.assert_close(w[:4, :4], a.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(w[4:, 4:], b.conv1.weight, rtol=0, atol=0)
    mix = f.conv1.mix
    ta, tb = a.conv1.mix.banks[0].templates, b.conv1.mix.banks[0].templates
    top_right_bank, bottom_left_bank = (ta, tb) if growth == "vertical" else (tb, ta)
    c = mix.coefficients
    torch.testing.assert_close(w[:4, 4:], torch.einsum("k,k...->...", c[1], top_right_bank))
    torch.testing.assert_close(w[4:, :4], torch.einsum("k,k...->...", c[2], bottom_left_bank))
    # orthogonal init: each new vector is orthogonal to the diagonal vector of the same bank
    ca, cb = a.conv1.mix.coefficients[0], b.conv1.mix.coefficients[0]
    same_a, same_b = (c[1], c[2]) if growth == "vertical" else (c[2], c[1])
    assert abs(float((same_a @ ca).detach())) < 1e-6 and abs(float((same_b @ cb).detach())) < 1e-6
    assert math.isclose(float(same_a.detach().norm()), float(ca.detach().norm()), rel_tol=1e-5)
    # stem stacks outputs, classifier averages, nothing new at the edges
    assert f.stem.mix.grid == (2, 1) and f.fc.mix.grid == (1, 2)
    torch.testing.assert_close(f.fc.weight[:, :8], a.fc.weight / 2)
    torch.testing.assert_close(f.fc.bias, (a.fc.bias + b.fc.bias) / 2)
    assert all(p.requires_grad for p in f.parameters())


@pytest.mark.parametrize("init", ["orthogonal", "orthogonal-official", "random", "random-uniform", "copy", "zero"])
def test_init_modes(init):
    """The new tiles' coefficients are what each mode says (fuse's docstring): per layer, tile 1 mixes a's
    templates next to a's diagonal vector ``ca``, tile 2 b's next to ``cb`` (vertical growth); the diagonal
    tiles keep a's and b's vectors; the same seed gives the same vectors."""
    a, b = _pair(Residual(c=8))
    news, olds = [], []
    for seed in range(6):
        f = morph.fuse(a, b, init=init, seed=seed)
        for name, m in mixed_layers(f):
            c = m.mix.coefficients.detach().double()
            if m.mix.grid != (2, 2):
                continue
            ca = a.get_submodule(name).mix.coefficients.detach()[0].double()
            cb = b.get_submodule(name).mix.coefficients.detach()[0].double()
            assert torch.equal(c[0], ca) and torch.equal(c[3], cb), name  # the trained tiles are kept
            for new, old in ((c[1], ca), (c[2], cb)):
                news.append(new)
                olds.append(old)
                if init == "orthogonal":  # orthogonal to the same bank's vector, with its norm
                    assert abs(float(new @ old)) < 1e-6 * float(old.norm()) ** 2
                    assert math.isclose(float(new.norm()), float(old.norm()), rel_tol=1e-5)
                elif init == "orthogonal-official":  # the least-singular direction: orthogonal, unit norm
                    assert abs(float(new @ old)) < 1e-6 * float(old.norm())
                    assert math.isclose(float(new.norm()), 1.0, rel_tol=1e-5)
                elif init == "copy":  # the same bank's vector plus noise of 1% of its norm, in a U[0, 1) direction
                    d = new - old
                    assert math.isclose(float(d.norm()), 0.01 * float(old.norm()), rel_tol=1e-4)
                    assert (d >= 0).all()
                elif init == "random-uniform":
                    assert (new >= 0).all() and (new < 1).all()
                elif init == "zero":
                    assert not new.any()
    values = torch.stack(news)
    again = morph.fuse(a, b, init=init, seed=5)
    assert torch.equal(again.conv1.mix.coefficients, f.conv1.mix.coefficients)  # seeded
    if init in ("random", "random-uniform"):  # over 6 seeds x 3 layers x 2 tiles x K=2: the distribution
        mean, std = float(values.mean()), float(values.std())
        if init == "random":  # N(0, 1)
            assert abs(mean) < 0.35 and 0.7 < std < 1.3, (mean, std)
        else:  # U[0, 1): mean 1/2, std 0.29
            assert abs(mean - 0.5) < 0.12 and 0.2 < std < 0.38, (mean, std)
    if init in ("random", "random-uniform", "copy"):  # another seed or layer, other vectors (with K = 2 the
        assert len({tuple(v.tolist()) for v in news}) == len(news)  # orthogonal modes leave only a sign)


def test_grow_zero_preserves_function():
    a = morph.convert(Residual(c=8), seed=1, input_size=SIZE)
    g = morph.grow(a, init="zero")
    a.eval(), g.eval()
    x = torch.randn(3, *SIZE)
    assert _relerr(g(x), a(x)) < 1e-6
    assert all(set(m.mix.tile_banks) == {0} and len(m.mix.banks) == 1 for _, m in mixed_layers(g))
    assert morph.get_info(g).kind == "grown"


@pytest.mark.parametrize("kind", ["half", "fused", "grown"])
def test_bake_equals_template_model(kind, tmp_path):
    m = _spec_model()
    a, b = _pair(m)
    model = {"half": a, "fused": morph.fuse(a, b, seed=0), "grown": morph.grow(a, seed=0)}[kind]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baked = morph.bake(model)
    model.eval(), baked.eval()
    x = torch.randn(2, *SIZE)
    assert _relerr(baked(x), model(x)) < 1e-5
    assert not mixed_layers(baked)
    # the original is untouched (bake shares its banks while generating, it does not copy them), and
    # no baked parameter shares memory with it
    assert len(mixed_layers(model)) > 0 and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in baked.parameters())
    stock = Residual(num_classes=5) if kind != "half" else morph.scale_width(m, 0.5, input_size=SIZE)
    stock.load_state_dict(baked.state_dict(), strict=True)
    # a baked fused model round-trips through morph checkpoints into the stock class
    path = morph.save(baked, tmp_path / "baked.safetensors")
    r = morph.load(path, trust_code=True)
    r.eval()
    assert torch.equal(r(x), baked(x))


def test_fused_checkpoint_round_trip(tmp_path):
    a, b = _pair(_spec_model())
    f = morph.fuse(a, b, growth="horizontal", seed=0)
    r = morph.load(morph.save(f, tmp_path / "f.safetensors"), model_fn=residual)
    f.eval(), r.eval()
    x = torch.randn(2, *SIZE)
    assert torch.equal(f(x), r(x))
    assert morph.get_info(r).growth == "horizontal" and morph.get_info(r).set_ids == ("seed1", "seed2")


def test_fuse_rejects_mismatched_inputs():
    m = _spec_model()
    a, b = _pair(m)
    with pytest.raises(morph.MorphError, match="template set"):
        morph.fuse(a, a)
    with pytest.raises(morph.MorphError, match="plain model"):
        morph.fuse(a, morph.bake(b))
    with pytest.raises(morph.MorphError, match="different templates"):
        morph.fuse(a, morph.convert(m, templates=3, seed=5, input_size=SIZE))
    with pytest.raises(morph.MorphError, match="fused model"):
        morph.fuse(morph.fuse(a, b), b)
    with pytest.raises(morph.MorphError, match="init must be one of"):
        morph.fuse(a, b, init="bogus")


# ---------------------------------------------------------------------------------------------
# model resolution and FLOPs
# ---------------------------------------------------------------------------------------------
def test_build_model_specs():
    assert morph.build_model("resnet18").morph_spec.source == "timm"
    assert morph.build_model("torchvision/resnet18").morph_spec.source == "torchvision"
    assert morph.build_model("squeezenet1_1").morph_spec.source == "torchvision"  # not in timm
    m = morph.build_model("timm/resnet18", num_classes=7)
    assert m.fc.out_features == 7 and m.morph_spec.kwargs == {"num_classes": 7}
    with pytest.raises(morph.ModelNotFoundError, match="no timm or torchvision model named 'resnet5O'"):
        morph.build_model("resnet5O")
    with pytest.raises(morph.ModelNotFoundError, match="cannot import"):
        morph.build_model("no_such_pkg.mod:fn")


def test_flops_amortize_generation():
    m = Residual(c=8)
    h = morph.convert(m, seed=0, input_size=SIZE)
    r1, r64 = morph.flops(h, SIZE, batch_size=1), morph.flops(h, SIZE, batch_size=64)
    gen = sum(2 * math.prod(mod.mix.tile_shape) for _, mod in mixed_layers(h))
    assert r1.generation == gen and r64.forward == r1.forward
    assert r64.per_image == pytest.approx(r1.forward + gen / 64)
    plain = morph.flops(morph.scale_width(m, 0.5, input_size=SIZE), SIZE)
    assert r1.forward == plain.per_image


def test_build_kernels_command_without_compiler(tmp_path, monkeypatch):
    """``morph build-kernels`` is the one command that compiles; without a compiler it says so in one
    error line (exit code 2) and builds nothing, and morph keeps working on the PyTorch implementation."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    from morph import native

    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("MORPH_CACHE", str(tmp_path / "cache"))
    native.cache_dir.cache_clear()
    try:
        res = CliRunner().invoke(app, ["build-kernels"])
        assert res.exit_code == 2, res.output
        assert "error: cannot build morph's native kernels" in res.output and "C++ compiler" in res.output
        assert not native.is_built()
    finally:
        native.cache_dir.cache_clear()


def test_walkthrough_commands_never_compile(tmp_path, monkeypatch):
    """convert, inspect, fuse, bake and grow never start a compiler (torch.utils.cpp_extension), built
    kernels or not: the walkthrough of the README waits on nothing but its own work."""
    import torch.utils.cpp_extension as cpp
    from morph.cli.main import app
    from typer.testing import CliRunner

    def compile_(*args, **kwargs):
        raise AssertionError("a morph command tried to compile")

    monkeypatch.setattr(cpp, "load", compile_)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    spec = ["motifs:residual", "--input-size", "3,8,8"]
    for args in (["convert", *spec, "--seed", "1", "-o", "a.safetensors"],
                 ["convert", *spec, "--seed", "2", "-o", "b.safetensors"],
                 ["inspect", "a.safetensors", "--trust-code"],
                 ["fuse", "a.safetensors", "b.safetensors", "-o", "f.safetensors", "--trust-code"],
                 ["bake", "f.safetensors", "-o", "p.safetensors", "--trust-code"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
