"""What a checkpoint may ask for: the rules that make reading a morph file (and building a model) safe.

A morph checkpoint is untrusted data. It records how to rebuild its model, and this module decides how
much of that record is obeyed. The rules, as they are enforced:

- **No code from the file.** Only timm and torchvision models (by a name the library knows) and morph's
  own factories are built from a file's record. A user's ``package.module:callable`` is imported and
  called only when the caller supplies the factory (``model_fn=``) or opts in for that call
  (``trust_code=True``, ``--trust-code``); the error that asks for it names the callable.
- **No weights, no network, no unpickling.** Every model morph builds (from a file, from
  :func:`morph.build_model`, from ``morph convert NAME``) is built with ``None``/``False`` for every
  weights argument its builder has (``weights``, ``weights_backbone``, ``pretrained``...: 15
  of torchvision's detection and segmentation builders default ``weights_backbone`` to ImageNet weights).
  As a backstop, :func:`no_weights` is active during every build and rebuild: a hub download
  (``torch.hub``, torchvision's and timm's loaders), ``torch.load``, an unpickled object, a socket
  connection or a DNS look-up in that thread raises a one-line error instead.
- **Constructor arguments.** JSON scalars and short lists of scalars only; integers and floats within
  ``±``:data:`MAX_KWARG_NUMBER`; no argument that loads weights, reads a file, downloads or names a
  cache: :data:`REFUSED_KWARGS`, and names by their words split at ``_`` (``checkpoint_path``,
  ``cache_dir``, ``weights_backbone``, ``hf_hub_id`` are refused; ``drop_path_rate`` and
  ``init_weights`` are not).
- **Metadata.** Strict JSON (no ``NaN``/``Infinity``, bounded size; nesting too deep is refused, not a
  crash); every field type-checked and bounded (:func:`check_info_json`); ``format_version`` is ASCII
  digits; template-set ids match ``[A-Za-z0-9_.-]{1,64}`` in full (a trailing newline fails).
- **Tensors.** The metadata must fit the tensors in the file (:func:`check_info`: their shapes and
  dtypes come from the header, nothing is read); template banks and coefficients must be floating
  point; every tensor must match the rebuilt model's name, shape and kind of dtype.
- **Memory and time.** The base model is first built on the meta device (no memory) under a module
  budget (:class:`ModuleBudget`, from the number of tensors in the file); it is refused when its
  parameters and buffers exceed what the file can account for (:func:`base_limits`). The real rebuild
  then runs under the same module budget and an allocation budget (:class:`AllocationBudget`) derived
  from the file's own size (a model that cannot be built on the meta device, such as torchvision's
  RegNets, is built for real under twice the elements the file accounts for), so a small file cannot ask
  for a large allocation or a long build.

Every refusal is a one-line :class:`~morph.errors.CheckpointError` naming the file and the field; text
from the file is quoted through :func:`morph.text.printable`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CheckpointError, MorphError
from .text import printable

__all__ = [
    "AllocationBudget", "BuildError", "MAX_INPUT_SIDE", "MAX_KWARG_NUMBER", "MAX_TEMPLATES", "MAX_WIDTH",
    "ModuleBudget", "REFUSED_KWARGS", "REFUSED_KWARG_WORDS", "base_limits", "check_info", "check_info_json",
    "check_kwargs", "names_weights_or_files", "no_weights", "parse_json", "rebuild_budget", "set_id_ok", "show",
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
MAX_KWARG_NUMBER = 1 << 15  # |int| and |float| of a recorded constructor argument (num_classes, depth, embed_dim...)
MAX_SHAPE_ENTRIES = 1 << 16  # entries of original.groups / original.shapes
MAX_SIZE = 1 << 40  # one recorded tensor dimension
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # safetensors' names

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

_SET_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SPEC_NAME = re.compile(r"[A-Za-z0-9_.\-]+(:[A-Za-z_][A-Za-z0-9_]*)?")


def show(value: Any, limit: int = 60) -> str:
    """A value from a file, quoted for an error line: ``repr``, printable, at most ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for str()
        text = f"<{type(value).__name__} too large to print>"
    text = printable(text)
    return text if len(text) <= limit else text[:limit] + "..."


