"""morph recipes: train, grow and compare CNNs the MixtureGrowth way.

- :mod:`recipes.run`: ``morph train`` (:func:`recipes.run.main`), every method of a config, every seed.
- :mod:`recipes.report`: ``morph report`` (:func:`recipes.report.main`), Table 1 and a FLOPs plot.
- :mod:`recipes.trainer`: the one training loop (DDP, AMP, checkpoint/resume, metrics).
- :mod:`recipes.schedule`: the stages of each method and the FLOPs budget.
- :mod:`recipes.config`, :mod:`recipes.data`, :mod:`recipes.models`: configs, datasets, WRNs.

Shipped configs live in ``recipes/configs/*.yaml``; each opens with its launch line.
"""

__all__ = ["checkpoint", "config", "data", "distributed", "metrics", "models", "report", "run", "schedule", "trainer"]
