"""morph: grow CNNs the MixtureGrowth way, on any standard architecture.

The public surface::

    build_model(spec, **kwargs)          timm/NAME, torchvision/NAME, NAME, package.module:callable
    analyze(model, input_size)           coupled channel groups of a traced model
    scale_width(model, width)            plain model at a new width
    convert(model, width=0.5, ...)       template-mixing model at reduced width
    fuse(a, b, growth=, init=)           full-width model from two halves (MixtureGrowth)
    grow(model, method=, width=, data=)  a registered growth method (MixtureGrowth without fusion for a half)
    list_growth_methods()                random, net2net, gradmax, firefly, mixturegrowth
    carry_optimizer_state(opt, old, new) optimizer slots onto the grown parameters
    bake(model)                          plain model with generated weights materialized
    save(model, path) / load(path)       safetensors checkpoints
    flops(model, input_size)             fvcore FLOPs (1 multiply-add = 1 flop)
    cka(model_a, model_b, data)          linear CKA between layers of two models (morph.cka module: more)
"""

from .bake import bake
from .checkpoint import load, read_info, save
from .cka import CKAResult, cka
from .convert import convert
from .errors import CheckpointError, ModelNotFoundError, MorphError, UnsupportedOpError
from .flops import FlopReport, flops
from .fuse import fuse
from .graph import ChannelPlan, analyze
from .growth import carry_optimizer_state, grow, list_growth_methods
from .info import MorphInfo, get_info
from .scale import scale_width
from .zoo import build_model

__version__ = "0.1.0"

__all__ = [
    "CKAResult", "ChannelPlan", "CheckpointError", "FlopReport", "ModelNotFoundError", "MorphError", "MorphInfo",
    "UnsupportedOpError", "analyze", "bake", "build_model", "carry_optimizer_state", "cka", "convert", "flops", "fuse",
    "get_info", "grow", "list_growth_methods", "load", "read_info", "save", "scale_width", "__version__",
]
