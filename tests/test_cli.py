"""The ``morph`` CLI through typer's CliRunner, and once through the installed ``morph`` entry point.

resnet18 (timm, found by its bare name) at 3x32x32 runs the main path: convert, inspect, fuse, bake, then load
the baked file into timm and torchvision. The tiny ``motifs:residual`` keeps the other cases fast. Every user
error must exit with code 2, print one ``error: ...`` line on stderr and nothing on stdout, and leave no file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import motifs  # tests/motifs.py: tiny models
import pytest
import timm
import torch
import torchvision
import typer
from morph.cli.convert import default_output
from morph.cli.inspect import si
from morph.cli.main import app
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import morph

runner = CliRunner()
TESTS = Path(__file__).parent
R1, R2 = "resnet18-half-seed1.safetensors", "resnet18-half-seed2.safetensors"
M1, M2 = "m1.safetensors", "m2.safetensors"
RESNET18_PARAMS = 11_689_512


READERS = {"inspect", "fuse", "grow", "bake"}


def run(*args, columns=200):
    """``morph ARGS``. ``motifs:residual`` is this test's own model, so commands that read checkpoints opt in to
    rebuilding it (``--trust-code``; without it they refuse: tests/test_security.py)."""
    args = [str(a) for a in args]
    if args and args[0] in READERS:
        args.append("--trust-code")
    return runner.invoke(app, args, env={"COLUMNS": str(columns)})


def ok(r):
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr
    return r.stdout


def lines(text):
    """Non-blank lines with runs of spaces collapsed (rich pads table cells)."""
    return [" ".join(x.split()) for x in text.splitlines() if x.strip()]


def flat(text):
    return " ".join(text.split())


def error(r):
    """The one stderr line of a user error: exit code 2, nothing on stdout."""
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    return err[0]


def coefs(path, layer):
    return load_file(path)[f"{layer}.mix.coefficients"]


def params(path):
    return sum(p.numel() for p in morph.load(path, trust_code=True).parameters())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with resnet18 halves (seeds 1, 2; default names) and motifs:residual halves (seeds 1, 2)."""
    d = tmp_path_factory.mktemp("cli")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        text = ok(run("convert", "resnet18", "--half", "--seed", 1, "--input-size", "3,32,32"))
        summary = json.loads(ok(run("convert", "resnet18", "--seed", 2, "--input-size", "3,32,32", "--json")))
        for seed, out in ((1, M1), (2, M2)):
            ok(run("convert", "motifs:residual", "--seed", seed, "--input-size", "3,8,8", "-o", out, "--json"))
    finally:
        os.chdir(cwd)
    return d, text, summary


@pytest.fixture
def here(work, monkeypatch):
    monkeypatch.chdir(work[0])
    return work[0]


def test_convert_text(here, work):
    n = params(R1)
    assert lines(work[1]) == [
        "converted resnet18 (timm/resnet18) -> resnet18-half-seed1.safetensors",
        "width 0.5, input 3x32x32, template set 'seed1'",
        "21 template-mixed layers, 2 templates per bank, share none",
        f"parameters {n:,} = {n / RESNET18_PARAMS:.3f}x the original's 11,689,512",
        "verified: reloaded it; 143 tensors identical, same outputs (max |diff| 0)",
    ]


def test_convert_json(here, work):
    n = params(R2)
    assert work[2] == {
        "output": R2, "model": "timm/resnet18", "kwargs": {}, "kind": "half", "width": 0.5, "templates": 2,
        "share": "none", "set_id": "seed2", "input_size": [3, 32, 32], "template_layers": 21, "params": n,
        "params_original": RESNET18_PARAMS, "params_ratio": n / RESNET18_PARAMS,
        "verified": {"tensors": 143, "tensors_equal": True, "output_max_abs_diff": 0.0, "ok": True},
    }


def test_default_output_names():
    assert default_output("resnet50", 0.5, None) == Path("resnet50-half.safetensors")
    assert default_output("resnet50", 0.5, 3) == Path("resnet50-half-seed3.safetensors")
    assert default_output("timm/resnet18", 0.25, 1) == Path("resnet18-w0.25-seed1.safetensors")
    assert default_output("torchvision/resnet50", 0.5, None) == Path("resnet50-half.safetensors")
    assert default_output("motifs:residual", 0.5, 0) == Path("residual-half-seed0.safetensors")


