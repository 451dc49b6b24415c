"""SuperWeights rows of ``morph train``: template sharing under a parameter budget, and SuperWeight ensembles.

Every row trains through the one :class:`~recipes.trainer.Trainer` (checkpoints, resume, metrics) with the
library's steps (:mod:`morph.superweights`); the rows (``superweights.rows``) are:

- ``stock``: the plain model (a single network; its template layers' weights are what a budget is compared to).
- ``learned`` (once per budget, NPAS, reference §1.3): a warm-up model with depth-binned clusters and tied
  coefficients trained ``warmup_epochs`` at a constant learning rate (stage ``warmup``); the weight gradients of
  every layer summed over ``grad_batches`` training batches (eval mode); the clusters split at ``tau`` (connected
  components), ``tau`` lowered until the budget fits (:func:`~morph.superweights.npas.learn_clusters`); the
  warm-up model discarded and the main model built from scratch under the budget (stage ``train``), tied
  coefficients (``tie``) untied after ``untie_epoch`` epochs at ``beta`` from coefficient gradients summed over
  ``untie_batches`` batches (:func:`~morph.superweights.npas.untie`: each new vector a clone, in the optimizer
  once). The learned clusters are kept in ``clusters.json`` so that a rerun builds the same model.
- ``shape``: one cluster (bank set) per weight shape, under the budget.
- ``none``: no sharing, one bank per layer; below the stock size the network is narrowed (the largest width,
  to 1/2^20, whose layers fit: one template each, the rest of the budget as more templates).
- ``sw-ensemble``: members (``members`` widths, ``member_depths`` for WRNs) sharing one bank set
  (:func:`~morph.superweights.ensemble.ensemble`), BatchNorm and heads per member; loss = sum of the members'
  cross-entropies, prediction = mean of their softmaxes; clusters ``ensemble_share`` (``learned``: the NPAS
  steps above on member 0, the others attach).
- ``deep-ensemble``: the same members as independent plain networks (:class:`Members`).

Each row writes ``seed<S>/<row>/result.json`` (the growth rows' fields, plus ``superweights``: top-1, NLL, ECE
with 15 bins and diversity per member and for the ensemble, template and total parameters, forward FLOPs per
image per member and in all, the clusters, ``tau`` and the vectors untied). ``morph report`` prints the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from morph.errors import CheckpointError, MorphError
from morph.paths import check_output
from morph.text import printable

from .checkpoint import atomic_write_text
from .config import ModelConfig
from .data import EpochBatches, derive_seed
from .errors import RecipeError
from .models import build_model
from .schedule import MethodResult, Planner, count_params
from .trainer import LRSchedule, Stage, StageHook, StageResult, Trainer, make_schedule

__all__ = ["Members", "SharingHook", "SWResult", "check_budgets", "narrowed_width", "row_keys", "run_rows", "evaluate_members"]

MAX_CLUSTERS_BYTES = 1 << 22

LABELS = {
    "stock": "single network (stock)",
    "learned": "learned sharing",
    "shape": "one bank per shape",
    "none": "no sharing (narrowed)",
    "sw-ensemble": "SuperWeight ensemble",
    "deep-ensemble": "deep ensemble",
}


class Members(nn.Module):
    """Independent members (a deep ensemble): ``forward(x)`` stacks their logits, ``[M, B, C]``."""

    stacked_logits = True

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])


def row_keys(sw: Any) -> list[tuple[str, str, int | None]]:
    """``(key, row, budget)`` of every row of ``superweights`` config ``sw``, in order: the keys are the rows'
    folder names (``learned-20000``)."""
    out: list[tuple[str, str, int | None]] = []
    for row in sw.rows:
        if row in ("learned", "shape", "none"):
            out += [(f"{row}-{b}", row, int(b)) for b in sw.budgets]
        else:
            out.append((row, row, None))
    return out


# --- the untying hook ------------------------------------------------------------------------------


def _banks(model: nn.Module) -> dict[tuple[int, int], nn.Module]:
    from morph.superweights.banks import superweight_layers

    out = {}
    for _, m in superweight_layers(model):
        for w, b in enumerate(m.mix.banks):
            out[(b.cluster, w)] = b
    return out


def sharing_state(model: nn.Module) -> dict[str, Any]:
    """Which coefficient vector every piece uses, and how many vectors every bank holds (JSON)."""
    from morph.superweights.banks import superweight_layers

    return {
        "coef": [[m.mix.ref[0], m.mix.ref[1], list(m.mix.coef)] for _, m in superweight_layers(model)],
        "vectors": [[c, w, len(b.coefficients)] for (c, w), b in sorted(_banks(model).items())],
    }


def restore_sharing(model: nn.Module, state: Any, where: str) -> None:
    """Give ``model`` (freshly built, coefficients tied as at its start) the coefficient vectors and indices of
    ``state`` (:func:`sharing_state`), checked as data: every layer and bank of the model listed once, vector
    counts between the model's and the bank's pieces, indices within them. New vectors are zeros; the
    checkpoint's tensors replace them.

    Raises:
        CheckpointError: one line naming ``where`` and what does not fit.
    """
    from morph.superweights.banks import superweight_layers

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CheckpointError(f"{where}: corrupt sharing state: {what}; delete it to restart that stage")

    layers = {m.mix.ref: m.mix for _, m in superweight_layers(model)}
    banks = _banks(model)
    uses: dict[tuple[int, int], int] = {}
    for mix in layers.values():
        for w, b in enumerate(mix.banks):
            uses[(b.cluster, w)] = uses.get((b.cluster, w), 0) + 1
    need(isinstance(state, dict) and isinstance(state.get("coef"), list) and isinstance(state.get("vectors"), list),
         "it must hold 'coef' and 'vectors' lists")
    need(len(state["vectors"]) == len(banks), f"{len(state['vectors'])} banks listed, the model has {len(banks)}")
    counts: dict[tuple[int, int], int] = {}
    for item in state["vectors"]:
        need(isinstance(item, list) and len(item) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in item), "a 'vectors' entry is not [cluster, level, count]")
        key = (item[0], item[1])
        need(key in banks and key not in counts, f"bank {printable(repr(key))[:40]} is unknown or listed twice")
        need(len(banks[key].coefficients) <= item[2] <= uses[key],
             f"bank {key} lists {item[2]} vectors: at least {len(banks[key].coefficients)}, at most {uses[key]}")
        counts[key] = item[2]
    need(len(state["coef"]) == len(layers), f"{len(state['coef'])} layers listed, the model has {len(layers)}")
    seen = set()
    for item in state["coef"]:
        need(isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and isinstance(item[1], str)
             and isinstance(item[2], list), "a 'coef' entry is not [member, layer, indices]")
        ref = (item[0], item[1])
        need(ref in layers and ref not in seen, f"layer {printable(item[1])[:80]!r} is unknown or listed twice")
        seen.add(ref)
        mix = layers[ref]
        need(len(item[2]) == mix.levels, f"layer {printable(item[1])[:80]!r} has {mix.levels} levels, not "
             f"{len(item[2])}")
        for w, i in enumerate(item[2]):
            need(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < counts[(mix.banks[w].cluster, w)],
                 f"layer {printable(item[1])[:80]!r} level {w}: index {printable(repr(i))[:20]} out of range")
    for key, n in counts.items():
        bank = banks[key]
        ref = bank.coefficients[0]
        while len(bank.coefficients) < n:
            bank.coefficients.append(nn.Parameter(torch.zeros_like(ref), requires_grad=ref.requires_grad))
    for m, name, idx in state["coef"]:
        layers[(m, name)].coef = [int(i) for i in idx]


@dataclass
class SharingHook(StageHook):
    """Coefficient untying inside the trainer's loop (SuperWeights §1.3 D): after ``epoch`` epochs, the
    coefficient gradients of every piece summed over ``batches`` training batches (eval mode, no step), then
    :func:`~morph.superweights.npas.untie` at ``beta`` with the stage's optimizer (each new vector enters it
    once). The sharing state goes into the stage's checkpoint; a resumed stage gets it back."""

    epoch: int
    beta: float
    batches: int
    untied: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def after_epoch(self, trainer: Trainer, model: nn.Module, optimizer: torch.optim.Optimizer, stage: Stage,
                    epoch: int) -> bool:
        if not self.epoch or epoch != self.epoch:
            return False
        from morph.superweights.npas import CoefficientGradients, untie

        was = model.training
        model.eval()
        data = trainer.growth_batches(derive_seed(stage.seed, "untie", epoch), self.batches)
        with CoefficientGradients(model) as cg:
            for x, y in data:
                x, y = trainer._batch_to_device(x, y)
                model.zero_grad(set_to_none=True)
                with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
                    loss = trainer.loss(model(x), y)
                loss.backward()
        model.zero_grad(set_to_none=True)
        model.train(was)
        new = untie(model, cg.grads, self.beta, optimizer)
        self.untied = len(new)
        rec = {"kind": "untie", **stage.labels, "stage_key": stage.key, "epoch": epoch,
               "step": min(epoch * trainer.steps_per_epoch, stage.steps), "beta": self.beta,
               "batches": len(data), "new_vectors": len(new)}
        trainer.metrics.write(rec)
        trainer.console.print(f"{stage.key}: untied {len(new)} coefficient vector(s) at beta {self.beta} after "
                              f"epoch {epoch} ({len(data)} batches)")
        return bool(new)

    def state(self, model: nn.Module) -> Any:
        return {**sharing_state(model), "untied": self.untied}

    def restore(self, model: nn.Module, state: Any, where: str) -> None:
        if state is None:
            raise CheckpointError(f"{where}: the checkpoint holds no sharing state; delete it to restart that stage")
        restore_sharing(model, state, where)
        u = state.get("untied", 0)
        self.untied = u if isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 1 << 30 else 0


