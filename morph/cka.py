"""Linear CKA: how similar the representations of two models' layers are, or of one layer across epochs.

Linear centered kernel alignment (Kornblith et al., 2019) of two representations ``X`` (n x p) and
``Y`` (n x q) of the same n inputs is::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T,  L = Y Y^T

It is 1 for representations that differ only by an orthogonal transform and an isotropic scaling, and
near 0 for unrelated ones. Two estimators:

- ``"unbiased"`` (default): the minibatch estimator of Nguyen et al. (2021, *Do wide and deep networks
  learn the same things?*). Every batch gives the unbiased HSIC estimate of Song et al. (2012), HSIC_1,
  for every pair of layers; the sums over batches are accumulated in float64 and CKA is their ratio. The
  memory is one ``n x n`` Gram matrix per layer and batch, whatever the number of images, and HSIC_1
  needs ``n >= 4`` images per batch.
- ``"biased"``: the plain estimator on all the images at once (what the MixtureGrowth paper's analysis
  did, on one batch of 200 images): features are kept for every image, so memory grows with the data.

Layers are named by module path (``layer1.0``: the module's output, through a forward hook) or by
``torch.fx`` node name (``add_3``: any intermediate value, through morph's tracer). Without names,
:func:`default_layers` picks the output of every block of the containers that hold residual blocks,
found from the traced graph (``layer1.0`` ... ``layer4.1`` of a ResNet), or every conv/linear layer of a
network without residual additions. Conv feature maps are flattened (``C*H*W`` features per image), or
averaged over their spatial positions with ``reduce="mean"``.

Models run in eval mode under ``torch.no_grad`` on their own device; each module's training flag is put
back and every hook removed afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import MorphError

__all__ = ["CKAResult", "cka", "cka_series", "default_layers", "hsic1", "layer_names", "linear_cka", "plot_cka"]

ESTIMATORS = ("unbiased", "biased")
REDUCTIONS = ("flatten", "mean")
PRESETS = ("blocks", "convs")

# Features kept by the biased estimator before it refuses (it needs every image's features at once).
_MAX_KEPT_BYTES = 8 * 2**30


# ----------------------------------------------------------------------------------------------
# The estimators on Gram matrices and features


def _zero_diagonal(k: torch.Tensor) -> torch.Tensor:
    return k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))


def _hsic1_matrix(ks: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of every pair: ``ks`` (A, n, n) and ``ls`` (B, n, n), Gram matrices with zero diagonals.

    HSIC_1(K, L) = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n(n-3))  (Song et al. 2012)
    """
    n = ks.shape[-1]
    trace = ks.reshape(ks.shape[0], -1) @ ls.reshape(ls.shape[0], -1).T  # tr(K L) = <K, L> (symmetric)
    rk, rl = ks.sum(-1), ls.sum(-1)  # K1, L1
    sk, sl = rk.sum(-1), rl.sum(-1)  # 1'K1, 1'L1
    return (trace + torch.outer(sk, sl) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl.T)) / (n * (n - 3))


