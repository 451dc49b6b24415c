"""The shared trainer: LR schedules, optimizer groups, FLOPs budget, metrics, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from morph.recipes.checkpoint import load_checkpoint, model_tensors
from morph.recipes.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from morph.recipes.data import build_data, derive_seed
from morph.recipes.distributed import setup
from morph.recipes.metrics import read_metrics
from morph.recipes.models import wrn
from morph.recipes.schedule import steps_for_budget
from morph.recipes.trainer import LRSchedule, Stage, Trainer, build_optimizer, make_schedule, to_channels_last

from morph.errors import CheckpointError


def tiny_config(**optim) -> Config:
    """64 synthetic 16x16 images, batch 16: 4 steps per epoch."""
    return Config(
        name="tiny",
        data=DataConfig(synthetic=True, train_subset=64, test_subset=32, image_size=16, num_workers=0),
        model=ModelConfig(depth=10, widen_factor=1),
        optim=OptimConfig(batch_size=16, lr=0.05, **optim),
        run=RunConfig(device="cpu", progress=False, log_every=2),
    ).validate()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return wrn(10, 1, num_classes=10)


def make_stage(trainer: Trainer, steps: int, key: str = "s/train", fpi: float = 1e6) -> Stage:
    lr = make_schedule(trainer.cfg.optim, steps, trainer.steps_per_epoch, ref_epochs=10)
    return Stage(
        key=key,
        seed=7,
        steps=steps,
        lr=lr,
        flops_per_image=fpi,
        labels={"seed": 0, "method": "large", "stage": "train"},
    )


def make_trainer(tmp: Path, cfg: Config | None = None) -> Trainer:
    cfg = cfg or tiny_config()
    return Trainer(cfg, build_data(cfg.data), setup("cpu"), tmp, flops_unit=1e9)


# --- LR schedules and the optimizer ----------------------------------------------------------


def test_cosine_schedule_goes_to_zero_and_continues_across_stages():
    full = LRSchedule(base_lr=0.1, total_steps=100)
    assert full(0) == pytest.approx(0.1)
    assert full(50) == pytest.approx(0.05)
    assert full(100) == pytest.approx(0.0, abs=1e-12)
    # a stage that continues the schedule (restart_at_growth=false) sees the same LR at the same global step
    second = LRSchedule(base_lr=0.1, total_steps=100, offset=60)
    assert [second(i) for i in range(40)] == [full(60 + i) for i in range(40)]


def test_step_schedule_scales_milestones_and_warmup():
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=[30, 60, 80], gamma=0.1, warmup_epochs=1)
    s = make_schedule(cfg, total_steps=900, steps_per_epoch=10, ref_epochs=90)  # 90 epochs of 10 steps
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)  # linear warmup over one epoch
    assert s(299) == pytest.approx(0.1) and s(300) == pytest.approx(0.01)
    assert s(600) == pytest.approx(0.001) and s(800) == pytest.approx(1e-4)
    short = make_schedule(cfg, total_steps=90, steps_per_epoch=10, ref_epochs=90)  # a 9-epoch stage
    assert short(29) == pytest.approx(0.1) and short(30) == pytest.approx(0.01)


def test_no_weight_decay_on_coefficients():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.coefficients = nn.Parameter(torch.ones(2, 2))
            self.templates = nn.Parameter(torch.ones(2, 3))
            self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    opt = build_optimizer(Mixed(), OptimConfig(weight_decay=5e-4, nesterov=True))
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert [p.shape for p in by_wd[5e-4]] == [(2, 3)]
    assert [p.shape for p in by_wd[0.0]] == [(2, 2)]
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


# --- training, FLOPs, metrics ------------------------------------------------------------------


def test_fit_stops_when_flops_budget_is_spent(tmp_path):
    trainer = make_trainer(tmp_path)
    fpi, batch = 2.5e6, 16
    budget = 3 * fpi * batch * 9.5  # the budget runs out half way through step 10 (epoch 3 of 4 steps)
    steps = steps_for_budget(budget, fpi, batch)
    assert steps == 9
    res = trainer.fit(make_model(), make_stage(trainer, steps, fpi=fpi))
    assert res.steps == 9 and res.epochs == 3  # the last epoch is partial
    assert res.flops <= budget < res.flops + 3 * fpi * batch
    epochs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [4, 8, 9]
    assert epochs[-1]["flops"] == pytest.approx(3 * fpi * batch * 9)
    assert epochs[-1]["flops_norm"] == pytest.approx(epochs[-1]["flops"] / 1e9)


def test_metrics_records_and_uncounted_stage(tmp_path):
    trainer = make_trainer(tmp_path)
    stage = make_stage(trainer, 8)
    stage = Stage(**{**stage.__dict__, "counted": False, "flops_offset": 0.0})
    res = trainer.fit(make_model(), stage)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {r["kind"] for r in records} == {"step", "epoch"}
    for key in ("stage", "epoch", "step", "loss", "top1", "lr", "flops", "images_per_s", "wall_time"):
        assert all(key in r for r in records), key
    assert all("test_top1" in r for r in records if r["kind"] == "epoch")
    assert res.flops == 0.0 and all(r["flops"] == 0.0 for r in records)  # net 1 is not counted
    assert all(math.isfinite(r["loss"]) for r in records)


def test_training_learns_synthetic_data(tmp_path):
    cfg = tiny_config()
    cfg.data.train_subset, cfg.data.cutout = 128, 0
    trainer = make_trainer(tmp_path, cfg)
    trainer.fit(make_model(), make_stage(trainer, 64))
    epochs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[-1]["loss"] < 0.7 * epochs[0]["loss"]
    assert epochs[-1]["top1"] > 50.0


# --- checkpoints and resume --------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [3, 7], ids=["before-first-checkpoint", "mid-epoch-2"])
def test_resume_after_crash_is_bit_exact(tmp_path, monkeypatch, crash_at):
    steps = 10  # 2.5 epochs
    ref = make_trainer(tmp_path / "ref").fit(make_model(), make_stage(make_trainer(tmp_path / "ref"), steps))

    trainer = make_trainer(tmp_path / "run")
    real_step = Trainer._step
    calls = {"n": 0}

    def crashing_step(self, *args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "_step", crashing_step)
    with pytest.raises(Crash):
        trainer.fit(make_model(), make_stage(trainer, steps))
    monkeypatch.setattr(Trainer, "_step", real_step)
    ckpt = tmp_path / "run" / "s/train" / "checkpoint.safetensors"
    if crash_at > 4:
        _, meta = load_checkpoint(ckpt)
        assert meta["progress"]["epoch"] == 1 and not meta["done"]
    else:
        assert not ckpt.exists()
    assert any(r["kind"] == "step" for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))  # lost work was logged

    torch.manual_seed(12345)  # the global RNG state of the crashed process must not matter
    trainer = make_trainer(tmp_path / "run")
    # a rerun rebuilds the same model; with a checkpoint its weights are replaced anyway
    res = trainer.fit(make_model(seed=99 if crash_at > 4 else 0), make_stage(trainer, steps))
    ref_t, res_t = model_tensors(ref.model), model_tensors(res.model)
    assert ref_t.keys() == res_t.keys()
    assert all(torch.equal(ref_t[k], res_t[k]) for k in ref_t)
    assert res.top1 == ref.top1 and res.test_loss == ref.test_loss

    def epochs(run):
        return [
            (r["epoch"], r["step"], r["loss"])
            for r in read_metrics(tmp_path / run / "metrics.jsonl")
            if r["kind"] == "epoch"
        ]

    assert epochs("run") == epochs("ref")  # every epoch logged exactly once, with identical values
    steps_logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps_logged == sorted(set(steps_logged))  # records of the lost work were dropped


def test_finished_stage_is_loaded_not_retrained(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    first = trainer.fit(make_model(), make_stage(trainer, 4))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(Trainer, "_step", no_training)
    again = make_trainer(tmp_path).fit(make_model(seed=3), make_stage(trainer, 4))
    assert again.top1 == first.top1 and again.steps == 4
    a, b = model_tensors(first.model), model_tensors(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_optimizer_and_rng_without_pickle(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(make_model(), make_stage(trainer, 6))
    path = tmp_path / "s/train" / "checkpoint.safetensors"
    groups, meta = load_checkpoint(path)
    assert set(groups) == {"model", "optim", "rng"}
    assert any(k.endswith("momentum_buffer") for k in groups["optim"])
    assert {"0.torch", "0.numpy"} <= set(groups["rng"])
    assert meta["done"] and meta["result"]["steps"] == 6
    json.dumps(meta)  # plain JSON metadata
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_changed_plan_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(make_model(), make_stage(trainer, 4))
    with pytest.raises(ValueError, match="plans 4 steps but this run plans 8"):
        trainer.fit(make_model(), make_stage(trainer, 8))
    path = tmp_path / "s/train" / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        trainer.fit(make_model(), make_stage(trainer, 4))


def test_batch_size_must_split_over_ranks_and_fit_the_data(tmp_path):
    cfg = tiny_config()
    cfg.optim.batch_size = 128
    with pytest.raises(ValueError, match="exceeds the 64 training images"):
        make_trainer(tmp_path, cfg)


def test_channels_last_handles_template_models():
    import morph

    half = morph.convert(wrn(10, 1, num_classes=10), seed=1, input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    ref = half(x)
    to_channels_last(half)
    convs = [p for p in half.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    out = half(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-5)
    half.to(memory_format=torch.contiguous_format)  # what the export does
    assert all(p.is_contiguous() for p in half.parameters())


def test_cpu_process_settings_only_when_asked(tmp_path, monkeypatch):
    """A CPU run changes no process-wide setting by default: the allocator setting and the native kernels'
    build happen only with ``run.keep_freed_memory`` / ``run.native_kernels`` in the config."""
    import morph.recipes.trainer as trainer_mod

    from morph import native

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append("mallopt"))
    monkeypatch.setattr(native, "build", lambda **kw: calls.append("build"))
    make_trainer(tmp_path / "default")
    assert calls == []
    cfg = tiny_config()
    cfg.run.keep_freed_memory = cfg.run.native_kernels = True
    make_trainer(tmp_path / "asked", cfg)
    assert calls == ["build", "mallopt"]


def test_batchnorm_reestimated_on_training_batches(tmp_path):
    """reestimate_bn: a copy whose BatchNorm statistics are the average over the batches of each batch's
    statistics (checked against a float64 computation from the layers' inputs); the model is untouched."""
    trainer = make_trainer(tmp_path)
    model = make_model().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(5, 9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = trainer.reestimate_bn(model, seed=3, n=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    ref = make_model().double().train()
    ref.load_state_dict(model.state_dict())
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x, _ in trainer.growth_batches(3, 2):
            ref(x.double())
    norms = dict(fresh.named_modules())
    assert inputs and not fresh.training
    for name, xs in inputs.items():
        assert len(xs) == 2
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        bn = norms[name]
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5), name
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-4, atol=1e-5), name
        assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1


def test_start_record_has_stale_and_reestimated_batchnorm(tmp_path):
    """A grown stage's start record holds both at-growth figures; measuring them changes no training."""
    def run(tmp, bn_batches):
        cfg = tiny_config()
        cfg.run.bn_batches = bn_batches
        trainer = make_trainer(tmp, cfg)
        stage = Stage(**{**make_stage(trainer, 4).__dict__, "evaluate_start": True})
        model = make_model()
        expect = trainer.evaluate(trainer.reestimate_bn(model, derive_seed(stage.seed, "bn-batches"), 3))
        res = trainer.fit(model, stage)
        start = [r for r in read_metrics(tmp / "metrics.jsonl") if r["kind"] == "start"]
        return res, start, expect

    res, start, expect = run(tmp_path / "a", 3)
    assert len(start) == 1 and start[0]["bn_batches"] == 3
    assert start[0]["test_top1_bn"] == expect["top1"] and start[0]["test_loss_bn"] == expect["loss"]
    res0, start0, _ = run(tmp_path / "b", 0)
    assert "test_top1_bn" not in start0[0] and start0[0]["test_top1"] == start[0]["test_top1"]
    assert all(torch.equal(a, b) for a, b in zip(model_tensors(res.model).values(), model_tensors(res0.model).values(),
                                                   strict=True))
