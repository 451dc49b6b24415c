"""SuperWeights: template banks shared across layers of any shape, learned sharing under a parameter budget
(NPAS), and SuperWeight ensembles (Teterwak et al., WACV 2024). See docs/superweights.md.

- :mod:`.banks`: :class:`SharedBank`, nested-block assembly (:class:`SuperWeightMixing`, :func:`cluster_layout`);
- :mod:`.npas`: initial clusters, gradient similarity, Algorithm 1 (connected components), budget allocation,
  coefficient untying;
- :mod:`.build`: plan and build shared models (``morph.convert(model, budget=N, share="learned")``);
- :mod:`.learn`: :func:`search`, the learned-sharing search end to end;
- :mod:`.ensemble`: members of different widths and depths sharing templates;
- :mod:`.metrics`: top-1, NLL, ECE, diversity;
- :mod:`.record`: the sharing record of a checkpoint, checked, and the rebuild.
"""

from .banks import MAX_TEMPLATES, SharedBank, SuperWeightMixing, cluster_layout, superweight_layers
from .build import convert_shared, initial_clusters, plan_sharing, sharing_record, template_layers
from .ensemble import SuperWeightEnsemble, anytime_subsets, bake_members, ensemble
from .learn import search
from .metrics import EnsembleMetrics
from .npas import (
    CoefficientGradients,
    WeightGradients,
    allocate,
    connected_components,
    cropped_cosine,
    depth_bins,
    learn_clusters,
    min_budget,
    similarity_matrix,
    untie,
)

__all__ = [
    "MAX_TEMPLATES", "CoefficientGradients", "EnsembleMetrics", "SharedBank", "SuperWeightEnsemble", "SuperWeightMixing",
    "WeightGradients", "allocate", "anytime_subsets", "bake_members", "ensemble", "search",
    "cluster_layout", "connected_components", "convert_shared", "cropped_cosine", "depth_bins", "initial_clusters",
    "learn_clusters", "min_budget", "plan_sharing", "sharing_record", "similarity_matrix", "superweight_layers",
    "template_layers", "untie",
]
