"""The stages of every method: MixtureGrowth and the paper's reference rows (MG Table 1).

Budget accounting (MixtureGrowth §4, official ``compute_flops.py``), with ``F`` the forward FLOPs
per image from ``morph.flops`` (fvcore convention, template generation amortized over the global
batch) and ``N`` the images of one epoch (``steps_per_epoch x batch_size``):

- training FLOPs of a stage = ``3 x F x images seen``;
- 1X = the target trained from scratch for ``growth.epochs`` epochs = ``3 x F_target x N x epochs``;
- a method may spend ``growth.budget`` X; small network 1 is not counted, as in the paper.

Methods (``growth.methods``):

- ``large``: the target, full width and plain, for ``epochs`` (1X).
- ``large-match``: the target for as many steps as the budget buys.
- ``small``: the plain half-width model (``morph.scale_width``) for ``epochs``.
- ``small-match``: the plain half-width model for the budget.
- ``mixturegrowth``: net 1 (``morph.convert``, half width, template mixing) for ``net1_epochs``; net 2
  (another ``morph.convert``) for ``net2_epochs`` (the growth point ``e``); ``morph.fuse`` of the two;
  the fused full-width model until the budget is spent.
- ``mixturegrowth-nofusion``: net 1, then ``morph.grow`` of net 1 alone, trained for the budget.
- ``random``, ``net2net``, ``firefly``, ``gradmax`` (MG Table 1's growth baselines): the plain small
  model trained to the growth point (``net2_epochs``, the same as MixtureGrowth's net 2, counted),
  grown to the target with ``morph.grow(method=...)``, then trained until the budget is spent. The
  growth step's own cost counts in the budget and is reported on its own (``growth`` stage):
  what the method's class says (``GrowthMethod.step_flops``): GradMax's gradient batches
  (``3 x F_small x images``), Firefly-Opt's Adam steps on its batch and the re-estimation of the norm
  statistics (``(3 x steps + 2) x F_target x images``); Random and Net2Net cost nothing. The growth
  step runs where ``growth.device`` says (``train``: the training device; ``cpu``), the grown model
  trains on the training device.

After growth (every growing method) the training follows ``growth.after``: ``paper`` (a fresh
cosine from ``optim.lr``) or ``official`` (the official code's cycles from ``growth.lr_growing``),
with the optimizer state carried across growth when ``growth.carries_optimizer``
(``morph.growth.carry_optimizer_state``: old momentum kept, zero for new weights).

Net 1 is shared by both MixtureGrowth methods of a seed, and the small model trained to the growth
point by the four growth baselines. Every model is built under a seed derived
from ``(run seed, role)``, so a rerun rebuilds the same models and resumes each stage's checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from morph.paths import check_output

from .checkpoint import atomic_write_text
from .config import GROWTH_BASELINES, METHODS, Config
from .data import derive_seed
from .errors import RecipeError
from .models import build_model
from .trainer import LRSchedule, Stage, StageResult, Trainer, make_schedule, optimizer_state_by_name

__all__ = ["MethodResult", "Planner", "count_params", "growth_cost", "run_method", "steps_for_budget"]


def steps_for_budget(flops: float, flops_per_image: float, batch_size: int) -> int:
    """Whole optimizer steps that fit in ``flops`` training FLOPs (``3 x F x batch`` per step)."""
    return int(flops // (3.0 * flops_per_image * batch_size))


def count_params(model: nn.Module) -> int:
    """Number of parameters, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class MethodResult:
    """One method trained with one seed: a row of the results table.

    Attributes:
        method: key in :data:`morph.recipes.config.METHODS`.
        label: its name in the paper's Table 1.
        seed: the run seed.
        top1: final test top-1 (%).
        test_loss: final test loss.
        flops: training FLOPs spent (net 1 excluded).
        flops_norm: ``flops`` over the target trained from scratch (1X).
        params: parameters of the final model.
        stages: per-stage steps, epochs, FLOPs per image and wall time.
    """

    method: str
    label: str
    seed: int
    top1: float
    test_loss: float
    flops: float
    flops_norm: float
    params: int
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


