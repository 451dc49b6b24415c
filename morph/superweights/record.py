"""The sharing record in a checkpoint: untrusted data, checked before use, and the rebuild it describes.

A shared model's or ensemble's :class:`~morph.info.MorphInfo` holds ``extra["superweights"]``: clusters of
``[member, layer path]``, banks ``[cluster, level, piece, K, coefficient vectors]`` and every layer's
coefficient indices (and, for an ensemble, ``extra["members"]``: each member's spec and width).
:func:`check_record` bounds every field, checks the record against itself and against the tensor shapes
in the file's header (nothing is read); :func:`rebuild` builds the members from their specs, recomputes
the nested blocks from the rebuilt layer shapes and refuses a record that does not fit them. Every refusal
is one :class:`~morph.errors.CheckpointError` line naming the file and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from morph.errors import CheckpointError, MorphError

from .banks import MAX_TEMPLATES

__all__ = ["check_record", "describe", "rebuild", "refresh", "MAX_LAYERS", "MAX_LEVELS"]

MAX_LAYERS = 100_000
MAX_LEVELS = 64
MAX_PIECE = 1 << 40
_KEY = re.compile(r"^(?:members\.(\d+)\.)?(.+)\.mix\.banks\.(\d+)\.(templates|coefficients\.(\d+))$")


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: corrupt sharing record: {what}")


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _members(info: Any, where: str) -> int:
    if info.kind == "shared":
        _need("members" not in info.extra, where, "a shared model records no ensemble members")
        return 1
    from morph.safety import check_info_json

    from .ensemble import MAX_MEMBERS

    mem = info.extra.get("members")
    _need(isinstance(mem, list) and 1 <= len(mem) <= MAX_MEMBERS, where,
          f"members must be a list of 1 to {MAX_MEMBERS} entries")
    for i, m in enumerate(mem):
        _need(isinstance(m, dict) and set(m) == {"spec", "width"}, where, f"member {i} must hold spec and width")
        check_info_json({"kind": "plain", "width": m["width"], "spec": m["spec"]}, f"{where}: member {i}")
        _need(m["width"] <= 1, where, f"member {i} width {m['width']!r} is above 1")
    return len(mem)


def check_record(info: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Bounds and consistency of ``info.extra["superweights"]``, and the record against the file's tensors:
    every bank tensor belongs to a recorded layer and level and holds ``K * piece`` values, every coefficient
    vector index exists and holds ``K`` values."""
    n_members = _members(info, where)
    rec = info.extra.get("superweights")
    _need(isinstance(rec, dict), where, "extra.superweights must be a JSON object")
    _need(rec.get("version") == 1, where, f"version {rec.get('version')!r} is not 1")
    budget = rec.get("budget")
    _need(budget is None or _int(budget, 1, MAX_PIECE), where, "budget must be null or a positive integer")
    clusters, banks, coef = rec.get("clusters"), rec.get("banks"), rec.get("coef")
    _need(isinstance(clusters, list) and 1 <= len(clusters) <= MAX_LAYERS, where, "clusters must be a non-empty list")
    refs: dict[tuple[int, str], int] = {}
    for ci, c in enumerate(clusters):
        _need(isinstance(c, list) and 1 <= len(c) <= MAX_LAYERS, where, f"cluster {ci} must be a non-empty list")
        for r in c:
            _need(isinstance(r, list) and len(r) == 2 and _int(r[0], 0, n_members - 1) and isinstance(r[1], str)
                  and 0 < len(r[1]) <= 300, where, f"cluster {ci} holds {str(r)[:60]!r}, not [member, layer path]")
            _need((r[0], r[1]) not in refs, where, f"layer {r[1][:60]!r} is in two clusters")
            refs[(r[0], r[1])] = ci
            _need(len(refs) <= MAX_LAYERS, where, "too many layers")
    _need(isinstance(banks, list) and 1 <= len(banks) <= MAX_LAYERS, where, "banks must be a non-empty list")
    bank_of: dict[tuple[int, int], list[int]] = {}
    for b in banks:
        _need(isinstance(b, list) and len(b) == 5, where, "a bank must be [cluster, level, piece, K, coefficients]")
        c, w, p, k, n = b
        _need(_int(c, 0, len(clusters) - 1) and _int(w, 0, MAX_LEVELS - 1) and _int(p, 1, MAX_PIECE)
              and _int(k, 1, MAX_TEMPLATES) and _int(n, 1, MAX_LAYERS), where, f"bank {str(b)[:80]} is out of bounds")
        _need((c, w) not in bank_of, where, f"bank of cluster {c} level {w} is listed twice")
        _need(w == 0 or (c, w - 1) in bank_of, where, f"bank of cluster {c} level {w} comes before its level {w - 1}")
        bank_of[(c, w)] = [p, k, n]
    _need(info.templates == max(v[1] for v in bank_of.values()), where,
          f"templates {info.templates} is not the largest K of the banks")
    _need(isinstance(coef, list) and len(coef) == len(refs), where, "coef must list every clustered layer once")
    levels: dict[tuple[int, str], list[int]] = {}
    for e in coef:
        _need(isinstance(e, list) and len(e) == 3 and isinstance(e[2], list), where,
              "a coef entry must be [member, layer path, [indices]]")
        ref = (e[0], e[1]) if isinstance(e[1], str) and not isinstance(e[0], bool) else None
        _need(ref in refs and ref not in levels, where, f"coef names {str(e[:2])[:80]}, not a clustered layer (or twice)")
        c = refs[ref]
        _need(1 <= len(e[2]) <= MAX_LEVELS, where, f"layer {ref[1][:60]!r} has {len(e[2])} levels")
        for w, i in enumerate(e[2]):
            _need((c, w) in bank_of and _int(i, 0, bank_of[(c, w)][2] - 1), where,
                  f"layer {ref[1][:60]!r} level {w} uses coefficient vector {i!r}, its bank has "
                  f"{bank_of.get((c, w), [0, 0, 0])[2]}")
        levels[ref] = e[2]
    # the file's tensors
    prefix = {(f"members.{m}.{n}" if info.kind == "ensemble" else n): (m, n) for m, n in refs}
    seen_banks: set[tuple[int, int]] = set()
    for key, shape in shapes.items():
        if ".mix.banks." not in key:
            continue
        mt = _KEY.match(key)
        _need(mt is not None, where, f"tensor {key[:100]!r} is not a bank's templates or coefficients")
        layer = key[: key.index(".mix.banks.")]
        _need(layer in prefix, where, f"tensor {key[:100]!r} belongs to no recorded layer")
        ref = prefix[layer]
        w = int(mt.group(3))
        _need(w < len(levels[ref]), where, f"tensor {key[:100]!r}: the layer has {len(levels[ref])} levels")
        c = refs[ref]
        p, k, n = bank_of[(c, w)]
        if mt.group(4) == "templates":
            _need(tuple(shape) == (k * p,), where, f"{key[:100]} has shape {list(shape)}, the record says [{k * p}]")
            seen_banks.add((c, w))
        else:
            i = int(mt.group(5))
            _need(i < n and tuple(shape) == (k,), where,
                  f"{key[:100]} has shape {list(shape)} (vector {i}), the record says {n} vectors of [{k}]")
    _need(seen_banks == set(bank_of), where, f"the file holds {len(seen_banks)} of the {len(bank_of)} recorded banks")


