"""What a checkpoint may ask for: the rules that make reading a morph file safe.

A morph checkpoint is untrusted data. It records how to rebuild its model, and this module decides how
much of that record is obeyed:

- **Models.** Only timm and torchvision models (by a name the library knows) and morph's own factories
  are built from a file's record. A user's ``package.module:callable`` is imported and called only
  when the caller supplies the factory (``model_fn=``) or opts in for that call (``trust_code=True``,
  ``--trust-code``); the error that asks for it names the callable.
- **Constructor arguments.** JSON scalars and lists of scalars only; no argument that loads weights,
  reads a file, downloads or names a cache: :data:`REFUSED_KWARGS`, and names by their words split at
  ``_`` (``checkpoint_path``, ``cache_dir``, ``weights_backbone``, ``hf_hub_id`` are refused;
  ``drop_path_rate`` and ``init_weights`` are not).
- **Sizes.** Every field of the metadata is type-checked and bounded (:func:`check_info`), checked
  against the tensors actually in the file (their shapes come from the header, nothing is read), and
  the rebuild runs under an allocation budget derived from the file's own size
  (:class:`AllocationBudget`), so a small file cannot ask for a large allocation.

Every refusal is a one-line :class:`~morph.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CheckpointError

__all__ = [
    "AllocationBudget", "MAX_INPUT_SIDE", "MAX_TEMPLATES", "MAX_WIDTH", "REFUSED_KWARGS", "REFUSED_KWARG_WORDS",
    "check_info", "check_kwargs", "parse_json", "rebuild_budget",
]

KINDS = {"plain": 0, "half": 1, "fused": 2, "grown": 1, "shared": 1, "ensemble": 1}  # kind -> number of template sets
SHARED_KINDS = ("shared", "ensemble")  # morph.superweights: the sharing record is checked by superweights.record
MAX_TEMPLATES = 64
MAX_WIDTH = 8.0
MAX_FACTOR = 8
MAX_INPUT_CHANNELS = 64
MAX_INPUT_SIDE = 2048
MAX_INPUT_PIXELS = 3 * 1024 * 1024  # C*H*W of one traced input
MAX_INFO_CHARS = 1 << 20
MAX_NAME_CHARS = 200
MAX_LIST_ITEMS = 64

# Constructor arguments that load weights, read files, download, or steer a cache.
REFUSED_KWARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
    "weights", "weights_backbone", "pretrained_backbone", "cache_dir", "model_dir", "file", "url", "hf_hub_id",
    "hf_hub_filename", "state_dict", "progress", "features_only", "out_indices",
})
# and, by the words of a name (split at "_"): any of these words anywhere, as a first word, or as a last word
REFUSED_KWARG_WORDS = ("pretrained", "checkpoint", "download", "hub")
REFUSED_FIRST_WORDS = ("weights", "cache", "url", "file", "hf")
REFUSED_LAST_WORDS = ("path", "file", "filename", "dir", "url", "urls")

_SET_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SPEC_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def parse_json(text: str, where: str, what: str, limit: int = MAX_INFO_CHARS) -> Any:
    """JSON text from a file's header, refused past ``limit`` characters or when it does not parse.

    Raises:
        CheckpointError: ``{where}: {what} ...``, one line.
    """
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: {what} is not text")
    if len(text) > limit:
        raise CheckpointError(f"{where}: {what} of {len(text):,} characters is too large")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: {what} is not valid JSON ({e})") from None


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """Constructor arguments from a file: a dict of JSON scalars or short lists of them, none refused.

    Raises:
        CheckpointError: naming the first argument that is refused and why.
    """
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: model kwargs must be a JSON object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise CheckpointError(f"{where}: model kwarg name {key!r} is not an identifier")
        words = key.lower().split("_")
        if (key in REFUSED_KWARGS or any(w in words for w in REFUSED_KWARG_WORDS)
                or words[0] in REFUSED_FIRST_WORDS or words[-1] in REFUSED_LAST_WORDS):
            raise CheckpointError(
                f"{where}: refuses model kwarg {key!r}: a checkpoint may not ask to load weights, read files or "
                "download; remove it from the file's morph_info"
            )
        ok = _is_scalar(value) or (
            isinstance(value, list) and len(value) <= MAX_LIST_ITEMS and all(_is_scalar(v) for v in value)
        )
        if not ok or (isinstance(value, str) and len(value) > MAX_NAME_CHARS):
            raise CheckpointError(
                f"{where}: model kwarg {key!r} must be a JSON scalar or a short list of scalars, got "
                f"{type(value).__name__}"
            )
    return dict(kwargs)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: corrupt morph metadata: {what}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_info_json(d: Any, where: str) -> None:
    """Types and bounds of a ``morph_info`` JSON object, before any field is used."""
    _need(isinstance(d, dict), where, "morph_info is not a JSON object")
    kind = d.get("kind")
    _need(kind in KINDS, where, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    width = d.get("width")
    _need(_num(width) and 0 < width <= MAX_WIDTH, where, f"width {width!r} is not a number in (0, {MAX_WIDTH:g}]")
    if kind != "plain":
        _need(width <= 1, where, f"width {width!r} of a {kind} model is above 1")
    templates = d.get("templates", 0)
    lo = 0 if kind == "plain" else 1
    _need(_int(templates) and lo <= templates <= MAX_TEMPLATES, where,
          f"templates {templates!r} is not an integer in [{lo}, {MAX_TEMPLATES}]")
    factor = d.get("factor", 1)
    _need(_int(factor) and 1 <= factor <= MAX_FACTOR, where, f"factor {factor!r} is not an integer in [1, {MAX_FACTOR}]")
    share = d.get("share", "none")
    _need(share == "learned" if kind in SHARED_KINDS else share in ("none", "consecutive"), where,
          f"share {share!r} is not {'learned' if kind in SHARED_KINDS else 'none or consecutive'}")
    set_ids = d.get("set_ids", [])
    _need(isinstance(set_ids, list) and all(isinstance(s, str) and _SET_ID.match(s) for s in set_ids), where,
          "set_ids must be a list of short ids")
    _need(len(set_ids) == KINDS[kind] or (kind == "plain" and len(set_ids) <= 2), where,
          f"a {kind} model has {KINDS[kind]} template set(s), the file lists {len(set_ids)}")
    size = d.get("input_size", [3, 224, 224])
    _need(isinstance(size, list) and len(size) == 3 and all(_int(s) and s >= 1 for s in size), where,
          f"input_size {size!r} is not three positive integers C, H, W")
    c, h, w = size
    _need(c <= MAX_INPUT_CHANNELS and h <= MAX_INPUT_SIDE and w <= MAX_INPUT_SIDE and c * h * w <= MAX_INPUT_PIXELS,
          where, f"input_size {c}x{h}x{w} is beyond morph's bounds (C <= {MAX_INPUT_CHANNELS}, H, W <= "
          f"{MAX_INPUT_SIDE}, C*H*W <= {MAX_INPUT_PIXELS})")
    for key in ("growth", "init"):
        v = d.get(key, "")
        _need(isinstance(v, str) and len(v) <= 64, where, f"{key} must be a short string")
    _need(isinstance(d.get("train_edge_coefficients", False), bool), where, "train_edge_coefficients must be true/false")
    _need(isinstance(d.get("extra", {}), dict), where, "extra must be a JSON object")
    grown = d.get("extra", {}).get("growth", {})
    _need(isinstance(grown, dict), where, "extra.growth must be a JSON object")
    if grown.get("which", "all") != "all":  # the loader rebuilds these shapes from the growth layout
        _need(grown.get("which") == "internal", where, "extra.growth.which must be 'all' or 'internal'")
        fw = grown.get("from_width")
        _need(isinstance(fw, (int, float)) and not isinstance(fw, bool) and 0 < fw <= MAX_WIDTH, where,
              f"extra.growth.from_width must be a width in (0, {MAX_WIDTH}]")
    orig = d.get("original", {})
    _need(isinstance(orig, dict) and set(orig) <= {"groups", "shapes"}, where, "original must be a JSON object")
    groups, shapes = orig.get("groups", {}), orig.get("shapes", {})
    _need(isinstance(groups, dict) and all(isinstance(k, str) and _int(v) and v >= 1 for k, v in groups.items()),
          where, "original.groups must map layer names to positive integers")
    _need(isinstance(shapes, dict) and all(isinstance(k, str) and isinstance(v, list) and len(v) <= 8
                                           and all(_int(x) and x >= 0 for x in v) for k, v in shapes.items()),
          where, "original.shapes must map tensor names to lists of sizes")
    spec = d.get("spec")
    if spec is not None:
        _need(isinstance(spec, dict), where, "spec must be a JSON object")
        _need(spec.get("source") in ("timm", "torchvision", "callable"), where,
              f"spec source {spec.get('source')!r} is not timm, torchvision or callable")
        name = spec.get("name")
        _need(isinstance(name, str) and len(name) <= MAX_NAME_CHARS and bool(_SPEC_NAME.match(name)), where,
              f"spec name {name!r} is not a model name")
        _need((":" in name) == (spec["source"] == "callable"), where, f"spec name {name!r} does not fit its source")
        check_kwargs(spec.get("kwargs", {}), where)


def check_info(info: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Check a parsed :class:`~morph.info.MorphInfo` against the tensors in the file (names -> shapes).

    Template banks (``*.templates``) hold ``info.templates`` templates each, coefficients
    (``*.coefficients``) mix that many, a plain model has neither, and a template model has some.
    """
    if info.kind in SHARED_KINDS:
        from .superweights.record import check_record

        check_record(info, shapes, where)
        return
    banks = {k: s for k, s in shapes.items() if k.endswith(".templates")}
    coefs = {k: s for k, s in shapes.items() if k.endswith(".mix.coefficients")}
    if info.kind == "plain":
        _need(not banks and not coefs, where, "a plain model's file holds template banks")
        return
    _need(bool(banks) and bool(coefs), where, f"a {info.kind} model's file holds no template banks")
    for k, s in banks.items():
        _need(len(s) >= 2 and s[0] == info.templates, where,
              f"{k} holds {s[0] if s else 0} templates, the metadata says {info.templates}")
    grid = 1 if info.kind == "half" else 4
    for k, s in coefs.items():
        _need(len(s) == 2 and s[1] == info.templates and 1 <= s[0] <= grid * info.factor ** 2, where,
              f"{k} has shape {list(s)}, not [tiles <= {grid * info.factor ** 2}, {info.templates}]")


def rebuild_budget(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Elements a rebuild may allocate: a generous multiple of what the file holds, plus room for the
    traced forward pass. Building a model, converting two halves and fusing them stays well inside."""
    held = sum(math.prod(s) for s in shapes.values())
    return 48 * held + (1 << 27)


class AllocationBudget(TorchDispatchMode):
    """Refuse tensor allocations past ``limit`` elements in total, *before* they happen.

    Counts the ``size`` argument of every factory op (``empty``, ``zeros``, ``randn``, ``new_empty``...) run
    while the mode is active, so a rebuild that a file's metadata inflates fails fast with a
    :class:`CheckpointError` instead of exhausting memory.
    """

    def __init__(self, limit: int, where: str) -> None:
        super().__init__()
        self.limit, self.where, self.used = int(limit), where, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.name != "size":
                continue
            size = args[i] if i < len(args) else kwargs.get("size")
            if size is not None:
                n = 1
                for d in size:
                    n *= max(int(d), 0)
                self.used += n
                if self.used > self.limit:
                    raise CheckpointError(
                        f"{self.where}: rebuilding the model it describes would allocate more than "
                        f"{self.limit:,} elements, far more than the file holds; its metadata is inconsistent"
                    )
            break
        return func(*args, **kwargs)
