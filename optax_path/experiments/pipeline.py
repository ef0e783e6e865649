"""The experiments of Section 5: step-size search, then the final runs of every method.

For one data set: each method's step size is chosen on a validation split (the paper's
rule), then every method is trained from the balanced and the unbalanced initialisation
on the whole training set, and ``metrics.csv``, ``selection.csv``, ``figure.png`` and
``summary.md`` are written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

import optax_path
from optax_path.experiments import data, models, report, selection
from optax_path.experiments.training import (
  EVAL_CHUNK,
  RunSpec,
  init_optimizer,
  make_evaluate,
  make_optimizer,
  make_train_step,
  to_device,
  train,
)


def show(values: Sequence[float]) -> str:
  return ' '.join(f'{v:g}' for v in values)


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of a ``reproduce`` run (see ``--help``)."""

  dataset: str
  data_dir: str | None
  model: str
  hidden: tuple[int, ...]
  epochs: int
  search_epochs: int
  batch_size: int
  dropout: float
  seed: int
  methods: tuple[str, ...]
  inits: tuple[str, ...]
  unbalanced_units: int
  alphas: tuple[float, ...]
  learning_rates: dict[str, float]
  search_init: str
  dtype: str
  out: str
  quiet: bool


class Experiment:
  """The data, model and jitted functions shared by all runs of a ``reproduce``."""

  def __init__(self, config: Config, dataset: data.Dataset):
    """Puts the data on the device and draws the initial parameters.

    Args:
      config: The settings.
      dataset: The loaded data set.
    """
    self.config = config
    self.dataset = dataset
    image_shape = dataset.train_images.shape[1:]
    self.model = models.make_model(
      config.model, config.hidden, dataset.num_classes, config.dropout, image_shape
    )
    self.mode = models.path_mode(self.model, math.prod(image_shape))
    num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)
    self.evaluate = make_evaluate(self.model, min(EVAL_CHUNK, num_train))
    self.data = to_device(
      np.concatenate([dataset.train_images, dataset.test_images]),
      np.concatenate([dataset.train_labels, dataset.test_labels]),
      config.dtype,
    )
    self.train = np.arange(num_train)
    self.test = num_train + np.arange(num_test)
    self.fit, self.val = selection.split_validation(num_train, config.seed)
    self.params = initial_params(config, self.model, dataset.train_images.shape[1:])

  def spec(self, train_step, search: bool) -> RunSpec:
    """The run specification of a search run or a final run."""
    c = self.config
    if search:
      return RunSpec(
        train_step,
        self.evaluate,
        self.data,
        self.fit,
        {'val': self.val},
        c.search_epochs,
        c.batch_size,
        c.seed,
      )
    evals = {'train': self.train, 'test': self.test}
    return RunSpec(
      train_step, self.evaluate, self.data, self.train, evals, c.epochs, c.batch_size, c.seed
    )


def initial_params(config: Config, model, input_shape: Sequence[int]) -> dict:
  """The balanced and (if asked for) unbalanced initial parameters, by init name.

  The MLP is unbalanced by :func:`optax_path.unbalance`; the CNN by rescaling channels
  (:func:`models.unbalance_channels`), capped at 1e30 in float32.
  """
  key_init, key_unbalance = jax.random.split(jax.random.key(config.seed))
  balanced = models.init_params(model, key_init, input_shape)
  params = {'balanced': jax.tree.map(lambda x: x.astype(config.dtype), balanced)}
  if 'unbalanced' in config.inits:
    if isinstance(model, models.MLP):
      unbalance = optax_path.unbalance
    else:
      cap = 30.0 if config.dtype == 'float32' else None
      unbalance = functools.partial(models.unbalance_channels, max_decades=cap)
    unbalance = jax.jit(unbalance, static_argnums=2)
    params['unbalanced'] = unbalance(key_unbalance, params['balanced'], config.unbalanced_units)
  return params


def search_method(exp: Experiment, method: str, tx, train_step, init: str) -> list[dict]:
  """The step-size search of one method on one init; returns selection.csv rows."""
  spec = exp.spec(train_step, search=True)

  def run(alpha: float) -> tuple[list[float], bool]:
    lr = selection.learning_rate(alpha)
    history = train(
      spec,
      exp.params[init],
      init_optimizer(tx, exp.params[init], lr),
      desc=f'search {method} {init} lr=1e-{alpha:g}',
      progress=not exp.config.quiet,
    )
    diverged = len(history) < spec.epochs + 1
    return [h['val_error'] for h in history], diverged

  candidates, chosen = selection.search(run, exp.config.alphas)
  return [
    {
      'dataset': exp.dataset.name,
      'method': method,
      'init': init,
      'alpha': c.alpha,
      'learning_rate': c.learning_rate,
      'best_val_error': c.best_error,
      'best_epoch': c.best_epoch,
      'final_val_error': c.final_error,
      'diverged': int(c.diverged),
      'chosen': int(c is chosen),
    }
    for c in candidates
  ]


