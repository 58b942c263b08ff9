"""The experiment harness: data, reference models, recipes, training, reports.

Needs the ``experiments`` extra (``pip install 'margin_regs[experiments]'``: flax,
scikit-learn, mnist1d, mlxtend, matplotlib, rich, dm-pix); the core library never
imports it.

- :mod:`~margin_regs.experiments.data`: embedded data sets and file loaders.
- :mod:`~margin_regs.experiments.models`: the papers' reference models (Flax linen).
- :mod:`~margin_regs.experiments.recipes`: each regularizer as the loop applies it.
- :mod:`~margin_regs.experiments.training`: the schedule, a recipe's pure step and
  epoch, the jitted measurements; ``run`` (a grid of one).
- :mod:`~margin_regs.experiments.grid`: the training driver, every (coefficient, seed)
  of a regularizer as one vmapped program; selection on validation.
- :mod:`~margin_regs.experiments.bagging`: bootstrap members as one program, their
  averaged-probability ensemble.
- :mod:`~margin_regs.experiments.stats`: paired differences and t-intervals.
- :mod:`~margin_regs.experiments.report`: summaries, the table, ``results.json``.
- :mod:`~margin_regs.experiments.plots`: the figures, drawn from ``results.json``.
- :mod:`~margin_regs.experiments.progress`: a rich progress bar, or lines in a log.
- :mod:`~margin_regs.experiments.bench`: overhead benchmarks.
- :mod:`~margin_regs.experiments.cli`: the ``margin-regs`` command line.
"""