# --- models ----------------------------------------------------------------------------------------


def narrowed_width(base: nn.Module, budget: int, input_size: tuple[int, ...]) -> float:
    """The largest width (bisection to 2^-20) at which ``base``'s template layers, one bank each, fit ``budget``
    template parameters (1 if the stock layers fit)."""
    from morph.graph.analyze import analyze
    from morph.superweights.build import prepare, template_layers

    plan = analyze(base, input_size)

    def size(w: float) -> int:
        new, _ = prepare(base, w, input_size, plan)
        return sum(math.prod(s) for _, _, s in template_layers(new, plan))

    if size(1.0) <= budget:
        return 1.0
    lo, hi = 2.0**-20, 1.0
    if size(lo) > budget:
        raise RecipeError(f"superweights.budgets: {budget:,} is below the template layers of the narrowest network")
    for _ in range(20):
        mid = (lo + hi) / 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _member_widths(p: Planner) -> list[float]:
    """Widths :func:`~morph.superweights.ensemble.ensemble` scales the member bases to: 1 for WRN members (built
    at their own widen factor), ``superweights.members`` otherwise."""
    sw = p.cfg.superweights
    return [1.0] * len(sw.members) if p.cfg.model.arch == "wrn" else list(sw.members)


def _member_base(p: Planner, seed: int, role: str, i: int) -> nn.Module:
    """Member ``i``'s architecture, freshly initialized: a WRN member is WRN-d-k itself (``d`` from
    ``member_depths``, ``k`` = the model's widen factor x its width: WRN-28-[7,4,3] from WRN-28-7 and widths
    [1, 4/7, 3/7], the 16-channel stem kept as in the paper's networks); another model is the recipe's model
    (scaled to its width later)."""
    sw = p.cfg.superweights
    m = p.cfg.model
    if m.arch != "wrn":
        return p.target(seed, f"{role}-{i}")
    depth = m.depth if sw.member_depths is None else sw.member_depths[i]
    cfg = ModelConfig(arch=m.arch, depth=depth, widen_factor=m.widen_factor * sw.members[i], norm=m.norm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, role, i, "init"))
        return build_model(cfg, p.num_classes, p.input_size)


