"""The experiments of Section 5: step-size search, then the final runs of every method.

For one data set: each method's step size is chosen on a validation split (the paper's
rule, on the first seed), then every method is trained from the balanced and the
unbalanced initialisation on the whole training set, once per seed (each seed draws its
own init, unbalancing, batch order and dropout masks), and ``metrics.csv``,
``selection.csv``, ``figure.png`` (and ``figure3.png`` with dropout) and ``summary.md``
are written. The CSV files are rewritten (atomically) after every finished run.
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
from optax_path.experiments import data, models, report, rundir, selection
from optax_path.experiments.training import (
  EVAL_CHUNK,
  RunSpec,
  init_optimizer,
  make_evaluate,
  make_optimizer,
  make_train_epoch,
  to_device,
  train,
)


def show(values: Sequence[float]) -> str:
  return ' '.join(f'{v:g}' for v in values)


#: How ``summary.md`` names the unbalanced init's factor.
SCHEME_TEXT = {
  'authors': "the authors' factor 10 exp(z), z ~ N(0, 1) (the paper's init)",
  'stress': 'the stress factor 10^exp(z), z ~ N(0, 1) (far harsher than the paper)',
}


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
  seeds: tuple[int, ...]
  methods: tuple[str, ...]
  inits: tuple[str, ...]
  unbalanced_units: int
  unbalanced_scheme: str
  alphas: tuple[float, ...]
  learning_rates: dict[str, float]
  search_init: str
  dtype: str
  out: str
  quiet: bool
  resume: bool = False
  train_size: int | None = None
  overwrite: bool = False


class Experiment:
  """The data, model and jitted functions shared by all runs of a ``reproduce``."""

  def __init__(self, config: Config, dataset: data.Dataset):
    """Puts the data on the device and builds the model.

    Args:
      config: The settings.
      dataset: The loaded data set.
    """
    self.config = config
    self.dataset = dataset
    self.image_shape = dataset.train_images.shape[1:]
    self.model = models.make_model(
      config.model, config.hidden, dataset.num_classes, config.dropout, self.image_shape
    )
    self.mode = models.path_mode(self.model, math.prod(self.image_shape))
    num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)
    self.evaluate = make_evaluate(self.model, min(EVAL_CHUNK, num_train))
    self.data = to_device(
      np.concatenate([dataset.train_images, dataset.test_images]),
      np.concatenate([dataset.train_labels, dataset.test_labels]),
      config.dtype,
    )
    self.train = np.arange(num_train)
    self.test = num_train + np.arange(num_test)
    self.fit, self.val = selection.split_validation(num_train, config.seeds[0])
    self._methods: dict[str, tuple] = {}

  def method(self, name: str) -> tuple:
    """``(transformation, jitted training epoch)`` of a method, built once."""
    if name not in self._methods:
      tx = make_optimizer(name, self.mode)
      self._methods[name] = (tx, make_train_epoch(self.model, tx))
    return self._methods[name]

  def spec(self, train_epoch, search: bool, seed: int) -> RunSpec:
    """The run specification of a search run or a final run."""
    c = self.config
    if search:
      evals, train, epochs = {'val': self.val}, self.fit, c.search_epochs
    else:
      evals, train, epochs = {'train': self.train, 'test': self.test}, self.train, c.epochs
    return RunSpec(
      train_epoch, self.evaluate, self.data, train, evals, epochs, c.batch_size, seed
    )


def initial_params(config: Config, model, input_shape: Sequence[int], seed: int) -> dict:
  """The balanced and (if asked for) unbalanced initial parameters of a seed, by init.

  The MLP is unbalanced by :func:`optax_path.unbalance`; the CNN by rescaling channels
  (:func:`models.unbalance_channels`), capped at 1e30 in float32.
  """
  key_init, key_unbalance = jax.random.split(jax.random.key(seed))
  balanced = models.init_params(model, key_init, input_shape)
  params = {'balanced': jax.tree.map(lambda x: x.astype(config.dtype), balanced)}
  if 'unbalanced' in config.inits:
    if isinstance(model, models.MLP):
      unbalance = functools.partial(optax_path.unbalance, scheme=config.unbalanced_scheme)
    else:
      cap = 30.0 if config.dtype == 'float32' else None
      unbalance = functools.partial(
        models.unbalance_channels, max_decades=cap, scheme=config.unbalanced_scheme
      )
    unbalance = jax.jit(unbalance, static_argnums=2)
    params['unbalanced'] = unbalance(key_unbalance, params['balanced'], config.unbalanced_units)
  return params


def search_method(exp: Experiment, method: str, params: dict, init: str, seed: int) -> list[dict]:
  """The step-size search of one method on one init of a seed; selection.csv rows."""
  tx, train_epoch = exp.method(method)
  spec = exp.spec(train_epoch, search=True, seed=seed)

  def run(alpha: float) -> tuple[list[float], bool]:
    lr = selection.learning_rate(alpha)
    history = train(
      spec,
      params[init],
      init_optimizer(tx, params[init], lr),
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
      'seed': seed,
      'alpha': c.alpha,
      'learning_rate': c.learning_rate,
      'best_val_error': c.best_error,
      'best_epoch': c.best_epoch,
      'final_val_error': c.final_error,
      'diverged': int(c.diverged),
      'extended': int(c.extended),
      'chosen': int(c is chosen),
    }
    for c in candidates
  ]


def final_run(
  exp: Experiment, method: str, params: dict, init: str, lr: float, seed: int
) -> list[dict]:
  """Trains on the whole training set from ``params[init]``; returns metrics.csv rows."""
  tx, train_epoch = exp.method(method)
  history = train(
    exp.spec(train_epoch, search=False, seed=seed),
    params[init],
    init_optimizer(tx, params[init], lr),
    desc=f'{method} {init} seed {seed} lr={lr:.0e}',
    progress=not exp.config.quiet,
  )
  base = {
    'dataset': exp.dataset.name,
    'method': method,
    'init': init,
    'dropout': exp.config.dropout,
    'seed': seed,
    'learning_rate': lr,
  }
  return [{**base, **h} for h in history]


def choose_steps(
  exp: Experiment, method: str, params: dict, seed: int
) -> tuple[dict, list[dict]]:
  """Each init's step size of a method: fixed by ``--lr``, else searched.

  Returns:
    ``({init: step size}, selection rows)``.
  """
  c = exp.config
  search_inits = ('balanced',) if c.search_init == 'balanced' else c.inits
  lrs, rows = {}, []
  for init in search_inits:
    if method in c.learning_rates:
      lrs[init] = c.learning_rates[method]
      continue
    found = search_method(exp, method, params, init, seed)
    rows += found
    lrs[init] = next(r['learning_rate'] for r in found if r['chosen'])
  return {init: lrs.get(init, lrs.get('balanced')) for init in c.inits}, rows


#: Seed of the training subset of ``--train-size`` (the same subset for every seed).
SUBSET_SEED = 0


def subsample_train(dataset: data.Dataset, size: int | None) -> data.Dataset:
  """The data set with a fixed random subset of ``size`` training examples (all if None).

  The subset is drawn with NumPy's generator seeded by :data:`SUBSET_SEED`, sorted, and
  the same for every ``--seed``; the test set is kept whole.

  Raises:
    UserError: If ``size`` is not between 1 and the number of training examples.
  """
  n = len(dataset.train_labels)
  if size is None or size == n:
    return dataset
  if not 1 <= size <= n:
    raise rundir.UserError(f'--train-size must be between 1 and {n}, got {size}.')
  keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:size])
  images, labels = dataset.train_images[keep], dataset.train_labels[keep]
  return dataset._replace(train_images=images, train_labels=labels)


def preamble(
  config: Config, dataset: data.Dataset, seconds: float, full_train: int | None = None
) -> list[str]:
  """The settings lines at the top of ``summary.md``."""
  n = len(dataset.train_labels)
  subset = (
    f' (a fixed random subset of the {full_train} training examples)'
    if full_train and full_train != n
    else ''
  )
  val = selection.validation_size(n)
  search = (
    'on the balanced init, used for both inits'
    if config.search_init == 'balanced'
    else 'separately for each init'
  )
  return [
    (
      f'Data: {dataset.name}, {n} training{subset} and {len(dataset.test_labels)} test '
      'examples. '
      f'{_network(config)}, batch {config.batch_size}, '
      f'{config.epochs} epochs, dropout {config.dropout:g}, {config.dtype}, '
      f'seeds {show(config.seeds)}. Unbalanced init: {config.unbalanced_units} hidden '
      f'units rescaled, {SCHEME_TEXT[config.unbalanced_scheme]}.'
    ),
    '',
    step_sizes_line(config, search, n - val, val),
    '',
    f'Wall time: {seconds:.0f} s'
    + (' (this invocation, which resumed an earlier one).' if config.resume else '.'),
  ]


def step_sizes_line(config: Config, search: str, fit: int, val: int) -> str:
  """The ``summary.md`` sentence on how the step sizes were chosen: by ``--lr`` or searched.

  Example:
    >>> c = Config('digits', None, 'mlp', (8,), 1, 1, 10, 0.0, (0,), ('path-sgd',),
    ...            ('balanced',), 1, 'authors', (1, 2), {'path-sgd': 0.1}, 'balanced',
    ...            'float64', 'out', True)
    >>> step_sizes_line(c, 'on the balanced init', 80, 20)
    'Step sizes fixed by --lr: path-sgd 0.1 (no step-size search).'
  """
  fixed = {m: v for m, v in config.learning_rates.items() if m in config.methods}
  searched = [m for m in config.methods if m not in fixed]
  fixed_text = ', '.join(f'{m} {v:g}' for m, v in fixed.items())
  if not searched:
    return f'Step sizes fixed by --lr: {fixed_text} (no step-size search).'
  text = (
    f'Step sizes of {", ".join(searched)}: 10^-alpha, alpha in {{{show(config.alphas)}}}, '
    f'chosen {search}: {config.search_epochs} epochs on {fit} examples, validation on the '
    f'other {val} (lowest validation error, reached first; the grid extended one step at '
    f'a time while the choice was at its end, within 0..10), on seed {config.seeds[0]}.'
  )
  return text + (f' Fixed by --lr: {fixed_text}.' if fixed else '')


def _network(config: Config) -> str:
  if config.model == 'mlp':
    return f'ReLU MLP, hidden layers {show(config.hidden)}'
  return f'ReLU CNN, 3x3 conv layers of {show(config.hidden)} channels with 2x2 average pooling'


def reproduce(config: Config) -> list[str]:
  """Runs the experiment and writes its outputs to ``config.out``.

  ``config.out`` is checked first (see :func:`rundir.check_out`), and marked as
  holding an incomplete run until the last file is written.

  Returns:
    The paths written.

  Raises:
    UserError: For an unusable ``config.out`` or a damaged data file.
    DatasetNotFoundError: If the data set is missing and cannot be downloaded.
  """
  start = time.perf_counter()
  rundir.check_out(config.out, resume=config.resume, overwrite=config.overwrite)
  load_previous(config)  # an earlier run that cannot be resumed: refused before any work
  try:
    dataset = data.load_dataset(config.dataset, config.data_dir)
  except ValueError as exc:  # a damaged data file
    raise rundir.UserError(str(exc)) from exc
  full_train = len(dataset.train_labels)
  dataset = subsample_train(dataset, config.train_size)
  rundir.begin(config.out, overwrite=config.overwrite and not config.resume)
  with jax.enable_x64(config.dtype == 'float64'):
    metrics, chosen = run_all(config, dataset)
  written = [os.path.join(config.out, n) for n in ('metrics.csv', 'selection.csv')]
  written = [p for p in written if os.path.exists(p)]  # no selection.csv if every step is fixed
  written += report.plot_figures(metrics, config.out)
  lines = preamble(config, dataset, time.perf_counter() - start, full_train)
  summary = os.path.join(config.out, 'summary.md')
  report.write_summary(summary, metrics, chosen, lines)
  written.append(summary)
  rundir.finish(config.out)
  print('Wrote ' + ', '.join(written))
  return written


def load_previous(
  config: Config, dataset: data.Dataset | None = None
) -> tuple[list[dict], list[dict]]:
  """The rows of an earlier run in ``config.out`` to resume from (``--resume``).

  Returns:
    ``(metrics rows, selection rows)``; empty without ``--resume`` or earlier files.

  Raises:
    UserError: If the earlier rows are of another data set or dropout rate, or a file
      is damaged.
  """
  path = os.path.join(config.out, 'metrics.csv')
  if not (config.resume and os.path.exists(path)):
    return [], []
  metrics, chosen = report.load_run(config.out)
  name = dataset.name if dataset is not None else config.dataset
  other = {(r['dataset'], float(r['dropout'])) for r in metrics} - {(name, float(config.dropout))}
  if other:
    raise rundir.UserError(
      f'--resume: {path} holds runs of {sorted(other)}, not of '
      f'{name} with dropout {config.dropout:g}; choose another --out.'
    )
  return metrics, chosen


def searched_steps(config: Config, method: str, chosen: Sequence[dict]) -> dict | None:
  """Each init's step size of a method from earlier selection rows, or None if absent."""
  if method in config.learning_rates:
    return {init: config.learning_rates[method] for init in config.inits}
  found = {r['init']: r['learning_rate'] for r in chosen if r['method'] == method and r['chosen']}
  if 'balanced' not in found and not set(config.inits) <= set(found):
    return None
  return {init: found.get(init, found.get('balanced')) for init in config.inits}


