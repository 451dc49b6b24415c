"""Model resolution: ``build_model(spec)`` from timm, torchvision or a user's callable.

Specs, as users type them:

- ``timm/NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``
- ``torchvision/NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
- ``NAME``: timm first, then torchvision; the resolved spec is recorded on the model
- ``package.module:callable``: a user's own model factory, called with ``**kwargs``

Weights are never downloaded or read: every weights argument a builder has (``weights``,
``weights_backbone``, ``pretrained``...) is passed ``None``/``False``, an argument that names weights or a
file is refused, and every build runs under :func:`morph.safety.no_weights`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .errors import CheckpointError, ModelNotFoundError, MorphError

__all__ = ["build_model", "build_recorded", "resolve_spec", "ModelSpec", "get_spec", "infer_spec", "weightless",
           "TRUSTED_FACTORIES"]

# morph's own model factories: a file may name these, as it may name a timm or torchvision model. Each
# recorded name (including the name earlier morph versions recorded) maps to the factory morph calls.
TRUSTED_FACTORIES = {
    "morph.recipes.models:wrn": "morph.recipes.models:wrn",
    "recipes.models:wrn": "morph.recipes.models:wrn",
    "morph.recipes.models:vit": "morph.recipes.models:vit",
    "recipes.models:vit": "morph.recipes.models:vit",
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model came from: enough to build it again.

    Attributes:
        source: ``"timm"``, ``"torchvision"`` or ``"callable"``.
        name: model name, or ``module:callable`` for user models.
        kwargs: constructor keyword arguments (JSON-serializable).
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return self.name if self.source == "callable" else f"{self.source}/{self.name}"


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _tv_has(name: str) -> bool:
    import torchvision.models as tvm

    return name in tvm.list_models()


def resolve_spec(spec: str) -> tuple[str, str]:
    """Resolve a user spec to ``(source, name)`` without building anything.

    Raises:
        ModelNotFoundError: no library knows the name.
    """
    spec = spec.strip()
    if ":" in spec and "/" not in spec.split(":", 1)[0]:
        return "callable", spec
    if spec.startswith("timm/"):
        name = spec[5:]
        if not _timm_has(name):
            raise ModelNotFoundError(f"timm has no model {name!r}; list names with timm.list_models('{name}*')")
        return "timm", name
    if spec.startswith("torchvision/") or spec.startswith("tv/"):
        name = spec.split("/", 1)[1]
        if not _tv_has(name):
            raise ModelNotFoundError(
                f"torchvision has no model {name!r}; list names with torchvision.models.list_models()"
            )
        return "torchvision", name
    if _timm_has(spec):
        return "timm", spec
    if _tv_has(spec):
        return "torchvision", spec
    raise ModelNotFoundError(
        f"no timm or torchvision model named {spec!r}; use timm/NAME, torchvision/NAME or package.module:callable"
    )


def _is_weights_arg(name: str) -> bool:
    words = name.lower().split("_")
    return words[0] == "weights" or "pretrained" in words


def weightless(builder: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``None`` (``False`` where the default is a bool) for every weights argument in
    ``builder``'s signature: ``weights``, ``weights_backbone``, ``pretrained``, ``pretrained_backbone``...
    (15 torchvision detection and segmentation builders default ``weights_backbone`` to ImageNet weights)."""
    out = dict(kwargs)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature to read: the backstop still holds
        return out
    for name, p in params.items():
        if _is_weights_arg(name) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[name] = False if isinstance(p.default, bool) else None
    return out