def _plain_member(p: Planner, seed: int, role: str, i: int) -> nn.Module:
    import morph

    base = _member_base(p, seed, role, i)
    w = _member_widths(p)[i]
    if w == 1.0:
        return base
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, role, i, "width"))
        return morph.scale_width(base, w, input_size=p.input_size)


def _read_clusters(path: Path, refs: set[tuple[int, str]]) -> list[list[tuple[int, str]]] | None:
    """The learned clusters a previous run kept (checked as data), or ``None`` if there are none."""
    import os

    from morph.inputs import read_json

    if not os.path.lexists(path):
        return None
    data = read_json(path, limit=MAX_CLUSTERS_BYTES, follow=False, what="learned clusters", max_depth=6)
    ok = isinstance(data, dict) and isinstance(data.get("clusters"), list)
    out: list[list[tuple[int, str]]] = []
    seen: set[tuple[int, str]] = set()
    for c in data.get("clusters", []) if ok else []:
        if not isinstance(c, list) or not c:
            ok = False
            break
        cl = []
        for r in c:
            if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str)
                    and (r[0], r[1]) in refs and (r[0], r[1]) not in seen):
                ok = False
                break
            seen.add((r[0], r[1]))
            cl.append((r[0], r[1]))
        out.append(cl)
    if not ok or seen != refs:
        raise MorphError(f"{printable(path)}: not the learned clusters of this row's layers; delete it to learn "
                         "them again")
    return out