def set_id_ok(value: Any) -> bool:
    """A template-set id: 1 to 64 of ``A-Z a-z 0-9 _ . -``, the whole string (a trailing newline fails)."""
    return isinstance(value, str) and _SET_ID.fullmatch(value) is not None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str, where: str, what: str, limit: int = MAX_INFO_CHARS) -> Any:
    """Strict JSON text from a file's header: refused past ``limit`` characters, when it does not parse,
    when it holds ``NaN``/``Infinity``, or when it nests too deeply to parse.

    Raises:
        CheckpointError: ``{where}: {what} ...``, one line.
    """
    where = printable(where)
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: {what} is not text")
    if len(text) > limit:
        raise CheckpointError(f"{where}: {what} of {len(text):,} characters is too large")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise CheckpointError(f"{where}: {what} is not valid JSON ({printable(e)})") from None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    """A finite JSON number (a huge integer is finite, and compares without overflow)."""
    if _int(v):
        return True
    return isinstance(v, float) and math.isfinite(v)


def _small_num(v: Any) -> bool:
    return _num(v) and -MAX_KWARG_NUMBER <= v <= MAX_KWARG_NUMBER


def _kwarg_scalar(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, str):
        return len(v) <= MAX_NAME_CHARS
    return _small_num(v)


def names_weights_or_files(key: str) -> bool:
    """Whether a constructor argument's name says it loads weights, reads a file, downloads or steers a
    cache: in :data:`REFUSED_KWARGS`, or by its words (see the module's rules)."""
    words = key.lower().split("_")
    return (key in REFUSED_KWARGS or any(w in words for w in REFUSED_KWARG_WORDS)
            or words[0] in REFUSED_FIRST_WORDS or words[-1] in REFUSED_LAST_WORDS)


def check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """Constructor arguments from a file: a dict of JSON scalars (numbers within ±:data:`MAX_KWARG_NUMBER`,
    strings of at most 200 characters) or short lists of them, none refused by name.

    Raises:
        CheckpointError: naming the first argument that is refused and why.
    """
    where = printable(where)
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: model kwargs must be a JSON object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or not key.isascii() or len(key) > MAX_NAME_CHARS:
            raise CheckpointError(f"{where}: model kwarg name {show(key)} is not an identifier")
        if names_weights_or_files(key):
            raise CheckpointError(
                f"{where}: refuses model kwarg {key!r}: a checkpoint may not ask to load weights, read files or "
                "download; remove it from the file's morph_info"
            )
        ok = _kwarg_scalar(value) or (
            isinstance(value, list) and len(value) <= MAX_LIST_ITEMS and all(_kwarg_scalar(v) for v in value)
        )
        if not ok:
            raise CheckpointError(
                f"{where}: model kwarg {key!r} must be a JSON scalar (a number within ±{MAX_KWARG_NUMBER:,}, a "
                f"string of at most {MAX_NAME_CHARS} characters) or a short list of them, got {show(value)}"
            )
    return dict(kwargs)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{printable(where)}: corrupt morph metadata: {what}")


