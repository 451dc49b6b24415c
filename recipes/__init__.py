"""morph recipes: train, grow and compare CNNs the MixtureGrowth way. Installed as, and imported only as,
``morph.recipes`` (one import name per module, tests included).

- :mod:`morph.recipes.run`: ``morph train`` (:func:`morph.recipes.run.main`), every method of a config, every seed.
- :mod:`morph.recipes.report`: ``morph report`` (:func:`morph.recipes.report.main`), Table 1 and a FLOPs plot.
- :mod:`morph.recipes.trainer`: the one training loop (DDP, AMP, checkpoint/resume, metrics).
- :mod:`morph.recipes.schedule`: the stages of each method and the FLOPs budget.
- :mod:`morph.recipes.config`, :mod:`morph.recipes.data`, :mod:`morph.recipes.models`: configs, datasets, WRNs.

Shipped configs live in ``recipes/configs/*.yaml``; each opens with its launch line.
"""

__all__ = ["checkpoint", "config", "data", "distributed", "errors", "metrics", "models", "report", "run", "schedule", "trainer"]