def rebuild(info: Any, *, model_fn: Callable[..., nn.Module] | None = None, trust_code: bool = False,
            where: str = "") -> nn.Module:
    """The untrained model a checked record describes (its tensors are loaded by the caller)."""
    from morph.info import set_info
    from morph.zoo import ModelSpec, build_recorded

    from .build import build_shared, plan_from_record, prepare, template_layers
    from .ensemble import SuperWeightEnsemble

    if info.kind == "shared":
        specs = [(info.spec, info.width)]
    else:
        specs = [(None if m["spec"] is None else ModelSpec(m["spec"]["source"], m["spec"]["name"],
                                                           dict(m["spec"]["kwargs"])), m["width"])
                 for m in info.extra["members"]]
    members, shapes = [], {}
    for i, (spec, width) in enumerate(specs):
        if spec is None:
            if model_fn is None or info.kind == "ensemble":
                raise CheckpointError(f"{where}: member {i} records no spec: load it with morph.load(path, model_fn=...)"
                                      if info.kind == "shared" else
                                      f"{where}: ensemble member {i} records no spec; only timm, torchvision and "
                                      "morph models can be ensemble members of a file")
            base = model_fn()
        else:
            base = build_recorded(spec, model_fn=model_fn, trust_code=trust_code, where=where)
        new, plan = prepare(base, width, info.input_size)
        members.append(new)
        shapes.update({(i, n): s for n, _, s in template_layers(new, plan)})
    rec = info.extra["superweights"]
    missing = [(m, n) for c in rec["clusters"] for m, n in c if (m, n) not in shapes]
    if missing:
        raise CheckpointError(f"{where}: corrupt sharing record: layer {missing[0][1][:80]!r} (member {missing[0][0]}) "
                              "is not a template layer of the rebuilt model")
    try:
        plan = plan_from_record(rec, shapes)
    except MorphError as e:
        raise CheckpointError(f"{where}: corrupt sharing record: {e}") from None
    build_shared(members, plan, seed=0)
    model = members[0] if info.kind == "shared" else SuperWeightEnsemble(members)
    return set_info(model, info)