# --- results ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_members(trainer: Trainer, model: nn.Module, subsets: list[tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Top-1, NLL, ECE (15 bins) per member and of the mean softmax, and diversity, over the whole test set
    (:class:`~morph.superweights.metrics.EnsembleMetrics`; one network is an ensemble of one)."""
    from morph.superweights.metrics import EnsembleMetrics

    stacked = bool(getattr(model, "stacked_logits", False))
    was = model.training
    model.eval()
    em = EnsembleMetrics()
    batches = EpochBatches(len(trainer.data.test), trainer.batch_size, shuffle=False, drop_last=False)
    for x, y in trainer.batches(batches):
        x, y = trainer._batch_to_device(x, y)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            out = model(x)
        em.update(out.float() if stacked else out.float()[None], y)
    model.train(was)
    return em.compute(subsets or ())


def _layer_weights(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Weights of a plain model's template layers (every conv and linear but the heads): what a budget counts."""
    from morph.graph.analyze import analyze
    from morph.superweights.build import template_layers

    mods = list(model.members) if isinstance(model, Members) else [model]
    return sum(math.prod(s) for m in mods for _, _, s in template_layers(m, analyze(m, input_size)))


def _counts(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    banks = _banks(model)
    total = count_params(model)
    if not banks:
        return {"template_params": _layer_weights(model, input_size), "coefficient_params": 0, "params": total}
    tp = sum(b.templates.numel() for b in banks.values())
    cp = sum(c.numel() for b in banks.values() for c in b.coefficients)
    return {"template_params": tp, "coefficient_params": cp, "params": total}


@dataclass
class SWResult(MethodResult):
    """One SuperWeights row trained with one seed (``result.json``; the growth rows' fields and ``superweights``)."""

    superweights: dict[str, Any] = field(default_factory=dict)


# --- rows ------------------------------------------------------------------------------------------


class _Rows:
    def __init__(self, p: Planner, seed: int, run_dir: Path) -> None:
        self.p, self.seed, self.run_dir = p, seed, run_dir
        self.sw = p.cfg.superweights
        self.spe = p.spe

    def stage(self, key: str, labels: dict[str, Any], steps: int, fpi: float, offset: float = 0.0,
              constant: bool = False) -> Stage:
        if constant:  # the warm-up: the official constant learning rate
            lr = LRSchedule(base_lr=self.p.cfg.optim.lr, total_steps=max(steps, 1), kind="step")
        else:
            lr = make_schedule(self.p.cfg.optim, steps, self.spe, self.sw.epochs)
        return Stage(key=key, seed=derive_seed(self.seed, key), steps=steps, lr=lr, flops_per_image=fpi,
                     flops_offset=offset, labels=labels)

    def fpi(self, kind: str, model: nn.Module) -> float:
        return self.p.flops(kind, lambda: model)

    def learned(self, key: str, build_warm, build_main, refs_of) -> tuple[nn.Module, dict[str, Any], list]:
        """The NPAS search through the trainer: warm-up stage, weight gradients, clusters under the budget.
        Returns the main model, the search's report, and the warm-up stage's result."""
        from morph.superweights.banks import superweight_layers
        from morph.superweights.npas import WeightGradients, learn_clusters

        sw, p = self.sw, self.p
        labels = {"seed": self.seed, "method": key}
        warm = build_warm()
        members = list(warm.members) if hasattr(warm, "members") else [warm]
        rec = warm.morph_info.extra["superweights"]
        initial = [[(int(m), str(n)) for m, n in c] for c in rec["clusters"]]
        shapes = {m.mix.ref: m.mix.shape for _, m in superweight_layers(warm)}
        path = self.run_dir / f"seed{self.seed}" / key / "clusters.json"
        fw = p.flops(f"sw-{key}-warm", lambda: warm)
        steps = sw.warmup_epochs * self.spe
        r_warm = p.trainer.fit(warm, self.stage(f"seed{self.seed}/{key}/warmup", {**labels, "stage": "warmup"},
                                                steps, fw, constant=True))
        images = 0
        kept = _read_clusters(path, set(shapes))
        if kept is None:
            warm = r_warm.model
            warm.eval()
            data = p.trainer.growth_batches(derive_seed(self.seed, key, "grad-batches"), sw.grad_batches)
            with WeightGradients(warm, members=members) as wg:
                for x, y in data:
                    x, y = p.trainer._batch_to_device(x, y)
                    warm.zero_grad(set_to_none=True)
                    p.trainer.loss(warm(x), y).backward()
                    wg.step()
                    images += len(y)
            warm.zero_grad(set_to_none=True)
            clusters, tau = learn_clusters(initial, wg.grads, shapes, refs_of(), sw.tau, sw.tau_step)
            if p.trainer.dist.is_main:
                check_output(path, force=True, option="run file")
                atomic_write_text(path, json.dumps({"clusters": [[[m, n] for m, n in c] for c in clusters],
                                                    "tau": tau, "grad_batches": len(data), "images": images}))
        else:
            from morph.inputs import read_json

            clusters = kept
            info = read_json(path, limit=MAX_CLUSTERS_BYTES, follow=False, what="learned clusters", max_depth=6)
            tau = info.get("tau") if isinstance(info.get("tau"), (int, float)) else None
            images = info.get("images") if isinstance(info.get("images"), int) else 0
        search = {"initial_clusters": len(initial), "clusters": len(clusters), "tau": tau,
                  "warmup_steps": steps, "grad_images": images,
                  "search_flops": r_warm.flops + 3.0 * fw * images}
        return build_main(clusters), search, r_warm

    def run(self, key: str, row: str, budget: int | None) -> tuple[SWResult, nn.Module]:
        import morph
        from morph.superweights.build import convert_shared
        from morph.superweights.ensemble import anytime_subsets, ensemble

        p, sw, seed = self.p, self.sw, self.seed
        labels = {"seed": seed, "method": key, "stage": "train"}
        dseed = derive_seed(seed, key, "templates")
        search: dict[str, Any] = {}
        stages: list[tuple[str, StageResult]] = []
        hook = None
        extra: dict[str, Any] = {"row": row, "budget": budget}
        if row == "stock":
            model = p.target(seed, "sw-stock")
        elif row == "shape":
            model = convert_shared(p.target(seed, key), 1.0, budget, "shape", bins=sw.bins, seed=dseed,
                                   input_size=p.input_size)
        elif row == "none":
            base = p.target(seed, key)
            w = narrowed_width(base, budget, p.input_size)
            model = convert_shared(base, w, budget, "layer", seed=dseed, input_size=p.input_size)
            extra["width"] = w
        elif row == "learned":
            base = p.target(seed, key)
            model, search, r_warm = self.learned(
                key,
                lambda: convert_shared(base, 1.0, None, "bins", bins=sw.bins, templates=sw.templates, tie=True,
                                       seed=derive_seed(seed, key, "warm"), input_size=p.input_size),
                lambda cl: convert_shared(base, 1.0, budget, [[r[1] for r in c] for c in cl], bins=sw.bins,
                                          tie=sw.tie, seed=dseed, input_size=p.input_size),
                lambda: budget)
            stages.append(("warmup", r_warm))
            hook = SharingHook(sw.untie_epoch, sw.beta, sw.untie_batches)
        elif row == "sw-ensemble":
            n = len(sw.members)
            bases = [_member_base(p, seed, key, i) for i in range(n)]
            widths = _member_widths(p)
            budget = sw.ensemble_budget or _layer_weights(_plain_member(p, 0, "flops", 0), p.input_size)
            extra["budget"] = budget
            if sw.ensemble_share == "learned":
                model, search, r_warm = self.learned(
                    key,
                    lambda: ensemble(bases, widths, None, "bins", bins=sw.bins, templates=sw.templates,
                                     tie=True, seed=derive_seed(seed, key, "warm"), input_size=p.input_size),
                    lambda cl: ensemble(bases, widths, budget, cl, bins=sw.bins, tie=sw.tie, seed=dseed,
                                        input_size=p.input_size),
                    lambda: budget)
                stages.append(("warmup", r_warm))
            else:
                model = ensemble(bases, widths, budget, sw.ensemble_share, bins=sw.bins, tie=sw.tie,
                                 seed=dseed, input_size=p.input_size)
            hook = SharingHook(sw.untie_epoch, sw.beta, sw.untie_batches)
        elif row == "deep-ensemble":
            model = Members([_plain_member(p, seed, key, i) for i in range(len(sw.members))])
        else:  # pragma: no cover - the config refuses it
            raise RecipeError(f"unknown superweights row {row!r}")
        counts = _counts(model, p.input_size)  # before training: what was built (and predicted)
        fpi = self.fpi(f"sw-{key}-seed{seed}", model)
        offset = search.get("search_flops", 0.0)
        r = p.trainer.fit(model, self.stage(f"seed{seed}/{key}/train", labels, sw.epochs * self.spe, fpi, offset),
                          hook=hook)
        stages.append(("train", r))
        model = r.model
        members = list(model.members) if getattr(model, "stacked_logits", False) else [model]
        member_flops = [float(morph.flops(m, input_size=p.input_size, batch_size=p.batch).total) for m in members]
        subsets = [s for s, _ in anytime_subsets(model, member_flops=member_flops)] if len(members) > 1 else []
        metrics = evaluate_members(p.trainer, model, subsets)
        counts_after = _counts(model, p.input_size)
        unit = 3.0 * p.flops("target", lambda: p.target(0, "flops")) * p.batch * self.spe * sw.epochs
        ens = metrics["ensemble"]
        info = {
            **extra, "top1": 100.0 * ens["top1"], "nll": ens["nll"], "ece": ens["ece"], "diversity": ens["diversity"],
            "members": [{"width": (sw.members[i] if len(members) > 1 else extra.get("width", 1.0)),
                         "top1": 100.0 * m["top1"], "nll": m["nll"], "ece": m["ece"], "flops": member_flops[i]}
                        for i, m in enumerate(metrics["members"])],
            "subsets": [{"members": s["members"], "top1": 100.0 * s["top1"], "nll": s["nll"], "ece": s["ece"],
                         "flops": sum(member_flops[i] for i in s["members"])} for s in metrics.get("subsets", [])],
            "flops_forward": sum(member_flops), "test_images": metrics["n"],
            "template_params_built": counts["template_params"], **counts_after,
            "untied": hook.untied if hook is not None else 0, **search,
        }
        if hasattr(model, "morph_info") and model.morph_info is not None and "superweights" in model.morph_info.extra:
            rec = model.morph_info.extra["superweights"]
            info["clusters"] = len(rec["clusters"])
            info["banks"] = len(rec["banks"])
        return SWResult(method=key, label=f"{LABELS[row]}" + (f", budget {budget:,}" if row in
                                                             ("learned", "shape", "none") else ""),
                        seed=seed, top1=100.0 * ens["top1"], test_loss=ens["nll"], flops=r.flops,
                        flops_norm=r.flops / unit, params=counts_after["params"],
                        stages=[{"stage": name, **res.summary()} for name, res in stages], superweights=info), model


def check_budgets(p: Planner) -> None:
    """Refuse, before anything trains, a budget below what its row can build: one template per bank of the
    initial clusters (learned: the depth bins, which learned clusters only split; shape: one cluster per shape;
    the SuperWeight ensemble: its clusters over every member's layers).

    Raises:
        RecipeError: naming the key, the row, the budget and the least budget that fits.
    """
    from morph.superweights.build import initial_clusters, prepare, template_layers
    from morph.superweights.npas import min_budget

    sw = p.cfg.superweights

    def floor(models: list[tuple[nn.Module, float]], mode: str) -> int:
        layers = []
        for i, (m, w) in enumerate(models):
            new, plan = prepare(m, w, p.input_size)
            layers += [((i, n), k, s) for n, k, s in template_layers(new, plan)]
        shapes = {r: s for r, _, s in layers}
        return min_budget([[shapes[r] for r in c] for c in initial_clusters(layers, mode, sw.bins)])

    single: dict[str, int] = {}
    for _, row, budget in row_keys(sw):
        if row in ("learned", "shape"):
            mode = "bins" if row == "learned" else "shape"
            if mode not in single:
                single[mode] = floor([(p.target(0, "flops"), 1.0)], mode)
            if budget < single[mode]:
                raise RecipeError(f"superweights.budgets: {budget:,} is below {single[mode]:,}, the least budget of "
                                  f"the {row} row (one template per bank of its {'depth bins' if row == 'learned' else 'shapes'})")
        if row == "sw-ensemble":
            mode = "bins" if sw.ensemble_share == "learned" else sw.ensemble_share
            widths = _member_widths(p)
            least = floor([(_member_base(p, 0, "flops", i), widths[i]) for i in range(len(sw.members))], mode)
            ebudget = sw.ensemble_budget or _layer_weights(_plain_member(p, 0, "flops", 0), p.input_size)
            if ebudget < least:
                raise RecipeError(f"superweights.ensemble_budget: {ebudget:,}"
                                  f"{'' if sw.ensemble_budget else ' (member 0' + chr(39) + 's layers)'} is below "
                                  f"{least:,}, the least budget of the ensemble's {mode} clusters (one template per "
                                  "bank)")


def run_rows(p: Planner, seed: int, run_dir: Path) -> list[SWResult]:
    """Run (or resume) every SuperWeights row of the config for ``seed``; write each ``result.json`` (and, but for
    the deep ensemble, ``model.safetensors``: ``morph.load`` rebuilds a shared model or ensemble from it)."""
    import morph

    rows = _Rows(p, seed, run_dir)
    out = []
    for key, row, budget in row_keys(p.cfg.superweights):
        res, model = rows.run(key, row, budget)
        if p.trainer.dist.is_main:
            d = run_dir / f"seed{seed}" / key
            for name in ("model.safetensors", "result.json"):  # both refused before either is written
                check_output(d / name, force=True, option="run file")
            if not isinstance(model, Members):
                morph.save(model.to(device="cpu", memory_format=torch.contiguous_format), d / "model.safetensors")
            atomic_write_text(d / "result.json", res.to_json())
        out.append(res)
    return out
