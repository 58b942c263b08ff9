"""The experiment harness: data, reference models, recipes, training, reports.

Needs the ``experiments`` extra (``pip install 'margin_regs[experiments]'``: flax,
scikit-learn, mnist1d, mlxtend, matplotlib); the core library never imports it.

- :mod:`~margin_regs.experiments.data`: embedded data sets and file loaders.
- :mod:`~margin_regs.experiments.models`: the papers' reference models (Flax linen).
- :mod:`~margin_regs.experiments.recipes`: each regularizer as the loop applies it.
- :mod:`~margin_regs.experiments.training`: the jitted train/evaluate loop.
- :mod:`~margin_regs.experiments.report`: summaries, the table, plots, JSON.
- :mod:`~margin_regs.experiments.bench`: overhead benchmarks.
- :mod:`~margin_regs.experiments.cli`: the ``margin-regs`` command line.
"""
