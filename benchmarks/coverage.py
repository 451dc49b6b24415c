"""Coverage table: every torchvision classification CNN and the timm family list through every morph pass.

Run (it takes a while; run it in the background)::

    nohup python benchmarks/coverage.py > coverage.log 2>&1 &
    python benchmarks/coverage.py --only timm/resnet10t torchvision/resnet18 --out /tmp/cov.md

Each model runs in its own subprocess (isolated memory, ``--timeout`` seconds, an address-space limit of
``--mem-gb``) through ``benchmarks/zoo_check.py``. Models under 30M parameters run in float64, larger
ones in float32. Rows are appended to ``<out>.json`` as they finish (``--resume`` skips models already
there); the markdown table is rewritten after every model, and a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/zoo_list.py: the model lists, shared with tests/test_zoo.py

from zoo_check import (  # noqa: E402
    FLOPS_FIELDS,
    GROWTH_METHODS,
    PRESERVING,
    TRAINS_LR_LADDER,
    TRAINS_LR_RISE,
    choose_trains_lr,
    sgd_in_backward,
)
from zoo_list import (  # noqa: E402
    FLOPS_DEVIATIONS,
    NOT_BLOCKWISE,
    TIMM_CI,
    TIMM_MODELS,
    TORCHVISION_MODELS,
    all_specs,
    flops_input_size,
    spec_input_size,
)

FLOAT64_MAX_PARAMS = 30e6
# models that cannot run in float64: torchvision builds Swin-V2's relative coordinate table (a buffer its
# position-bias MLP reads) in float32 whatever the default dtype, and a state_dict load keeps that dtype
FLOAT32_SPECS = ("torchvision/swin_v2_t", "torchvision/swin_v2_s", "torchvision/swin_v2_b")
LAST = ("torchvision/regnet_y_128gf",)
TOL = 1e-5
PARTS = ("main", "direct", "growth", "trains")
PART_KEY = {"lr": "trains_lr_rule", "flops": "flops_rerun"}  # parts whose row key is not their name  # check_model via morph.build_model; the same built directly;
# growth methods (function); the grown models train (new rows move)
GROWTH_TOL = {"float64": 1e-6, "float32": 1e-4}
TRAINS_STEPS, TRAINS_BATCH = 3, 4
TRAINS_LR_BEFORE = 0.1  # the lr of every trains row run before the rule (rows without "trains_lr")
# why a model's grown neurons do not train (the "trains" section lists every failure with this, or "not investigated")
TRAINS_NOTES = {
    "timm/nf_regnet_b0": "squeeze-excitation gate rows that moved less than 1e-12 of their layer's norm: the stock init sets "
                         "every block's last ScaledStdConv2d gain to 0 (the coverage check does not randomize it), so the "
                         "residual branches get almost no gradient (old rows of those layers move ~1e-11 in 3 steps) and a "
                         "gate row, whose gradient is its gated new channel's value, follows at 1e-13 to 1e-25; with those "
                         "gains drawn from U[0.5, 1.5] 363 gate rows remain (random), at 1e-13 (growth keeps the function since "
                         "morph.growth re-standardizes the grown filters: 3e-15 in float64)",
    "torchvision/regnet_y_1_6gf": "squeeze-excitation gate rows of new channels of block1: a gate row's gradient is its "
                                  "gated channel's value times its upstream gradient, and those channels are still exactly "
                                  "zero at steps 1 and 2. Measured in block1-0: the first step moves a new channel's "
                                  "BatchNorm bias (a.1) by up to 1.0 while the channel's scale is new_gamma 0.1 (the "
                                  "channel sits at the ReLU's kink and its bias gets the whole upstream sum), so a channel "
                                  "whose bias went negative is off everywhere at step 1 (3 of 24 with 4 images, 15 of 24 "
                                  "with 8) and everything behind it stays zero. Same draws, random: new_gamma 1.0 "
                                  "(growneuron's identity norm) leaves none but the loss ends at 30.6 (9.4 with 0.1); at lr "
                                  "0.03 none stays zero for random or gradmax (loss 6.95 -> 3.0, 2.4); the lr rule keeps 0.1 "
                                  "(the half: 6.95 -> 7.99 in 3 steps, within 2x)",
    "torchvision/alexnet": "1 of 2048 new rows of classifier.1 (random only): the Dropout(0.5) after it dropped that neuron "
                           "on all 4 images at all 3 steps; expected 2048 x 2^-12 = 0.5 such rows (a zero-incoming neuron "
                           "sits at the ReLU's kink and trains at the first step dropout keeps it)",
    "torchvision/regnet_y_16gf": "223 of 224 new rows of one squeeze-excitation gate (block2-2's se.fc2), whose gradient is "
                                 "the gated new channel of conv b's value: those channels never turn on. Replayed with the "
                                 "check's draws (random; gradmax grows these groups the same way): at step 0 every new channel "
                                 "of the block's conv a (f.a, 224) is 0 and its BatchNorm bias (f.a.1) gets the whole upstream "
                                 "sum, of the same sign for all 224 (positive, |g| median 4.7, max 5.4), so the step moves every one down "
                                 "(lr 0.1: to -0.40 ... -0.54; lr 0.03: -0.12 ... -0.16) against the new scale 0.1 (new_gamma): "
                                 "at step 1 all 224 are below 0 at every position, off behind the ReLU, and their bias gets no "
                                 "gradient again (0 at steps 1, 2). Conv b's new channels then see zero input, so their BatchNorm "
                                 "output is their bias, which step 0 moved down for 223 of 224 (by at most 0.007): 223 stay off and "
                                 "their gate rows get no gradient. The sign is shared by a block's new channels, not always bad: in "
                                 "regnet_y_1_6gf's block1-1 all 24 get a negative gradient (biases up, channels on). Neither lr "
                                 "0.03 (the same 223) nor new_gamma 1.0 (295, loss 60.8) clears it; the lr rule keeps 0.1 (the "
                                 "half: 7.12 -> 9.29)",
    "torchvision/efficientnet_b7": "1 of 114280 rows (gradmax only), the same count and losses when rerun with gradmax's "
                                   "rank cut at the activations' precision (the change that cleared convnext_large's 3 gradmax "
                                   "rows, same lr 0.1, bit-identical losses); a draw of the train-mode randomness: the model has "
                                   "StochasticDepth (55 blocks, p up to 0.196) and Dropout(0.5), and gradmax replayed alone (the "
                                   "same half, batch and lr, without the other methods' draws before it) leaves no row zero (loss 7.10 -> 7.79, the check's 7.22 -> 5.42); not traced per layer",
    "torchvision/vgg11": "5 of 5472 rows (random only) at lr 0.01 (the half's 3 steps at 0.1 go 6.87 -> 1.4e15, at "
                         "0.03 to 21.1), all in the classifier: 4 of classifier.0's 2048 new rows and 1 of classifier.3's, "
                         "each layer followed by ReLU and Dropout(0.5). Replaying the check (same draws), those rows' "
                         "gradient norm is 0 in float32 at all 3 steps (every entry exactly 0 at 2 of them); random's grown "
                         "model's loss rises 6.89 -> 6.14 -> 72 at the lr where the half's falls (6.87 -> 5.81); dropout "
                         "alone would leave 2^-12 x 4096 = 1 such row expected (as on alexnet); not traced further",
    **{f"torchvision/{n}": f"{counts} at lr {lr} (the rule's: the half's 3 steps at 0.1 diverge, {half}); the grown "
                           f"{which} model's loss rises at that lr ({rise}) where the half's stays within 2x (half loss "
                           "column); not traced per layer (vgg11's are classifier rows behind Dropout)"
       for n, counts, lr, half, which, rise in (
           ("vgg11_bn", "2 of 5472 rows (random only)", "0.01", "7.42 -> 4.9e7", "random", "7.59 -> 93; gradmax's "
            "6.92 -> 131 with no zero row"),
           ("vgg13", "1 of 5568 rows (random only)", "0.03", "6.87 -> 2.3e12", "random", "6.92 -> 21"),
           ("vgg13_bn", "1 (random) and 1 (gradmax) of 5568 rows", "0.01", "6.73 -> 3.2e7", "random and gradmax",
            "6.67 -> 284, 7.14 -> 117"),
           ("vgg16_bn", "1 of 6208 rows (random only)", "0.01", "7.03 -> 1.1e8", "random", "8.13 -> 151; gradmax's "
            "7.81 -> 160 with no zero row"),
           ("vgg19", "1 of 6848 rows (gradmax only)", "0.03", "6.94 -> 6.9e29", "gradmax", "6.92 -> 3.7e4"),
           ("vgg19_bn", "1 (random) and 3 (gradmax) of 6848 rows", "0.01", "7.53 -> 1.2e8", "random and gradmax",
            "7.27 -> 520, 7.10 -> 199"),
       )},
    "torchvision/vgg16": "1 of 6208 rows (random only) at lr 0.01 (the rule's: the half's 3 steps at 0.1 diverge, 6.91 -> "
                         "4.4e29); here every method's loss falls at that lr (random 7.01 -> 6.69); not traced per layer "
                         "(vgg11's are classifier rows behind Dropout)",
    "torchvision/regnet_y_32gf": "651 (random) and 644 (gradmax) of 54337 rows at the rule's lr 0.03 (at the old fixed 0.1: "
                                 "1483 and 1492, loss 6.98 -> 10.82; the half's 3 steps at 0.1 go 6.98 -> 15.9): as "
                                 "regnet_y_16gf, one squeeze-excitation gate, block3-0's se.fc2 (random: 651 of its 696 new "
                                 "rows, replayed with the check's draws). At step 0 the BatchNorm bias of every new channel of "
                                 "the block's conv a (f.a.1) gets a positive gradient (696 of 696; |g| median 5.8, max 6.2), the "
                                 "step moves them to -0.16 ... -0.19 against the new scale 0.1, and all 696 are off (0 at every "
                                 "position behind the ReLU) from step 1 on, their bias gradient 0; conv b's new channels, with "
                                 "zero input, output their bias, which step 0 moved below 0 for 651: off, and their gate rows get "
                                 "no gradient",
    "timm/legacy_seresnet18": "a squeeze-excitation gate row (layer4.1.se_module.fc2) whose gradient, the gated new "
                              "channel's value times its upstream gradient over 2x2 positions x 4 images, summed against the "
                              "SE bottleneck's sparse ReLU units, is exactly 0 at all 3 steps (0 at the first by "
                              "construction: the gated channel is 0); with 8 images no row stays zero; which row and method "
                              "it hits changes with the random draws",
}


def rows_near(new, old, tol: float, k: int = 32) -> int:
    """How many rows of ``new`` lie within ``tol`` (Euclidean distance) of some row of ``old``: the count of
    ``cdist(new, old).min(1) <= tol``, without measuring every pair in full (2048 x 2048 rows of 25088 entries,
    VGG's first classifier layer, take minutes). A pair is measured exactly only where it is within ``tol`` in a
    random ``k``-dimensional orthonormal projection, which never lengthens a difference (plus a rounding margin
    of 1e-12 of the largest row norm): a pair farther apart there is farther apart in full."""
    import torch

    if new.shape[1] <= k:
        return int((torch.cdist(new, old, compute_mode="donot_use_mm_for_euclid_dist").min(1).values <= tol).sum())
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(new.shape[1], k, generator=g, dtype=new.dtype))
    slack = 1e-12 * float(torch.cat([new.norm(dim=1), old.norm(dim=1)]).max())
    near = torch.cdist(new @ q, old @ q, compute_mode="donot_use_mm_for_euclid_dist") <= tol + slack
    i, j = near.nonzero(as_tuple=True)
    hit = torch.zeros(new.shape[0], dtype=torch.bool)
    step = max(1, 2**22 // new.shape[1])
    for s in range(0, len(i), step):
        ii, jj = i[s:s + step], j[s:s + step]
        hit[ii[(new[ii] - old[jj]).norm(dim=1) <= tol]] = True
    return int(hit.sum())


def _train_grown(half, method: str, x, y, input_size, steps: int, lr: float, opts: dict) -> dict:
    """One method of :func:`check_trains`: grow, train, count. Its tensors are freed when it returns (the next
    method's growth must not find the previous grown model and its copies still in memory)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import morph

    grown = morph.grow(half, method, 2.0, data=(x, y), seed=0, input_size=input_size, **opts)
    masks = {}
    for k, entries in grown.growth_record.params.items():
        mod = grown.get_submodule(k.rpartition(".")[0]) if "." in k else grown
        rows = entries[0][2][0] if entries[0][2] else None
        if (k.endswith("weight") and isinstance(mod, (nn.Conv2d, nn.Linear)) and rows is not None
                and not getattr(mod, "transposed", False) and (rows < 0).any()):
            masks[k] = rows < 0
    # the old rows before the steps (only they are compared with)
    before = {k: v.detach().flatten(1)[~masks[k]].clone() for k, v in grown.state_dict().items() if k in masks}
    grown.train()
    hooks = sgd_in_backward(grown, lr)
    losses = []
    for _ in range(steps):
        o = grown(x)
        loss = F.cross_entropy(o[0] if isinstance(o, (tuple, list)) else o, y)
        loss.backward()
        losses.append(float(loss.detach()))
        del o, loss
    for h in hooks:
        h.remove()
    sd = grown.state_dict()
    total = zero = same = 0
    for k, new in masks.items():
        w = sd[k].detach().flatten(1).double()
        ref = w[~new].norm(dim=1).mean() if (~new).any() else w.norm(dim=1).mean()
        old, old0 = w[~new], before.pop(k).double()
        moved = (old - old0).norm(dim=1) > 1e-4 * ref
        if (~new).any() and torch.equal(old, old0):
            continue  # a layer the loss does not reach (an auxiliary head in train mode)
        total += int(new.sum())
        zero += int((w[new].norm(dim=1) <= 1e-12 * ref).sum())
        if moved.any():  # a replica of a neuron that got no gradient cannot part from it
            same += rows_near(w[new], old[moved], float(1e-6 * ref))
    lv = getattr(grown, "growth_liveness", {"live": {}, "chained_norms": []})
    return {"status": "ok", "rows": total, "zero": zero, "replica": same, "loss": [losses[0], losses[-1]],
            "layers": len(masks), "live": len(lv["live"]), "chained_norms": len(lv["chained_norms"])}


def check_trains(spec: str, input_size: tuple[int, ...], methods: tuple[str, ...] = GROWTH_METHODS,
                 steps: int = TRAINS_STEPS, lr: float | None = None, firefly_steps: int = 5) -> tuple[dict, dict | None]:
    """Do the grown models train? ``scale_width(model, 0.5)`` (norms randomized) grown back with each method's
    defaults and trained (:func:`trains_of`), on a batch of ``TRAINS_BATCH`` random images at ``input_size`` and
    random labels. Returns ``(per method, the lr record)``; a model that cannot be built or scaled records
    ``status`` ``error`` (MorphError) or ``crash`` for every method, and no lr record."""
    import morph

    try:
        half, x, y = trains_setup(spec, input_size)
        return trains_of(half, x, y, input_size, methods, steps, lr, firefly_steps)
    except morph.MorphError as e:
        return {m: {"status": "error", "error": str(e).splitlines()[0][:300]} for m in methods}, None
    except Exception as e:  # noqa: BLE001
        return {m: {"status": "crash", "error": f"{type(e).__name__}: {e}"[:300]} for m in methods}, None


def trains_setup(spec: str, input_size: tuple[int, ...]):
    """The trains check's un-grown model and batch: ``scale_width(model, 0.5)`` with randomized norms (eval mode),
    ``TRAINS_BATCH`` random images at ``input_size`` and random labels, all drawn from seed 0."""
    import torch
    from zoo_check import attention_mode, randomize_norms

    import morph
    from morph.graph import attention_width

    torch.manual_seed(0)
    with attention_width(attention_mode(spec)):  # the half records it: growth analyzes it the same way
        half = morph.scale_width(morph.build_model(spec), 0.5, input_size=input_size).eval()
    randomize_norms(half)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((TRAINS_BATCH, *input_size), generator=g)
    with torch.no_grad():
        out_half = half(x)
    classes = (out_half[0] if isinstance(out_half, (tuple, list)) else out_half).shape[-1]
    del out_half
    y = torch.randint(0, classes, (TRAINS_BATCH,), generator=g)
    return half, x, y


def trains_of(half, x, y, input_size: tuple[int, ...], methods: tuple[str, ...] = GROWTH_METHODS,
              steps: int = TRAINS_STEPS, lr: float | None = None, firefly_steps: int = 5) -> tuple[dict, dict]:
    """The trains check on the un-grown model ``half`` (eval mode) and the batch ``(x, y)``. First the learning
    rate, once per model and the same for every method: ``lr``, or where it is None the rule of
    :func:`zoo_check.choose_trains_lr` (the largest of ``TRAINS_LR_LADDER`` at which ``steps`` SGD steps of ``half``
    itself, no growth, keep every loss finite and within ``TRAINS_LR_RISE`` times the first). Then per method: grow
    ``half`` back to twice its width (``morph.grow(half, method, 2.0, data=(x, y), seed=0)``), ``steps`` plain
    SGD steps at that lr (float32, train mode). Per method: ``lr``; ``rows`` = new output rows (fresh or replica)
    of conv/linear layers whose old rows moved (layers the loss reaches: not auxiliary heads, whose outputs the
    first output leaves out), ``zero`` = those still exactly zero, ``replica`` = those still equal (to 1e-6 of the
    old rows' mean norm) to an old row of their layer that moved by more than 1e-4 of it during the steps (the
    replica of a neuron that got no gradient cannot part; float32 rounding must not pass for parting), ``loss`` =
    the training loss at the first and the last step. A method that raises records ``status`` ``error``
    (MorphError) or ``crash``. The SGD step runs inside backward (:func:`sgd_in_backward`) and only the old rows
    are kept for the comparison, so that regnet_y_128gf's grown model trains within 12 GB. Returns ``(per method,
    the lr record)``: ``{"lr", "stable", "losses": {lr: the un-grown model's losses}, "seconds"}`` (``"fixed":
    True`` and no losses when ``lr`` was given)."""
    import gc

    import morph

    t0 = time.perf_counter()
    rec = ({"lr": lr, "fixed": True} if lr is not None else choose_trains_lr(half, x, y, steps))
    rec["seconds"] = time.perf_counter() - t0
    out: dict[str, dict] = {}
    for method in methods:
        t0 = time.perf_counter()
        try:
            opts = {"steps": firefly_steps} if method == "firefly" else {}
            r = _train_grown(half, method, x, y, input_size, steps, rec["lr"], opts)
        except morph.MorphError as e:
            r = {"status": "error", "error": str(e).splitlines()[0][:300]}
        except Exception as e:  # noqa: BLE001 - recorded, reported as a crash
            r = {"status": "crash", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        r["lr"] = rec["lr"]
        r["seconds"] = time.perf_counter() - t0
        out[method] = r
        gc.collect()
    return out, rec


def trains_verdict(r: dict, method: str) -> str:
    """The grown model trains: after the SGD steps no new row is still zero or still a replica, the loss finite."""
    t = r.get("trains", {}).get(method)
    if t is None:
        return "—"
    if t["status"] != "ok":
        return f"**{t['status']}**: {t['error'][:70]}"
    bad = []
    if t["zero"]:
        bad.append(f"{t['zero']}/{t['rows']} rows zero")
    if t["replica"]:
        bad.append(f"{t['replica']}/{t['rows']} replicas")
    if not all(math.isfinite(v) for v in t["loss"]):
        bad.append("loss not finite")
    if not t["rows"]:
        bad.append("no new rows")
    return "yes" if not bad else "**no**: " + ", ".join(bad)


def growth_verdict(r: dict, method: str) -> str:
    """A growth method on the half of ``r``'s model: function kept (net2net, random and gradmax at epsilon 0;
    eval mode, and train mode for BatchNorm models), strict load into the stock model with the same outputs;
    firefly: old entries untouched and its batch loss lowered."""
    g = r.get("growth", {}).get(method)
    if g is None:
        return "—"
    if g["status"] != "ok":
        return f"**{g['status']}**: {g['error'][:70]}"
    tol = GROWTH_TOL[r.get("growth_dtype", "float64")]
    bad = []
    if method == "firefly" and not g.get("fitted", True):
        # nothing fresh to fit (every new channel replicates an old one): the function must be kept instead
        if not g["old_kept"]:
            bad.append("old entries changed")
        if not g["eval"] <= tol:
            bad.append(f"relerr {g['eval']:.0e} with nothing to fit")
    elif method == "firefly":
        if not g["old_kept"]:
            bad.append("old entries changed")
        if not g["loss"][1] < g["loss"][0]:
            bad.append("loss not lowered")
    else:
        err = max(g["eval"], g.get("train", 0.0))
        if not err <= tol:
            bad.append(f"relerr {err:.0e}")
    if not g.get("strict"):
        bad.append("strict load")
    elif not g["stock"] <= TOL:
        bad.append("stock output")
    return "yes" if not bad else "**no**: " + ", ".join(bad)


def _child(spec: str, mem_gb: float, threads: int = 1, parts: tuple[str, ...] = PARTS) -> None:
    if mem_gb > 0:  # fail with an allocation error instead of waking the OOM killer
        lim = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import tempfile

    import torch
    from zoo_check import check_flops, check_growth, check_model

    import morph

    torch.set_num_threads(threads)
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in morph.build_model(spec).parameters())
    except Exception:  # constructors that compute on tensors (torchvision regnet)
        n = sum(p.numel() for p in morph.build_model(spec).parameters())
    dtype = torch.float64 if n < FLOAT64_MAX_PARAMS and spec not in FLOAT32_SPECS else torch.float32
    row: dict = {}
    if "main" in parts:
        with tempfile.TemporaryDirectory() as d:
            r = check_model(spec, spec_input_size(spec), dtype=dtype, flops_size=flops_input_size(spec), tmpdir=d)
        row = r.row()
        del r
    if "direct" in parts:
        with tempfile.TemporaryDirectory() as d:  # the same model built by the library's own constructor
            rd = check_model(spec, spec_input_size(spec), dtype=dtype, flops_size=flops_input_size(spec), tmpdir=d,
                             direct=True, full=False)
        row["direct"] = {k: getattr(rd, k) for k in ("status", "stage", "error", "strict_load", "stock_relerr",
                                                    "ensemble_relerr", "save_load_exact", "bake_relerr", "seconds")}
        del rd
    if "flops" in parts:  # only the FLOPs fields of the main part (rerun: the attention products counted since)
        f = check_flops(spec, spec_input_size(spec), flops_input_size(spec))
        if f["status"] == "ok":
            row.update({k: f[k] for k in FLOPS_FIELDS})
        row["flops_rerun"] = {k: v for k, v in f.items() if k not in FLOPS_FIELDS}
    if "growth" in parts:
        row["growth"] = check_growth(spec, spec_input_size(spec), dtype=dtype)
        row["growth_dtype"] = str(dtype).replace("torch.", "")
    if "trains" in parts:
        row["trains"], row["trains_lr"] = check_trains(spec, spec_input_size(spec))
    if "lr" in parts:  # only the rule's lr, for a row whose trains part ran before the rule (at TRAINS_LR_BEFORE)
        try:
            t0 = time.perf_counter()
            rec = choose_trains_lr(*trains_setup(spec, spec_input_size(spec)), TRAINS_STEPS)
            rec["seconds"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded
            rec = {"status": "crash", "error": f"{type(e).__name__}: {e}"[:300]}
        row["trains_lr_rule"] = rec
    print("RESULT " + json.dumps(row), flush=True)


def direct_verdict(r: dict) -> str:
    """The directly built path: every check of the morph.build_model path holds the same way."""
    d = r.get("direct")
    if d is None:
        return "—"
    if d["status"] != "ok":
        return f"**{d['status']}** ({d['stage']}): {d['error'][:80]}" if r["status"] == "ok" else "same error"
    bad = []
    if not (d["strict_load"] and d["stock_relerr"] <= TOL):
        bad.append("strict load")
    if not d["save_load_exact"]:
        bad.append("save/load")
    if d["bake_relerr"] > TOL:
        bad.append("bake")
    if (d["ensemble_relerr"] <= TOL) != (r["ensemble_relerr"] <= TOL):
        bad.append("ensemble differs")
    return "yes" if not bad else "**no**: " + ", ".join(bad)


# ------------------------------------------------------------------------------------------------
# judging a row
# ------------------------------------------------------------------------------------------------
def family(spec: str) -> str:
    src, name = spec.split("/", 1)
    if src == "timm":
        for fam, n in TIMM_MODELS.items():
            if n == name:
                return fam
        return "(extra)"
    return ""


def failed_checks(r: dict) -> list[str]:
    """Invariants that do not hold for a row whose passes all ran."""
    bad = []
    if not r["output_shape_ok"]:
        bad.append("output shape")
    for k in ("half", "consecutive", "fused"):
        if r[f"params_{k}"] != r[f"params_{k}_predicted"]:
            bad.append(f"params {k} {r[f'params_{k}']} != predicted {r[f'params_{k}_predicted']}")
    if not (r["half_bake_relerr"] <= TOL and r["bake_relerr"] <= TOL):
        bad.append("bake != template model")
    if not r["save_load_exact"]:
        bad.append("save/load not bit-exact")
    if not (r["strict_load"] and r["stock_relerr"] <= TOL):
        bad.append("stock model with baked weights differs")
    exact = r["ensemble_relerr"] <= TOL
    if exact == (r["spec"] in NOT_BLOCKWISE):
        bad.append("ensemble exact but listed NOT_BLOCKWISE" if exact else "ensemble not exact and not in NOT_BLOCKWISE")
    dev = abs(r["flops_ratio"] - 0.25) > 0.03
    if dev != (r["spec"] in FLOPS_DEVIATIONS):
        bad.append("FLOPs deviate, not in FLOPS_DEVIATIONS" if dev else "FLOPs within 0.25 +- 0.03 but listed")
    if dev and abs(r["flops_ratio"] - r["flops_expected"]) > 0.03:
        bad.append("FLOPs ratio off the breakdown's prediction")
    return bad


def _f(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _cell(s: str) -> str:
    return s.replace("|", "/").replace("\n", " ")


def write_table(rows: list[dict], out: Path, seconds: float) -> dict:
    tv = [r for r in rows if r["spec"].startswith("torchvision/")]
    tm = [r for r in rows if r["spec"].startswith("timm/") and family(r["spec"]) != "(extra)"]
    ex = [r for r in rows if family(r["spec"]) == "(extra)"]
    ok = lambda rs: [r for r in rs if r["status"] == "ok"]  # noqa: E731
    clean = lambda rs: [r for r in ok(rs) if not failed_checks(r)]  # noqa: E731
    conv_ok = lambda rs: [r for r in rs if r["status"] == "ok" or r.get("stage") not in ("build", "analyze", "scale_width", "convert", "")]  # noqa: E731
    exact = [r for r in ok(rows) if r["ensemble_relerr"] <= TOL]
    summary = {
        "torchvision": f"{len(ok(tv))}/{len(tv)}", "timm_families": f"{len(ok(tm))}/{len(tm)}",
        "timm_extra": f"{len(ok(ex))}/{len(ex)}", "convert_and_scale": f"{len(conv_ok(rows))}/{len(rows)}",
        "all_checks": f"{len(clean(rows))}/{len(rows)}", "ensemble_exact": f"{len(exact)}/{len(ok(rows))}",
        "direct_same": f"{len([r for r in ok(rows) if direct_verdict(r) == 'yes'])}/"
                       f"{len([r for r in ok(rows) if 'direct' in r])}",
    }
    dense = [r["flops_ratio"] for r in ok(rows) if r["spec"] not in FLOPS_DEVIATIONS]
    lines = [
        "# Coverage",
        "",
        "Generated by `python benchmarks/coverage.py` (CPU, one subprocess per model, "
        f"{seconds / 60:.0f} min). Models: every torchvision classification CNN",
        "(`torchvision.models.list_models(module=torchvision.models)` without ViT, Swin and MaxViT) and one model per",
        "timm CNN family (`tests/zoo_list.py`: `TIMM_MODELS`, the smallest variant of the family that can be fused",
        "back into its stock architecture), plus `TIMM_EXTRA`. `tests/test_zoo.py` runs the CI subset",
        "(`TORCHVISION_MODELS`, `TIMM_CI`) with the same checks.",
        "",
        "## Summary",
        "",
        f"- torchvision: **{summary['torchvision']}** models pass every pass; timm: **{summary['timm_families']}** families"
        f" (extra variants: {summary['timm_extra']}).",
        f"- `convert` and `scale_width` succeed on {summary['convert_and_scale']} models; every invariant below holds on"
        f" {summary['all_checks']}.",
        f"- zero-initialized fusion equals the ensemble within {TOL:g} on {summary['ensemble_exact']} models; the others are"
        " listed in `NOT_BLOCKWISE` with their reason (table below).",
        f"- built directly by the library's constructor instead of `morph.build_model`, every check holds the same way"
        f" on {summary['direct_same']} of the passing models run that way (column **direct**; `—`: not run yet, "
        f"`python benchmarks/coverage.py --add direct` runs them; {len(ok(rows))} models pass).",
    ]
    trained = [r for r in ok(rows) if "trains" in r]
    if trained:
        counts = ", ".join(f"`{m}` {len([r for r in trained if trains_verdict(r, m) == 'yes'])}/{len(trained)}"
                           for m in GROWTH_METHODS)
        lines.append(f"- grown models train (section \"Grown models train\"): {counts} of the {len(trained)} models run"
                     f" ({len(ok(rows)) - len(trained)} of the {len(ok(rows))} passing models not run yet).")
    if dense:
        lines.append(f"- FLOPs ratio (half / original, per image at batch 64) of the models outside `FLOPS_DEVIATIONS`:"
                     f" {min(dense):.3f} to {max(dense):.3f} (mean {sum(dense) / len(dense):.3f}).")
    fails = [r for r in rows if r["status"] != "ok"]
    if fails:
        lines += ["", "## Not converted", "", "| model | stage | error |", "| --- | --- | --- |"]
        lines += [f"| {r['spec']} | {r.get('stage', '')} | {r['status']}: {_cell(r['error'])} |" for r in fails]
    lines += [
        "",
        "## Table",
        "",
        "Trace input 3x64x64 (torchvision inception_v3: 3x299x299, its aux head is traced in train mode; timm",
        "inception_v3/v4: 3x96x96); float64 under 30M parameters, float32 above.",
        "",
        "- **params**: parameters of the half template model (`convert(0.5)`, 2 templates per layer, no sharing) /",
        "  the original's. `pred` = the half, `share=\"consecutive\"` and fused parameter counts all equal the prediction",
        "  from layer shapes (plain half model: every parameter, conv/linear weights replaced by 2 templates + 2",
        "  coefficients; fused: stock model, conv/linear weights replaced by a's and b's banks + 2 coefficients per tile).",
        "- **FLOPs**: half template model / original, per image at the model's default input (timm: its",
        "  `pretrained_cfg`; torchvision: 224, inception_v3: 299), weight generation amortized over a batch of 64",
        "  (`morph.flops(half, size, batch_size=64).per_image`; fvcore, 1 multiply-add = 1 flop).",
        "- **dense / edge / dw / other**: the original's FLOPs shares in convs and linears whose input and output",
        "  both scale (x0.25 at half width), in the stem and classifier (one side fixed: x0.5), in depthwise and",
        "  group-width-keeping convs (x0.5), and elsewhere (norms, pooling: x0.5). **exp** = 0.25 dense +",
        "  0.5 (edge + dw + other) + generation: where FLOPs are far from 0.25, exp explains them (`FLOPS_DEVIATIONS`).",
        "- **ensemble**: relative error of `fuse(a, b, init=\"zero\")` against `(a(x) + b(x)) / 2` (eval mode).",
        "- **strict**: `bake(fused)` loads with `strict=True` into `morph.build_model(spec)`, and that stock model then",
        "  computes the fused model's function (relative error <= 1e-5); **bake** = max relative error of",
        "  `bake(m)(x)` against `m(x)` for the half and the fused model; **s/l**: save/load of the half model is",
        "  bit-exact.",
        "",
        "- **direct**: the same checks on the model built by the library's own constructor (`timm.create_model`,",
        "  `torchvision.models.get_model`), not through morph: the baked fused model loads with `strict=True` into a",
        "  model built that way and computes the fused function, save/load is bit-exact, bake is exact, and the",
        "  fusion is (or is not) the ensemble exactly as through `morph.build_model`.",
        "",
        "| model | family | status | params | pred | FLOPs | exp | dense / edge / dw / other | ensemble | bake | strict | s/l | direct | dtype | s | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fam = family(r["spec"])
        if r["status"] != "ok":
            lines.append(f"| {r['spec']} | {fam} | **{r['status']}** ({r.get('stage', '')}) | | | | | | | | | | "
                         f"{direct_verdict(r)} | "
                         f"{r.get('dtype', '')} | {r.get('seconds', 0):.0f} | {_cell(r['error'])} |")
            continue
        bad = failed_checks(r)
        pred = all(r[f"params_{k}"] == r[f"params_{k}_predicted"] for k in ("half", "consecutive", "fused"))
        notes = []
        if r["spec"] in NOT_BLOCKWISE:
            notes.append(f"not block-wise: {NOT_BLOCKWISE[r['spec']]}")
        if r["spec"] in FLOPS_DEVIATIONS:
            notes.append(f"FLOPs: {FLOPS_DEVIATIONS[r['spec']]}")
        notes += [f"**{b}**" for b in bad]
        lines.append(
            f"| {r['spec']} | {fam} | {'ok' if not bad else '**check failed**'} | {r['params_ratio']:.3f} | "
            f"{'yes' if pred else '**no**'} | {r['flops_ratio']:.3f} | {r['flops_expected']:.3f} | "
            f"{r['share_dense']:.2f} / {r['share_edge']:.2f} / {r['share_grouped']:.2f} / {r['share_other']:.2f} | "
            f"{_f(r['ensemble_relerr'], '.1e')} | {_f(max(r['bake_relerr'], r['half_bake_relerr']), '.0e')} | "
            f"{'yes' if r['strict_load'] and r['stock_relerr'] <= TOL else '**no**'} | "
            f"{'yes' if r['save_load_exact'] else '**no**'} | {_cell(direct_verdict(r))} | {r['dtype']} | {r['seconds']:.0f} | {_cell('; '.join(notes))} |"
        )
    lines += _growth_table(rows, summary)
    lines += _trains_table(rows, summary)
    lines = _keep_foreign_sections(out, lines)
    out.write_text("\n".join(lines) + "\n")
    return summary


def _sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """``lines`` cut at every ``## `` heading: (heading, its lines); the text before the first has heading ``""``."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith("## "):
            out.append((line, []))
        out[-1][1].append(line)
    return out


def _keep_foreign_sections(out: Path, lines: list[str]) -> list[str]:
    """Sections of the existing ``out`` that this script does not write (pasted by hand or by other runs, such as
    "Transformers and MLP models") stay, after the generated section they followed."""
    if not out.exists():
        return lines
    new = _sections(lines)
    ours = {h for h, _ in new}
    old = _sections(out.read_text().splitlines())
    after: dict[str, list[list[str]]] = {}
    prev = ""
    for h, body in old:
        if h in ours:
            prev = h
        else:
            while body and not body[-1].strip():
                body = body[:-1]
            after.setdefault(prev, []).append(["", *body] if body and body[0].strip() else body)
    result: list[str] = []
    for h, body in new:
        while body and not body[-1].strip() and h in after:
            body = body[:-1]
        result += body
        for block in after.pop(h, []):
            result += [*block, ""]
    for blocks in after.values():
        for block in blocks:
            result += block
    return result


def _growth_table(rows: list[dict], summary: dict) -> list[str]:
    """The growth-methods section: one column per method for every passing model."""
    ran = [r for r in rows if r["status"] == "ok" and "growth" in r]
    if not ran:
        return []
    judged = [r for r in ran if r["spec"] not in NOT_BLOCKWISE]
    counts = []
    for m in GROWTH_METHODS:
        n_ok = len([r for r in judged if growth_verdict(r, m) == "yes"])
        summary[f"growth_{m}"] = f"{n_ok}/{len(judged)}"
        counts.append(f"`{m}` **{n_ok}/{len(judged)}**")
    lines = [
        "",
        "## Growth methods",
        "",
        "`morph.grow(half, method, 2.0, data=(x, y), seed=0)` on `scale_width(model, 0.5)` with randomized norm",
        f"statistics and affine parameters, for {len(ran)} of the"
        f" {len([r for r in rows if r['status'] == 'ok'])} passing models (`python benchmarks/coverage.py --add growth`"
        " runs any missing ones). Every check holds on: " + ", ".join(counts) + f" of the {len(judged)} models outside"
        " `NOT_BLOCKWISE`.",
        "",
        "- **net2net / random / gradmax** (epsilon 0): the grown model computes the half's function, relative error",
        f"  <= {GROWTH_TOL['float64']:g} in float64 ({GROWTH_TOL['float32']:g} in float32, models over 30M parameters),"
        " in eval mode and, for",
        "  BatchNorm models, in train mode (batch statistics; dropout off); its state dict loads with `strict=True`",
        "  into the stock model (`morph.build_model(spec)`), which then computes the same outputs.",
        "- **firefly** (5 Adam steps at its default lr 1e-3, on the batch of 2, BatchNorm in train mode): old entries untouched, the batch loss lowered,",
        "  strict load into the stock model with the same outputs. Firefly does not keep the function (epsilon > 0);",
        "  where every new channel replicates an old one (nothing fresh to fit: gMLP) it runs no step and must keep it.",
        "- **err**: the largest relative error of the three preserving methods; **s**: seconds for all four.",
        "",
        "| model | dtype | net2net | random | gradmax | firefly | err | firefly loss | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ran:
        g = r["growth"]
        errs = [max(g[m]["eval"], g[m].get("train", 0.0)) for m in PRESERVING if g.get(m, {}).get("status") == "ok"]
        ff = g.get("firefly", {})
        loss = f"{ff['loss'][0]:.2f} -> {ff['loss'][1]:.2f}" if ff.get("status") == "ok" else ""
        name = r["spec"] + (" (not block-wise)" if r["spec"] in NOT_BLOCKWISE else "")
        cells = [_cell(growth_verdict(r, m)) for m in GROWTH_METHODS]
        secs = sum(x.get("seconds", 0.0) for x in g.values())
        lines.append(f"| {name} | {r.get('growth_dtype', '')} | {' | '.join(cells)} | "
                     f"{_f(max(errs) if errs else None, '.0e')} | {loss} | {secs:.0f} |")
    return lines


def _trains_table(rows: list[dict], summary: dict) -> list[str]:
    """The "trains" section: per method, whether the grown model's new neurons move under plain SGD."""
    ran = [r for r in rows if r["status"] == "ok" and "trains" in r]
    if not ran:
        return []
    counts = []
    for m in GROWTH_METHODS:
        n_ok = len([r for r in ran if trains_verdict(r, m) == "yes"])
        summary[f"trains_{m}"] = f"{n_ok}/{len(ran)}"
        counts.append(f"`{m}` **{n_ok}/{len(ran)}**")
    ruled = [r for r in ran if "trains_lr" in r]
    before = [r for r in ran if "trains_lr" not in r]
    probed = [r for r in before if (r.get("trains_lr_rule") or {}).get("lr") is not None]
    same = [r for r in probed if r["trains_lr_rule"]["lr"] == TRAINS_LR_BEFORE]
    chosen = {}
    for r in ruled:
        if r["trains_lr"]:
            chosen[r["trains_lr"]["lr"]] = chosen.get(r["trains_lr"]["lr"], 0) + 1
    summary["trains_lr"] = {repr(k): v for k, v in sorted(chosen.items(), reverse=True)}
    summary["trains_lr_before"] = {"rows": len(before), "rule_checked": len(probed), "rule_same": len(same)}
    ladder = ", ".join(f"{v:g}" for v in TRAINS_LR_LADDER)
    lines = [
        "",
        "## Grown models train",
        "",
        "`morph.grow(half, method, 2.0, data=(x, y), seed=0)` with each method's defaults (ReLU sub-gradient 1 at 0,",
        "new BatchNorm weights 0.1, Net2Net's uneven split) on `scale_width(model, 0.5)` with randomized norms, then",
        f"{TRAINS_STEPS} plain SGD steps (at the model's lr, below; float32, train mode, {TRAINS_BATCH} random images at"
        " the model's input size; the loss on the first output). **trains**: in every conv/linear layer the loss reaches"
        " (an old row moves), no new output row (fresh or replica) is still",
        "exactly zero or still equal (to 1e-6 of the old rows' mean norm) to an old row of its layer that moved by more"
        " than 1e-4 of it, and the loss"
        f" stays finite. {len(ran)} models (`python benchmarks/coverage.py --add trains [--only SPEC ...]`);"
        " trains on: " + ", ".join(counts) + ".",
        "",
        f"**lr**: one per model, the same for every method, chosen before any method runs and without a grown model:"
        f" the largest of {ladder} at which the same {TRAINS_STEPS} SGD steps on the un-grown half itself (the same"
        f" batch, train mode) keep every loss, at each step and after the last, finite and at most"
        f" {TRAINS_LR_RISE:g} times the first step's (`benchmarks/zoo_check.py` `choose_trains_lr`; the smallest, marked"
        " **unstable**, where none does). **half loss**: the half's loss at that lr, first step -> after the last."
        f" Rows run with the rule: {len(ruled)}"
        + (" (" + ", ".join(f"lr {k:g}: {v}" for k, v in sorted(chosen.items(), reverse=True)) + ")" if ruled else "")
        + f". Rows run before it ({len(before)} of {len(ran)}) ran at the fixed lr {TRAINS_LR_BEFORE:g}; for"
        f" {len(probed)} of them the rule alone was run since (`--add lr`: the probe on the half, no method): where it"
        f" chooses {TRAINS_LR_BEFORE:g} ({len(same)}) the row ran at the rule's lr (the probe leaves the random state"
        f" alone, so a rerun would repeat the row's steps), and the lr column shows it with the half's loss; where it"
        f" chooses less ({len(probed) - len(same)}) the column reads `{TRAINS_LR_BEFORE:g}* (rule: <its lr>)`: the row"
        f" needs a rerun at that lr; `{TRAINS_LR_BEFORE:g}*` alone: the rule not run yet"
        f" ({len(before) - len(probed)}).",
        "",
        "| model | lr | net2net | random | gradmax | firefly | new rows | half loss | loss (random) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ran:
        t = r["trains"]
        cells = [_cell(trains_verdict(r, m)) for m in GROWTH_METHODS]
        rows_n = next((t[m]["rows"] for m in GROWTH_METHODS if t.get(m, {}).get("status") == "ok"), None)
        rd = t.get("random", {})
        loss = f"{rd['loss'][0]:.2f} -> {rd['loss'][1]:.2f}" if rd.get("status") == "ok" else ""
        secs = sum(x.get("seconds", 0.0) for x in t.values())
        rec = r.get("trains_lr", "before the rule")
        if rec is None:  # the run crashed or timed out before it chose one
            lr, half_loss = "—", ""
        elif isinstance(rec, dict):
            lr = f"{rec['lr']:g}" + ("" if rec.get("stable", True) else " **unstable**")
            hl = rec.get("losses", {}).get(repr(rec["lr"]))
            half_loss = f"{hl[0]:.2f} -> {hl[-1]:.2f}" if hl else ""
            secs += rec.get("seconds", 0.0)
        else:
            rule = r.get("trains_lr_rule") or {}
            lr, half_loss = f"{TRAINS_LR_BEFORE:g}*", ""
            if rule.get("lr") == TRAINS_LR_BEFORE:
                lr = f"{TRAINS_LR_BEFORE:g}"
                hl = rule["losses"][repr(TRAINS_LR_BEFORE)]
                half_loss = f"{hl[0]:.2f} -> {hl[-1]:.2f}"
            elif rule:
                lr += f" (rule: {rule['lr']:g}{'' if rule.get('stable', True) else ' unstable'})" if "lr" in rule else \
                    f" (rule: {rule.get('status', '?')})"
        lines.append(f"| {r['spec']} | {lr} | {' | '.join(cells)} | {rows_n if rows_n is not None else ''} | "
                     f"{half_loss} | {loss} | {secs:.0f} |")
    fails = [(r["spec"], [m for m in GROWTH_METHODS if trains_verdict(r, m) != "yes"]) for r in ran]
    fails = [(spec, ms) for spec, ms in fails if ms]
    if fails:
        lines += ["", "Where a grown model does not train (docs/growth.md, \"Training after growth\"):", ""]
        lines += [f"- `{spec}` ({', '.join(ms)}): {TRAINS_NOTES.get(spec, 'not investigated yet')}" for spec, ms in fails]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--only", nargs="*", help="specs to run instead of the whole list")
    ap.add_argument("--ci", action="store_true", help="run the CI subset only")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--mem-gb", type=float, default=20.0, help="address-space limit per model (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model (1 is fastest on a shared CPU)")
    ap.add_argument("--resume", action="store_true", help="keep rows of <out>.json, run the missing models")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from <out>.json, run nothing")
    ap.add_argument("--add", nargs="+", choices=("direct", "growth", "trains", "lr", "flops"), default=None,
                    help="run only these parts for the passing rows of <out>.json that lack them, and merge them in "
                         "(lr: only the trains check's lr rule, for rows whose trains part ran before it; flops: "
                         "only the main part's FLOPs columns, again)")
    ap.add_argument("--redo", action="store_true", help="with --add: run the parts again where rows have them")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=(*PARTS, "lr", "flops"),
                    help="parts to run per model (default: all; add the others later with --add)")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.mem_gb, args.threads, tuple(args.parts))
        return
    out = Path(args.out)
    if args.add:
        _add(out, args, tuple(args.add))
        return
    if "main" not in args.parts and not args.table_only:
        # the growth, trains and direct parts extend a main row (status, params): without one nothing is written
        ap.error("--parts without main has no row to extend: run --parts main first, or --add "
                 f"{' '.join(args.parts)} [--redo] --only SPEC ... on an existing <out>.json")
    if args.only:
        specs = args.only
    elif args.ci:
        specs = [f"torchvision/{n}" for n in TORCHVISION_MODELS] + [f"timm/{TIMM_MODELS[f]}" for f in TIMM_CI]
    else:  # the largest model last: it needs the most memory
        specs = sorted(all_specs(), key=lambda s: s in LAST)
    done: dict[str, dict] = {}
    jpath = out.with_suffix(".json")
    if args.table_only:
        rows = json.loads(jpath.read_text())
        meta = json.loads(out.with_suffix(".meta.json").read_text()) if out.with_suffix(".meta.json").exists() else {}
        _report(rows, out, meta.get("seconds", 0.0))
        return
    if args.resume and jpath.exists():
        done = {r["spec"]: r for r in json.loads(jpath.read_text())}
    t_start = time.perf_counter()
    rows: list[dict] = []
    for spec in specs:
        if spec in done:
            rows.append(done[spec])
            continue
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", spec, "--mem-gb", str(args.mem_gb),
                                "--threads", str(args.threads), "--parts", *args.parts],
                               capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                row = json.loads(line[-1][7:])
            else:
                tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
                row = {"spec": spec, "status": "crash", "stage": "", "error": tail[:300]}
        except subprocess.TimeoutExpired:
            row = {"spec": spec, "status": "timeout", "stage": "", "error": f"over the {args.timeout}s budget"}
        row.setdefault("seconds", time.perf_counter() - t0)
        rows.append(row)
        msg = row["error"][:150] if row["status"] != "ok" else "; ".join(failed_checks(row)) or (
            f"params {row['params_ratio']:.3f} FLOPs {row['flops_ratio']:.3f} ensemble {row['ensemble_relerr']:.1e}")
        print(f"{spec}: {row['status']} {msg} ({row['seconds']:.0f}s)", flush=True)
        jpath.write_text(json.dumps(rows, indent=1) + "\n")
        write_table(rows, out, time.perf_counter() - t_start)
    jpath.write_text(json.dumps(rows, indent=1) + "\n")
    seconds = time.perf_counter() - t_start + sum(r.get("seconds", 0) for r in rows if r["spec"] in done)
    out.with_suffix(".meta.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    _report(rows, out, seconds)
    print(f"wrote {out} and {jpath}")


def _add(out: Path, args: argparse.Namespace, parts: tuple[str, ...]) -> None:
    """Run ``parts`` (``direct``, ``growth``, ``trains``) for the passing rows of ``<out>.json`` that lack them
    (``--redo``: all of them), rewriting the JSON (atomically) and the table after each model, so that an
    interrupted run loses at most the model it was on and the same command goes on where it stopped."""
    jpath = out.with_suffix(".json")
    rows = json.loads(jpath.read_text())
    meta = json.loads(out.with_suffix(".meta.json").read_text()) if out.with_suffix(".meta.json").exists() else {}
    only = set(args.only or [])
    def wanted(r: dict, p: str) -> bool:  # lr: rows whose trains part ran before the lr rule
        if p == "lr":
            return "trains" in r and "trains_lr" not in r and (args.redo or "trains_lr_rule" not in r)
        if p == "flops":  # every passing row has the main part's FLOPs: rerun where not rerun yet
            return args.redo or "flops_rerun" not in r
        return args.redo or p not in r

    todo = [r for r in rows if r["status"] == "ok" and (not only or r["spec"] in only)
            and any(wanted(r, p) for p in parts)]
    for r in sorted(todo, key=lambda r: r.get("params", 0)):  # smallest first: the most models per hour
        missing = [p for p in parts if wanted(r, p)]
        try:
            p = subprocess.run([sys.executable, __file__, "--child", r["spec"], "--parts", *missing, "--mem-gb",
                                str(args.mem_gb), "--threads", str(args.threads)],
                               capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                r.update(json.loads(line[-1][7:]))
            else:
                _failed(r, missing, {"status": "crash", "stage": "",
                                     "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
        except subprocess.TimeoutExpired:
            _failed(r, missing, {"status": "timeout", "stage": "", "error": f"over the {args.timeout}s budget"})
        msg = [f"direct {direct_verdict(r)}"] if "direct" in missing else []
        msg += [f"{m} {growth_verdict(r, m)}" for m in GROWTH_METHODS] if "growth" in missing else []
        if "flops" in missing:
            fr = r["flops_rerun"]
            msg += [f"FLOPs {r['flops_ratio']:.3f} (exp {r['flops_expected']:.3f}, {fr['seconds']:.0f}s)"
                    if fr["status"] == "ok" else f"FLOPs {fr['status']}: {fr.get('error', '')}"]
        if "lr" in missing:
            msg += [f"the rule's lr {r['trains_lr_rule'].get('lr', r['trains_lr_rule'].get('error'))}"]
        if "trains" in missing:
            msg += [f"trains lr {(r.get('trains_lr') or {}).get('lr')}"]
            msg += [f"{m} trains {trains_verdict(r, m)}" for m in GROWTH_METHODS]
        print(f"{r['spec']}: {'; '.join(msg)}", flush=True)
        _write_json(jpath, rows)  # after every model: an interrupted run keeps what it finished (rerun to go on)
        write_table(rows, out, meta.get("seconds", 0.0))


def _failed(r: dict, missing: list[str], err: dict) -> None:
    """Record ``err`` for the parts of ``r`` that a child run did not return."""
    for k in missing:
        if k == "direct":
            r[k] = err
        elif k == "lr":
            r["trains_lr_rule"] = err
        elif k == "flops":
            r["flops_rerun"] = err
        else:
            r[k] = {m: err for m in GROWTH_METHODS}
        if k == "trains":
            r["trains_lr"] = None


def _write_json(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` whole or not at all (a temporary file renamed over ``path``)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def _report(rows: list[dict], out: Path, seconds: float) -> None:
    summary = write_table(rows, out, seconds)
    print("summary:", json.dumps(summary))
    for r in rows:
        if r["status"] != "ok":
            print(f"  FAIL {r['spec']}: {r['status']} at {r.get('stage', '')}: {r['error'][:200]}")
        elif failed_checks(r):
            print(f"  CHECK {r['spec']}: {'; '.join(failed_checks(r))}")


if __name__ == "__main__":
    main()