def check_info_json(d: Any, where: str) -> None:
    """Types and bounds of a ``morph_info`` JSON object, before any field is used."""
    _need(isinstance(d, dict), where, "morph_info is not a JSON object")
    kind = d.get("kind")
    _need(isinstance(kind, str) and kind in KINDS, where, f"kind {show(kind)} is not one of {', '.join(KINDS)}")
    width = d.get("width")
    _need(_num(width) and 0 < width <= MAX_WIDTH, where, f"width {show(width)} is not a number in (0, {MAX_WIDTH:g}]")
    if kind != "plain":
        _need(width <= 1, where, f"width {show(width)} of a {kind} model is above 1")
    templates = d.get("templates", 0)
    lo = 0 if kind == "plain" else 1
    _need(_int(templates) and lo <= templates <= MAX_TEMPLATES, where,
          f"templates {show(templates)} is not an integer in [{lo}, {MAX_TEMPLATES}]")
    factor = d.get("factor", 1)
    _need(_int(factor) and 1 <= factor <= MAX_FACTOR, where,
          f"factor {show(factor)} is not an integer in [1, {MAX_FACTOR}]")
    share = d.get("share", "none")
    _need(isinstance(share, str) and (share == "learned" if kind in SHARED_KINDS else share in ("none", "consecutive")),
          where, f"share {show(share)} is not {'learned' if kind in SHARED_KINDS else 'none or consecutive'}")
    set_ids = d.get("set_ids", [])
    _need(isinstance(set_ids, list) and len(set_ids) <= MAX_LIST_ITEMS and all(set_id_ok(s) for s in set_ids), where,
          f"set_ids {show(set_ids)} must be a list of ids of 1 to 64 characters A-Z a-z 0-9 _ . -")
    _need(len(set_ids) == KINDS[kind] or (kind == "plain" and len(set_ids) <= 2), where,
          f"a {kind} model has {KINDS[kind]} template set(s), the file lists {len(set_ids)}")
    size = d.get("input_size", [3, 224, 224])
    _need(isinstance(size, list) and len(size) == 3 and all(_int(s) and 1 <= s <= MAX_SIZE for s in size), where,
          f"input_size {show(size)} is not three positive integers C, H, W")
    c, h, w = size
    _need(c <= MAX_INPUT_CHANNELS and h <= MAX_INPUT_SIDE and w <= MAX_INPUT_SIDE and c * h * w <= MAX_INPUT_PIXELS,
          where, f"input_size {c}x{h}x{w} is beyond morph's bounds (C <= {MAX_INPUT_CHANNELS}, H, W <= "
          f"{MAX_INPUT_SIDE}, C*H*W <= {MAX_INPUT_PIXELS})")
    for key in ("growth", "init"):
        v = d.get(key, "")
        _need(isinstance(v, str) and len(v) <= 64, where, f"{key} {show(v)} must be a short string")
    _need(isinstance(d.get("train_edge_coefficients", False), bool), where, "train_edge_coefficients must be true/false")
    extra = d.get("extra", {})
    _need(isinstance(extra, dict), where, "extra must be a JSON object")
    grown = extra.get("growth", {})
    _need(isinstance(grown, dict), where, "extra.growth must be a JSON object")
    which = grown.get("which", "all")
    _need(isinstance(which, str) and which in ("all", "internal"), where,
          f"extra.growth.which {show(which)} must be 'all' or 'internal'")
    if which == "internal":  # the loader rebuilds these shapes from the growth layout
        fw = grown.get("from_width")
        _need(_num(fw) and 0 < fw <= MAX_WIDTH, where, f"extra.growth.from_width {show(fw)} must be a width in "
              f"(0, {MAX_WIDTH:g}]")
    orig = d.get("original", {})
    _need(isinstance(orig, dict) and set(orig) <= {"groups", "shapes"}, where, "original must be a JSON object")
    groups, shapes = orig.get("groups", {}), orig.get("shapes", {})
    _need(isinstance(groups, dict) and len(groups) <= MAX_SHAPE_ENTRIES
          and all(isinstance(k, str) and _int(v) and 1 <= v <= MAX_SIZE for k, v in groups.items()),
          where, "original.groups must map layer names to positive integers")
    _need(isinstance(shapes, dict) and len(shapes) <= MAX_SHAPE_ENTRIES
          and all(isinstance(k, str) and isinstance(v, list) and len(v) <= 8
                  and all(_int(x) and 0 <= x <= MAX_SIZE for x in v) for k, v in shapes.items()),
          where, "original.shapes must map tensor names to lists of sizes")
    _need("spec" in d, where, "no spec (null for a model morph cannot rebuild by name)")
    spec = d["spec"]
    if spec is not None:
        _need(isinstance(spec, dict), where, f"spec {show(spec)} must be a JSON object")
        source = spec.get("source")
        _need(isinstance(source, str) and source in ("timm", "torchvision", "callable"), where,
              f"spec source {show(source)} is not timm, torchvision or callable")
        name = spec.get("name")
        _need(isinstance(name, str) and len(name) <= MAX_NAME_CHARS and _SPEC_NAME.fullmatch(name) is not None,
              where, f"spec name {show(name)} is not a model name")
        _need((":" in name) == (source == "callable"), where, f"spec name {show(name)} does not fit its source")
        check_kwargs(spec.get("kwargs", {}), where)


def check_info(info: Any, shapes: Mapping[str, tuple[int, ...]], where: str,
               dtypes: Mapping[str, str] | None = None) -> None:
    """Check a parsed :class:`~morph.info.MorphInfo` against the tensors in the file (names -> shapes, and
    names -> safetensors dtype names such as ``F32``). The sharing record of SuperWeights files
    (:data:`SHARED_KINDS`) is checked by :func:`morph.superweights.record.check_record` instead.

    Template banks (``*.templates``) hold ``info.templates`` templates each, coefficients
    (``*.coefficients``) mix that many, both in floating point; a plain model has neither, and a
    template model has some.
    """
    banks = {k: s for k, s in shapes.items() if k.endswith(".templates")}
    coefs = {k: s for k, s in shapes.items() if k.endswith(".mix.coefficients")}
    for k in (*banks, *coefs):
        dtype = (dtypes or {}).get(k, "F32")
        _need(dtype in FLOAT_DTYPES, where, f"{show(k, 120)} is stored as {show(dtype)}, not floating point")
    if info.kind == "plain":
        _need(not banks and not coefs, where, "a plain model's file holds template banks")
        return
    _need(bool(banks) and bool(coefs), where, f"a {info.kind} model's file holds no template banks")
    for k, s in banks.items():
        _need(len(s) >= 2 and s[0] == info.templates, where,
              f"{show(k, 120)} holds {s[0] if s else 0} templates, the metadata says {info.templates}")
    grid = 1 if info.kind == "half" else 4
    for k, s in coefs.items():
        _need(len(s) == 2 and s[1] == info.templates and 1 <= s[0] <= grid * info.factor ** 2, where,
              f"{show(k, 120)} has shape {list(s)}, not [tiles <= {grid * info.factor ** 2}, {info.templates}]")