def _hsic1_self(ks: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K, K) of each Gram matrix in ``ks`` (A, n, n), zero diagonals."""
    n = ks.shape[-1]
    rk = ks.sum(-1)
    sk = rk.sum(-1)
    return ((ks * ks).sum((-2, -1)) + sk * sk / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk * rk).sum(-1)) / (n * (n - 3))


def _gram(features: torch.Tensor) -> torch.Tensor:
    """Zero-diagonal linear Gram matrix (float64) of ``features`` (n x p), centered first: HSIC_1 does not
    change when every feature moves by a constant, and centering keeps large means from eating the
    float64 mantissa."""
    x = features.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    k = x @ x.T
    k.diagonal().zero_()
    return k


def _check_n(n: int, where: str) -> None:
    if n < 4:
        raise MorphError(
            f"{where} has {n} example{'s' * (n != 1)}; the unbiased HSIC estimator needs at least 4 per batch: "
            "use larger batches (and drop_last=True on a DataLoader), or estimator='biased'"
        )


def hsic1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimate (Song et al. 2012) of the linear kernels of ``x`` (n x p) and ``y`` (n x q),
    in float64.

    Raises:
        MorphError: fewer than 4 rows, or a different number of rows in ``x`` and ``y``.
    """
    if x.shape[0] != y.shape[0]:
        raise MorphError(f"x has {x.shape[0]} rows and y {y.shape[0]}; CKA compares representations of the same inputs")
    _check_n(x.shape[0], "the batch")
    return _hsic1_matrix(_gram(x.reshape(x.shape[0], -1))[None], _gram(y.reshape(y.shape[0], -1))[None])[0, 0]


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Linear CKA of two representations of the same inputs, ``x`` (n x ...) and ``y`` (n x ...), in float64.

    Args:
        x: features of n inputs (flattened after the first dimension).
        y: features of the same n inputs.
        estimator: ``"unbiased"`` (HSIC_1, n >= 4) or ``"biased"`` (centered Gram matrices).

    Raises:
        MorphError: an unknown estimator, different numbers of rows, or fewer than 4 rows (unbiased).
    """
    _choice("estimator", estimator, ESTIMATORS)
    if x.shape[0] != y.shape[0]:
        raise MorphError(f"x has {x.shape[0]} rows and y {y.shape[0]}; CKA compares representations of the same inputs")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if estimator == "biased":
        kx, ky = _centered_gram(x), _centered_gram(y)
        return (kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum())
    _check_n(x.shape[0], "the batch")
    kx, ky = _gram(x)[None], _gram(y)[None]
    return (_hsic1_matrix(kx, ky) / torch.sqrt(_hsic1_self(kx)[:, None] * _hsic1_self(ky)[None, :]))[0, 0]


def _centered_gram(features: torch.Tensor) -> torch.Tensor:
    x = features.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MorphError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------
# Layers


def _trace(model: nn.Module) -> fx.GraphModule:
    from .graph.trace import MorphTracer

    tracer = MorphTracer()
    was = _modes(model)
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise MorphError(
            f"torch.fx cannot trace {type(model).__name__} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "name layers by module path, which needs no tracing"
        ) from e
    finally:
        _restore_modes(model, was)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _is_residual_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(tensors) == 2


def _graph_order(gm: fx.GraphModule) -> list[str]:
    """Module paths in the order their first op runs."""
    from .graph.trace import node_qualname

    order: dict[str, None] = {}
    for node in gm.graph.nodes:
        path = node_qualname(node)
        parts = path.split(".") if path else []
        for i in range(1, len(parts) + 1):
            order.setdefault(".".join(parts[:i]), None)
    return list(order)


def default_layers(model: nn.Module, preset: str = "blocks") -> list[str]:
    """The layers :func:`cka` compares when none are named, as module paths in execution order.

    Args:
        model: any model.
        preset: ``"blocks"``: every child of each container that holds a residual block (a module whose
            forward adds two tensors), found from the traced graph: ``layer1.0`` ... ``layer4.1`` of a
            ResNet, ``features.0`` ... ``features.18`` of a MobileNetV2; a model without residual additions
            (or that fx cannot trace) gets ``"convs"``. ``"convs"``: every conv and linear layer.
    """
    _choice("preset", preset, PRESETS)
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if preset == "convs":
        return convs
    try:
        gm = _trace(model)
    except MorphError:
        return convs
    from .graph.trace import node_qualname

    blocks = {node_qualname(n) for n in gm.graph.nodes if _is_residual_add(n)} - {""}
    if not blocks:
        return convs
    parents = {b.rpartition(".")[0] for b in blocks}
    order = _graph_order(gm)
    layers = []
    for path in order:
        parent = path.rpartition(".")[0] if "." in path else ""
        if path in modules and (parent in parents) and path not in parents:
            layers.append(path)
    # a block whose parent is the model itself: the blocks alone
    return layers or [p for p in order if p in blocks]


def layer_names(model: nn.Module) -> dict[str, list[str]]:
    """Every name :func:`cka` accepts for ``model``: ``{"modules": [...], "nodes": [...]}`` (module paths,
    and fx node names when the model traces)."""
    out = {"modules": [n for n, _ in model.named_modules() if n], "nodes": []}
    try:
        out["nodes"] = [n.name for n in _trace(model).graph.nodes if n.op not in ("placeholder", "output")]
    except MorphError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# Running models


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _inputs(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise MorphError(
        f"batch {index} of the data is a {type(batch).__name__}; give an iterable of input tensors or of "
        "(inputs, targets) pairs, such as a DataLoader"
    )


def _reduce(value: Any, reduce: str, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MorphError(
            f"layer {name} gives a {type(value).__name__}, not a tensor; name a submodule or fx node that "
            "gives one tensor"
        )
    value = value.detach()
    if reduce == "mean" and value.dim() > 2:
        value = value.float().mean(dim=tuple(range(2, value.dim())))
    return value.reshape(value.shape[0], -1)


class _Taps:
    """Records the features of named layers of one model during forward passes.

    Module paths get forward hooks on the model; fx node names are read from a traced copy of its graph
    that returns them (a second forward pass, only when some names are node names). A context manager:
    hooks are removed and training flags restored on exit, whatever happens.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], reduce: str, which: str, keep: Callable[[torch.Tensor], Any]
    ) -> None:
        self.model, self.names, self.reduce, self.which, self.keep = model, list(names), reduce, which, keep
        modules = dict(model.named_modules())
        self.module_names = [n for n in self.names if n and n in modules]
        self.node_names = [n for n in self.names if n not in self.module_names]
        self.gm: fx.GraphModule | None = None
        if self.node_names:
            gm = _trace(model)
            nodes = {n.name: n for n in gm.graph.nodes}
            missing = [n for n in self.node_names if n not in nodes or nodes[n].op in ("placeholder", "output")]
            if missing:
                hint = ", ".join(default_layers(model)[:4])
                raise MorphError(
                    f"{missing[0]!r} is neither a module path nor an fx node name of {which} "
                    f"({type(model).__name__}); module paths look like {hint or 'layer1.0'}; "
                    f"morph.cka.layer_names(model) lists them all"
                )
            # return a copy of each tapped value, taken before a later in-place op (ReLU(inplace=True)) changes it
            copies = []
            for name in self.node_names:
                with gm.graph.inserting_after(nodes[name]):
                    copies.append(gm.graph.call_function(_copy, (nodes[name],)))
            out_node = next(n for n in gm.graph.nodes if n.op == "output")
            out_node.args = (tuple(copies),)
            gm.recompile()
            self.gm = gm
        self.modules = modules
        self.device = _device(model)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.handles: list[Any] = []
        self.values: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self) -> _Taps:
        self.modes = _modes(self.model)
        try:
            self.model.eval()
            for name in self.module_names:
                self.handles.append(self.modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.values.clear()
        _restore_modes(self.model, self.modes)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            # kept now: a later in-place op (ReLU(inplace=True)) may change the output tensor
            self.values[name] = self.keep(_reduce(output, self.reduce, name))

        return hook

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> list[Any]:
        """``keep(features)`` (features: n x p) of every named layer for inputs ``x``, in the order of ``names``."""
        dtype = self.dtype if x.is_floating_point() else None  # images in float32, a model in bf16/fp16
        x = x.to(self.device, dtype=dtype, non_blocking=True)
        self.values.clear()
        self.calls.clear()
        if self.module_names:
            self.model(x)
            for name in self.module_names:
                calls = self.calls.get(name, 0)
                if calls != 1:
                    what = "did not run" if calls == 0 else f"ran {calls} times"
                    raise MorphError(
                        f"layer {name} of {self.which} {what} in one forward pass; CKA needs one output per input: "
                        + ("name a module that runs" if calls == 0 else "name the fx node of the call you mean "
                           "(morph.cka.layer_names(model)['nodes'])")
                    )
        if self.gm is not None:
            for name, value in zip(self.node_names, self.gm(x), strict=True):
                self.values[name] = self.keep(_reduce(value, self.reduce, name))
        return [self.values[n] for n in self.names]


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _resolve(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return default_layers(model)
    if isinstance(layers, str):
        if layers in PRESETS:
            return default_layers(model, layers)
        layers = [layers]
    names = list(layers)
    if not names:
        raise MorphError("no layers to compare: name at least one, or pass None for the defaults")
    return names


def _batches(data: Iterable[Any], batches: int | None) -> Iterable[tuple[int, torch.Tensor]]:
    for i, batch in enumerate(data):
        if batches is not None and i >= batches:
            return
        yield i, _inputs(batch, i)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CKAResult:
    """A CKA matrix and what it compares.

    Attributes:
        matrix: ``len(layers_a) x len(layers_b)`` float64 CPU tensor; ``matrix[i, j]`` compares
            ``layers_a[i]`` with ``layers_b[j]`` (NaN where a layer's features are constant).
        layers_a: names of the rows.
        layers_b: names of the columns.
        estimator: ``"unbiased"`` (minibatch HSIC_1) or ``"biased"`` (all images at once).
        reduce: ``"flatten"`` or ``"mean"`` (spatial average of conv maps).
        images: images seen.
        batches: batches seen.
    """

    matrix: torch.Tensor
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    estimator: str = "unbiased"
    reduce: str = "flatten"
    images: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``layers_a``, ``layers_b``, ``matrix`` (NaN as None) and the settings."""
        matrix = [[None if v != v else v for v in row] for row in self.matrix.tolist()]
        return {
            "layers_a": list(self.layers_a), "layers_b": list(self.layers_b), "matrix": matrix,
            "estimator": self.estimator, "reduce": self.reduce, "images": self.images, "batches": self.batches,
        }


class _Accumulator:
    """Sums of HSIC_1 over batches (float64), or every image's features for the biased estimator."""

    def __init__(self, estimator: str) -> None:
        self.estimator = estimator
        self.ab: torch.Tensor | None = None
        self.aa: torch.Tensor | None = None
        self.bb: torch.Tensor | None = None
        self.kept_a: list[list[torch.Tensor]] = []
        self.kept_b: list[list[torch.Tensor]] = []
        self.kept_bytes = 0
        self.images = self.batches = 0

    def keep(self, features: torch.Tensor) -> torch.Tensor:
        """What a layer's features (n x p) leave for :meth:`add`: their zero-diagonal Gram matrix (unbiased),
        or a float32 CPU copy (biased)."""
        return _gram(features) if self.estimator == "unbiased" else features.float().cpu()

    def add(self, fa: list[torch.Tensor], fb: list[torch.Tensor] | None, n: int) -> None:
        """Add one batch of ``n`` images: :meth:`keep` of the row layers ``fa`` and of the column layers ``fb``
        (None: the same as the rows)."""
        self.images += n
        self.batches += 1
        if self.estimator == "biased":
            self._keep(fa, fb)
            return
        ka = torch.stack(fa)
        kb = ka if fb is None else torch.stack([k.to(ka.device) for k in fb])
        ab = _hsic1_matrix(ka, kb)
        aa = _hsic1_self(ka)
        bb = aa.clone() if fb is None else _hsic1_self(kb)
        if self.ab is None:
            self.ab, self.aa, self.bb = ab, aa, bb
        else:
            self.ab += ab
            self.aa += aa
            self.bb += bb

    def _keep(self, fa: list[torch.Tensor], fb: list[torch.Tensor] | None) -> None:
        for kept, feats in ((self.kept_a, fa), (self.kept_b, fb or [])):
            if not kept:
                kept.extend([] for _ in feats)
            for store, f in zip(kept, feats, strict=True):
                store.append(f.float().cpu())
                self.kept_bytes += f.numel() * 4
        if self.kept_bytes > _MAX_KEPT_BYTES:
            raise MorphError(
                f"the biased estimator keeps every image's features, over {_MAX_KEPT_BYTES // 2**30} GiB after "
                f"{self.images} images; use fewer images (batches=), reduce='mean', or the unbiased estimator"
            )

    def matrix(self, same: bool) -> torch.Tensor:
        if self.batches == 0:
            raise MorphError("the data gave no batch; CKA needs at least one")
        if self.estimator == "biased":
            ka = torch.stack([_centered_gram(torch.cat(fs)) for fs in self.kept_a])
            kb = ka if same else torch.stack([_centered_gram(torch.cat(fs)) for fs in self.kept_b])
            ab = ka.reshape(len(ka), -1) @ kb.reshape(len(kb), -1).T
            aa = (ka * ka).sum((-2, -1))
            bb = aa if same else (kb * kb).sum((-2, -1))
        else:
            ab, aa, bb = self.ab, self.aa, self.bb
        with torch.no_grad():
            denom = torch.sqrt(aa[:, None].clamp(min=0) * bb[None, :].clamp(min=0))
            m = torch.where(denom > 0, ab / denom, torch.full_like(ab, float("nan")))
        return m.cpu()


# ----------------------------------------------------------------------------------------------
# Public entry points


def cka(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    *,
    estimator: str = "unbiased",
    reduce: str = "flatten",
    batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CKAResult:
    """Linear CKA between layers of ``model_a`` (rows) and layers of ``model_b`` (columns).

    Both models see the same batches, in one pass over ``data``. ``model_b`` may be ``model_a`` (it then
    runs once per batch).

    Args:
        model_a: any ``nn.Module``; it runs in eval mode on its own device.
        model_b: another, or the same.
        data: an iterable of input tensors or of ``(inputs, targets)`` batches, such as a DataLoader.
        layers_a: module paths or fx node names of ``model_a``, a preset (``"blocks"``, ``"convs"``), or
            None for :func:`default_layers`.
        layers_b: the same for ``model_b`` (None: its defaults).
        estimator: ``"unbiased"`` (minibatch HSIC_1 accumulated in float64; batches of at least 4) or
            ``"biased"`` (all images at once; keeps every image's features).
        reduce: ``"flatten"`` conv maps, or average them over space (``"mean"``).
        batches: use at most this many batches of ``data``.
        progress: called with the number of batches done after each batch.

    Returns:
        A :class:`CKAResult`; ``result.matrix[i, j]`` compares ``layers_a[i]`` with ``layers_b[j]``.

    Raises:
        MorphError: an unknown layer name, a layer that gives no tensor or runs twice per forward pass, a
            batch of fewer than 4 inputs (unbiased), no data, or an untraceable model named by fx node.
    """
    _choice("estimator", estimator, ESTIMATORS)
    _choice("reduce", reduce, REDUCTIONS)
    names_a = _resolve(model_a, layers_a)
    same_model = model_b is model_a
    names_b = _resolve(model_b, layers_b)
    same = same_model and names_a == names_b
    acc = _Accumulator(estimator)
    union = list(dict.fromkeys(names_a + names_b))
    with contextlib.ExitStack() as stack:
        if same_model:
            taps_a = taps_b = stack.enter_context(_Taps(model_a, union, reduce, "the model", acc.keep))
        else:
            taps_a = stack.enter_context(_Taps(model_a, names_a, reduce, "model A", acc.keep))
            taps_b = stack.enter_context(_Taps(model_b, names_b, reduce, "model B", acc.keep))
        for i, x in _batches(data, batches):
            if estimator == "unbiased":
                _check_n(x.shape[0], f"batch {i}")
            if same_model:
                by_name = dict(zip(union, taps_a.run(x), strict=True))
                feats_a = [by_name[n] for n in names_a]
                feats_b = None if same else [by_name[n] for n in names_b]
            else:
                feats_a, feats_b = taps_a.run(x), taps_b.run(x)
            acc.add(feats_a, feats_b, x.shape[0])
            if progress is not None:
                progress(acc.batches)
    return CKAResult(acc.matrix(same), tuple(names_a), tuple(names_b), estimator, reduce, acc.images, acc.batches)


def cka_series(
    models: Sequence[nn.Module | Callable[[], nn.Module]],
    data: Iterable[Any],
    layer: str,
    labels: Sequence[str] | None = None,
    *,
    estimator: str = "unbiased",
    reduce: str = "flatten",
    batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CKAResult:
    """CKA of one layer across several models, such as the checkpoints of one training run (epoch x epoch).

    The models are run one at a time over the same data (``data`` is iterated once per model, so it must
    give the same batches every time: a DataLoader without shuffling); a zero-argument callable in
    ``models`` is called when its turn comes (to load checkpoints one at a time).

    Args:
        models: models, or callables that return them.
        data: an iterable of input tensors or ``(inputs, targets)`` batches, re-iterable in the same order.
        layer: module path or fx node name, the same in every model (widths may differ).
        labels: names of the models (default ``0``, ``1``, ...).
        estimator: ``"unbiased"`` or ``"biased"`` (see :func:`cka`).
        reduce: ``"flatten"`` or ``"mean"``.
        batches: use at most this many batches per model.
        progress: called after each batch with the number of batches done over all models.

    Returns:
        A square :class:`CKAResult` whose rows and columns are ``labels``.

    Raises:
        MorphError: as :func:`cka`, and when the data gives other batches on a later pass.
    """
    _choice("estimator", estimator, ESTIMATORS)
    _choice("reduce", reduce, REDUCTIONS)
    labels = [str(i) for i in range(len(models))] if labels is None else list(labels)
    if len(labels) != len(models) or not models:
        raise MorphError(f"{len(models)} models and {len(labels)} labels; give one label per model, and a model")
    grams: list[list[torch.Tensor]] = []  # per model, per batch (unbiased) or one centered Gram (biased)
    signature: list[tuple[int, float]] | None = None
    done = images = 0
    for k, entry in enumerate(models):
        model = entry if isinstance(entry, nn.Module) else entry()
        mine: list[tuple[int, float]] = []
        per_model: list[torch.Tensor] = []
        keep = (lambda f: _gram(f).cpu()) if estimator == "unbiased" else (lambda f: f.float().cpu())
        with _Taps(model, [layer], reduce, f"model {labels[k]}", keep) as taps:
            for i, x in _batches(data, batches):
                if estimator == "unbiased":
                    _check_n(x.shape[0], f"batch {i}")
                (kept,) = taps.run(x)
                per_model.append(kept)
                mine.append((x.shape[0], float(x.double().sum())))
                done += 1
                if progress is not None:
                    progress(done)
        if signature is None:
            signature = mine
            images = sum(n for n, _ in mine)
        elif [n for n, _ in mine] != [n for n, _ in signature] or not all(
            abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(mine, signature, strict=True)
        ):
            raise MorphError(
                f"the data gave other batches for model {labels[k]} than for model {labels[0]} (a shuffling "
                "DataLoader?); comparing models needs the same inputs in the same order: use shuffle=False"
            )
        if estimator == "biased":
            per_model = [_centered_gram(torch.cat(per_model))]
        grams.append(per_model)
        del model
    if not signature:
        raise MorphError("the data gave no batch; CKA needs at least one")
    e = len(models)
    ab = torch.zeros(e, e, dtype=torch.float64)
    for b in range(len(grams[0])):
        ks = torch.stack([g[b] for g in grams])
        ab += _hsic1_matrix(ks, ks) if estimator == "unbiased" else ks.reshape(e, -1) @ ks.reshape(e, -1).T
    diag = torch.diagonal(ab).clone()
    denom = torch.sqrt(diag[:, None].clamp(min=0) * diag[None, :].clamp(min=0))
    m = torch.where(denom > 0, ab / denom, torch.full_like(ab, float("nan")))
    return CKAResult(m, tuple(labels), tuple(labels), estimator, reduce, images, len(signature))


def plot_cka(
    result: CKAResult,
    path: Any,
    *,
    title: str | None = None,
    xlabel: str = "model B",
    ylabel: str = "model A",
    marks: Sequence[float] = (),
    mark_label: str | None = None,
) -> None:
    """Write ``result`` as a heatmap PNG: rows (``layers_a``) top to bottom, columns left to right, a colour
    bar from 0 to 1, and dashed lines at ``marks`` (positions between cells, e.g. a growth point)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = result.matrix.numpy()
    rows, cols = m.shape
    size = (min(4 + 0.32 * cols, 16), min(3.4 + 0.3 * rows, 16))
    fig, ax = plt.subplots(figsize=size, dpi=120)
    try:
        im = ax.imshow(m, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_xticks(range(cols), result.layers_b, rotation=90, fontsize=7)
        ax.set_yticks(range(rows), result.layers_a, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        for i, pos in enumerate(marks):
            ax.axvline(pos, color="cyan", lw=1.2, ls="--", label=mark_label if i == 0 else None)
            ax.axhline(pos, color="cyan", lw=1.2, ls="--")
        if marks and mark_label:
            ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        est = "unbiased minibatch" if result.estimator == "unbiased" else "biased"
        ax.set_title(title or f"linear CKA ({est}, {result.images:,} images)", fontsize=9)
        fig.colorbar(im, ax=ax, label="linear CKA", fraction=0.046, pad=0.04)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
