"""Reproduction of the experiments of Section 5 of the Path-SGD paper.

Run ``python -m optax_path.experiments reproduce`` (or ``optax-path reproduce``; see
``--help``): a ReLU MLP trained with Path-SGD, SGD and AdaGrad from the balanced and the
unbalanced initialisation, each method's step size ``10**-alpha`` chosen on a held-out
validation split. The default run (8x8 digits, two hidden layers of 512 units) takes about
two minutes on two CPU cores; ``--paper --dataset mnist`` uses the paper's settings.
Outputs: ``metrics.csv``, ``selection.csv``, ``figure.png`` (like Figures 2 and 3) and
``summary.md``; ``python -m optax_path.experiments plot RUN_DIR ...`` combines runs.

Modules: :mod:`~optax_path.experiments.data` (data sets),
:mod:`~optax_path.experiments.models` (the ReLU MLP),
:mod:`~optax_path.experiments.training` (methods, jitted training, evaluation),
:mod:`~optax_path.experiments.selection` (step-size search),
:mod:`~optax_path.experiments.report` (CSV files, figure, summary),
:mod:`~optax_path.experiments.rundir` (the output directory: checked first, marked while
incomplete),
:mod:`~optax_path.experiments.bench` (``bench``: step times against the plain optimizers).
"""