def test_inspect_json(here):
    s = json.loads(ok(run("inspect", R1, "--json")))
    total = params(R1)
    assert (s["file"], s["model"], s["kwargs"], s["kind"], s["width"], s["templates"], s["share"]) == (
        R1, "timm/resnet18", {}, "half", 0.5, 2, "none")
    assert (s["set_ids"], s["growth"], s["init"], s["input_size"]) == (["seed1"], "", "", [3, 32, 32])
    assert (s["params"], s["template_banks"], s["template_layers"], len(s["layers"])) == (total, 21, 21, 21)
    assert sum(x["params"] for x in s["layers"]) == s["params_layers"] == total - s["params_other"]
    assert s["layers"][0] == {
        "layer": "conv1", "type": "Conv2d", "weight_shape": [32, 3, 7, 7], "mixed": True,
        "params": 2 * 32 * 3 * 7 * 7 + 2, "grid": [1, 1], "tiles": [0],
        "banks": [{"set_id": "seed1", "name": "conv1", "templates": 2, "template_shape": [32, 3, 7, 7]}],
        "coefficients": coefs(R1, "conv1").tolist(), "coefficients_train": False,
    }
    fc = s["layers"][-1]
    assert (fc["layer"], fc["type"], fc["weight_shape"], fc["params"]) == ("fc", "Linear", [1000, 256], 2 * 256_000 + 2 + 1000)
    f = s["flops"]
    # fvcore on resnet18 at 3x32x32: convolutions, batch norms, pooling and the classifier at full width
    assert f["original"] == morph.flops(timm.create_model("resnet18"), (3, 32, 32)).per_image
    assert f["per_image"] == f["forward"] + f["generation"] / 64 and f["batch_size"] == 64
    assert f["ratio"] == f["per_image"] / f["original"] and 0.25 < f["ratio"] < 0.3
    assert (f["params_original"], f["params_ratio"]) == (RESNET18_PARAMS, total / RESNET18_PARAMS)


def test_inspect_table(here):
    out = ok(run("inspect", M1))
    s = json.loads(ok(run("inspect", M1, "--json")))
    text, f = lines(out), s["flops"]
    assert flat(out).startswith("m1.safetensors: motifs:residual, half, width 0.5, 2 templates per bank, share none, "
                                "template sets seed1 layer weight bank tiles coefficients params")
    c = coefs(M1, "stem")[0]
    i = text.index(f"stem 4x3x3x3 seed1 1x1 {c[0]:+.3f} {c[1]:+.3f} 218")
    assert text[i + 1] == "(fixed)"
    c = coefs(M1, "conv1")[0]
    assert f"conv1 4x4x3x3 seed1 1x1 {c[0]:+.3f} {c[1]:+.3f} 290" in text
    assert f"5 layers {s['params_layers']:,}" in text
    assert (f"parameters: {s['params']:,} = {s['params_layers']:,} in 5 conv/linear layers + {s['params_other']:,} in "
            "other modules; 5 template banks in 5 template-mixed layers") in text
    assert text[-4:] == [
        "FLOPs per 3x8x8 image (fvcore: 1 multiply-add = 1 flop):",
        f"this model {si(f['per_image'])} = forward {si(f['forward'])} + weight generation {si(f['generation'])} / batch 64",
        f"original {si(f['original'])} (motifs:residual at full width, {f['params_original']:,} parameters)",
        f"ratio {f['ratio']:.3f}x FLOPs, {f['params_ratio']:.3f}x parameters",
    ]


def test_inspect_fits_80_columns(here):
    out = ok(run("inspect", R1, "--no-flops", columns=80))
    assert max(len(x) for x in out.splitlines()) <= 80
    c = coefs(R1, "layer2.0.downsample.0")[0]
    assert f"layer2.0.downsample.0 64x32x1x1 seed1 1x1 {c[0]:+.3f} {c[1]:+.3f} 4,098" in lines(out)


def test_fuse_bake_and_load_into_timm_and_torchvision(here, tmp_path):
    fused, plain = tmp_path / "resnet18-fused.safetensors", tmp_path / "resnet18-fused-plain.safetensors"
    s = json.loads(ok(run("fuse", R1, R2, "-o", fused, "--seed", 0, "--json")))
    assert s == {"output": str(fused), "model": "timm/resnet18", "kind": "fused", "width": 1.0,
                 "set_ids": ["seed1", "seed2"], "growth": "vertical", "init": "orthogonal", "params": s["params"]}
    s = json.loads(ok(run("inspect", fused, "--json", "--no-flops")))
    assert (s["kind"], s["width"], s["set_ids"], s["growth"], s["init"]) == (
        "fused", 1.0, ["seed1", "seed2"], "vertical", "orthogonal")  # as recorded in the file
    assert "flops" not in s and (s["template_banks"], s["template_layers"]) == (42, 21)
    banks = [{"set_id": k, "name": "conv1", "templates": 2, "template_shape": [32, 3, 7, 7]} for k in ("seed1", "seed2")]
    conv1, l1 = s["layers"][0], s["layers"][1]
    assert (conv1["weight_shape"], conv1["grid"], conv1["tiles"], conv1["banks"]) == ([64, 3, 7, 7], [2, 1], [0, 1], banks)
    assert (l1["layer"], l1["weight_shape"], l1["grid"], l1["tiles"]) == ("layer1.0.conv1", [64, 64, 3, 3], [2, 2], [0, 0, 1, 1])

    s = json.loads(ok(run("bake", fused, "-o", plain, "--json")))
    hint = f"model = timm.create_model('resnet18'); model.load_state_dict(safetensors.torch.load_file({str(plain)!r}))"
    assert s == {"output": str(plain), "model": "timm/resnet18", "kwargs": {}, "kind": "plain", "width": 1.0,
                 "from_kind": "fused", "params": RESNET18_PARAMS, "tensors": 122, "load_with": hint}
    # The README's two ways to load the baked file; every tensor must arrive (timm drops the classifier silently
    # when num_classes differs from its pretrained config, so compare them all).
    sd = load_file(plain)
    m = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)), num_classes=1000)
    assert m.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    tv = torchvision.models.resnet18()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv.eval()(x), m.eval()(x))


