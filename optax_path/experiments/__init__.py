"""Reproduction of the experiments of Section 5 of the Path-SGD paper.

Run ``python -m optax_path.experiments reproduce --help`` (or ``optax-path reproduce``).
Modules: :mod:`~optax_path.experiments.data` (data sets),
:mod:`~optax_path.experiments.models` (the ReLU MLP),
:mod:`~optax_path.experiments.training` (methods, jitted training, evaluation),
:mod:`~optax_path.experiments.selection` (step-size search),
:mod:`~optax_path.experiments.report` (CSV files, figure, summary).
"""
