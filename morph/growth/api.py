"""``morph.grow``: the one entry point of every growth method."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import MorphError
from ..info import get_info
from .registry import get_growth_method, list_growth_methods

__all__ = ["grow"]


def grow(
    model: nn.Module, method: str | None = None, width: float = 2.0, data: Any = None, seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Grow ``model`` to ``width`` x its width with a registered growth method.

    Args:
        model: a plain model (``morph.scale_width``, ``morph.bake``, ``morph.load`` of a plain checkpoint, or
            any traceable timm/torchvision/own model), or a half-width template model for ``mixturegrowth``.
        method: a name from :func:`morph.list_growth_methods`; default ``mixturegrowth`` for a template
            model (MixtureGrowth without fusion) and required for a plain one.
        width: the width ratio (any ratio >= 1 the shapes allow; ``mixturegrowth``: 2).
        data: an ``(inputs, targets)`` batch or an iterable of them (``gradmax``, ``firefly``); read once, and
            moved to the model's device. A plain model is traced at the images' size (unless ``input_size=`` is
            given).
        seed: seed of every random draw of the method. The draws come from a CPU generator seeded with it, in the
            same order on every device, and are moved to the model's device: a model on a GPU grows there (index
            maps, masks, gradients, Firefly's steps), with the numbers the same seed draws on the CPU.
        **options: the method's options (``epsilon``, ``mapping``, ``which``, ``init`` ...).

    Returns:
        A new model (the input is left unchanged unless a method's ``inplace=True``). Plain results carry
        ``growth_report`` (per channel group, the rule that ran) and record the method and its options in
        ``morph.get_info(model).extra["growth"]``.

    Raises:
        MorphError: unknown method or option, a method that needs ``data`` without it, a template model
            given to a plain method (or the reverse), or shapes that cannot grow.
    """
    info = get_info(model)
    template = info is not None and info.kind != "plain"
    if method is None:
        if not template:
            raise MorphError(f"pass method= to grow a plain model; known: {', '.join(list_growth_methods())}")
        method = "mixturegrowth"
    cls = get_growth_method(method)
    if cls.template and not template:
        raise MorphError(f"{method} grows half-width template models (morph.convert); this model is plain")
    impl = cls(**options)
    if cls.needs_data and data is None:
        raise MorphError(f"growth method {method!r} reads data: pass data=(inputs, targets) or an iterable of batches")
    if data is not None and not cls.template:
        from .plain import iterate_batches

        # read once: the method, the input size and the norm statistics use it; moved to where the model is
        device = next((p.device for p in model.parameters()), None)
        data = [tuple(t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in batch)
                for batch in iterate_batches(data)]
        if data and "input_size" in cls.options and impl.opts.get("input_size") is None:
            x = data[0][0]
            if isinstance(x, torch.Tensor) and x.dim() == 4:  # images: (C, H, W)
                impl.opts["input_size"] = tuple(int(s) for s in x.shape[1:])
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return impl.grow(model, width, data, gen)
