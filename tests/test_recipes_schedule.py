"""Planning of every method: stage lengths, FLOPs budget, LR spans (with real morph surgery, no training)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from morph.recipes.config import Config, GrowthConfig, ModelConfig, OptimConfig
from morph.recipes.distributed import DistInfo
from morph.recipes.schedule import Planner, run_method, steps_for_budget
from morph.recipes.trainer import Stage, StageResult

SPE, BATCH, EPOCHS = 4, 16, 10


class RecordingTrainer:
    """Stands in for :class:`recipes.trainer.Trainer`: records each stage and counts its FLOPs the
    trainer's way (``3 x F x batch`` per counted step) without training."""

    def __init__(self) -> None:
        self.steps_per_epoch = SPE
        self.dist = DistInfo(0, 1, 0, torch.device("cpu"))
        self.stages: list[Stage] = []
        self.models: list[nn.Module] = []

    def fit(self, model: nn.Module, stage: Stage, optimizer_state=None) -> StageResult:
        self.stages.append(stage)
        self.models.append(model)
        spent = 3.0 * stage.flops_per_image * BATCH * stage.steps if stage.counted else 0.0
        return StageResult(model, 50.0, 1.0, stage.flops_offset + spent, math.ceil(stage.steps / SPE), stage.steps, 0.0)


def make_planner(**growth) -> tuple[Planner, RecordingTrainer]:
    cfg = Config(
        model=ModelConfig(depth=10, widen_factor=2),
        optim=OptimConfig(batch_size=BATCH),
        growth=GrowthConfig(epochs=EPOCHS, net1_epochs=EPOCHS, net2_epochs=5, **growth),
    ).validate()
    trainer = RecordingTrainer()
    return Planner(cfg, trainer, num_classes=10, input_size=(3, 16, 16)), trainer


def test_steps_for_budget():
    assert steps_for_budget(3 * 10 * 4 * 7.99, flops_per_image=10, batch_size=4) == 7
    assert steps_for_budget(3 * 10 * 4 * 8, flops_per_image=10, batch_size=4) == 8


def test_reference_rows(tmp_path):
    p, t = make_planner()
    results = {m: run_method(p, m, 0, tmp_path) for m in ("large", "large-match", "small", "small-match")}
    steps = [s.steps for s in t.stages]
    assert steps[0] == EPOCHS * SPE  # Large: the from-scratch schedule, 1X
    assert steps[1] == int(0.45 * EPOCHS * SPE)  # Large Match: the budget
    assert steps[2] == EPOCHS * SPE  # Small
    assert results["large"].flops_norm == pytest.approx(1.0)
    assert results["large-match"].flops_norm <= 0.45
    f_small, f_target = t.stages[2].flops_per_image, t.stages[0].flops_per_image
    assert 0.2 < f_small / f_target < 0.35  # about a quarter at half width
    assert results["small"].flops_norm == pytest.approx(f_small / f_target)
    assert 0.45 - results["small-match"].flops_norm < 3 * f_small * BATCH / p.unit  # spent to within one step
    assert results["small"].params < results["large"].params / 3
    assert all(s.lr.total_steps == s.steps and s.lr.offset == 0 for s in t.stages)
    for m in results:
        assert (tmp_path / "seed0" / m / "result.json").is_file()
        assert (tmp_path / "seed0" / m / "model.safetensors").is_file()


def test_mixturegrowth_stages_and_budget(tmp_path):
    p, t = make_planner()
    res = run_method(p, "mixturegrowth", 0, tmp_path)
    net1, net2, grown = t.stages
    assert [s.key for s in t.stages] == ["seed0/net1", "seed0/mixturegrowth/net2", "seed0/mixturegrowth/grown"]
    assert not net1.counted and net1.steps == EPOCHS * SPE  # net 1 is free, as in the paper
    assert net2.counted and net2.steps == 5 * SPE and net2.flops_offset == 0
    spent2 = 3 * net2.flops_per_image * BATCH * net2.steps
    assert grown.flops_offset == pytest.approx(spent2)
    assert grown.steps == steps_for_budget(p.budget - spent2, grown.flops_per_image, BATCH) > 0
    assert res.flops_norm <= 0.45 and 0.45 - res.flops_norm < 3 * grown.flops_per_image * BATCH / p.unit
    target = p.flops("target", lambda: None)
    assert grown.flops_per_image == pytest.approx(target, rel=0.05)  # fused = full width + generation
    assert net2.flops_per_image == pytest.approx(net1.flops_per_image)
    # the fused model is full width and continues both halves' templates
    fused = t.models[2]
    assert fused(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert [s["stage"] for s in res.stages] == ["net1", "net2", "grown"]
    # restart at growth (default): each stage has its own schedule
    assert grown.lr.total_steps == grown.steps and grown.lr.offset == 0 and grown.lr(0) == pytest.approx(0.1)


def test_schedule_continues_across_growth_without_restart(tmp_path):
    p, t = make_planner()
    p.cfg.optim.restart_at_growth = False
    run_method(p, "mixturegrowth", 0, tmp_path)
    _, net2, grown = t.stages
    assert net2.lr.total_steps == grown.lr.total_steps == net2.steps + grown.steps
    assert grown.lr.offset == net2.steps
    assert grown.lr(0) == pytest.approx(net2.lr(net2.steps))  # no jump at growth
    assert net2.lr(net2.steps - 1) > grown.lr(0) > grown.lr(grown.steps - 1) > 0


def test_nofusion_spends_the_whole_budget_on_the_grown_model(tmp_path):
    p, t = make_planner()
    res = run_method(p, "mixturegrowth-nofusion", 0, tmp_path)
    net1, grown = t.stages
    assert not net1.counted and grown.flops_offset == 0
    assert grown.steps == steps_for_budget(p.budget, grown.flops_per_image, BATCH)
    assert res.flops_norm <= 0.45
    import morph

    assert morph.get_info(t.models[1]).kind == "grown"


def test_budget_spent_before_growth_is_a_clear_error(tmp_path):
    p, _ = make_planner(budget=0.1)
    with pytest.raises(
        ValueError, match=r"growth.budget=0.1 leaves no step for the grown model .*lower growth.net2_epochs"
    ):
        run_method(p, "mixturegrowth", 0, tmp_path)
