"""Growth of plain models: the assembly every plain method shares, and its value hooks.

:class:`PlainGrowth` builds the grown model from a :class:`~.layout.Layout` (shape) and asks the method
(values) for the parts that are new:

- a conv/linear weight is indexed by its output :class:`~.layout.DimMap` (rows) and, when it is not
  grouped, its input map (columns). Old and replica entries are gathered from the old weight, divided
  by the replica count along the input (Net2Net's fan-out rule; a count of 1 everywhere else).
  **Fresh rows** are the incoming weights of new neurons (:meth:`PlainGrowth.incoming`); **fresh
  columns** of kept rows are the outgoing weights of new neurons (:meth:`PlainGrowth.outgoing`); fresh
  rows of a grouped or depthwise conv read only new channels and are free (:meth:`PlainGrowth.free`).
- biases of new neurons are 0; norm layers get identity channels (running variance 1, bias and running
  mean 0, weight 1), except the weight of a BatchNorm/GroupNorm channel of new neurons: ``new_gamma``
  (0.1); every other per-channel tensor (layer scales, timm's conv gains) is gathered.

``model.growth_report`` lists, per growing channel group, the rule that ran and why.

Options of every plain method, so that what ``morph.grow`` returns trains in an ordinary loop:

- ``relu_grad`` (``"one"``): the grown model's ReLUs get sub-gradient 1 at 0 (:mod:`.activation`), without
  which new neurons with zero incoming weights never receive a gradient; ``"stock"``: PyTorch's 0.
- ``new_gamma`` (0.1): the norm weight of new channels. Behind an all-zero channel BatchNorm multiplies the
  gradient by ``1/sqrt(eps)`` (GradMax App. C): the first step moves new incoming weights by about a fifth
  of an old neuron's norm (180x the old rows' update, ``benchmarks/first_step.py``), and from then on BatchNorm
  scales the channel to unit variance, so new neurons enter at full strength through untrained outgoing
  weights and the loss jumps. growneuron grows norms as identity (weight 1) and takes that jump; a weight of
  0.1 lets new neurons enter at a tenth of that strength, the weight itself learning how much of them the
  network uses. The function at growth does not depend on it (a zero channel normalizes to 0).
- ``split`` (0.5): replicated channels (Net2Net; LayerNorm-normalized groups of every method) share their
  source's fan-out weights unevenly (:func:`.layout.split_unevenly`), so that replicas part.
- ``keys`` (``"random"``): the all-zero key rows of new attention heads (or head channels) get random values,
  and the query rows of whole new heads too (their values are 0, so the head outputs 0 whatever it attends
  to); queries of new channels inside old heads stay 0 (``0 . k``): the function is kept and q and k train
  (:mod:`.keys`: with both at zero neither ever gets a gradient); ``"zero"``: leave them at zero.
- ``bn_stats`` (``"auto"``): after a step that changes the function and read data (Firefly; GradMax or Random
  with epsilon > 0), BatchNorm running statistics are re-estimated on the growth batches
  (:func:`reestimate_norm_stats`; Firefly: on the batches it did not fit, when there are any), so the model
  is usable in eval mode right away; a function-preserving
  step keeps the (exact) statistics of the model grown. ``"reestimate"``: whenever data is given;
  ``"keep"``: never.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import MorphError
from ..graph.mha import stock as mha_stock
from ..graph.mha import stock_name, traceable
from ..info import MorphInfo, get_info, set_info
from ..zoo import get_spec
from . import activation
from .cosine import cosine_query_keys
from .directions import mean_norm, random_directions
from .layout import FRESH, OLD, DimMap, Layout, build_layout, split_unevenly
from .liveness import (
    chained_norms,
    constant_inputs,
    dead_products,
    project_out,
    shuffled_inputs,
    split_products,
    zero_inputs,
)
from .logits import keep_logits
from .optim import GrowthRecord
from .registry import GrowthMethod

__all__ = ["BN_STATS", "PlainGrowth", "fresh_mask", "iterate_batches", "mean_norm", "random_directions",
           "reestimate_norm_stats"]


_IDENTITY_ONE = ("weight", "running_var")

#: ``bn_stats``: ``auto`` (re-estimate the BatchNorm statistics on the growth batches when the step changed the
#: function), ``reestimate`` (whenever data is given), ``keep``.
BN_STATS = ("auto", "reestimate", "keep")


def reestimate_norm_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches`` (forward passes in
    training mode, cumulative average: ``momentum=None``), as ``torch.optim.swa_utils.update_bn`` does;
    everything else (``num_batches_tracked``, momentum, the training flag) is left as it was. Returns the
    number of batches read."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None]
    batches = list(batches)
    if not norms or not batches:
        return 0
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    was = model.training
    p0 = next(iter(model.parameters()))
    n = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(p0))
                n += 1
    finally:
        model.train(was)
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    return n


class PlainGrowth(GrowthMethod):
    """Base of the methods on plain models (see the module docstring). Subclasses set the class attributes
    and override the hooks."""

    rule: ClassVar[str] = "fresh"
    mapping: ClassVar[str] = "cycle"
    options: ClassVar[dict[str, Any]] = {"which": "all", "plan": None, "input_size": None, "relu_grad": "one",
                                         "split": 0.5, "bn_stats": "auto", "new_gamma": 0.1, "keys": "random"}

    # -- value hooks ------------------------------------------------------------------------------
    def incoming(self, name: str, w: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> None:
        """Incoming weights of new neurons ``w[rows]`` (default: zero)."""
        w[rows] = 0

    def outgoing(self, name: str, w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, group: torch.Tensor,
                 old: torch.Tensor) -> None:
        """Outgoing weights of new neurons ``w[rows][:, cols]`` (``group``: each column's channel group)."""
        raise NotImplementedError

    def free(self, name: str, w: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> None:
        """New filters of a grouped/depthwise conv, which read only new channels: random directions at the
        existing filters' mean norm (new channels are zero at growth, so the function is kept)."""
        w[rows] = random_directions(len(rows), tuple(w.shape[1:]), self.gen, w) * mean_norm(old, 0)

    def live(self, name: str, w: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> None:
        """Incoming weights of the new neurons of the live factor of a product of two new channels
        (:func:`.liveness.dead_products`): random directions at ``scale`` (0.5) x the layer's mean row norm."""
        s = float(self.opts.get("scale", 0.5))
        w[rows] = random_directions(len(rows), tuple(w.shape[1:]), self.gen, w) * s * mean_norm(old, 0)

    def zero_incoming(self) -> bool:
        """Whether new neurons start with zero incoming weights (then :mod:`.liveness` applies)."""
        return True

    def prepare(self, model: nn.Module, layout: Layout, data) -> None:
        """Called before assembly (GradMax reads its gradients here)."""

    def finish(self, new: nn.Module, model: nn.Module, layout: Layout, data) -> None:
        """Called after assembly (Firefly optimizes the new weights here)."""

    def keeps_function(self) -> bool:
        """Whether the step keeps the function (then the norm statistics are exact and stay)."""
        return True

    def stats_batches(self, batches: list) -> list:
        """The batches the norm statistics are re-estimated on (all of them)."""
        return batches

    def step_flops(self, f_small: float, f_grown: float, images: int) -> float:
        """The method's own passes (:meth:`data_flops`), plus one forward pass of the grown model per image where
        the norm statistics are re-estimated."""
        extra = f_grown * images if self.needs_data and self._reestimates(True) else 0.0
        return self.data_flops(f_small, f_grown, images) + extra

    def data_flops(self, f_small: float, f_grown: float, images: int) -> float:
        """FLOPs of the passes the method itself runs on its data (none)."""
        return 0.0

    def _reestimates(self, data) -> bool:
        mode = self.opts["bn_stats"]
        if data is None or mode == "keep":
            return False
        return mode == "reestimate" or not self.keeps_function()

    def _check_options(self) -> None:
        if self.opts["relu_grad"] not in activation.RELU_GRAD:
            raise MorphError(f"relu_grad must be one of {', '.join(activation.RELU_GRAD)}, got {self.opts['relu_grad']!r}")
        if not float(self.opts["new_gamma"]) > 0:
            raise MorphError(f"new_gamma must be > 0 (a zero norm weight cuts new neurons off), got {self.opts['new_gamma']}")
        if self.opts["keys"] not in ("random", "zero"):
            raise MorphError(f"keys must be one of random, zero, got {self.opts['keys']!r}")
        if self.opts["bn_stats"] not in BN_STATS:
            raise MorphError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {self.opts['bn_stats']!r}")

    def rule_of(self, layout: Layout, root: int) -> str:
        """The rule reported for one growing group."""
        g = layout.groups[root]
        rule = self.name if g.rule == "fresh" else g.rule
        return f"{rule} ({g.note})" if g.note else rule

    # -- driver -----------------------------------------------------------------------------------
    def grow(self, model: nn.Module, width: float, data, gen: torch.Generator) -> nn.Module:
        info = get_info(model)
        if info is not None and info.kind != "plain":
            raise MorphError(
                f"method {self.name!r} grows plain models; this is a {info.kind} template model: bake it first "
                "(morph.bake), or grow it with mixturegrowth"
            )
        self._check_options()
        self.gen = gen
        model = traceable(model)  # nn.MultiheadAttention's packed projection as the Linear in_proj (turned back below)
        p0 = next(iter(model.parameters()))
        layout = build_layout(model, width, rule=self.rule, mapping=self.mapping, which=self.opts["which"], gen=gen,
                              plan=self.opts["plan"], input_size=self.opts["input_size"], device=p0.device)
        split_unevenly(layout, float(self.opts["split"]), gen)
        self.layout = layout
        # where zero new neurons could not start to train (module docstring of .liveness)
        zero = self.zero_incoming()
        self.live_layers = dead_products(layout) if zero else {}
        self.live_rows: dict[str, torch.Tensor] = {}  # live layers whose live rows are one slice of their output
        for name, (product, rows) in (split_products(layout) if zero else {}).items():
            if name not in self.live_layers:
                self.live_layers[name], self.live_rows[name] = product, rows
        self.chained = set(chained_norms(layout)) if zero else set()
        new = layout.skeleton().to(dtype=p0.dtype, device=p0.device)
        _copy_same_shape(model, new)
        self.prepare(model, layout, data)
        record: dict[str, list] = {}
        with torch.no_grad():
            for name, p in layout.plan.layers.items():
                self._fill_layer(layout, p, model.get_submodule(name), new.get_submodule(name), record)
            for path, dims in layout.plan.params.items():
                self._fill_attr(layout, path, dims, model, new, record)
        self.offsets: list[str] = []
        if zero:
            self._live_zero_inputs(new, model, layout, data)
            self._cancel_offsets(new, layout, data)
        for prm in new.parameters():
            prm.requires_grad_(True)
        new.train(model.training)
        activation.restore(new, {"relu_grad": self.opts["relu_grad"]})
        batches = list(iterate_batches(data))
        x = batches[0][0].to(p0) if batches else torch.randn(
            (1, *layout.plan.input_size), generator=torch.Generator().manual_seed(0), dtype=p0.dtype).to(p0.device)
        # heads that grew (head_dim mode): queries scaled so that the logits stay (.logits)
        self.scaled_queries = keep_logits(new, model, layout, x)
        # cosine attention (Swin-V2) whose heads grew: new query and key rows a rotated copy of the old (.cosine)
        self.cosine_rows = cosine_query_keys(new, model, layout, x, gen, zero_rows=self.opts["keys"] == "random")
        if self.opts["keys"] == "random":
            from .keys import init_new_keys

            self.new_keys = init_new_keys(new, layout, x, gen)
        self.finish(new, model, layout, data)
        if self._reestimates(data):
            reestimate_norm_stats(new, self.stats_batches(list(iterate_batches(data))))
        new.growth_report = self.report(layout)
        new.growth_liveness = {"live": dict(self.live_layers), "chained_norms": sorted(self.chained),
                               "offsets": sorted(self.offsets)}
        mha = mha_stock(new)
        if mha:  # the stock parameter names (in_proj_weight) in the record, new and old alike
            record = {stock_name(k, mha): [(src, stock_name(o, mha), i) for src, o, i in v] for k, v in record.items()}
        new.growth_record = GrowthRecord(record)
        spec = info.spec if info is not None else get_spec(model)
        size = tuple(layout.plan.input_size)
        base = info or MorphInfo(kind="plain", spec=spec, width=1.0, input_size=size)
        # widths are relative to the layout's reference: the base model, or (a model whose base morph does not
        # rebuild here: a recorded callable) the model itself, at its recorded width
        scale = base.width if layout.reference is model else 1.0
        extra = {**base.extra, "growth": {**self.record(), "from_width": layout.w_from * scale,
                                          "rules": _count_rules(new.growth_report)}}
        return set_info(new, dataclasses.replace(base, kind="plain", spec=spec, width=layout.w_to * scale,
                                                 input_size=size, extra=extra))

    def _live_zero_inputs(self, new: nn.Module, model: nn.Module, layout: Layout, data) -> None:
        """New rows of layers behind a channel shuffle whose input is all zero at growth get live incoming weights
        (:func:`.liveness.shuffled_inputs`): probed on the first batch of ``data``, else on random images."""
        cand = shuffled_inputs(layout)
        if not cand:
            return
        batches = list(iterate_batches(data))
        p0 = next(iter(new.parameters()))
        x = batches[0][0] if batches else torch.randn((2, *layout.plan.input_size), generator=self.gen,
                                                      dtype=torch.float64)
        for name in zero_inputs(new, list(cand), x.to(p0)):
            rows = layout.dim(layout.plan.layers[name].out_dim).fresh.nonzero().flatten()
            with torch.no_grad():
                self.live(name, new.get_submodule(name).weight.data, rows, model.get_submodule(name).weight.detach())
            self.live_layers[name] = cand[name]

    def _cancel_offsets(self, new: nn.Module, layout: Layout, data) -> None:
        """New channels that are a non-zero constant at growth (an activation with ``f(0) != 0`` behind zero new
        neurons: StarReLU's bias) would add ``constant x outgoing weight`` to the consumer's output: its outgoing
        weights of new channels are made orthogonal to the constants, per output row and kernel tap
        (:func:`.liveness.constant_inputs`, :func:`.liveness.project_out`), so the function is kept exactly."""
        batches = list(iterate_batches(data))
        p0 = next(iter(new.parameters()))
        x = batches[0][0] if batches else torch.randn((2, *layout.plan.input_size), dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(0))  # not self.gen
        for name, c in constant_inputs(new, layout, x.to(p0)).items():
            cols = layout.dim(layout.plan.layers[name].in_dim).fresh.nonzero().flatten()
            w = new.get_submodule(name).weight
            with torch.no_grad():
                project_out(w.data, cols.to(w.device), c)
            self.offsets.append(name)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in super().record().items() if k not in ("plan", "input_size")}

    def report(self, layout: Layout) -> list[dict[str, Any]]:
        out = []
        for g in layout.growing():
            out.append({"group": g.root, "channels": [g.old, g.new], "rule": self.rule_of(layout, g.root),
                        "note": g.note, "producers": layout.producers(g.root), "consumers": layout.consumers(g.root)})
        return out

    # -- assembly ---------------------------------------------------------------------------------
    def _fill_layer(self, layout: Layout, p, old: nn.Module, mod: nn.Module, record) -> None:
        if p.kind in ("conv", "linear"):
            self._fill_weight(layout, p, old, mod, record)
            return
        if p.kind == "scalar":
            return
        maps = [layout.dim(d) for d in p.ln_dims] if p.kind == "layernorm" else [layout.dim(p.in_dim)]
        for tname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or t.dim() == 0:
                continue
            src = getattr(old, tname).detach()
            axes = maps[-t.dim():] if p.kind == "layernorm" else [maps[0]] + [None] * (t.dim() - 1)
            new = _gather(src, axes)
            if p.kind != "layernorm":
                fresh = maps[0].fresh
                if fresh.any():
                    new[fresh] = 1.0 if tname in _IDENTITY_ONE else 0.0
                    if tname == "weight" and isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                        new[fresh] = float(self.opts["new_gamma"])  # see the module docstring
                        if p.name in self.chained:  # in series with another zero norm: gain new_gamma (.liveness)
                            new[fresh] = float(self.opts["new_gamma"]) * math.sqrt(float(mod.eps))
            t.data = new.to(t.dtype)
            record[_pname(p.name, tname)] = [(0, _pname(p.name, tname), [_old_index(a) for a in axes])]

    def _fill_weight(self, layout: Layout, p, old: nn.Module, mod: nn.Module, record) -> None:
        out_map, in_map = layout.dim(p.out_dim), layout.dim(p.in_dim)
        transposed = p.kind == "conv" and mod.transposed
        grouped = p.kind == "conv" and mod.groups > 1
        w_old = old.weight.detach()
        w_old = w_old.transpose(0, 1) if transposed else w_old
        w = w_old.index_select(0, out_map.src)
        want = tuple(mod.weight.shape)
        want = (want[1], want[0], *want[2:]) if transposed else want
        cols = in_map
        if grouped and not transposed and want[1] != w.shape[1] and len(in_map) == want[1] * mod.groups:
            # a grouped conv whose groups widen: the layout grew its input block by block (one block per
            # group, old channels first), so every group's columns follow the first block's map
            cols = _first_block(in_map, want[1], mod.groups)
            grouped = False
        if not grouped:
            w = w.index_select(1, cols.src)
            w = w * cols.fanout.to(w).view(1, -1, *([1] * (w.dim() - 2)))
        if tuple(w.shape) != want:
            raise MorphError(
                f"{p.name}: a grouped conv whose groups widen ({tuple(w_old.shape)} -> {want}) cannot keep its "
                "function; growth needs group widths that stay constant (choose another width)"
            )
        rows_f = out_map.fresh.nonzero().flatten()
        if len(rows_f):
            (self.free if grouped else self.incoming)(p.name, w, rows_f, w_old)
            if not grouped and p.name in self.live_layers:
                part = self.live_rows.get(p.name)
                live = rows_f if part is None else (out_map.fresh & part).nonzero().flatten()
                self.live(p.name, w, live, w_old)
        if not grouped:
            cols_f = cols.fresh.nonzero().flatten()
            if len(cols_f):
                rows_k = out_map.kept.nonzero().flatten()
                self.outgoing(p.name, w, rows_k, cols_f, cols.group[cols_f], w_old)
        w = w.transpose(0, 1) if transposed else w
        mod.weight.data = w.contiguous().to(mod.weight.dtype)
        axes = [out_map, None if grouped else cols]
        record[_pname(p.name, "weight")] = [(0, _pname(p.name, "weight"),
                                             [_old_index(a) for a in (axes[::-1] if transposed else axes)])]
        for tname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if tname == "weight" or t is None or t.dim() == 0:
                continue
            src = getattr(old, tname).detach()
            if transposed or src.shape[0] != out_map.n_old:
                continue
            new = src.index_select(0, out_map.src)
            if tname == "bias":
                new[out_map.fresh] = 0
            t.data = new.to(t.dtype)
            record[_pname(p.name, tname)] = [(0, _pname(p.name, tname), [_old_index(out_map)] + [None] * (t.dim() - 1))]
        if _standardized(mod) and not grouped and not transposed:
            self._restandardize(mod, old, w_old, out_map, cols)

    def _restandardize(self, mod: nn.Module, old_mod: nn.Module, w_old: torch.Tensor, out_map: DimMap,
                       cols: DimMap) -> None:
        """A weight-standardized conv (timm's ``ScaledStdConv2d``: ``gain x gamma / sqrt(fan_in) x (w - mean) /
        sqrt(var + eps)`` per filter, over its fan-in; ``gamma / sqrt(fan_in)`` is the module's ``scale``) whose
        fan-in grows by new input channels: every kept filter's new entries are shifted to have the filter's old
        mean, so the old entries standardize around the same mean, and its gain takes the change of ``scale`` and
        variance, so they standardize to the same values; new channels
        (zero at growth) keep their (shifted) outgoing weights, which standardize to non-zero values. The filters of
        new neurons get gain ``new_gamma``, like a BatchNorm channel of new neurons: a zero filter standardizes to 0,
        and as soon as it is not constant to unit variance, so it enters at ``new_gamma`` of full strength. (Gain 0
        with a live random filter, which keeps the function too, was tried: on ``timm/nf_regnet_b0`` it left more
        new rows unmoved after 3 steps, the squeeze-excitation rows behind those filters included.) The entries
        of replicated input channels (Net2Net) split their source's deviation from the mean, ``mean + share x
        (w - mean)``, so the replicas' standardized entries sum to the source's."""
        w = mod.weight.data
        fresh_c = cols.fresh.to(w.device)
        rows_k = out_map.kept.nonzero().flatten().to(w.device)
        eps = float(mod.eps)
        with torch.no_grad():
            if len(cols) != w_old.shape[1] and len(rows_k):
                old = w_old.index_select(0, out_map.src[out_map.kept].to(w.device)).flatten(1).double()
                mu, var = old.mean(1), old.var(1, unbiased=False)
                sub = w.index_select(0, rows_k).double()  # [kept, in, taps...]
                shape = (-1, *([1] * (sub.dim() - 1)))
                kept_c = ~fresh_c
                sub[:, kept_c] += (1 - cols.fanout.to(sub)[kept_c]).view(1, -1, *([1] * (sub.dim() - 2))) * mu.view(shape)
                if fresh_c.any():
                    v = sub[:, fresh_c]
                    sub[:, fresh_c] = v - v.flatten(1).mean(1).view(shape) + mu.view(shape)
                var_new = sub.flatten(1).var(1, unbiased=False)
                ratio = float(old_mod.scale) / float(mod.scale) * torch.sqrt((var_new + eps) / (var + float(old_mod.eps)))
                w.index_copy_(0, rows_k, sub.to(w.dtype))
                g = mod.gain.data
                g[rows_k] = (g[rows_k].double() * ratio.view(-1, *([1] * (g.dim() - 1)))).to(g.dtype)
            rows_f = out_map.fresh.nonzero().flatten().to(w.device)
            if len(rows_f):
                mod.gain.data[rows_f] = float(self.opts["new_gamma"])

    def _fill_attr(self, layout: Layout, path: str, dims, model: nn.Module, new: nn.Module, record) -> None:
        mod_path, _, name = path.rpartition(".")
        src = getattr(model.get_submodule(mod_path) if mod_path else model, name).detach()
        owner = new.get_submodule(mod_path) if mod_path else new
        t = getattr(owner, name)
        axes = [layout.dim(d) for d in dims]
        data = _gather(src, axes)
        if any(a.fresh.any() for a in axes) and _additive(layout.plan.gm, path):
            # a bias added to the activations (ResMLP's Affine beta, position tables, class tokens): a fresh
            # channel is zero at growth, so its entries are 0 as a conv bias of new neurons is
            for d, a in enumerate(axes):
                if a.fresh.any():
                    idx = [slice(None)] * data.dim()
                    idx[d] = a.fresh.to(data.device)
                    data[tuple(idx)] = 0
        t.data = data.to(t.dtype)
        record[path] = [(0, path, [_old_index(a) for a in axes])]


# ops through which a tensor keeps its role (its values reach the output unchanged, rearranged or broadcast)
_PASS_METHODS = {"expand", "expand_as", "view", "reshape", "to", "type", "type_as", "contiguous", "clone",
                 "unsqueeze", "squeeze", "flatten", "permute", "transpose", "repeat", "float", "double", "half"}
_PASS_FUNCTIONS = {"expand", "reshape", "unsqueeze", "squeeze", "flatten", "permute", "transpose"}
_ADD_FUNCTIONS = {"add", "iadd", "sub", "isub", "cat", "concat"}


def _additive(gm, path: str) -> bool:
    """Whether the free tensor ``path`` only ever enters the forward as a summand (``x + p``, ``addcmul(p, a, x)``'s
    first argument) or as concatenated tokens (class and distillation tokens), through shape-only ops: then a
    fresh channel's entries must be 0 for the channel to stay 0. A factor (Affine's alpha, layer scale) is not."""
    starts = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == path]
    if not starts:
        return False
    todo, seen = list(starts), set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            name = str(user.target) if user.op == "call_method" else getattr(user.target, "__name__", "")
            if (user.op == "call_method" and name in _PASS_METHODS) or (
                    user.op == "call_function" and name in _PASS_FUNCTIONS and user.args and user.args[0] is node):
                todo.append(user)
            elif user.op in ("call_function", "call_method") and name in _ADD_FUNCTIONS:
                continue
            elif name in ("addcmul", "addcdiv") and user.args and user.args[0] is node:
                continue
            else:
                return False
    return True


def _standardized(mod: nn.Module) -> bool:
    """A conv that standardizes its filters with a per-filter gain (timm's ``ScaledStdConv2d``/``...Same``)."""
    return (isinstance(mod, nn.Conv2d) and "StdConv" in type(mod).__name__ and isinstance(getattr(mod, "gain", None),
            torch.Tensor) and hasattr(mod, "eps") and hasattr(mod, "scale"))


def _first_block(a: DimMap, width: int, blocks: int) -> DimMap:
    """The first of ``blocks`` equal blocks of ``a``, as the per-group input map of a grouped conv whose
    groups widen (every block has the same pattern: old channels first, then new ones of the same kinds)."""
    n_old = a.n_old // blocks
    return DimMap(a.src[:width] % max(n_old, 1), a.kind[:width], a.count[:width], a.group[:width], n_old,
                  a.fanout[:width])


def _pname(mod: str, t: str) -> str:
    return f"{mod}.{t}" if mod else t


def _gather(t: torch.Tensor, axes: list[DimMap | None]) -> torch.Tensor:
    for d, a in enumerate(axes):
        if a is not None and t.dim() > d:
            t = t.index_select(d, a.src.to(t.device))
    return t.clone()


def _old_index(a: DimMap | None) -> torch.Tensor | None:
    """The record's index of one axis (on the CPU: a :class:`~.optim.GrowthRecord` is metadata of the model)."""
    if a is None:
        return None
    return torch.where(a.kind == OLD, a.src, torch.full_like(a.src, -1)).cpu()


def _copy_same_shape(model: nn.Module, new: nn.Module) -> None:
    """Tensors outside the analyzed layers (constant filters, unused buffers) come from the model."""
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in new.state_dict(keep_vars=True).items():
            if k in sd and tuple(sd[k].shape) == tuple(v.shape):
                v.data = sd[k].detach().clone().to(v.dtype)


def _count_rules(report: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in report:
        rule = r["rule"].split(" (")[0]
        counts[rule] = counts.get(rule, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def fresh_mask(w_shape: tuple[int, ...], out_map: DimMap, in_map: DimMap | None) -> torch.Tensor:
    """Boolean mask of the new entries of a conv/linear weight (fresh rows, and fresh columns)."""
    rows = out_map.kind == FRESH
    m = rows.view(-1, *([1] * (len(w_shape) - 1))).expand(w_shape).clone()
    if in_map is not None:
        m |= (in_map.kind == FRESH).view(1, -1, *([1] * (len(w_shape) - 2))).expand(w_shape)
    return m


def iterate_batches(data) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``data``: one ``(inputs, targets)`` batch or an iterable of them."""
    if data is None:
        return []
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    return data