def refresh(model: nn.Module) -> None:
    """Write the model's current coefficient indices and vector counts (after untying) into its record."""
    from morph.info import get_info

    info = get_info(model)
    if info is None or info.kind not in ("shared", "ensemble"):
        return
    rec = info.extra["superweights"]
    members = list(model.members) if info.kind == "ensemble" else [model]
    ncoef: dict[tuple[int, int], int] = {}
    coef = []
    for m, name, _ in rec["coef"]:
        mix = members[m].get_submodule(name).mix
        coef.append([m, name, list(mix.coef)])
        for w, bank in enumerate(mix.banks):
            ncoef[(bank.cluster, w)] = len(bank.coefficients)
    rec["coef"] = coef
    rec["banks"] = [[c, w, p, k, ncoef.get((c, w), n)] for c, w, p, k, n in rec["banks"]]


def describe(model: nn.Module) -> dict[str, Any]:
    """The sharing of a shared model or ensemble, for ``morph inspect``: clusters (layers, envelopes), banks
    (key, piece size, templates, coefficient vectors, the layers that use them), the budget and the counts
    (template parameters, what the budget counts; coefficients; everything)."""
    from morph.info import get_info

    from .banks import superweight_layers

    info = get_info(model)
    if info is None or info.kind not in ("shared", "ensemble"):
        raise MorphError("not a template-sharing model (morph.convert with share='learned', or an ensemble)")
    refresh(model)
    rec = info.extra["superweights"]
    layers = superweight_layers(model)
    by_ref = {m.mix.ref: m.mix for _, m in layers}
    banks: dict[tuple[int, int], Any] = {}
    users: dict[tuple[int, int], list[str]] = {}
    for _, m in layers:
        for w, b in enumerate(m.mix.banks):
            banks[(b.cluster, w)] = b
            users.setdefault((b.cluster, w), []).append(f"{m.mix.ref[0]}:{m.mix.ref[1]}")
    clusters = []
    for ci, c in enumerate(rec["clusters"]):
        mixes = [by_ref[(r[0], r[1])] for r in c]
        env = max((mx.envelopes for mx in mixes), key=len)
        clusters.append({
            "cluster": ci, "layers": [{"member": mx.ref[0], "layer": mx.ref[1], "shape": list(mx.shape),
                                       "levels": mx.levels, "coefficients": list(mx.coef)} for mx in mixes],
            "envelopes": [list(e) for e in env],
        })
    bank_rows = [{"cluster": c, "level": w, "piece": b.piece, "templates": b.num_templates,
                  "template_params": b.templates.numel(), "coefficient_vectors": len(b.coefficients),
                  "pieces": len(users[(c, w)])} for (c, w), b in sorted(banks.items())]
    template = sum(r["template_params"] for r in bank_rows)
    coef = sum(b.num_templates * len(b.coefficients) for b in banks.values())
    total = sum(p.numel() for p in model.parameters())
    return {"kind": info.kind, "mode": rec.get("mode"), "budget": rec.get("budget"), "template_params": template,
            "coefficient_params": coef, "other_params": total - template - coef, "params": total,
            "clusters": clusters, "banks": bank_rows,
            "members": info.extra.get("members", [{"spec": None, "width": info.width}])}
