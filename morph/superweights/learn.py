"""The learned-sharing search end to end (SuperWeights §1.3 A-C), for one network, on the caller's data.

:func:`search` runs the official order of steps with the library pieces: a warm-up model with depth-binned
clusters and tied coefficients, trained for ``warmup_steps`` batches; the weight gradients of every layer
summed over ``grad_batches`` further batches (in eval mode, as the official code, but over many batches);
clusters split at ``tau`` and ``tau`` lowered until the budget fits; then the warm-up model is discarded
and the main model built from scratch with the learned clusters under the budget. Untying (§1.3 D) happens
later in the main training: :class:`~morph.superweights.npas.CoefficientGradients` and
:func:`~morph.superweights.npas.untie`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from morph.errors import MorphError

from .banks import superweight_layers
from .build import convert_shared
from .npas import WeightGradients, learn_clusters, min_budget

__all__ = ["search"]


def search(
    model: nn.Module,
    budget: int | None,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    width: float = 1.0,
    bins: int = 4,
    tau: float = 0.1,
    tau_step: float = 0.05,
    warmup_steps: int = 100,
    grad_batches: int = 20,
    lr: float = 0.1,
    templates: int = 2,
    tie: bool = False,
    seed: int | None = None,
    input_size: tuple[int, ...] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[nn.Module, dict[str, Any]]:
    """Learn where layers share templates; return the main model (untrained) and a report.

    Args:
        model: the architecture (left unchanged).
        budget: template parameters of the main model.
        data: ``(inputs, labels)`` batches; the first ``warmup_steps`` train the warm-up model (SGD, momentum
            0.9, constant ``lr``, as the official warm-up), the next ``grad_batches`` give the gradients.
        tau: similarity threshold (official 0.1), lowered by ``tau_step`` until the budget fits.
        tie: the main model starts with one coefficient vector per bank (untie it later at ``beta``).

    Returns:
        ``(model, report)``: the report holds the initial and learned clusters, the final ``tau``, the
        template parameters, and the number of batches of each phase.
    """
    if warmup_steps < 0 or grad_batches < 1:
        raise MorphError("search needs warmup_steps >= 0 and grad_batches >= 1")
    warm = convert_shared(model, width, None, "bins", bins=bins, templates=templates, tie=True, seed=seed,
                          input_size=input_size)
    rec = warm.morph_info.extra["superweights"]
    initial = [[(int(m), str(n)) for m, n in c] for c in rec["clusters"]]
    opt = torch.optim.SGD([p for p in warm.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    it = iter(data)
    steps = 0
    warm.train()
    for _ in range(warmup_steps):
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss_fn(warm(x), y).backward()
        opt.step()
        steps += 1
    warm.eval()
    n = 0
    with WeightGradients(warm) as wg:
        for _ in range(grad_batches):
            try:
                x, y = next(it)
            except StopIteration:
                break
            warm.zero_grad(set_to_none=True)
            loss_fn(warm(x), y).backward()
            wg.step()
            n += 1
    if not n:
        raise MorphError("search ran out of data before the gradient batches")
    shapes = {m.mix.ref: m.mix.shape for _, m in superweight_layers(warm)}
    clusters, tau_final = learn_clusters(initial, wg.grads, shapes, budget, tau, tau_step)
    main = convert_shared(model, width, budget, [[r[1] for r in c] for c in clusters], bins=bins,
                          templates=templates, tie=tie, seed=seed, input_size=input_size,
                          meta={"tau": tau_final, "warmup_steps": steps, "grad_batches": n})
    report = {
        "initial_clusters": [[r[1] for r in c] for c in initial],
        "clusters": [[r[1] for r in c] for c in clusters],
        "tau": tau_final,
        "template_params": main.morph_info.extra["superweights"]["template_params"],
        "min_budget": min_budget([[shapes[r] for r in c] for c in clusters]),
        "warmup_steps": steps,
        "grad_batches": n,
    }
    return main, report