class Planner:
    """Builds the models of a run and turns epochs and budgets into stages.

    Args:
        cfg: the recipe config.
        trainer: the shared trainer (gives steps per epoch and the device).
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` for FLOPs counting.
    """

    def __init__(self, cfg: Config, trainer: Trainer, num_classes: int, input_size: tuple[int, int, int]) -> None:
        self.cfg, self.trainer = cfg, trainer
        self.num_classes, self.input_size = num_classes, input_size
        self.batch = cfg.optim.batch_size
        self.spe = trainer.steps_per_epoch
        self._flops: dict[str, float] = {}

    # --- models -------------------------------------------------------------------------------

    def target(self, seed: int, role: str) -> nn.Module:
        """A freshly initialized target model, the same for the same ``(seed, role)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, role, "init"))
            return build_model(self.cfg.model, self.num_classes, self.input_size)

    def small(self, seed: int) -> nn.Module:
        """The plain small model (``morph.scale_width`` of the target), freshly initialized."""
        import morph

        return morph.scale_width(self.target(seed, "small"), self.cfg.growth.width, input_size=self.input_size)

    def half(self, seed: int, role: str) -> nn.Module:
        """A half-width template-mixing network (``morph.convert``)."""
        import morph

        g = self.cfg.growth
        return morph.convert(
            self.target(seed, role),
            width=g.width,
            templates=g.templates,
            share=g.share,
            seed=derive_seed(seed, role),
            train_edge_coefficients=g.train_edge_coefficients,
            input_size=self.input_size,
        )

    def flops(self, kind: str, build: Callable[[], nn.Module]) -> float:
        """Forward FLOPs per image of the model ``build()`` returns, memoized by ``kind`` (an
        architecture's FLOPs do not depend on the seed, so each kind is built and counted once)."""
        if kind not in self._flops:
            import morph

            self._flops[kind] = float(morph.flops(build(), input_size=self.input_size, batch_size=self.batch).total)
        return self._flops[kind]

    # --- budgets ------------------------------------------------------------------------------

    @property
    def unit(self) -> float:
        """Training FLOPs of the target trained from scratch (1X)."""
        f = self.flops("target", lambda: self.target(0, "flops"))
        return 3.0 * f * self.batch * self.spe * self.cfg.growth.epochs

    @property
    def budget(self) -> float:
        """Training FLOPs a budgeted method may spend."""
        return self.cfg.growth.budget * self.unit

    def stage(
        self,
        key: str,
        seed: int,
        labels: dict[str, Any],
        steps: int,
        fpi: float,
        *,
        offset_flops: float = 0.0,
        counted: bool = True,
        schedule_steps: int | None = None,
        schedule_offset: int = 0,
        grown: bool = False,
    ) -> Stage:
        """A :class:`Stage` whose LR schedule spans ``schedule_steps`` (default: the stage itself);
        ``grown``: a stage after growth, whose schedule ``growth.after=official`` replaces."""
        g = self.cfg.growth
        if grown and g.after == "official":
            lr = LRSchedule(base_lr=g.lr_growing, total_steps=steps, kind="cycles", cycles=g.cycles,
                            cycle_decay=0.5, min_lr=g.lr_min)
        else:
            lr = make_schedule(self.cfg.optim, schedule_steps or steps, self.spe, g.epochs, schedule_offset)
        return Stage(
            key=key,
            seed=derive_seed(seed, key),
            steps=steps,
            lr=lr,
            flops_per_image=fpi,
            flops_offset=offset_flops,
            counted=counted,
            labels=labels,
            evaluate_start=grown,
        )


def _cpu(model: nn.Module) -> nn.Module:
    """Surgery runs on the CPU, where its seeded generators live."""
    return model.to("cpu")


Stages = list[tuple[str, StageResult | dict[str, Any]]]


def _train_net1(p: Planner, seed: int) -> StageResult:
    """Small network 1, shared by both MixtureGrowth methods; its FLOPs are not counted."""
    net1 = p.half(seed, "net1")
    steps = p.cfg.growth.net1_epochs * p.spe
    labels = {"seed": seed, "method": None, "stage": "net1"}
    fpi = p.flops("half", lambda: net1)
    return p.trainer.fit(net1, p.stage(f"seed{seed}/net1", seed, labels, steps, fpi, counted=False))


def _plain(p: Planner, method: str, seed: int) -> Stages:
    small = method.startswith("small")
    model = p.small(seed) if small else p.target(seed, "large")
    fpi = p.flops("small" if small else "target", lambda: model)
    if method.endswith("-match"):
        steps = steps_for_budget(p.budget, fpi, p.batch)
    else:
        steps = p.cfg.growth.epochs * p.spe
    labels = {"seed": seed, "method": method, "stage": "train"}
    return [("train", p.trainer.fit(model, p.stage(f"seed{seed}/{method}/train", seed, labels, steps, fpi)))]


def _grown_steps(p: Planner, method: str, spent: float, fpi: float) -> int:
    left = p.budget - spent
    steps = steps_for_budget(left, fpi, p.batch)
    if steps < 1:
        raise RecipeError(
            f"{method}: growth.budget={p.cfg.growth.budget} leaves no step for the grown model "
            f"(the stages before it and the growth step spend {spent / p.unit:.3f}X); lower growth.net2_epochs, "
            "growth.firefly_steps or growth.growth_batches, or raise growth.budget"
        )
    return steps


def _mixturegrowth(p: Planner, seed: int) -> Stages:
    import morph

    g = p.cfg.growth
    method = "mixturegrowth"
    net1 = _train_net1(p, seed)
    net2 = p.half(seed, "net2")
    f_half = p.flops("half", lambda: net2)
    fuse = lambda a, b: morph.fuse(_cpu(a), _cpu(b), growth=g.growth, init=g.init, seed=derive_seed(seed, "fuse"))  # noqa: E731
    f_full = p.flops("fused", lambda: fuse(p.half(seed, "net1"), p.half(seed, "net2")))
    steps2 = g.net2_epochs * p.spe
    spent2 = 3.0 * f_half * p.batch * steps2
    steps3 = _grown_steps(p, method, spent2, f_full)
    restart = p.cfg.optim.restart_at_growth
    span = None if restart else steps2 + steps3
    labels = {"seed": seed, "method": method}
    r2 = p.trainer.fit(
        net2,
        p.stage(f"seed{seed}/{method}/net2", seed, {**labels, "stage": "net2"}, steps2, f_half, schedule_steps=span),
    )
    grown = fuse(net1.model, r2.model)
    carried = _carry(p, [net1, r2], grown)
    r3 = p.trainer.fit(
        grown,
        p.stage(
            f"seed{seed}/{method}/grown",
            seed,
            {**labels, "stage": "grown"},
            steps3,
            f_full,
            offset_flops=r2.flops,
            schedule_steps=span,
            schedule_offset=0 if restart else steps2,
            grown=True,
        ),
        carried,
    )
    return [("net1", net1), ("net2", r2), ("grown", r3)]


def _carry(p: Planner, sources: list[StageResult], grown: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The optimizer state of the grown model, carried from its sources' (``growth.carries_optimizer``)."""
    if not p.cfg.growth.carries_optimizer:
        return None
    from morph.growth import carry_optimizer_state

    opts = [r.optimizer for r in sources]
    if any(o is None for o in opts):
        raise RecipeError("a stage returned no optimizer to carry across growth")
    new = carry_optimizer_state(opts if len(opts) > 1 else opts[0], [r.model for r in sources], grown)
    return optimizer_state_by_name(new, grown)


def _mixturegrowth_nofusion(p: Planner, seed: int) -> Stages:
    import morph

    g = p.cfg.growth
    method = "mixturegrowth-nofusion"
    net1 = _train_net1(p, seed)
    grow = lambda a: morph.grow(_cpu(a), init=g.init, seed=derive_seed(seed, "grow"))  # noqa: E731
    f_full = p.flops("grown", lambda: grow(p.half(seed, "net1")))
    steps = _grown_steps(p, method, 0.0, f_full)
    labels = {"seed": seed, "method": method, "stage": "grown"}
    grown = grow(net1.model)
    stage = p.stage(f"seed{seed}/{method}/grown", seed, labels, steps, f_full, grown=True)
    r = p.trainer.fit(grown, stage, _carry(p, [net1], grown))
    return [("net1", net1), ("grown", r)]


def _train_small_to_growth(p: Planner, seed: int, span: int | None) -> StageResult:
    """The plain small model trained to the growth point (``net2_epochs``, counted), shared by the
    growth baselines of a seed."""
    model = p.small(seed)
    fpi = p.flops("small", lambda: model)
    steps = p.cfg.growth.net2_epochs * p.spe
    labels = {"seed": seed, "method": None, "stage": "small"}
    return p.trainer.fit(model, p.stage(f"seed{seed}/grow-from-small/train", seed, labels, steps, fpi,
                                        schedule_steps=span))


def growth_cost(p: Planner, method: str) -> float:
    """Training FLOPs of the growth step itself: what the method says it costs
    (:meth:`morph.growth.GrowthMethod.step_flops`) on ``growth_batches`` batches."""
    import morph.growth

    impl = morph.growth.get_growth_method(method)(**_growth_options(p, method))
    if not impl.needs_data:
        return impl.step_flops(0.0, 0.0, 0)
    images = p.cfg.growth.growth_batches * p.batch
    return impl.step_flops(p.flops("small", lambda: p.small(0)), p.flops("target", lambda: p.target(0, "flops")), images)


def _growth_options(p: Planner, method: str) -> dict[str, Any]:
    import morph.growth

    return morph.growth.get_growth_method(method).recipe_options(p.cfg.growth)


def _grow_baseline(p: Planner, method: str, seed: int) -> Stages:
    """A growth-baseline row: small model to the growth point, ``morph.grow(method)``, train to the budget."""
    import time

    import morph

    g = p.cfg.growth
    f_small = p.flops("small", lambda: p.small(seed))
    f_full = p.flops("target", lambda: p.target(seed, "flops"))
    steps1 = g.net2_epochs * p.spe
    spent1 = 3.0 * f_small * p.batch * steps1
    cost = growth_cost(p, method)
    steps2 = _grown_steps(p, method, spent1 + cost, f_full)
    restart = p.cfg.optim.restart_at_growth
    # one schedule over both stages (restart_at_growth=false): its length is that of the rows whose
    # growth costs nothing, so the shared first stage is the same for every method
    span = None if restart else steps1 + _grown_steps(p, method, spent1, f_full)
    r1 = _train_small_to_growth(p, seed, span)
    key = f"seed{seed}/{method}/grown"
    record_path = p.trainer.run_dir / f"seed{seed}" / method / "growth.json"
    if p.trainer.checkpoint_path(key).exists() and record_path.exists():
        # resumed: the grown stage's checkpoint holds the weights and the optimizer; a target-shaped
        # model receives them, and the growth step (deterministic) is not redone
        grown = morph.growth.restore(p.target(seed, "large"), method, **_growth_options(p, method))
        carried = None
        wall = _recorded_wall_time(record_path)
    else:
        t0 = time.perf_counter()
        data = p.trainer.growth_batches(derive_seed(seed, "growth-data"), g.growth_batches)
        small = _cpu(r1.model) if g.device == "cpu" else r1.model  # morph.grow grows on the model's device
        reads = morph.growth.get_growth_method(method).needs_data
        grown = morph.grow(small, method=method, width=1.0 / g.width, data=data if reads else None,
                           seed=derive_seed(seed, method, "grow"), **_growth_options(p, method))
        carried = _carry(p, [r1], grown)
        if p.trainer.device.type == "cuda":
            torch.cuda.synchronize(p.trainer.device)
        wall = time.perf_counter() - t0
        if p.trainer.dist.is_main:
            atomic_write_text(record_path, json.dumps({"flops": cost, "wall_time": wall,
                                                       "device": str(next(grown.parameters()).device)}))
    labels = {"seed": seed, "method": method}
    growth = _growth_record(p, method, seed, r1.flops, cost, wall)
    gkey = f"seed{seed}/{method}/growth"
    p.trainer.metrics.truncate(gkey, -1)  # one record per growth step, also after a rerun
    p.trainer.metrics.write({"kind": "growth", **labels, "stage": "growth", "stage_key": gkey, "step": 0, **growth})
    r2 = p.trainer.fit(
        grown,
        p.stage(key, seed, {**labels, "stage": "grown"}, steps2, f_full, offset_flops=r1.flops + cost,
                schedule_steps=span, schedule_offset=0 if restart else steps1, grown=True),
        carried,
    )
    return [("small", r1), ("growth", growth), ("grown", r2)]


def _recorded_wall_time(path: Path) -> float:
    """``wall_time`` of a run's ``growth.json``, read as data (a regular file, no link, finite, non-negative)."""
    import math

    from morph.inputs import read_json
    from morph.text import printable

    rec = read_json(path, limit=1 << 16, follow=False, what="growth record")
    wall = rec.get("wall_time", 0.0) if isinstance(rec, dict) else None
    if not (isinstance(wall, (int, float)) and not isinstance(wall, bool) and math.isfinite(wall) and wall >= 0):
        raise RecipeError(f"{printable(path)}: wall_time is not a finite non-negative number; delete the file to "
                          "redo the growth step")
    return float(wall)


def _growth_record(p: Planner, method: str, seed: int, before: float, cost: float, wall: float) -> dict[str, Any]:
    """The growth step as a stage summary: its own FLOPs, and the method's running total after it."""
    p.trainer.console.print(
        f"seed{seed}/{method}/growth: morph.grow(method={method}) cost {cost:.4g} training FLOPs "
        f"({cost / p.unit:.4f}X) in {wall:.1f} s"
    )
    return {"growth_flops": cost, "growth_flops_norm": cost / p.unit, "flops": before + cost, "wall_time": wall,
            "steps": 0, "epochs": 0}


_RUNNERS: dict[str, Callable[[Planner, int], Stages]] = {
    "large": lambda p, s: _plain(p, "large", s),
    "large-match": lambda p, s: _plain(p, "large-match", s),
    "small": lambda p, s: _plain(p, "small", s),
    "small-match": lambda p, s: _plain(p, "small-match", s),
    "mixturegrowth": _mixturegrowth,
    "mixturegrowth-nofusion": _mixturegrowth_nofusion,
    **{m: (lambda p, s, m=m: _grow_baseline(p, m, s)) for m in GROWTH_BASELINES},
}


def run_method(p: Planner, method: str, seed: int, run_dir: Path) -> MethodResult:
    """Run (or resume) every stage of ``method`` for ``seed``; write ``seed<S>/<method>/result.json``."""
    stages = _RUNNERS[method](p, seed)
    final = stages[-1][1]
    out = MethodResult(
        method=method,
        label=METHODS[method],
        seed=seed,
        top1=final.top1,
        test_loss=final.test_loss,
        flops=final.flops,
        flops_norm=final.flops / p.unit,
        params=count_params(final.model),
        stages=[{"stage": name, **(r if isinstance(r, dict) else r.summary())} for name, r in stages],
    )
    if p.trainer.dist.is_main:
        import morph

        out_dir = run_dir / f"seed{seed}" / method
        for name in ("model.safetensors", "result.json"):  # both refused before either is written (a link ...)
            check_output(out_dir / name, force=True, option="run file")
        # the method is finished: its model may leave the device for export
        morph.save(final.model.to(device="cpu", memory_format=torch.contiguous_format), out_dir / "model.safetensors")
        atomic_write_text(out_dir / "result.json", out.to_json())
    return out
