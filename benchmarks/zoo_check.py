"""One model through every morph pass, with the measurements the coverage table and the zoo test share.

``check_model(spec, input_size)`` builds the stock model and runs, in order (freeing each model as soon
as it is no longer needed, so that the largest torchvision models fit in memory):

1. ``analyze`` and ``scale_width(0.5)``: output shape;
2. ``convert(0.5)`` twice (two template sets) and once with ``share="consecutive"``: output shape;
   parameter counts against a prediction from layer shapes (:func:`predict_half_params`);
   ``bake(half)(x) == half(x)``; ``save``/``load`` is bit-exact;
3. FLOPs per image at the model's default input, the half model's weight generation amortized over a
   batch of 64 (``morph.flops(half, size, batch_size=64).per_image``), in float32 (FLOP counts do not
   depend on the dtype), with the original's FLOPs split by how they scale (:func:`flops_breakdown`);
4. ``fuse(a, b, init="zero")``: output shape, parameter count against :func:`predict_fused_params`,
   relative error against the ensemble ``(a(x) + b(x)) / 2``;
5. ``bake(fused)``: equals the fused model; its state dict loads with ``strict=True`` into
   ``morph.build_model(spec)`` and the stock model then computes the same function.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

import morph
from morph.graph.analyze import ChannelPlan, analyze, default_input_size
from morph.scale import layer_shapes

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
BATCH = 64  # training batch over which weight generation is amortized


@dataclass
class ZooResult:
    spec: str
    status: str = "ok"  # ok | error (a MorphError) | crash (any other exception)
    stage: str = ""  # the pass that failed
    error: str = ""
    dtype: str = ""
    input_size: tuple[int, ...] = ()
    output_shape_ok: bool = False
    # parameters
    params: int = 0  # original
    params_plain: int = 0  # scale_width(0.5)
    params_half: int = 0  # convert(0.5): templates + coefficients + the rest
    params_half_predicted: int = 0
    params_consecutive: int = 0  # convert(0.5, share="consecutive")
    params_consecutive_predicted: int = 0
    params_fused: int = 0
    params_fused_predicted: int = 0
    params_ratio: float = float("nan")  # half template model / original
    # FLOPs
    flops_input: tuple[int, ...] = ()
    flops: float = 0.0  # original, per image
    flops_half: float = 0.0  # half template model, per image at batch 64
    flops_ratio: float = float("nan")
    flops_plain_ratio: float = float("nan")  # scale_width(0.5) / original (no generation)
    share_dense: float = 0.0  # original FLOPs in convs/linears whose input and output both scale (x0.25)
    share_edge: float = 0.0  # stem and classifier: one side fixed (x0.5)
    share_grouped: float = 0.0  # depthwise / group-width-keeping convs (x0.5)
    share_other: float = 0.0  # norms, pooling, attention matmuls (x0.5 for norms and pooling)
    share_generation: float = 0.0  # weight generation / 64, relative to the original's FLOPs
    flops_expected: float = float("nan")  # 0.25 dense + 0.5 (edge + grouped + other) + generation
    # fusion and bake
    ensemble_relerr: float = float("nan")
    half_bake_relerr: float = float("nan")
    bake_relerr: float = float("nan")
    stock_relerr: float = float("nan")  # stock model with the baked weights vs the fused model
    strict_load: bool = False
    save_load_exact: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return asdict(self)


def relerr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = _first(x).double(), _first(y).double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def _first(y):
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _weighted(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape of every conv and linear (template-mixed ones: the tile shape); a stock
    ``nn.MultiheadAttention``'s packed ``in_proj_weight`` is the Linear ``<path>.in_proj`` morph makes of it."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED):
            out[name] = tuple(m.mix.tile_shape) if hasattr(m, "mix") else tuple(m.weight.shape)
        elif type(m) is nn.MultiheadAttention and m._parameters.get("in_proj_weight") is not None:
            out[f"{name}.in_proj" if name else "in_proj"] = tuple(m.in_proj_weight.shape)
    return out


def execution_order(gm: fx.GraphModule, model: nn.Module | None = None) -> list[str]:
    """Conv and linear module paths in the order the traced forward first calls them, or (``model`` given) first
    reads their weight for a function that applies it (torchvision's Swin attention: ``F.linear`` inside)."""
    mods = dict(gm.named_modules())
    seen: list[str] = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and model is not None and str(n.target).endswith(".weight"):
            path = str(n.target)[: -len(".weight")]
            try:
                owner = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(owner, _WEIGHTED) and path not in seen:
                seen.append(path)
            continue
        if n.op != "call_module":
            continue
        m = mods[str(n.target)]
        inner = [(str(n.target), m)] if isinstance(m, _WEIGHTED) else [  # a leaf holding layers (timm's ConvMlp)
            (f"{n.target}.{k}", c) for k, c in m.named_modules() if k and isinstance(c, _WEIGHTED)]
        seen += [k for k, _ in inner if k not in seen]
    return seen


def predict_half_params(plain: nn.Module, order: list[str], templates: int = 2, share: str = "none") -> int:
    """Parameters of ``convert(model, 0.5, templates, share)``, from the plain half model's shapes.

    Every parameter of ``scale_width(model, 0.5)`` stays, except conv/linear weights: each becomes one
    ``1 x K`` coefficient row, and each bank adds ``K x`` its weight shape. Banks: one per layer
    (``none``), or consecutive layers (in execution order) with equal weight shapes paired (``consecutive``).
    """
    shapes = _weighted(plain)
    n = _numel(plain) - sum(math.prod(s) for s in shapes.values())
    banks: list[list[str]] = []
    i = 0
    while i < len(order):
        if share == "consecutive" and i + 1 < len(order) and shapes[order[i]] == shapes[order[i + 1]]:
            banks.append(order[i : i + 2])
            i += 2
        else:
            banks.append([order[i]])
            i += 1
    for members in banks:
        n += templates * math.prod(shapes[members[0]])  # the bank
        n += templates * len(members)  # one coefficient vector per layer
    return n


def predict_fused_params(stock: nn.Module, half_shapes: dict[str, tuple[int, ...]], templates: int = 2) -> int:
    """Parameters of ``fuse(a, b)`` (``share="none"``), from the stock full model's and the half model's shapes.

    Every parameter of the stock model stays, except conv/linear weights: each layer keeps a's and b's
    banks (``2 K x`` the half weight) and gets ``K`` coefficients per tile of its grid, the grid being
    ``(full out / half out) x (full in-per-group / half in-per-group)``: 2x2, 2x1 (stem, depthwise and
    group-width-keeping convs), 1x2 (classifier) or 1x1.
    """
    full = _weighted(stock)
    n = _numel(stock) - sum(math.prod(s) for s in full.values())
    for name, hs in half_shapes.items():
        fs = full[name]
        rows, cols = fs[0] // hs[0], fs[1] // hs[1]
        n += 2 * templates * math.prod(hs) + rows * cols * templates
    return n


def flops_breakdown(model: nn.Module, plan: ChannelPlan, input_size: tuple[int, ...]) -> tuple[float, dict[str, float]]:
    """The original's FLOPs per image (fvcore) and their shares by how they scale at half width."""
    from fvcore.nn import FlopCountAnalysis

    from morph.flops import _sdpa_handle
    from morph.graph.mha import traceable

    model = traceable(model)  # nn.MultiheadAttention as morph.flops counts it: the plan's in_proj Linears
    p = next(iter(model.parameters()))
    # the attention products (_sdpa_handle), as morph.flops counts them for the half
    fca = FlopCountAnalysis(model.eval(), torch.zeros((1, *input_size), dtype=p.dtype))
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        total = float(fca.total())
    by_mod = fca.by_module()
    shapes = layer_shapes(plan, model, 0.5)
    share = {"dense": 0.0, "edge": 0.0, "grouped": 0.0}
    for lp in plan.conv_layers():
        f = float(by_mod.get(lp.name, 0))
        groups = getattr(model.get_submodule(lp.name), "groups", 1)
        if not (plan.scales(lp.in_dim) and plan.scales(lp.out_dim)):
            share["edge"] += f
        elif groups == 1 or not shapes[lp.name].constant_group_width:  # dense, or grouped keeping its group count
            share["dense"] += f
        else:
            share["grouped"] += f
    out = {k: v / total for k, v in share.items()} if total else share
    out["other"] = 1.0 - sum(out.values())
    return total, out


def _float32(model: nn.Module) -> nn.Module:
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _first(model.eval()(x))


def build_direct(spec: str, **kwargs) -> nn.Module:
    """``spec``'s model built the way users build it, by the library's own constructor, not through
    :func:`morph.build_model` (so it carries no morph spec): ``timm.create_model(NAME)`` or
    ``torchvision.models.get_model(NAME, weights=None)``."""
    source, name = spec.split("/", 1)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision.models as tvm

    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", True)
    return tvm.get_model(name, weights=None, **kwargs)


def attention_mode(spec: str) -> str:
    """How ``spec``'s attention changes width (``tests/zoo_list.py`` ``ATTENTION_WIDTH``; default: heads)."""
    try:
        from zoo_list import ATTENTION_WIDTH
    except ImportError:
        return "heads"
    return ATTENTION_WIDTH.get(spec, "heads")


def check_model(spec: str, input_size: tuple[int, ...], **kwargs) -> ZooResult:
    """:func:`_check_model` under the model's attention width mode (:func:`attention_mode`)."""
    from morph.graph.rules import attention_width

    with attention_width(attention_mode(spec)):
        return _check_model(spec, input_size, **kwargs)


def _check_model(spec: str, input_size: tuple[int, ...], *, dtype=torch.float64, flops_size=None,
                 tmpdir=None, templates: int = 2, direct: bool = False, full: bool = True) -> ZooResult:
    """Run every morph pass on ``spec``; a MorphError is recorded as ``status="error"``, anything else
    as ``status="crash"`` (a bug: morph must explain every failure with a MorphError).

    ``direct``: build the model (and the stock model the baked one must load into) with the library's
    own constructor (:func:`build_direct`) instead of :func:`morph.build_model`. ``full=False`` skips the
    FLOPs and the ``share="consecutive"`` conversion (the coverage script's directly built pass: neither
    depends on how the model was built)."""
    t0 = time.perf_counter()
    r = ZooResult(spec, dtype=str(dtype).replace("torch.", ""), input_size=tuple(input_size))
    build = (lambda **kw: build_direct(spec, **kw)) if direct else (lambda **kw: morph.build_model(spec, **kw))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    stage = "build"
    try:
        torch.manual_seed(0)
        m = build().eval()
        assert direct == (getattr(m, "morph_spec", None) is None)
        r.params = _numel(m)
        x = torch.randn(2, *input_size)
        y0 = _run(m, x)

        stage = "analyze"
        plan = analyze(m, input_size)
        order = execution_order(plan.gm, m)

        stage = "scale_width"
        plain = morph.scale_width(m, 0.5, plan=plan)
        shape_ok = _run(plain, x).shape == y0.shape
        r.params_plain = _numel(plain)

        stage = "convert"
        a = morph.convert(m, 0.5, templates, seed=1, plan=plan).eval()
        ya = _run(a, x)
        shape_ok &= ya.shape == y0.shape
        r.params_half = _numel(a)
        r.params_half_predicted = predict_half_params(plain, order, templates)
        r.params_ratio = r.params_half / r.params
        if full:
            c = morph.convert(m, 0.5, templates, share="consecutive", seed=3, plan=plan)
            r.params_consecutive = _numel(c)
            r.params_consecutive_predicted = predict_half_params(plain, order, templates, "consecutive")
            del c
        b = morph.convert(m, 0.5, templates, seed=2, plan=plan).eval()
        yb = _run(b, x)
        half_shapes = _weighted(a)

        stage = "flops"
        if full:
            flops_original(r, m, plan, plain, flops_size)
            del plain  # before the half's count copies it to float32: the largest models need the memory
            flops_half(r, a)
        else:
            del plain
        del m, plan
        gc.collect()

        stage = "bake(half)"
        r.half_bake_relerr = relerr(_run(morph.bake(a), x), ya)
        if tmpdir is not None:
            stage = "save/load"
            path = morph.save(a, f"{tmpdir}/{spec.replace('/', '_')}.safetensors")
            re = morph.load(path, model_fn=build if morph.read_info(path)[0].spec is None else None)
            r.save_load_exact = bool(torch.equal(_run(re, x), ya))
            del re
            path.unlink()

        stage = "fuse"
        f = morph.fuse(a, b, init="zero", seed=0, inplace=True).eval()
        yf = _run(f, x)
        shape_ok &= yf.shape == y0.shape
        r.ensemble_relerr = relerr(yf, (ya + yb) / 2)
        r.params_fused = _numel(f)

        stage = "bake(fused)"
        baked = morph.bake(f)
        r.bake_relerr = relerr(_run(baked, x), yf)
        del f, a, b
        sd = baked.state_dict()
        del baked
        gc.collect()

        stage = "strict load"
        stock = build()
        r.params_fused_predicted = predict_fused_params(stock, half_shapes, templates)
        stock.load_state_dict(sd, strict=True)
        r.strict_load = True
        del sd
        r.stock_relerr = relerr(_run(stock, x), yf)
        r.output_shape_ok = bool(shape_ok)
    except morph.MorphError as e:
        r.status, r.stage, r.error = "error", stage, str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - recorded, reported as a crash
        r.status, r.stage, r.error = "crash", stage, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        torch.set_default_dtype(old)
        r.seconds = time.perf_counter() - t0
    return r


FLOPS_FIELDS = ("flops_input", "flops", "flops_half", "flops_ratio", "flops_plain_ratio", "share_dense", "share_edge",
                "share_grouped", "share_other", "share_generation", "flops_expected")


def flops_original(r: ZooResult, m: nn.Module, plan: ChannelPlan, plain: nn.Module,
                   flops_size: tuple[int, ...] | None) -> None:
    """The FLOPs fields of ``r`` (:data:`FLOPS_FIELDS`) of the original ``m`` (analyzed as ``plan``) and its plain
    half ``plain``, per image at ``flops_size`` (default: the model's own input), in float32, the attention
    products (``scaled_dot_product_attention``) counted; :func:`flops_half` adds the half template model's."""
    fs = tuple(flops_size or default_input_size(m))
    r.flops_input = fs
    m32 = _float32(m)
    r.flops, shares = flops_breakdown(m32, plan, fs)
    del m32
    r.share_dense, r.share_edge, r.share_grouped, r.share_other = (shares[k] for k in ("dense", "edge", "grouped", "other"))
    r.flops_plain_ratio = morph.flops(_float32(plain), fs).per_image / r.flops


def flops_half(r: ZooResult, a: nn.Module) -> None:
    """The half template model's FLOPs per image (weight generation amortized over :data:`BATCH` images), its
    ratio to the original's (:func:`flops_original` first) and the breakdown's expected ratio."""
    fs = r.flops_input
    a32 = _float32(a)
    rep = morph.flops(a32, fs, batch_size=BATCH)
    del a32
    r.flops_half = rep.per_image
    r.flops_ratio = r.flops_half / r.flops
    r.share_generation = rep.generation / BATCH / r.flops
    r.flops_expected = 0.25 * r.share_dense + 0.5 * (r.share_edge + r.share_grouped + r.share_other) + r.share_generation


def check_flops(spec: str, input_size: tuple[int, ...], flops_size: tuple[int, ...] | None = None,
                templates: int = 2) -> dict:
    """Only the FLOPs fields of :func:`check_model`'s row (the same half: ``convert(0.5, templates)``), under the
    model's attention width mode, in float32 (counts do not depend on the dtype): ``{"status": "ok", field:
    value, ...}``, or the error as ``check_model`` records it."""
    from morph.graph.rules import attention_width

    t0 = time.perf_counter()
    r = ZooResult(spec, dtype="float32", input_size=tuple(input_size))
    stage = "build"
    try:
        with attention_width(attention_mode(spec)):
            torch.manual_seed(0)
            m = morph.build_model(spec).float().eval()
            stage = "analyze"
            plan = analyze(m, input_size)
            stage = "scale_width"
            plain = morph.scale_width(m, 0.5, plan=plan)
            stage = "convert"
            a = morph.convert(m, 0.5, templates, seed=1, plan=plan).eval()
            stage = "flops"
            flops_original(r, m, plan, plain, flops_size)
            flops_half(r, a)
    except morph.MorphError as e:
        return {"status": "error", "stage": stage, "error": str(e).splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - recorded, reported as a crash
        return {"status": "crash", "stage": stage, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    row = r.row()
    return {"status": "ok", **{k: row[k] for k in FLOPS_FIELDS}, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# growth methods
# ------------------------------------------------------------------------------------------------
GROWTH_METHODS = ("net2net", "random", "gradmax", "firefly")
PRESERVING = ("net2net", "random", "gradmax")  # function-preserving (random and gradmax at epsilon 0)


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Trained-looking norm statistics and affine parameters (fresh ones are 0/1 everywhere, which would
    make new identity channels look like old ones), and random weights for a Linear whose weight is all zero
    (timm zero-initializes the classifier heads of MLP-Mixer, ResMLP and gMLP: every output would be the bias,
    and no growth check could tell anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.numel() and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def sgd_in_backward(model, lr: float) -> list:
    """Plain SGD (no momentum, no weight decay) applied to each parameter as soon as backward has accumulated its
    gradient, which is then freed: the update of ``torch.optim.SGD(model.parameters(), lr)`` after
    ``loss.backward()``, bit for bit, without holding every gradient at once (regnet_y_128gf: 2.6 GB). Returns the
    hook handles (``.remove()`` them)."""
    def step(p):
        with torch.no_grad():
            p.add_(p.grad, alpha=-lr)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(step) for p in model.parameters() if p.requires_grad]


# the trains check's learning rate: the largest of the ladder at which the un-grown model trains without exploding
TRAINS_LR_LADDER = (0.1, 0.03, 0.01, 0.003)
TRAINS_LR_RISE = 2.0  # no loss of the steps (nor the one after them) above this many times the first step's


def sgd_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    """``steps`` plain SGD steps on ``(x, y)`` (cross-entropy on the first output, the mode ``model`` is in, the
    update of :func:`sgd_in_backward`), then one more forward: the loss at each step and after the last one."""
    import torch.nn.functional as F

    hooks = sgd_in_backward(model, lr)
    losses = []
    try:
        for i in range(steps + 1):
            o = model(x)
            loss = F.cross_entropy(_first(o), y)
            if i < steps:
                loss.backward()
            losses.append(float(loss.detach()))
            del o, loss
    finally:
        for h in hooks:
            h.remove()
    return losses


def choose_trains_lr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                     ladder: tuple[float, ...] = TRAINS_LR_LADDER, rise: float = TRAINS_LR_RISE) -> dict:
    """The trains check's learning rate for ``model``, the un-grown model: decided once, before any growth method
    runs, so that every method's grown model trains at the same lr and no grown model has a say in it. The largest
    lr of ``ladder`` at which ``steps`` plain SGD steps on a copy of ``model`` in train mode (:func:`sgd_losses`)
    keep every loss, at each step and after the last, finite and at most ``rise`` times the first step's loss (a
    loss that shoots up and comes back down is a net whose ReLUs went off, not one that trains);
    the smallest of ``ladder`` with ``stable`` false if none does. ``model`` is not changed, nor the global random
    state (dropout draws) that the methods' steps see. Returns ``{"lr", "stable", "losses": {str(lr): [...]}}``."""
    import gc

    tried: dict[str, list[float]] = {}
    for lr in ladder:
        m = copy.deepcopy(model).train()
        with torch.random.fork_rng(devices=[]):
            losses = sgd_losses(m, x, y, steps, lr)
        del m
        gc.collect()
        tried[repr(lr)] = losses
        if all(math.isfinite(v) and v <= rise * losses[0] for v in losses):
            return {"lr": lr, "stable": True, "losses": tried}
    return {"lr": ladder[-1], "stable": False, "losses": tried}


def _norms_train(model: nn.Module) -> None:
    """Eval mode except BatchNorm layers, which use batch statistics (dropout stays off: its masks depend on
    the width, so train mode with dropout is not a function of the input alone)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


def _old_entries_kept(grown: nn.Module, start: nn.Module) -> bool:
    """Every entry that ``grown.growth_record`` maps to an old entry is the same in ``grown`` and in ``start``
    (the same layout before Firefly's steps: ``random`` with Firefly's seed and epsilon). Old entries are
    compared with the assembled start, not with the small model, because replicated channels of
    LayerNorm-normalized groups divide old fan-out weights by their replica count."""
    ref_params = dict(start.named_parameters())
    for name, p in grown.named_parameters():
        for _, _, index in grown.growth_record.params.get(name, []):
            keep, ref = p.detach(), ref_params[name].detach()
            for d, i in enumerate(index):
                if i is not None:
                    sel = (i >= 0).nonzero().flatten()
                    keep, ref = keep.index_select(d, sel.to(keep.device)), ref.index_select(d, sel.to(ref.device))
            if not torch.equal(keep, ref):
                return False
    return True


def check_growth(spec: str, input_size: tuple[int, ...], **kwargs) -> dict:
    """:func:`_check_growth` under the model's attention width mode (:func:`attention_mode`)."""
    from morph.graph.rules import attention_width

    with attention_width(attention_mode(spec)):
        return _check_growth(spec, input_size, **kwargs)


def _check_growth(spec: str, input_size: tuple[int, ...], *, dtype=torch.float64, direct: bool = False,
                  methods: tuple[str, ...] = GROWTH_METHODS, firefly_steps: int = 5) -> dict:
    """Grow ``scale_width(model, 0.5)`` (norms randomized) back to full width with each method.

    Per method: ``eval`` / ``train`` = relative error of the grown model against the half (eval mode; train
    mode with batch statistics, BatchNorm models only); ``strict`` = the grown state dict loads with
    ``strict=True`` into the stock model; ``stock`` = that stock model's relative error against the grown one;
    firefly: ``old_kept`` (old entries untouched) and ``loss`` (its batch loss before and after its steps).
    A method that raises records ``status`` ``error`` (MorphError) or ``crash``."""
    build = (lambda: build_direct(spec)) if direct else (lambda: morph.build_model(spec))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    out: dict[str, dict] = {}
    try:
        torch.manual_seed(0)
        m = build().eval()
        half = morph.scale_width(m, 0.5, input_size=input_size).eval()
        del m
        randomize_norms(half)
        has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in half.modules())
        x = torch.randn(2, *input_size)
        y_half = _run(half, x)
        y = torch.randint(0, y_half.shape[-1], (2,))
        if has_bn:
            buffers = {k: v.clone() for k, v in half.named_buffers()}
            _norms_train(half)
            with torch.no_grad():
                y_half_train = _first(half(x))
            with torch.no_grad():  # back to the statistics before the train-mode pass
                for k, v in half.named_buffers():
                    v.copy_(buffers[k])
            half.eval()
        stock = build().eval()
        for method in methods:
            t0 = time.perf_counter()
            r: dict = {"status": "ok"}
            try:
                opts = {"steps": firefly_steps} if method == "firefly" else {}  # Firefly's own lr (1e-3)
                grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=input_size, **opts)
                if method == "firefly":
                    r["loss"] = [grown.growth_losses[0], grown.growth_losses[-1]]
                    r["fitted"] = len(grown.growth_losses) > 1  # False: every new channel a replica, no step
                    start = morph.grow(half, "firefly", 2.0, data=(x, y), seed=0, input_size=input_size, steps=0)
                    r["old_kept"] = _old_entries_kept(grown, start)
                    del start
                r["eval"] = relerr(_run(grown, x), y_half)
                if has_bn:
                    _norms_train(grown)
                    with torch.no_grad():
                        r["train"] = relerr(_first(grown(x)), y_half_train)
                    grown.eval()
                try:
                    stock.load_state_dict(grown.state_dict(), strict=True)
                    r["strict"] = True
                    r["stock"] = relerr(_run(stock, x), _run(grown, x))
                except RuntimeError as e:
                    r["strict"] = False
                    r["strict_error"] = str(e).splitlines()[0][:200]
                del grown
            except morph.MorphError as e:
                r = {"status": "error", "error": str(e).splitlines()[0][:300]}
            except Exception as e:  # noqa: BLE001 - recorded, reported as a crash
                r = {"status": "crash", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            r["seconds"] = time.perf_counter() - t0
            out[method] = r
            gc.collect()
    except morph.MorphError as e:
        out = {mth: {"status": "error", "error": str(e).splitlines()[0][:300]} for mth in methods}
    except Exception as e:  # noqa: BLE001
        out = {mth: {"status": "crash", "error": f"{type(e).__name__}: {e}"[:300]} for mth in methods}
    finally:
        torch.set_default_dtype(old)
    return out