def final_run(exp: Experiment, method: str, tx, train_step, init: str, lr: float) -> list[dict]:
  """Trains on the whole training set; returns metrics.csv rows."""
  params = exp.params[init]
  history = train(
    exp.spec(train_step, search=False),
    params,
    init_optimizer(tx, params, lr),
    desc=f'{method} {init} lr={lr:.0e}',
    progress=not exp.config.quiet,
  )
  base = {
    'dataset': exp.dataset.name,
    'method': method,
    'init': init,
    'dropout': exp.config.dropout,
    'learning_rate': lr,
  }
  return [{**base, **h} for h in history]


def run_method(exp: Experiment, method: str) -> tuple[list[dict], list[dict]]:
  """Step-size search (unless fixed by ``--lr``) and final runs of one method.

  Returns:
    ``(metrics rows, selection rows)``.
  """
  c = exp.config
  tx = make_optimizer(method, exp.mode)
  train_step = make_train_step(exp.model, tx)
  search_inits = ('balanced',) if c.search_init == 'balanced' else c.inits
  lrs, chosen_rows = {}, []
  for init in search_inits:
    if method in c.learning_rates:
      lrs[init] = c.learning_rates[method]
      continue
    rows = search_method(exp, method, tx, train_step, init)
    chosen_rows += rows
    lrs[init] = next(r['learning_rate'] for r in rows if r['chosen'])
  metrics = []
  for init in c.inits:
    lr = lrs.get(init, lrs.get('balanced'))
    metrics += final_run(exp, method, tx, train_step, init, lr)
  return metrics, chosen_rows


def preamble(config: Config, dataset: data.Dataset, seconds: float) -> list[str]:
  """The settings lines at the top of ``summary.md``."""
  n = len(dataset.train_labels)
  val = selection.validation_size(n)
  search = (
    'on the balanced init, used for both inits'
    if config.search_init == 'balanced'
    else 'separately for each init'
  )
  fixed = ', '.join(f'{m}={v:g}' for m, v in config.learning_rates.items()) or 'none'
  return [
    (
      f'Data: {dataset.name}, {n} training and {len(dataset.test_labels)} test examples. '
      f'{_network(config)}, batch {config.batch_size}, '
      f'{config.epochs} epochs, dropout {config.dropout:g}, seed {config.seed}, {config.dtype}. '
      f'Unbalanced init: {config.unbalanced_units} hidden units rescaled.'
    ),
    '',
    (
      f'Step sizes 10^-alpha, alpha in {{{show(config.alphas)}}}, chosen {search}: '
      f'{config.search_epochs} epochs on {n - val} examples, validation on the other {val} '
      f'(lowest validation error, reached first). Fixed by --lr: {fixed}.'
    ),
    '',
    f'Wall time: {seconds:.0f} s.',
  ]


def _network(config: Config) -> str:
  if config.model == 'mlp':
    return f'ReLU MLP, hidden layers {show(config.hidden)}'
  return f'ReLU CNN, 3x3 conv layers of {show(config.hidden)} channels with 2x2 average pooling'


def reproduce(config: Config) -> None:
  """Runs the experiment and writes its four outputs to ``config.out``."""
  start = time.perf_counter()
  dataset = data.load_dataset(config.dataset, config.data_dir)
  with jax.enable_x64(config.dtype == 'float64'):
    metrics, chosen = run_all(config, dataset)
  report.plot(metrics, os.path.join(config.out, 'figure.png'))
  lines = preamble(config, dataset, time.perf_counter() - start)
  report.write_summary(os.path.join(config.out, 'summary.md'), metrics, chosen, lines)
  if not config.quiet:
    print(f'Wrote metrics.csv, selection.csv, figure.png, summary.md to {config.out}')


def run_all(config: Config, dataset: data.Dataset) -> tuple[list[dict], list[dict]]:
  """Runs every method, rewriting the two CSV files after each; returns their rows."""
  exp = Experiment(config, dataset)
  os.makedirs(config.out, exist_ok=True)
  metrics, chosen = [], []
  for method in config.methods:
    rows, sel = run_method(exp, method)
    metrics, chosen = metrics + rows, chosen + sel
    report.write_csv(os.path.join(config.out, 'metrics.csv'), report.METRIC_COLUMNS, metrics)
    report.write_csv(os.path.join(config.out, 'selection.csv'), report.SELECTION_COLUMNS, chosen)
  return metrics, chosen