def rebuild_budget(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Elements a rebuild may allocate: a generous multiple of what the file holds, plus room for the
    traced forward pass. Building a model, converting two halves and fusing them stays well inside."""
    held = sum(math.prod(s) for s in shapes.values())
    return 48 * held + (1 << 27)


@dataclass(frozen=True)
class BaseLimits:
    """Bounds on the base model a file's record builds: registered submodules, and parameter and buffer
    elements (checked on the meta device, before anything is allocated)."""

    modules: int
    elements: int
    held: int


def base_limits(shapes: Mapping[str, tuple[int, ...]], width: float) -> BaseLimits:
    """What a file of these tensors can account for, for a model recorded at ``width`` of its base.

    A model at width ``w`` (scaled, or template sets of width ``w``) holds about ``w**2`` of its base's
    weights, so the base may have ``8 * held / w**2`` elements (``w`` counted as at least 1/16) plus 4M
    for small models and buffers; and at most 2.5 modules per state-dict tensor were met across the model
    zoo (145 timm and torchvision models), so 8 per tensor in the file plus 1024.
    """
    held = sum(math.prod(s) for s in shapes.values())
    w = min(max(float(width), 1 / 16), 1.0)
    return BaseLimits(modules=8 * len(shapes) + 1024, elements=int(8 * held / (w * w)) + (1 << 22), held=held)


class _Stop(BaseException):
    """Raised inside a library's code to stop a build; not an ``Exception``, so that no ``except Exception``
    on the way swallows it. Turned back into :attr:`error` where the guard that raised it ends."""

    def __init__(self, error: MorphError) -> None:
        super().__init__(str(error))
        self.error = error


class BuildError(CheckpointError):
    """timm, torchvision or a factory raised while building the model a file's record describes."""


class ModuleBudget:
    """Refuse a model construction, in this thread, that registers more than ``limit`` submodules:
    a recorded ``depth`` of a million stops after ``limit`` modules, before it costs time or memory.

    Raises (on exit):
        CheckpointError: naming the file and the limit.
    """

    def __init__(self, limit: int, where: str) -> None:
        self.limit, self.where, self.count = int(limit), printable(where), 0
        self._thread = threading.get_ident()
        self._handle: Any = None

    def _hook(self, module: Any, name: str, submodule: Any) -> None:
        if threading.get_ident() != self._thread or submodule is None:
            return None
        self.count += 1
        if self.count > self.limit:
            raise _Stop(CheckpointError(
                f"{self.where}: the model it describes has more than {self.limit:,} modules, far more than the "
                "file's tensors account for; its metadata is inconsistent"))
        return None

    def __enter__(self) -> ModuleBudget:
        from torch.nn.modules.module import register_module_module_registration_hook

        self._handle = register_module_module_registration_hook(self._hook)
        return self

    def __exit__(self, typ, exc, tb) -> bool:  # noqa: ANN001
        self._handle.remove()
        if isinstance(exc, _Stop):
            raise exc.error from None
        return False


def _on_meta(args: tuple, kwargs: dict) -> bool:
    """Whether a factory op allocates on the meta device (no memory): its ``device``, or its tensor's."""
    device = kwargs.get("device")
    if device is None and args and hasattr(args[0], "device"):
        device = args[0].device
    return device is not None and getattr(device, "type", device) == "meta"


class AllocationBudget(TorchDispatchMode):
    """Refuse tensor allocations past ``limit`` elements in total, *before* they happen.

    Counts the ``size`` argument of every factory op (``empty``, ``zeros``, ``randn``, ``new_empty``...) run
    while the mode is active (except on the meta device, which allocates nothing), so a rebuild that a file's metadata inflates fails fast with a
    :class:`CheckpointError` instead of exhausting memory.
    """

    def __init__(self, limit: int, where: str) -> None:
        super().__init__()
        self.limit, self.where, self.used = int(limit), printable(where), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.name != "size":
                continue
            size = args[i] if i < len(args) else kwargs.get("size")
            if size is not None and not _on_meta(args, kwargs):
                n = 1
                for d in size:
                    n *= max(int(d), 0)
                self.used += n
                if self.used > self.limit:
                    raise _Stop(CheckpointError(
                        f"{self.where}: rebuilding the model it describes would allocate more than "
                        f"{self.limit:,} elements, far more than the file holds; its metadata is inconsistent"
                    ))
            break
        return func(*args, **kwargs)

    def __exit__(self, typ, exc, tb):  # noqa: ANN001
        super().__exit__(typ, exc, tb)
        if isinstance(exc, _Stop):
            raise exc.error from None
        return False


# ---------------------------------------------------------------------------------------------
# the backstop: no download, no torch.load, no unpickling, no connection while a model is built

# (module, attribute) of the functions that download or load weights; replaced while a guard is active
_LOADERS = (
    ("torch", "load"), ("torch.serialization", "load"), ("torch.hub", "load"),
    ("torch.hub", "load_state_dict_from_url"), ("torch.hub", "download_url_to_file"),
    ("torchvision.models._api", "load_state_dict_from_url"),
    ("timm.models._builder", "load_pretrained"), ("timm.models._builder", "load_custom_pretrained"),
    ("timm.models._builder", "load_state_dict_from_url"), ("timm.models._builder", "load_state_dict_from_hf"),
    ("timm.models._builder", "download_cached_file"), ("timm.models._hub", "download_cached_file"),
    ("timm.models._hub", "load_state_dict_from_hf"), ("timm.models._hub", "hf_hub_download"),
    ("timm.models._helpers", "load_checkpoint"), ("timm.models._helpers", "load_state_dict"),
    ("urllib.request", "urlopen"),
)
# audit events (sys.addaudithook) refused while a guard is active in the thread that raises them
_EVENTS = {
    "socket.connect": "open a network connection", "socket.getaddrinfo": "look up a host name",
    "socket.gethostbyname": "look up a host name", "socket.sendto": "send a network packet",
    "urllib.Request": "open a URL", "pickle.find_class": "unpickle an object",
}
_guard = threading.local()
_lock = threading.Lock()
_installed: dict[tuple[str, str], Any] = {}  # (module, attribute) -> the original, while any guard is active
_users = 0
_audit_hooked = False


def _active() -> str | None:
    return getattr(_guard, "where", None)


def _audit(event: str, args: tuple) -> None:
    if event in _EVENTS and getattr(_guard, "where", None) is not None:
        raise _Stop(MorphError(f"tried to {_EVENTS[event]} ({event})"))


def _wrap(module: str, attr: str, original: Callable) -> Callable:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _active() is not None:
            raise _Stop(MorphError(f"tried to load weights ({module}.{attr})"))
        return original(*args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    guarded.__name__ = getattr(original, "__name__", attr)
    guarded.__doc__ = getattr(original, "__doc__", None)
    return guarded


def _install() -> None:
    global _audit_hooked
    import torch.hub  # noqa: F401  (so that its loaders are replaced before a builder imports them lazily)

    if not _audit_hooked:
        sys.addaudithook(_audit)
        _audit_hooked = True
    for module, attr in _LOADERS:
        mod = sys.modules.get(module)
        original = getattr(mod, attr, None) if mod is not None else None
        if original is not None and callable(original):
            _installed[(module, attr)] = original
            setattr(mod, attr, _wrap(module, attr, original))


def _uninstall() -> None:
    for (module, attr), original in _installed.items():
        setattr(sys.modules[module], attr, original)
    _installed.clear()


@contextmanager
def no_weights(where: str, error: type[MorphError] = CheckpointError) -> Iterator[None]:
    """While active in this thread: any weights download or load (``torch.hub``, torchvision's and timm's
    loaders), ``torch.load``, unpickling, socket connection or host look-up raises, and leaves the block as
    one ``error(f"{where}: building the model tried to ...")`` line. Other threads are not affected.

    The functions are replaced for the outermost guard's lifetime (and call through outside a guarded
    thread); unpickling and the network are caught by an audit hook, installed once, that does nothing
    outside a guard.
    """
    global _users
    outer = _active()
    if outer is not None:  # nested: the outer guard reports
        yield
        return
    with _lock:
        if _users == 0:
            _install()
        _users += 1
    _guard.where = where
    try:
        yield
    except _Stop as e:
        if isinstance(e.error, CheckpointError):  # a budget's refusal passing through
            raise e.error from None
        raise error(f"{printable(where)}: building the model {e.error}; morph builds models without weights and "
                    "never downloads or unpickles while building one") from None
    finally:
        _guard.where = None
        with _lock:
            _users -= 1
            if _users == 0:
                _uninstall()
