"""Linear CKA (morph.cka): the estimators against their definitions, the hook path, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import morph
from morph.cka import cka_series, default_layers, hsic1, layer_names, linear_cka

# ----------------------------------------------------------------------------------------------
# Direct float64 implementations of the formulas, written from the papers, not from morph.cka


def direct_biased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (2019), Eq. for linear CKA: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), columns centered."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float(torch.linalg.norm(y.T @ x) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def direct_hsic1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012): HSIC_1 as the U-statistic over ordered 4-tuples of distinct indices,
    (1/(n)_4) sum k_ij l_ij + k_ij l_qr - 2 k_ij l_iq, with linear kernels."""
    k = (x.double() @ x.double().T).tolist()
    l = (y.double() @ y.double().T).tolist()  # noqa: E741
    n = len(k)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i][j] * l[i][j] + k[i][j] * l[q][r] - 2 * k[i][j] * l[i][q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def direct_unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    return direct_hsic1(x, y) / math.sqrt(direct_hsic1(x, x) * direct_hsic1(y, y))


def _related(n: int, p: int = 6, q: int = 4, noise: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    y = x @ torch.randn(p, q, generator=g) + noise * torch.randn(n, q, generator=g)
    return x, y


# ----------------------------------------------------------------------------------------------
# The estimators


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_cka_of_a_representation_with_itself_is_one(estimator):
    x = torch.randn(50, 30)
    assert float(linear_cka(x, x, estimator)) == pytest.approx(1.0, abs=1e-12)
    conv = torch.randn(20, 4, 5, 5)  # flattened after the first dimension
    assert float(linear_cka(conv, conv, estimator)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(estimator):
    x, y = _related(64, p=12, q=9)
    base = float(linear_cka(x, y, estimator))
    qx = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    qy = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))[0]
    xd, yd = x.double(), y.double()
    assert 0.2 < base < 0.99
    for a, b in [(xd @ qx, yd), (xd, yd @ qy), (3.7 * xd, yd), (xd, 0.01 * yd), (2.5 * xd @ qx, 40.0 * yd @ qy)]:
        assert float(linear_cka(a, b, estimator)) == pytest.approx(base, abs=1e-10)
    # the unbiased estimator is also unchanged by a constant shift of the features (it centers implicitly)
    assert float(linear_cka(xd + 100.0, yd - 5.0, estimator)) == pytest.approx(base, abs=1e-9)


def test_estimators_agree_with_direct_float64_formulas():
    for seed, (n, p, q) in enumerate([(7, 5, 3), (9, 3, 8), (8, 10, 10)]):
        x, y = _related(n, p, q, noise=0.7, seed=seed)
        assert float(hsic1(x, y)) == pytest.approx(direct_hsic1(x, y), rel=1e-9)
        assert float(linear_cka(x, y, "unbiased")) == pytest.approx(direct_unbiased_cka(x, y), abs=1e-10)
        assert float(linear_cka(x, y, "biased")) == pytest.approx(direct_biased_cka(x, y), abs=1e-10)


class Pair(nn.Module):
    """Splits each input row into two representations, ``a`` (the first ``p`` columns) and ``b`` (the rest)."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p
        self.a, self.b = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x[:, : self.p]), self.b(x[:, self.p :])


def test_minibatch_estimator_through_models_matches_the_formulas():
    x, y = _related(24, noise=0.5)
    data = list(torch.cat([x, y], 1).split(8))
    model = Pair(x.shape[1])
    r = morph.cka(model, model, data, ["a", "b"], ["a", "b"])
    # Nguyen et al. (2021): ratio of the per-batch HSIC_1 sums
    hab = sum(direct_hsic1(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8))
    haa = sum(direct_hsic1(x[i : i + 8], x[i : i + 8]) for i in range(0, 24, 8))
    hbb = sum(direct_hsic1(y[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8))
    assert float(r.matrix[0, 1]) == pytest.approx(hab / math.sqrt(haa * hbb), abs=1e-10)
    assert r.matrix[0, 0] == pytest.approx(1.0) and r.matrix[1, 1] == pytest.approx(1.0)
    assert (r.images, r.batches, r.estimator) == (24, 3, "unbiased")
    full = morph.cka(model, model, data, ["a"], ["b"], estimator="biased")
    assert float(full.matrix[0, 0]) == pytest.approx(direct_biased_cka(x, y), abs=1e-10)


def test_minibatch_estimator_converges_to_the_full_data_unbiased_value():
    n, batch = 2048, 32
    x, y = _related(n, p=8, q=5, noise=2.0, seed=3)
    target = float(linear_cka(x, y, "unbiased"))  # HSIC_1 over all 2,048 images at once
    data = list(torch.cat([x, y], 1).split(batch))
    model = Pair(x.shape[1])
    errors = {}
    for k in (1, 4, 16, 64):
        r = morph.cka(model, model, data, ["a"], ["b"], batches=k)
        assert r.images == k * batch
        errors[k] = abs(float(r.matrix[0, 0]) - target)
    assert errors[64] < 0.01
    assert errors[64] < errors[16] < errors[1]
    assert errors[4] < errors[1]


def test_small_batches_are_refused():
    model = Pair(3)
    data = [torch.randn(8, 6), torch.randn(3, 6)]
    with pytest.raises(morph.MorphError, match="batch 1 has 3 examples.*at least 4"):
        morph.cka(model, model, data, ["a"], ["b"])
    with pytest.raises(morph.MorphError, match="at least 4"):
        linear_cka(torch.randn(3, 5), torch.randn(3, 5))
    # the biased estimator takes any batch size
    r = morph.cka(model, model, data, ["a"], ["b"], estimator="biased")
    assert r.images == 11


# ----------------------------------------------------------------------------------------------
# Models, hooks and fx nodes


def tiny_wrn() -> nn.Module:
    from morph.recipes.models import wrn

    return wrn(10, 1)


def _images(batches: int = 3, n: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # 16x16: the WRN pools globally, and small images keep the tests fast
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.zeros(n, dtype=torch.long)) for _ in range(batches)]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_default_layers_follow_residual_blocks():
    import torchvision

    assert default_layers(tiny_wrn()) == ["group1.0", "group2.0", "group3.0"]
    assert default_layers(torchvision.models.resnet18())[:3] == ["layer1.0", "layer1.1", "layer2.0"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
    assert default_layers(plain) == ["0", "2", "4"]  # no residual additions: conv and linear layers


def test_model_against_itself_gives_one_on_the_diagonal_through_hooks_and_nodes():
    model = tiny_wrn()
    model.train()
    names = layer_names(model)
    assert "group1.0.conv1" in names["modules"] and "add" in names["nodes"]
    layers = [*default_layers(model), "group2.0.conv1", "add_1", "relu"]
    r = morph.cka(model, model, _images(), layers, layers)
    assert torch.allclose(torch.diagonal(r.matrix), torch.ones(len(layers), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(r.matrix, r.matrix.T, atol=1e-12)
    # the fx node "add_1" is the output of block group2.0 (read before its in-place ReLU changes it)
    assert float(r.matrix[layers.index("group2.0"), layers.index("add_1")]) == pytest.approx(1.0, abs=1e-10)
    assert model.training and _hooks(model) == 0
    # a second instance with the same weights, run separately, gives the same matrix
    twin = tiny_wrn()
    twin.load_state_dict(model.state_dict())
    r2 = morph.cka(model, twin, _images(), layers, layers)
    assert torch.allclose(r2.matrix, r.matrix, atol=1e-9)
    assert r2.layers_a == tuple(layers) and r2.to_dict()["matrix"][0][0] == pytest.approx(1.0)


def test_different_models_and_pooling():
    a, b = tiny_wrn(), tiny_wrn()
    r = morph.cka(a, b, _images(), "convs", None, reduce="mean")
    assert r.matrix.shape == (len(default_layers(a, "convs")), 3)
    assert bool(torch.isfinite(r.matrix).all()) and r.reduce == "mean"  # unbiased: may dip below 0 on 8 images
    biased = morph.cka(a, b, _images(), "convs", None, reduce="mean", estimator="biased")
    assert bool(((biased.matrix >= 0) & (biased.matrix <= 1.0 + 1e-12)).all())


def test_a_bfloat16_copy_is_nearly_identical_to_its_float32_model():
    a = tiny_wrn()
    b = tiny_wrn()
    b.load_state_dict(a.state_dict())
    b.to(torch.bfloat16)  # float32 images are cast to the model's dtype; Gram matrices are float64 either way
    r = morph.cka(a, b, _images(2))
    assert bool((torch.diagonal(r.matrix) > 0.98).all())


def test_hooks_are_removed_and_modes_restored_after_an_exception():
    model = tiny_wrn()
    model.train()
    model.group2.eval()  # a mixed state must come back exactly

    def data():
        yield from _images(1)
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        morph.cka(model, model, data(), ["group1.0", "group2.0.conv1"])
    assert _hooks(model) == 0
    assert model.training and model.group1.training and not model.group2.training

    bad = [torch.randn(8, 5, 16, 16)]  # the model raises inside the forward pass
    with pytest.raises(RuntimeError):
        morph.cka(model, tiny_wrn(), bad)
    assert _hooks(model) == 0 and model.training and not model.group2.training


def test_bad_layers_and_data_are_morph_errors():
    model = tiny_wrn()
    with pytest.raises(morph.MorphError, match="'nope' is neither a module path nor an fx node"):
        morph.cka(model, model, _images(1), ["group1.0", "nope"])
    with pytest.raises(morph.MorphError, match="runs|ran 2 times"):
        shared = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
        twice = nn.Sequential(shared, nn.ReLU(), shared[1])  # the Linear runs twice per forward pass
        morph.cka(twice, twice, [torch.randn(8, 12)], ["0.1"])
    with pytest.raises(morph.MorphError, match="no batch"):
        morph.cka(model, model, [])
    with pytest.raises(morph.MorphError, match="iterable of input tensors"):
        morph.cka(model, model, [{"x": 1}])
    assert _hooks(model) == 0 and _hooks(twice) == 0


def test_series_of_models_epoch_by_epoch():
    a, b = tiny_wrn(), tiny_wrn()
    data = _images(2)
    r = cka_series([a, lambda: b, a], data, "group3.0.conv2", ["e0", "e1", "e2"])
    assert r.layers_a == ("e0", "e1", "e2")
    assert float(r.matrix[0, 2]) == pytest.approx(1.0, abs=1e-10)
    pair = morph.cka(a, b, data, ["group3.0.conv2"], ["group3.0.conv2"])
    assert float(r.matrix[0, 1]) == pytest.approx(float(pair.matrix[0, 0]), abs=1e-10)

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(_images(2, seed=self.calls))

    with pytest.raises(morph.MorphError, match="other batches"):
        cka_series([a, b], Shuffled(), "group3.0.conv2")


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / "test" / cls).mkdir(parents=True)
        for i in range(8):
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "test" / cls / f"{i}.png")
    return root


def _cli(args):
    from morph.cli.main import app

    return CliRunner().invoke(app, args)


def test_cli_json_and_png_for_two_checkpoints(image_folder, tmp_path):
    a, b = tiny_wrn(), tiny_wrn()
    for m in (a, b):
        m.morph_spec = morph.zoo.ModelSpec("callable", "morph.recipes.models:wrn", {"depth": 10, "widen_factor": 1})
    morph.save(a, tmp_path / "a.safetensors")
    morph.save(b, tmp_path / "b.safetensors")
    png = tmp_path / "out" / "ab.png"
    res = _cli(["cka", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--data", str(image_folder),
                "--batches", "2", "--batch-size", "8", "--image-size", "16", "--layers", "group1.0,group3.0.conv2", "--layers-b", "blocks",
                "-o", str(png), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["layers_a"] == ["group1.0", "group3.0.conv2"] and doc["layers_b"] == ["group1.0", "group2.0", "group3.0"]
    assert len(doc["matrix"]) == 2 and len(doc["matrix"][0]) == 3
    assert doc["images"] == 16 and doc["batches"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A against itself: ones on the diagonal
    res = _cli(["cka", str(tmp_path / "a.safetensors"), "--data", str(image_folder), "--batches", "2",
                "--batch-size", "8", "--image-size", "16", "--json"])
    doc = json.loads(res.stdout)
    assert [round(doc["matrix"][i][i], 9) for i in range(3)] == [1.0, 1.0, 1.0]


def test_cli_run_epochs(image_folder, tmp_path):
    run = tmp_path / "run"
    for stage, epochs in (("mixturegrowth/net2", 3), ("mixturegrowth/grown", 2)):
        for e in range(epochs):
            m = tiny_wrn()
            m.morph_spec = morph.zoo.ModelSpec("callable", "morph.recipes.models:wrn", {"depth": 10, "widen_factor": 1})
            morph.save(m, run / "seed0" / stage / "epochs" / f"epoch-{e:03d}.safetensors")
    png = tmp_path / "epochs.png"
    res = _cli(["cka", "--run", str(run), "--data", str(image_folder), "--batches", "1", "--batch-size", "16",
                "--image-size", "16", "-o", str(png), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["layers_a"] == ["net2 0", "net2 1", "net2 2", "grown 2", "grown 3"]
    assert png.stat().st_size > 1000
    res = _cli(["cka", "--run", str(run), "--data", str(image_folder), "--method", "large"])
    assert res.exit_code == 2 and "keep_every" in res.stderr and res.stderr.count("\n") == 1


def test_cli_errors_are_one_line(image_folder, tmp_path):
    res = _cli(["cka", "torchvision/resnet18", "--data", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1
    res = _cli(["cka", "torchvision/resnet18", "--data", str(image_folder), "--image-size", "16", "--batch-size", "8",
                "--batches", "1", "--layers", "layer1.0,bogus"])
    assert res.exit_code == 2 and "bogus" in res.stderr and res.stderr.count("\n") == 1
    res = _cli(["cka", "torchvision/resnet18", "--data", str(image_folder), "-o", str(tmp_path / "x.jpg")])
    assert res.exit_code == 2 and ".png" in res.stderr


def test_trainer_keeps_every_nth_epoch_and_cka_reads_the_run(image_folder, tmp_path):
    from morph.recipes.run import main as train

    run = tmp_path / "run"
    train("cifar10-smoke", out_dir=run, overrides=["growth.methods=[small]", "run.keep_every=2", "data.train_subset=64",
                                                   "data.test_subset=32"])
    kept = sorted(p.name for p in (run / "seed0" / "small" / "train" / "epochs").iterdir())
    assert kept == ["epoch-000.safetensors", "epoch-002.safetensors", "epoch-003.safetensors"]  # start, every 2nd, last
    info, meta = morph.read_info(run / "seed0" / "small" / "train" / "epochs" / "epoch-002.safetensors")
    assert meta["epoch"] == "2" and meta["stage"] == "seed0/small/train"
    res = _cli(["cka", "--run", str(run), "--method", "small", "--data", str(image_folder), "--batches", "1",
                "--batch-size", "16", "--layer", "group3.0.conv2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["layers_a"] == ["small 0", "small 2", "small 3"]
    assert [round(doc["matrix"][i][i], 9) for i in range(3)] == [1.0, 1.0, 1.0]


def test_help_documents_every_option():
    import typer
    from morph.cli.main import app

    res = _cli(["cka", "--help"])
    assert res.exit_code == 0 and "Usage: morph cka [OPTIONS] [A] [B]" in res.stdout
    for p in typer.main.get_command(app).commands["cka"].params:
        assert p.help, f"morph cka: {p.name} has no help"
        for name in p.opts if p.param_type_name == "option" else [p.metavar]:
            assert name in res.stdout, f"morph cka --help does not show {name}"
    assert "cka " in _cli(["--help"]).stdout
