"""Eager (un-jitted) updates: the first call and the median of later ones, per optimizer.

Run from the repository root: ``python results/bench/eager/eager_updates.py``. Every
optimizer updates the paper's 784-4000-4000-10 net (float32) 1 + 10 times outside ``jit``,
as in a notebook or a debugger; then ``optax.inject_hyperparams`` versions, which rebuild
the transformation on every update. Prints a markdown table.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optax_path

WIDTHS = (784, 4000, 4000, 10)
LATER = 10


def paper_net():
  keys = jax.random.split(jax.random.key(0), len(WIDTHS) - 1)
  return {
    f'Dense_{i}': {'kernel': jax.random.normal(k, (a, b)) / a**0.5, 'bias': jnp.zeros(b)}
    for i, (k, a, b) in enumerate(zip(keys, WIDTHS[:-1], WIDTHS[1:]))
  }


def timed(tx, params, grads):
  """(first, median of the later) eager update times in ms."""
  state = tx.init(params)
  times = []
  for _ in range(1 + LATER):
    start = time.perf_counter()
    updates, state = tx.update(grads, state, params)
    jax.block_until_ready(updates)
    times.append(1e3 * (time.perf_counter() - start))
  return times[0], statistics.median(times[1:])


def main():
  params = paper_net()
  grads = jax.tree.map(lambda w: 1e-3 * w, params)
  rows = [
    ('optax.sgd(0.1)', optax.sgd(0.1)),
    ('path_sgd(0.1)', optax_path.path_sgd(0.1)),
    ('optax.adam(1e-3)', optax.adam(1e-3)),
    ('path_adam(1e-3)', optax_path.path_adam(1e-3)),
    ('inject_hyperparams(optax.sgd)', optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)),
    ('inject_hyperparams(path_sgd)', optax.inject_hyperparams(optax_path.path_sgd)(learning_rate=0.1)),
    ('inject_hyperparams(optax.adam)', optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)),
    ('inject_hyperparams(path_adam)', optax.inject_hyperparams(optax_path.path_adam)(learning_rate=1e-3)),
  ]
  print(f'JAX {jax.__version__}, {jax.devices()[0].platform}, {WIDTHS}, float32, {LATER} later calls')
  print('| optimizer | first eager update (ms) | later, median (ms) |')
  print('|---|---:|---:|')
  for name, tx in rows:
    first, later = timed(tx, params, grads)
    print(f'| {name} | {first:.0f} | {later:.0f} |', flush=True)


if __name__ == '__main__':
  sys.exit(main())
