"""torch.fx tracing and channel analysis."""

from .analyze import ChannelPlan, LayerPlan, analyze
from .trace import MorphTracer, trace

__all__ = ["ChannelPlan", "LayerPlan", "MorphTracer", "analyze", "trace"]
