"""The morph CLI through typer's CliRunner: every command, --json, --help, and user errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

import morph
from morph.cli.main import app

runner = CliRunner()
MODEL = "motifs:residual"
SIZE = "3,8,8"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    for seed in (1, 2):
        r = run("convert", MODEL, "--half", "--seed", seed, "--num-classes", 5, "--input-size", SIZE,
                "-o", d / f"h{seed}.safetensors")
        assert r.exit_code == 0, r.output
    return d


def test_convert_default_name_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("convert", MODEL, "--half", "--seed", 3, "--input-size", SIZE, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["output"] == "residual-half-s3.safetensors" and (tmp_path / s["output"]).exists()
    assert s["set_id"] == "seed3" and s["width"] == 0.5 and s["reloaded"] is True
    assert s["resolved_from"] == "callable"


def test_inspect_table_and_json(halves):
    r = run("inspect", halves / "h1.safetensors")
    assert r.exit_code == 0, r.output
    assert "conv1" in r.stdout and "FLOPs/image" in r.stdout
    r = run("inspect", halves / "h1.safetensors", "--json")
    s = json.loads(r.stdout)
    assert s["kind"] == "half" and s["banks"] == s["mixed_layers"] == 5
    layer = next(x for x in s["layers"] if x["layer"] == "conv1")
    assert layer["weight_shape"] == [4, 4, 3, 3] and layer["grid"] == [1, 1] and layer["templates"] == 2
    assert 0 < s["flops"]["ratio"] < 0.5


def test_fuse_grow_bake_inspect(halves, tmp_path):
    f = tmp_path / "f.safetensors"
    r = run("fuse", halves / "h1.safetensors", halves / "h2.safetensors", "-o", f, "--growth", "horizontal",
            "--init", "zero", "--seed", 0, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["set_ids"] == ["seed1", "seed2"]
    s = json.loads(run("inspect", f, "--json", "--no-flops").stdout)
    conv1 = next(x for x in s["layers"] if x["layer"] == "conv1")
    assert conv1["grid"] == [2, 2] and conv1["tiles"] == ["seed1:conv1", "seed2:conv1", "seed1:conv1", "seed2:conv1"]
    assert run("grow", halves / "h1.safetensors", "-o", tmp_path / "g.safetensors", "--init", "zero").exit_code == 0
    baked = tmp_path / "baked.safetensors"
    r = run("bake", f, "-o", baked)
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    from motifs import Residual

    stock = Residual(num_classes=5)
    stock.load_state_dict(load_file(baked), strict=True)
    fused = morph.load(f).eval()
    stock.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(stock(x), fused(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cmd", ["convert", "inspect", "fuse", "grow", "bake", "train", "report"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.stdout


def _one_line_error(r):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) >= 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    return " ".join(lines)


def test_errors(halves, tmp_path):
    msg = _one_line_error(run("convert", "resnet5O", "-o", tmp_path / "x.safetensors"))
    assert "no timm or torchvision model named 'resnet5O'" in msg
    _one_line_error(run("inspect", tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_text("hello")
    assert "not a readable safetensors" in _one_line_error(run("inspect", bad))
    data = (halves / "h1.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 3])
    _one_line_error(run("inspect", trunc))
    out = tmp_path / "self.safetensors"
    assert "template set" in _one_line_error(run("fuse", halves / "h1.safetensors", halves / "h1.safetensors", "-o", out))
    assert not out.exists()
    baked = tmp_path / "plain.safetensors"
    assert run("bake", halves / "h1.safetensors", "-o", baked).exit_code == 0
    assert "plain model" in _one_line_error(run("fuse", halves / "h1.safetensors", baked, "-o", out))
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    assert "--input-size" in _one_line_error(run("convert", MODEL, "--input-size", "a,b", "-o", tmp_path / "y.safetensors"))
    assert "exists" in _one_line_error(run("bake", halves / "h1.safetensors", "-o", baked))
    _one_line_error(run("train", "no-such-config"))
