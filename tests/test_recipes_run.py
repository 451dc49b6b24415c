"""``morph train`` end to end: the cifar10-smoke schedule with real training, rerun, report, errors."""

from __future__ import annotations

import json

import pytest
import torch
from morph.recipes import report, run
from morph.recipes.config import METHODS
from morph.recipes.metrics import read_metrics
from morph.recipes.trainer import Trainer

# cifar10-smoke at 16x16 and 128 images (4 steps per epoch) to keep the test short
SMALL = ["data.image_size=16", "data.train_subset=128", "data.test_subset=64", "growth.firefly_steps=1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert run.main("cifar10-smoke", out_dir=out, overrides=SMALL) == out
    return out


def _results(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("seed0/*/result.json")}


def test_smoke_schedule_runs_every_method(smoke_run):
    results = _results(smoke_run)
    assert set(results) == set(METHODS)
    assert results["large"]["flops_norm"] == pytest.approx(1.0)
    for m in ("large-match", "small-match", "mixturegrowth", "mixturegrowth-nofusion"):
        assert 0.3 < results[m]["flops_norm"] <= 0.45, m
    assert 0.2 < results["small"]["flops_norm"] < 0.35
    mg = results["mixturegrowth"]
    assert [s["stage"] for s in mg["stages"]] == ["net1", "net2", "grown"]
    assert mg["stages"][0]["flops"] == 0.0  # net 1 is not counted
    assert all(0.0 <= r["top1"] <= 100.0 for r in results.values())
    assert (smoke_run / "config.yaml").is_file() and (smoke_run / "provenance.yaml").is_file()


def test_smoke_metrics_and_exported_models(smoke_run):
    import morph

    records = read_metrics(smoke_run / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    stages = {r["stage_key"] for r in epochs}
    assert "seed0/net1" in stages and "seed0/mixturegrowth/grown" in stages
    for r in epochs:
        for key in (
            "stage",
            "epoch",
            "step",
            "loss",
            "top1",
            "lr",
            "flops",
            "flops_norm",
            "images_per_s",
            "wall_time",
            "test_top1",
        ):
            assert key in r, key
    keys = [(r["stage_key"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys))
    grown = morph.load(smoke_run / "seed0" / "mixturegrowth" / "model.safetensors")
    assert morph.get_info(grown).kind == "fused"
    assert grown(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_rerun_resumes_finished_run_without_training(smoke_run, monkeypatch):
    before = _results(smoke_run)
    lines = len(read_metrics(smoke_run / "metrics.jsonl"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(Trainer, "_step", no_training)
    run.main("cifar10-smoke", out_dir=smoke_run, overrides=SMALL)
    assert _results(smoke_run) == before
    assert len(read_metrics(smoke_run / "metrics.jsonl")) == lines


def test_report_table_and_plot(smoke_run, tmp_path):
    files = report.main([smoke_run], tmp_path / "report")
    text = files.markdown.read_text()
    assert text == files.text
    for label in METHODS.values():
        assert f"| {label} |" in text
    assert "| cifar10-smoke top-1 (%) | cifar10-smoke FLOPs |" in text
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        run.main("nope", out_dir=out)
    with pytest.raises(ValueError, match="bad override 'optim.lr'"):
        run.main("cifar10-smoke", out_dir=out, overrides=["optim.lr"])
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'missing'} does not exist"):
        run.main("cifar10-smoke", data_dir=tmp_path / "missing", out_dir=out, overrides=["data.synthetic=false"])
    import morph

    with pytest.raises(morph.MorphError, match="timm has no model 'nope'"):
        run.main("cifar10-smoke", out_dir=out, overrides=["model.arch=timm/nope"])
    assert not out.exists()


def test_run_dir_of_another_config_is_refused(smoke_run):
    with pytest.raises(ValueError, match="holds a run with optim.lr=0.05, not 0.2"):
        run.main("cifar10-smoke", out_dir=smoke_run, overrides=[*SMALL, "optim.lr=0.2"])


def test_train_cli_user_errors_one_line_bugs_traceback(monkeypatch, tmp_path):
    """``morph train``: a user error of a recipe (a MorphError subclass) is one ``error:`` line and exit
    code 2; any other exception, even a ValueError, is a bug and comes out with its traceback."""
    from morph.cli.main import app
    from morph.recipes.errors import RecipeError, RecipePathError
    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(app, ["train", "cifar10-smoke", "no.such_key=1", "--out-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "error: unknown config key 'no.such_key'" in res.output
    res = runner.invoke(app, ["train", "cifar10-smoke", "growth.width=2", "--out-dir", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "error:" in res.output and "growth.width must be in (0, 1)" in res.output
    assert issubclass(RecipeError, ValueError) and issubclass(RecipePathError, FileNotFoundError)

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(run, "main", bug)
    res = runner.invoke(app, ["train", "cifar10-smoke", "--out-dir", str(tmp_path / "r3")])
    assert isinstance(res.exception, ValueError) and str(res.exception) == "an internal bug"
    assert res.exit_code == 1


def test_option_added_after_the_run_started_is_accepted_at_its_default(tmp_path):
    """A run directory whose config.yaml predates an option resumes when the option is at its default, and
    is refused when it is not."""
    import yaml
    from morph.recipes.config import load_config

    cfg = load_config("cifar10-smoke")
    old = cfg.to_dict()
    del old["growth"]["device"]  # a run made before growth.device existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    run.check_run_dir(tmp_path, cfg)
    with pytest.raises(ValueError, match="holds a run with growth.device=None, not 'cpu'"):
        run.check_run_dir(tmp_path, load_config("cifar10-smoke", ["growth.device=cpu"]))


def test_a_diverged_run_checkpoints_and_resumes(tmp_path, monkeypatch):
    """A NaN test loss (a diverged run) is written as null in the strict-JSON checkpoint metadata and read back as
    NaN: the finished stage resumes without training; a NaN literal written into the file is still refused."""
    import math

    from morph.recipes.checkpoint import load_checkpoint, save_checkpoint

    from morph.errors import CheckpointError

    real = Trainer.evaluate

    def diverged(self, *args, **kwargs):
        ev = real(self, *args, **kwargs)
        return {**ev, "loss": float("nan")}

    monkeypatch.setattr(Trainer, "evaluate", diverged)
    out = tmp_path / "diverged"
    args = [*SMALL, "growth.methods=[large]"]
    run.main("cifar10-smoke", out_dir=out, overrides=args)
    (ckpt,) = out.rglob("checkpoint.safetensors")
    groups, meta = load_checkpoint(ckpt)
    assert meta["done"] and math.isnan(meta["result"]["test_loss"])
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        raw = f.metadata()["meta"]
    assert '"test_loss": null' in raw and "NaN" not in raw

    def no_training(*a, **k):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(Trainer, "_step", no_training)
    run.main("cifar10-smoke", out_dir=out, overrides=args)  # resumes: the finished stage is loaded, not trained
    # a NaN literal (what json.dumps writes by default) is refused, as before
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, groups, meta)
    with safe_open(str(bad), framework="pt") as f:
        header = f.metadata()
    from safetensors.torch import save_file

    flat = {f"{g}.{k}": v for g, t in groups.items() for k, v in t.items()}
    save_file(flat, str(bad), metadata={**header, "meta": header["meta"].replace('"test_loss": null', '"test_loss": NaN')})
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(bad)
    # null is accepted only where a diverged run can put it
    import re

    top1_null = re.sub(r'"top1": [-0-9.e+]+', '"top1": null', header["meta"])
    assert top1_null != header["meta"]
    save_file(flat, str(bad), metadata={**header, "meta": top1_null})
    with pytest.raises(CheckpointError, match="result"):
        load_checkpoint(bad)
