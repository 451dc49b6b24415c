"""Ensemble metrics: top-1, NLL, ECE (15 equal-width confidence bins), diversity; per member and ensemble.

All figures are computed in float64 from probabilities (softmax of logits). The ensemble's prediction is
the mean of its members' probabilities. Diversity follows Fort et al. (used by the SuperWeights paper):
the fraction of test points on which two members' top-1 predictions disagree, divided by the members'
error rate; morph averages the disagreement over all member pairs and divides by the mean member error
(the official code divides by the ensemble's error, reference §5.10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["top1", "nll", "ece", "diversity", "EnsembleMetrics", "ECE_BINS"]

ECE_BINS = 15


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest probability is at the label."""
    return float((probs.argmax(1) == labels).to(torch.float64).mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p[label]`` (probabilities clamped at the smallest normal float64)."""
    p = probs.to(torch.float64).gather(1, labels.view(-1, 1)).squeeze(1)
    return float(-p.clamp_min(torch.finfo(torch.float64).tiny).log().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over ``bins`` equal-width bins of the
    top-1 confidence, ``(i/bins, (i+1)/bins]`` (a confidence of exactly 0 goes to the first)."""
    p = probs.to(torch.float64)
    conf, pred = p.max(1)
    correct = (pred == labels).to(torch.float64)
    idx = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    n = conf.numel()
    total = 0.0
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        if k:
            total += k / n * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return total


def diversity(member_probs: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    """Mean pairwise top-1 disagreement divided by the mean member error (0 for one member or error-free members)."""
    if len(member_probs) < 2:
        return 0.0
    preds = [p.argmax(1) for p in member_probs]
    pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    dis = sum(float((preds[i] != preds[j]).to(torch.float64).mean()) for i, j in pairs) / len(pairs)
    err = sum(1.0 - float((p == labels).to(torch.float64).mean()) for p in preds) / len(preds)
    return dis / err if err > 0 else 0.0


class EnsembleMetrics:
    """Accumulate members' logits over batches; :meth:`compute` reports every metric per member and for the mean
    of the members' softmaxes (and, with ``subsets``, for each subset of members)."""

    def __init__(self) -> None:
        self._probs: list[list[torch.Tensor]] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """``logits``: ``[members, batch, classes]`` (or a list of ``[batch, classes]``)."""
        probs = [lg.detach().to(torch.float64).softmax(-1).cpu() for lg in logits]
        if self._probs and len(probs) != len(self._probs):
            raise ValueError(f"{len(probs)} members' logits, earlier batches had {len(self._probs)}")
        if not self._probs:
            self._probs = [[] for _ in probs]
        for acc, p in zip(self._probs, probs, strict=True):
            acc.append(p)
        self._labels.append(labels.detach().cpu().long())

    def compute(self, subsets: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
        if not self._labels:
            raise ValueError("no batches")
        y = torch.cat(self._labels)
        probs = [torch.cat(p) for p in self._probs]

        def row(ps: list[torch.Tensor]) -> dict[str, float]:
            mean = torch.stack(ps).mean(0)
            return {"top1": top1(mean, y), "nll": nll(mean, y), "ece": ece(mean, y), "diversity": diversity(ps, y)}

        out: dict[str, Any] = {
            "n": int(y.numel()),
            "members": [{"top1": top1(p, y), "nll": nll(p, y), "ece": ece(p, y)} for p in probs],
            "ensemble": row(probs),
        }
        if subsets:
            out["subsets"] = [{"members": list(s), **row([probs[i] for i in s])} for s in subsets]
        return out