def test_fuse_grow_bake_text(here, tmp_path):
    fused, grown, plain = (tmp_path / f"{n}.safetensors" for n in ("f", "g", "p"))
    text = lines(ok(run("fuse", M1, M2, "-o", fused, "--growth", "horizontal", "--init", "zero")))
    n = params(fused)
    assert text == [f"fused m1.safetensors + m2.safetensors -> {fused}",
                    f"motifs:residual at width 1, template sets seed1 + seed2, growth horizontal, init zero, "
                    f"{n:,} parameters"]
    out = ok(run("inspect", fused, "--no-flops"))
    assert "motifs:residual, fused, width 1, 2 templates per bank, share none, template sets seed1, seed2, " \
           "growth horizontal, init zero" in flat(out)
    c = coefs(fused, "conv1")
    i = lines(out).index(f"conv1 8x8x3x3 A seed1 2x2 A B A {c[0, 0]:+.3f} {c[0, 1]:+.3f} {2 * 2 * 144 + 8}")
    assert lines(out)[i + 1:i + 4] == [f"B seed2 A B B {c[1, 0]:+.3f} {c[1, 1]:+.3f}",
                                       f"A {c[2, 0]:+.3f} {c[2, 1]:+.3f}", f"B {c[3, 0]:+.3f} {c[3, 1]:+.3f}"]
    assert lines(ok(run("grow", M1, "-o", grown, "--seed", 3))) == [
        f"grown m1.safetensors -> {grown}",
        f"motifs:residual at width 1, template set seed1, init orthogonal, {params(grown):,} parameters"]
    stock = motifs.residual()
    n, t = sum(p.numel() for p in stock.parameters()), len(stock.state_dict())
    assert lines(ok(run("bake", fused, "-o", plain))) == [
        f"baked {fused} (fused) -> {plain}", f"plain motifs:residual at width 1, {n:,} parameters in {t} tensors",
        f"load it with: model = motifs.residual(); model.load_state_dict(safetensors.torch.load_file({str(plain)!r}))"]


def test_grow_zero_keeps_the_function(here, tmp_path):
    grown = tmp_path / "grown.safetensors"
    s = json.loads(ok(run("grow", M1, "-o", grown, "--init", "zero", "--json")))
    g = morph.load(grown, trust_code=True).eval()
    assert s == {"output": str(grown), "model": "motifs:residual", "kind": "grown", "width": 1.0, "set_ids": ["seed1"],
                 "growth": "vertical", "init": "zero", "params": sum(p.numel() for p in g.parameters())}
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(g(x), morph.load(M1, trust_code=True).eval()(x))


def test_shared_banks_are_shown_and_counted_once(here, tmp_path):
    out = tmp_path / "shared.safetensors"
    ok(run("convert", "motifs:residual", "--share", "consecutive", "--input-size", "3,8,8", "--seed", 0, "-o", out))
    s = json.loads(ok(run("inspect", out, "--json", "--no-flops")))
    by = {x["layer"]: x for x in s["layers"]}
    assert [b["name"] for b in by["conv2"]["banks"]] == ["conv1"]  # conv1 and conv2 share conv1's bank
    assert (by["conv1"]["params"], by["conv2"]["params"]) == (2 * 4 * 4 * 9 + 2, 2)
    assert (s["template_banks"], s["template_layers"]) == (4, 5)
    assert sum(x["params"] for x in s["layers"]) + s["params_other"] == s["params"] == params(out)
    c = coefs(out, "conv2")[0]
    assert f"conv2 4x4x3x3 seed0/conv1 1x1 {c[0]:+.3f} {c[1]:+.3f} 2" in lines(ok(run("inspect", out, "--no-flops")))