def run_all(config: Config, dataset: data.Dataset) -> tuple[list[dict], list[dict]]:
  """Runs every seed and method, rewriting the two CSV files after each run.

  The step sizes are chosen on the first seed and used for all seeds. With
  ``config.resume``, the finished runs and step searches of ``config.out`` are kept
  and skipped (a run is written only once finished, so none is half there).

  Returns:
    ``(metrics rows, selection rows)``.
  """
  exp = Experiment(config, dataset)
  os.makedirs(config.out, exist_ok=True)
  metrics, chosen = load_previous(config, dataset)
  done = set(report.group(metrics, ('method', 'init', 'seed')))
  steps = {}
  for seed in config.seeds:
    params = None
    for method in config.methods:
      todo = [i for i in config.inits if (method, i, seed) not in done]
      if method not in steps:
        steps[method] = searched_steps(config, method, chosen)
      if not todo and steps[method] is not None:
        continue
      params = params or initial_params(config, exp.model, exp.image_shape, seed)
      if steps[method] is None:
        steps[method], rows = choose_steps(exp, method, params, seed)
        chosen += rows
        report.write_csv(
          os.path.join(config.out, 'selection.csv'), report.SELECTION_COLUMNS, chosen
        )
      for init in todo:
        metrics += final_run(exp, method, params, init, steps[method][init], seed)
        report.write_csv(os.path.join(config.out, 'metrics.csv'), report.METRIC_COLUMNS, metrics)
  return metrics, chosen