def _build_library(source: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm or torchvision model ``name``, without weights, under the :func:`morph.safety.no_weights` guard."""
    from .safety import no_weights

    with no_weights(f"{source}/{name}", MorphError):
        if source == "timm":
            import timm

            try:
                builder = timm.models.model_entrypoint(name)
            except (RuntimeError, KeyError, ValueError):  # a name timm resolves itself (a tag, an alias)
                builder = None
            extra = {k: v for k, v in weightless(builder, {}).items() if k != "pretrained"} if builder else {}
            return timm.create_model(name, pretrained=False, **extra, **kwargs)
        import torchvision.models as tvm

        builder = tvm.get_model_builder(name)
        return builder(**weightless(builder, kwargs))


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a spec, without weights: nothing is downloaded or read (see the module's notes).

    Args:
        spec: ``timm/NAME``, ``torchvision/NAME``, a bare ``NAME`` (timm first, then torchvision) or
            ``package.module:callable``.
        **kwargs: constructor arguments such as ``num_classes``; ``None`` values are dropped so that
            model defaults apply (as ``timm.create_model`` does). An argument that loads weights or names a
            file (``weights``, ``pretrained``, ``checkpoint_path``...) is refused.

    Returns:
        The model, with its :class:`ModelSpec` at ``model.morph_spec``.

    Raises:
        ModelNotFoundError: no library knows the name, or the arguments do not fit it.
        MorphError: an argument that loads weights, or a build that tried to (the backstop).
    """
    from .safety import names_weights_or_files, no_weights

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for key in kwargs:
        if names_weights_or_files(key):
            raise MorphError(f"build_model builds models without weights and reads no file: argument {key!r} "
                             "is not accepted (load weights into the model yourself)")
    source, name = resolve_spec(spec)
    try:
        if source in ("timm", "torchvision"):
            if source == "torchvision" and name in ("googlenet", "inception_v3"):
                kwargs.setdefault("init_weights", True)
            model = _build_library(source, name, kwargs)
        else:
            mod_name, fn_name = name.split(":", 1)
            try:
                fn = getattr(importlib.import_module(mod_name), fn_name)
            except (ImportError, AttributeError) as e:
                raise ModelNotFoundError(f"cannot import {name!r}: {e}") from e
            with no_weights(name, MorphError):
                model = fn(**kwargs)
            if not isinstance(model, nn.Module):
                raise ModelNotFoundError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    except TypeError as e:
        raise ModelNotFoundError(f"cannot build {source}/{name} with {kwargs}: {e}") from e
    model.morph_spec = ModelSpec(source, name, dict(kwargs))  # type: ignore[assignment]
    return model


def build_recorded(
    spec: ModelSpec, *, model_fn: Callable[..., nn.Module] | None = None, trust_code: bool = False, where: str = "",
) -> nn.Module:
    """Build the model a checkpoint's record names, running no code that the file chooses.

    timm and torchvision models are built by name (the name must be one the library knows) with
    :func:`morph.safety.check_kwargs`-checked arguments, as are morph's own factories
    (:data:`TRUSTED_FACTORIES`). A ``package.module:callable`` is called only through the caller's
    ``model_fn`` (called with the recorded kwargs) or, with ``trust_code=True``, imported by name.

    An exception raised by the library (or factory) while it builds the recorded model with the recorded
    arguments means the record describes no model it can build: it becomes a one-line
    :class:`~morph.safety.BuildError` (a :class:`CheckpointError`). The caller's own ``model_fn`` is not
    wrapped: its exceptions are its own.

    Raises:
        CheckpointError: a refused kwarg, an unknown model, a callable the caller did not allow, or a
            record the library cannot build.
    """
    from .safety import BuildError, check_kwargs, show

    where = where or "checkpoint"
    kwargs = check_kwargs(spec.kwargs, where)
    if model_fn is not None:
        model = model_fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{where}: model_fn returned {type(model).__name__}, not an nn.Module")
        model.morph_spec = ModelSpec(spec.source, spec.name, dict(kwargs))  # type: ignore[assignment]
        return model
    if spec.source in ("timm", "torchvision"):
        has = _timm_has if spec.source == "timm" else _tv_has
        if not has(spec.name):
            raise CheckpointError(f"{where}: {spec.source} has no model {spec.name!r}; was it written with another "
                                  f"{spec.source} version?")
    elif spec.source != "callable":
        raise CheckpointError(f"{where}: unknown model source {spec.source!r}")
    elif spec.name not in TRUSTED_FACTORIES and not trust_code:
        raise CheckpointError(
            f"{where}: the model is built by the Python callable {spec.name!r}, and reading a checkpoint runs no "
            f"code that the file names; if you trust this file, pass model_fn=<your factory> or trust_code=True "
            f"to morph.load (--trust-code on the command line), which will call {spec.name}(**{kwargs})"
        )
    target = TRUSTED_FACTORIES.get(spec.name, spec.name) if spec.source == "callable" else spec.spec
    try:
        model = build_model(target, **kwargs)
    except MorphError as e:
        raise BuildError(f"{where}: {e}") from e
    except Exception as e:  # the library's own check of the recorded arguments (or its failure on them)
        text = str(e).splitlines()[0] if str(e) else ""
        raise BuildError(f"{where}: {spec.spec} cannot be built with the recorded kwargs {show(kwargs, 200)}: "
                         f"{type(e).__name__}: {show(text, 200)[1:-1]}") from e
    if spec.source == "callable" and spec.name in TRUSTED_FACTORIES:
        model.morph_spec = ModelSpec(spec.source, target, dict(kwargs))  # type: ignore[assignment]
    return model


def get_spec(model: nn.Module) -> ModelSpec | None:
    """The :class:`ModelSpec` a model was built from: the one :func:`build_model` recorded, or, for a
    timm or torchvision model built directly, the one :func:`infer_spec` can establish for certain."""
    spec = getattr(model, "morph_spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    return infer_spec(model)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _same_on_meta(model: nn.Module, build: Callable[[], nn.Module]) -> bool:
    import torch

    from .safety import no_weights

    try:
        with no_weights("inferring the spec of a model", MorphError), torch.device("meta"):
            ref = build()
    except Exception:  # a constructor that computes on tensors, or other arguments: not certain
        return False
    return type(ref) is type(model) and _shapes(ref) == _shapes(model)


def _classifier_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return None if last is None else (last.out_features if isinstance(last, nn.Linear) else last.out_channels)


def infer_spec(model: nn.Module) -> ModelSpec | None:
    """The spec of a timm or torchvision model built directly (``timm.create_model``, a torchvision
    constructor), when it is certain: the named model built with the found ``num_classes`` (on the meta
    device: no memory) has the same class and the same tensor names and shapes. ``None`` otherwise (a
    user's own model, other constructor arguments that change tensors). Arguments that hold no tensors,
    such as dropout rates, cannot be recovered and take their defaults when the model is rebuilt."""
    cls = type(model)
    n = _classifier_outputs(model)
    candidates: list[tuple[str, str, Callable[..., nn.Module]]] = []
    cfg = getattr(model, "pretrained_cfg", None)
    if cls.__module__.startswith("timm.") and isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str):
        import timm

        name = cfg["architecture"]
        if timm.is_model(name):
            candidates.append(("timm", name, lambda **kw: timm.create_model(name, pretrained=False, **kw)))
    elif cls.__module__.startswith("torchvision.models"):
        import torchvision.models as tvm

        for name in tvm.list_models():
            builder = tvm.get_model_builder(name)
            if getattr(builder, "__module__", "") == cls.__module__:
                candidates.append(("torchvision", name, lambda b=builder, **kw: b(**weightless(b, kw))))
    for source, name, build in candidates:
        for kwargs in ({}, {"num_classes": n}) if n is not None else ({},):
            if _same_on_meta(model, lambda build=build, kwargs=kwargs: build(**kwargs)):
                return ModelSpec(source, name, dict(kwargs))
    return None