@pytest.mark.parametrize("cmd", ["convert", "inspect", "fuse", "grow", "bake"])
def test_help_documents_every_option(cmd):
    text = ok(run(cmd, "--help"))
    assert f"Usage: morph {cmd} [OPTIONS]" in text
    for p in typer.main.get_command(app).commands[cmd].params:
        assert p.help, f"morph {cmd}: {p.name} has no help"
        for name in p.opts if p.param_type_name == "option" else [p.metavar]:
            assert name in text, f"morph {cmd} --help does not show {name}"
    assert f"{cmd} " in ok(run("--help"))


def test_user_errors(here, tmp_path):
    assert error(run("convert", "resnet5O", "-o", tmp_path / "x.safetensors")) == (
        "error: no timm or torchvision model named 'resnet5O'; use timm/NAME, torchvision/NAME or "
        "package.module:callable")
    assert error(run("inspect", tmp_path / "missing.safetensors")) == (
        f"error: Invalid value for 'FILE': file '{tmp_path / 'missing.safetensors'}' does not exist; "
        "see 'morph inspect --help'")
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not a checkpoint")
    assert error(run("inspect", notes)).startswith(f"error: {notes}: not a readable safetensors file (")
    data = Path(M1).read_bytes()
    for cut in (5, len(data) // 2):
        trunc = tmp_path / f"trunc{cut}.safetensors"
        trunc.write_bytes(data[:cut])
        assert error(run("inspect", trunc)).startswith(f"error: {trunc}: not a readable safetensors file (")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    assert error(run("bake", foreign, "-o", tmp_path / "b.safetensors")) == (
        f"error: {foreign}: a safetensors file without morph metadata; it was not written by morph.save")
    assert error(run("convert", "resnet18", "--input-size", "a,b", "-o", tmp_path / "y.safetensors")) == (
        "error: Invalid value for '--input-size': expected C,H,W such as 3,224,224 (or one size such as 224), "
        "got 'a,b'; see 'morph convert --help'")
    assert error(run("convert", "resnet18", "--half", "--width", 0.25)) == (
        "error: Invalid value for '--half': --half means --width 0.5; drop one of them (got --width 0.25); "
        "see 'morph convert --help'")
    assert error(run("fuse", M1, M2, "-o", tmp_path / "f.safetensors", "--init", "bogus")).startswith(
        "error: Invalid value for '--init': ")
    assert error(run("fuse", M1, "-o", tmp_path / "f.safetensors")) == (
        "error: Missing argument 'B'; see 'morph fuse --help'")
    assert error(run("bake", M1, "-o", tmp_path / "x.pt")) == (
        f"error: Invalid value for '-o' / '--output': {tmp_path / 'x.pt'} must end in .safetensors; "
        "see 'morph bake --help'")
    assert error(run("bake", M1, "-o", M2)) == (
        "error: Invalid value for '-o' / '--output': m2.safetensors exists; pass --force to overwrite it; "
        "see 'morph bake --help'")
    assert error(run("nonsense")) == "error: No such command 'nonsense'; see 'morph --help'"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["notes.safetensors", "trunc5.safetensors", f"trunc{len(data) // 2}.safetensors", "foreign.safetensors"])


def test_fusion_errors_leave_no_file(here, tmp_path):
    out = tmp_path / "fused.safetensors"
    assert error(run("fuse", M1, M1, "-o", out)) == (
        "error: both models use template set 'seed1'; convert the second with another seed or set_id")
    baked = tmp_path / "baked.safetensors"
    ok(run("bake", M1, "-o", baked))
    assert error(run("fuse", M1, baked, "-o", out)) == (
        "error: fusion needs half-width template models from morph.convert; the second is a plain model")
    assert error(run("grow", baked, "-o", out)) == (  # a plain model grows by a method it names
        f"error: Invalid value for '--method': {baked} is a plain checkpoint: choose a growth method (firefly, "
        "gradmax, mixturegrowth, net2net, random); see 'morph grow --help'")
    assert error(run("bake", baked, "-o", out)) == (
        "error: bake needs a template model (from morph.convert, fuse or grow); this one is plain")
    assert error(run("fuse", M1, R1, "-o", out)) == (
        "error: cannot fuse models with different architectures: motifs:residual vs timm/resnet18")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked.safetensors"]  # no output, no temporary file


@pytest.mark.slow
def test_installed_entry_point(tmp_path):
    morph_bin = Path(sys.executable).with_name("morph")
    assert morph_bin.is_file(), f"{morph_bin} is missing: install the package with pip install -e ."
    r = subprocess.run([morph_bin, "convert", "motifs:residual", "--input-size", "3,8,8", "--json"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(TESTS)}, capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stderr) == (0, "")
    assert json.loads(r.stdout)["output"] == "residual-half.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual-half.safetensors"]
