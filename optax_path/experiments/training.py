"""Training and evaluation loops for the experiments.

The methods compared (:data:`METHODS`) are Optax gradient transformations built from a
step size. Each is wrapped in :func:`optax.inject_hyperparams`, so the step size lives in
the optimizer state and one jitted epoch function per method serves every step size and
both initialisations. An epoch is a :func:`jax.lax.scan` over mini-batches gathered on
the device from the whole training set (put there once), in an order drawn with NumPy's
RNG from the run's seed: every method and initialisation sees the same batches.
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

from optax_path.experiments.models import MLP

#: Examples per jitted evaluation call.
EVAL_CHUNK = 10_000


class Method(NamedTuple):
    """An optimisation method of the comparison.

    Attributes:
      factory: Builds the method's transformation from ``learning_rate=`` (keyword).
      description: One line for ``--help``.
    """

    factory: Callable[..., optax.GradientTransformation]
    description: str


def _path_sgd(learning_rate: float) -> optax.GradientTransformation:
    import optax_path  # The core library; imported late so the CLI loads without it.

    return optax_path.path_sgd(learning_rate)


def _sgd(learning_rate: float) -> optax.GradientTransformation:
    return optax.sgd(learning_rate)


def _adagrad(learning_rate: float) -> optax.GradientTransformation:
    return optax.adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7)


#: The methods, by command-line name. Add an entry to compare another method.
METHODS: dict[str, Method] = {
    "path-sgd": Method(_path_sgd, "Path-SGD, p=2 (eq. 8): SGD on path-normalized gradients"),
    "sgd": Method(_sgd, "plain mini-batch SGD"),
    "adagrad": Method(_adagrad, "AdaGrad (initial accumulator 0.1, eps 1e-7)"),
}


class Split(NamedTuple):
    """Examples on the device.

    Attributes:
      images: ``(N, features)`` float32.
      labels: ``(N,)`` int32.
    """

    images: jax.Array
    labels: jax.Array


def to_device(images: np.ndarray, labels: np.ndarray, dtype: str = "float32") -> Split:
    """Flattens images and puts a split on the default device.

    Args:
      images: ``(N, ...)`` array.
      labels: ``(N,)`` integer array.
      dtype: Floating dtype of the images (``float64`` needs x64 mode).

    Returns:
      The split as device arrays.
    """
    flat = np.asarray(images, dtype).reshape(len(images), -1)
    return Split(jax.device_put(flat), jax.device_put(np.asarray(labels, np.int32)))


def make_optimizer(method: str) -> optax.GradientTransformation:
    """Builds a method with its step size held in the state.

    Args:
      method: A key of :data:`METHODS`.

    Returns:
      The transformation; set the step size with :func:`init_optimizer`.
    """
    return optax.inject_hyperparams(METHODS[method].factory)(learning_rate=1.0)


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
    state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, dtype)
    return state


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def epoch_batches(
    rng: np.random.Generator, num_examples: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one epoch's mini-batches.

    Every example is used once; the last batch is padded and masked out if needed.

    Args:
      rng: NumPy generator (the run's seed).
      num_examples: Training set size.
      batch_size: Examples per step.

    Returns:
      ``(indices, mask)``, both ``(steps, batch_size)``; mask is 1.0 for real examples.
    """
    steps = -(-num_examples // batch_size)
    pad = steps * batch_size - num_examples
    indices = np.concatenate([rng.permutation(num_examples), np.zeros(pad, np.int64)])
    mask = np.concatenate([np.ones(num_examples, np.float32), np.zeros(pad, np.float32)])
    return indices.reshape(steps, batch_size).astype(np.int32), mask.reshape(steps, batch_size)


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
    """Builds the jitted epoch function of a method.

    Args:
      model: The network.
      tx: The method (needs ``params`` in ``update``, as Path-SGD does).

    Returns:
      ``train_epoch(params, opt_state, data, indices, mask, key)`` returning
      ``(params, opt_state, step_losses)``; ``data`` is the whole training :class:`Split`.
    """

    def loss_fn(params, x, y, w, key):
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.sum(cross_entropy(logits, y) * w) / jnp.sum(w)

    @jax.jit
    def train_epoch(params, opt_state, data, indices, mask, key):
        def step(carry, batch):
            params, opt_state = carry
            idx, w, step_key = batch
            loss, grads = jax.value_and_grad(loss_fn)(
                params, data.images[idx], data.labels[idx], w, step_key
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(key, indices.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (indices, mask, keys))
        return params, opt_state, losses

    return Compiled(train_epoch)


Evaluate = Callable[[optax.Params, Split], tuple[float, float]]


def make_evaluate(model: MLP, chunk: int = EVAL_CHUNK) -> Evaluate:
    """Builds the evaluation function (no dropout), run in large jitted chunks.

    Args:
      model: The network.
      chunk: Examples per jitted call.

    Returns:
      ``evaluate(params, split) -> (mean cross-entropy, 0/1 error)``. The error is NaN
      when some logits are not finite (a diverged net has no meaningful predictions).
    """

    @jax.jit
    def sums(params, x, y):
        logits = model.apply({"params": params}, x)
        wrong = jnp.where(
            jnp.all(jnp.isfinite(logits), axis=-1),
            (jnp.argmax(logits, axis=-1) != y).astype(jnp.float32),
            jnp.nan,
        )
        return jnp.sum(cross_entropy(logits, y)), jnp.sum(wrong)

    def evaluate(params, split):
        n = split.labels.shape[0]
        loss, wrong = 0.0, 0.0
        for start in range(0, n, chunk):
            a, b = sums(params, split.images[start : start + chunk], split.labels[start : start + chunk])
            loss, wrong = loss + float(a), wrong + float(b)
        return loss / n, wrong / n

    return evaluate


class RunSpec(NamedTuple):
    """What one training run needs besides its parameters and optimizer.

    Attributes:
      train_epoch: From :func:`make_train_epoch`.
      evaluate: From :func:`make_evaluate`.
      train: The training split (on the device).
      evals: Splits evaluated after every epoch, by name (metrics ``<name>_loss`` and
        ``<name>_error``).
      epochs: Number of epochs.
      batch_size: Examples per step.
      seed: Seeds the batch order and the dropout masks.
    """

    train_epoch: TrainEpoch
    evaluate: Evaluate
    train: Split
    evals: Mapping[str, Split]
    epochs: int
    batch_size: int
    seed: int


def evaluate_all(spec: RunSpec, params: optax.Params) -> dict[str, float]:
    """Evaluates ``params`` on every split of ``spec.evals``."""
    row = {}
    for name, split in spec.evals.items():
        row[f"{name}_loss"], row[f"{name}_error"] = spec.evaluate(params, split)
    return row


def is_diverged(row: Mapping[str, float]) -> bool:
    """Whether any metric of an epoch is NaN or infinite."""
    return not all(math.isfinite(v) for v in row.values())


def train(
    spec: RunSpec,
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    desc: str = "",
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
    n = spec.train.labels.shape[0]
    history = [{"epoch": 0, "seconds": 0.0, "batch_loss": math.nan, **evaluate_all(spec, params)}]
    seconds = 0.0
    bar = tqdm(range(1, spec.epochs + 1), desc=desc, disable=not progress, leave=True)
    for epoch in bar:
        args = (params, opt_state, spec.train, *epoch_batches(rng, n, spec.batch_size),
                jax.random.fold_in(key, epoch))
        run_epoch = spec.train_epoch.prepare(*args)
        start = time.perf_counter()
        params, opt_state, losses = run_epoch(*args)
        batch_loss = float(jnp.mean(losses))
        seconds += time.perf_counter() - start
        row = {"batch_loss": batch_loss, **evaluate_all(spec, params)}
        history.append({"epoch": epoch, "seconds": seconds, **row})
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.endswith("error")})
        if is_diverged(row):
            bar.close()
            break
    return history
