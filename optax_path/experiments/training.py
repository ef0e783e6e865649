"""Training and evaluation loops for the experiments.

The methods compared (:data:`METHODS`) are Optax gradient transformations built from a
step size. Each is wrapped in :func:`optax.inject_hyperparams`, so the step size lives in
the optimizer state and one jitted training step per method serves every step size,
both initialisations, the step-size search and the final runs. All examples (training
and test) are put on the device once, as one :class:`Data`; a split is an array of
indices into it, and a step gathers its mini-batch on the device. A whole epoch is one
compiled ``lax.scan`` over its steps (:func:`make_train_epoch`). The batches are drawn
with NumPy's RNG from the run's seed, so every method and initialisation sees the same
batches (and dropout masks). Evaluation runs in large fixed-size jitted chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import optax_path
from optax_path.experiments.models import MLP

#: Examples per jitted evaluation call.
EVAL_CHUNK = 10_000


class Method(NamedTuple):
  """An optimisation method of the comparison.

  Attributes:
    factory: Builds the method's transformation from a step size and a path mode.
    description: One line for ``--help``.
  """

  factory: Callable[..., optax.GradientTransformation]
  description: str


def _naive_path_sgd(learning_rate: float) -> optax.GradientTransformation:
  from optax_path.experiments.bench import naive_path_normalize  # bench imports this module

  return optax.chain(naive_path_normalize(), optax.sgd(learning_rate))


def _adagrad(learning_rate: float) -> optax.GradientTransformation:
  return optax.adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7)


#: The methods, by command-line name: ``factory(learning_rate, mode)``, where ``mode``
#: holds the keyword arguments that say how to find the path scales (see
#: :func:`optax_path.experiments.models.path_mode`). Add an entry to compare another.
METHODS: dict[str, Method] = {
  'path-sgd': Method(
    lambda lr, mode: optax_path.path_sgd(lr, **mode),
    'Path-SGD, p=2 (eq. 8): SGD on path-normalized gradients',
  ),
  'sgd': Method(lambda lr, mode: optax.sgd(lr), 'plain mini-batch SGD'),
  'adagrad': Method(lambda lr, mode: _adagrad(lr), 'AdaGrad (initial accumulator 0.1, eps 1e-7)'),
  'path-adagrad': Method(
    lambda lr, mode: optax_path.path_adagrad(lr, **mode),
    "the paper's Path-AdaGrad: AdaGrad on path-normalized gradients (not invariant)",
  ),
  'path-adagrad-geometry': Method(
    lambda lr, mode: optax_path.path_geometry(_adagrad(lr), **mode),
    'AdaGrad in the path geometry: path_geometry(adagrad), rescaling invariant',
  ),
  'adam': Method(lambda lr, mode: optax.adam(lr), 'Adam (b1 0.9, b2 0.999, eps 1e-8)'),
  'path-adam': Method(
    lambda lr, mode: optax_path.path_adam(lr, **mode),
    'Adam in the path geometry: path_adam, rescaling invariant',
  ),
  'naive-path-sgd': Method(
    lambda lr, mode: _naive_path_sgd(lr),
    'Path-SGD in plain float arithmetic (the bench reference; not robust: inf/NaN where '
    'the scales leave the float range; MLP only)',
  ),
}


class Data(NamedTuple):
  """All the examples of an experiment, on the device.

  Attributes:
    images: ``(N, features)`` float32.
    labels: ``(N,)`` int32.
  """

  images: jax.Array
  labels: jax.Array


def to_device(images: np.ndarray, labels: np.ndarray, dtype: str = 'float32') -> Data:
  """Flattens images and puts them on the default device.

  Args:
    images: ``(N, ...)`` array.
    labels: ``(N,)`` integer array.
    dtype: Floating dtype of the images (``float64`` needs x64 mode).

  Returns:
    The examples as device arrays.
  """
  flat = np.asarray(images, dtype).reshape(len(images), -1)
  return Data(jax.device_put(flat), jax.device_put(np.asarray(labels, np.int32)))


def make_optimizer(
  method: str, mode: Mapping[str, Any] | None = None
) -> optax.GradientTransformation:
  """Builds a method with its step size held in the state.

  Args:
    method: A key of :data:`METHODS`.
    mode: How to find the path scales (default: the MLP mode).

  Returns:
    The transformation; set the step size with :func:`init_optimizer`.
  """
  factory, mode = METHODS[method].factory, dict(mode or {})
  # Only the step size is injected: other numeric defaults (such as p) stay static.
  return optax.inject_hyperparams(lambda learning_rate: factory(learning_rate, mode))(
    learning_rate=1.0
  )


def init_optimizer(
  tx: optax.GradientTransformation, params: optax.Params, learning_rate: float
) -> optax.OptState:
  """Initialises an optimizer from :func:`make_optimizer` with a step size.

  Args:
    tx: The transformation.
    params: The initial parameters.
    learning_rate: The step size.

  Returns:
    The state.
  """
  state = tx.init(params)
  dtype = jax.tree.leaves(params)[0].dtype
  state.hyperparams['learning_rate'] = jnp.asarray(learning_rate, dtype)
  return state


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def padded_chunks(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts indices into rows of ``size``, padding the last row (mask 0).

  Args:
    indices: 1-D example indices.
    size: Row length.

  Returns:
    ``(indices, mask)``, both ``(rows, size)``; mask is 1.0 for real examples.
  """
  rows = max(1, -(-len(indices) // size))
  pad = rows * size - len(indices)
  padded = np.concatenate([indices, np.zeros(pad, indices.dtype)]).astype(np.int32)
  mask = np.concatenate([np.ones(len(indices), np.float32), np.zeros(pad, np.float32)])
  return padded.reshape(rows, size), mask.reshape(rows, size)


def epoch_batches(
  rng: np.random.Generator, examples: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one epoch's mini-batches.

  Every example is used once; the last batch is padded and masked out if needed.

  Args:
    rng: NumPy generator (the run's seed).
    examples: Indices of the training examples.
    batch_size: Examples per step.

  Returns:
    ``(indices, mask)``, both ``(steps, batch_size)``; mask is 1.0 for real examples.
  """
  return padded_chunks(examples[rng.permutation(len(examples))], batch_size)


class Compiled:
  """A jitted function compiled ahead of time, once per argument signature.

  Compiling through :meth:`prepare` before a timer starts keeps compilation out of
  the measured training time.
  """

  def __init__(self, fn: Callable[..., Any]):
    """Wraps ``fn`` (a :func:`jax.jit` function)."""
    self._fn = fn
    self._cache: dict[Any, Any] = {}

  def prepare(self, *args: Any) -> Callable[..., Any]:
    """The executable for arguments like ``args`` (compiled on first use)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in self._cache:
      self._cache[key] = self._fn.lower(*args).compile()
    return self._cache[key]

  def __call__(self, *args: Any) -> Any:
    """Runs the function."""
    return self.prepare(*args)(*args)


TrainEpoch = Compiled


def make_train_epoch(model: MLP, tx: optax.GradientTransformation) -> TrainEpoch:
  """Builds the jitted training epoch of a method: all its steps in one ``lax.scan``.

  One compiled call per epoch, with the data already on the device, so that the
  Python loop costs nothing per step.

  Args:
    model: The network.
    tx: The method (needs ``params`` in ``update``, as Path-SGD does).

  Returns:
    ``train_epoch(params, opt_state, data, indices, mask, key)`` returning
    ``(params, opt_state, losses)``: one update per row of ``indices``
    ``(steps, batch)`` on the mini-batch ``data[indices[i]]`` (``mask[i]`` weighs its
    examples), with dropout masks drawn from ``fold_in(key, i)``; ``losses`` ``(steps,)``
    are the mini-batch losses before each update; ``data`` is all the examples
    (:class:`Data`), already on the device.
  """

  def loss_fn(params, x, y, w, key):
    logits = model.apply({'params': params}, x, train=True, rngs={'dropout': key})
    return jnp.sum(cross_entropy(logits, y) * w) / jnp.sum(w)

  @jax.jit
  def train_epoch(params, opt_state, data, indices, mask, key):
    def step(carry, batch):
      params, opt_state = carry
      i, rows, weights = batch
      x, y = data.images[rows], data.labels[rows]
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y, weights, jax.random.fold_in(key, i))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    steps = jnp.arange(indices.shape[0], dtype=jnp.int32)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (steps, indices, mask))
    return params, opt_state, losses

  return Compiled(train_epoch)


Evaluate = Callable[[optax.Params, Data, np.ndarray], tuple[float, float]]


def make_evaluate(model: MLP, chunk: int = EVAL_CHUNK) -> Evaluate:
  """Builds the evaluation function (no dropout), run in fixed-size jitted chunks.

  Args:
    model: The network.
    chunk: Examples per jitted call (one compilation serves every split).

  Returns:
    ``evaluate(params, data, indices) -> (mean cross-entropy, 0/1 error)`` over the
    examples ``indices`` of ``data``. The error is NaN when some logits are not finite
    (a diverged net has no meaningful predictions).
  """

  @jax.jit
  def sums(params, data, indices, mask):
    logits = model.apply({'params': params}, data.images[indices])
    labels = data.labels[indices]
    wrong = jnp.where(
      jnp.all(jnp.isfinite(logits), axis=-1),
      (jnp.argmax(logits, axis=-1) != labels).astype(logits.dtype),
      jnp.nan,
    )
    keep = mask > 0  # where(), not a product: padding must not turn inf into NaN
    loss = jnp.where(keep, cross_entropy(logits, labels), 0.0)
    return jnp.sum(loss), jnp.sum(jnp.where(keep, wrong, 0.0))

  def evaluate(params, data, indices):
    loss, wrong = 0.0, 0.0
    for rows, mask in zip(*padded_chunks(indices, chunk)):
      a, b = sums(params, data, rows, mask)
      loss, wrong = loss + float(a), wrong + float(b)
    return loss / len(indices), wrong / len(indices)

  return evaluate


class RunSpec(NamedTuple):
  """What one training run needs besides its parameters and optimizer.

  Attributes:
    train_epoch: From :func:`make_train_epoch`.
    evaluate: From :func:`make_evaluate`.
    data: All examples, on the device.
    train: Indices of the training examples in ``data``.
    evals: Indices of the examples evaluated after every epoch, by split name
      (metrics ``<name>_loss`` and ``<name>_error``).
    epochs: Number of epochs.
    batch_size: Examples per step.
    seed: Seeds the batch order and the dropout masks.
  """

  train_epoch: TrainEpoch
  evaluate: Evaluate
  data: Data
  train: np.ndarray
  evals: Mapping[str, np.ndarray]
  epochs: int
  batch_size: int
  seed: int


def evaluate_all(spec: RunSpec, params: optax.Params) -> dict[str, float]:
  """Evaluates ``params`` on every split of ``spec.evals``."""
  row = {}
  for name, indices in spec.evals.items():
    row[f'{name}_loss'], row[f'{name}_error'] = spec.evaluate(params, spec.data, indices)
  return row


def is_diverged(row: Mapping[str, float]) -> bool:
  """Whether any metric of an epoch is NaN or infinite."""
  return not all(math.isfinite(v) for v in row.values())


def train(
  spec: RunSpec,
  params: optax.Params,
  opt_state: optax.OptState,
  *,
  desc: str = '',
  progress: bool = True,
) -> list[dict[str, float]]:
  """Trains for ``spec.epochs`` epochs, evaluating before and after every epoch.

  A run whose training loss or metrics become NaN or infinite is stopped after
  recording that epoch.

  Args:
    spec: What to train on and how.
    params: Initial parameters.
    opt_state: Initial optimizer state (from :func:`init_optimizer`).
    desc: Progress-bar label.
    progress: Whether to show a progress bar.

  Returns:
    One dict per epoch, from epoch 0 (before training): ``epoch``, ``seconds``
    (cumulative training time, evaluation excluded), ``batch_loss`` (mean loss of the
    epoch's steps; NaN at epoch 0) and the metrics of :func:`evaluate_all`.
  """
  rng = np.random.default_rng(spec.seed)
  key = jax.random.key(spec.seed)
  history = [{'epoch': 0, 'seconds': 0.0, 'batch_loss': math.nan, **evaluate_all(spec, params)}]
  seconds = 0.0
  bar = tqdm(range(1, spec.epochs + 1), desc=desc, disable=not progress, leave=True)
  for epoch in bar:
    indices, mask = epoch_batches(rng, spec.train, spec.batch_size)
    epoch_key = jax.random.fold_in(key, epoch)
    run_epoch = spec.train_epoch.prepare(params, opt_state, spec.data, indices, mask, epoch_key)
    start = time.perf_counter()
    params, opt_state, losses = run_epoch(params, opt_state, spec.data, indices, mask, epoch_key)
    batch_loss = float(jnp.mean(losses))
    seconds += time.perf_counter() - start
    row = {'batch_loss': batch_loss, **evaluate_all(spec, params)}
    history.append({'epoch': epoch, 'seconds': seconds, **row})
    bar.set_postfix({k: f'{v:.4g}' for k, v in row.items() if k.endswith('error')})
    if is_diverged(row):
      bar.close()
      break
  return history
