"""Growth methods behind one seam: :mod:`.layout` decides the shape (which channels are new and where
they go), a registered :class:`~.registry.GrowthMethod` decides the values.

Methods: ``random``, ``net2net``, ``gradmax``, ``firefly`` (plain models) and ``mixturegrowth``
(template models; fusion and growth without fusion). :func:`carry_optimizer_state` moves an
optimizer's state onto the grown parameters.
"""

from . import firefly, gradmax, mixturegrowth, net2net, random  # noqa: F401  (registers the methods)
from .api import grow
from .layout import Layout, build_layout
from .optim import carry_optimizer_state
from .registry import GrowthMethod, baseline_methods, get_growth_method, list_growth_methods, register_growth

__all__ = [
    "GrowthMethod", "Layout", "baseline_methods", "build_layout", "carry_optimizer_state", "get_growth_method",
    "grow", "list_growth_methods", "register_growth", "restore",
]


def restore(model, method: str, **options):
    """What ``morph.grow(method=..., **options)`` leaves on a model besides its values (the activations'
    sub-gradient, :mod:`.activation`), applied to ``model`` of the grown shape: a resumed training stage
    that rebuilt the grown model and loaded its weights. Returns ``model``."""
    from . import activation

    impl = get_growth_method(method)(**options)
    return activation.restore(model, {"relu_grad": impl.opts.get("relu_grad", "stock")}, where=f"growth method {method}")
