"""torch.fx tracing and channel analysis.

``analyze(model)`` returns a :class:`ChannelPlan`. Teach the analysis an op it does not know with
:func:`register_module_rule`, :func:`register_function_rule` or :func:`register_method_rule`
(docs/design.md, "Adding a rule"); a rule receives the :class:`Analyzer` and the fx node and returns the
:class:`TD` of the node's output.
"""

from .analyze import analyze, default_input_size
from .analyzer import Analyzer
from .forwards import register_traceable_forward
from .plan import TD, ChannelPlan, ConstSite, LayerPlan
from .registry import register_function_rule, register_method_rule, register_module_rule
from .rules import ATTENTION_WIDTHS, attention_width
from .trace import MorphTracer, node_qualname, trace

__all__ = [
    "ATTENTION_WIDTHS", "attention_width", "Analyzer", "ChannelPlan", "ConstSite", "LayerPlan", "MorphTracer", "TD", "analyze", "default_input_size",
    "node_qualname", "register_function_rule", "register_method_rule", "register_module_rule",
    "register_traceable_forward", "trace",
]
