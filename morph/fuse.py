"""``morph.fuse``: two half-width template models become one full-width model by tiling (MixtureGrowth).

The public name of the fusion; the implementation is the MixtureGrowth growth method,
:mod:`morph.growth.mixturegrowth`, whose public names this module re-exports: ``from morph.fuse import fuse, grow, GROWTH_MODES, INIT_MODES``
(``morph.fuse`` itself, in the package namespace, is the function).
"""

from .growth.mixturegrowth import (
    COEFFICIENT_INITS,
    GROWTH_MODES,
    INIT_MODES,
    fuse,
    grow,
    layout_perm,
    register_coefficient_init,
)

__all__ = ["COEFFICIENT_INITS", "GROWTH_MODES", "INIT_MODES", "fuse", "grow", "layout_perm", "register_coefficient_init"]
