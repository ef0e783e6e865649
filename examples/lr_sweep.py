"""A small learning-rate sweep: Path-SGD, path-adam and SGD on digits, from both inits.

The README's "Picking the learning rate" table comes from this script:

    nice python examples/lr_sweep.py --out results/lr_sweep

A ReLU MLP 64-512-512-10 (Flax's default init, ``N(0, 1/fan_in)`` weights and zero biases:
the balanced start) is trained on scikit-learn's bundled 8x8 digits (1,437 training and 360
test images, the split of ``python -m optax_path.experiments reproduce``) in float32, with
mini-batches of 100, for a few epochs, at a few step sizes per method, from the balanced
start and from the paper's unbalanced one (``optax_path.unbalance(key, params, 256)``: a
quarter of the hidden units rescaled by ``10 exp(z)``, the same function). Every run of a
seed sees the same init and the same batches. It prints a markdown table of the final
training loss and test error (mean over the seeds) and, with ``--out DIR``, writes it to
``DIR/lr_sweep.md`` and every run to ``DIR/lr_sweep.csv`` (each file written to a temporary
file, then renamed). About two minutes on two busy CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import pathlib
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_path
from optax_path.experiments.data import load_dataset

#: method -> (optimizer from a step size, the step sizes tried)
METHODS = {
  'path-sgd': (optax_path.path_sgd, (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
  'path-adam': (optax_path.path_adam, (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
  'sgd': (optax.sgd, (1e-2, 1e-1, 3e-1, 1.0, 3.0)),
}
HIDDEN = (512, 512)
BATCH = 100


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in HIDDEN:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train(make_tx):
  """One compiled function per method: the step size is an argument, not a constant."""

  @jax.jit
  def train(params, learning_rate, batches, x, y):
    tx = make_tx(learning_rate)

    def step(carry, batch):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x[batch], y[batch])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
    return params

  return train


@jax.jit
def evaluate(params, x_train, y_train, x_test, y_test):
  train_loss = loss_fn(params, x_train, y_train)
  test_error = jnp.mean(jnp.argmax(MODEL.apply({'params': params}, x_test), -1) != y_test)
  return train_loss, test_error


def run(epochs: int, seeds: int) -> list[dict]:
  data = load_dataset('digits')
  x_train = jnp.asarray(data.train_images.reshape(len(data.train_images), -1))
  x_test = jnp.asarray(data.test_images.reshape(len(data.test_images), -1))
  y_train, y_test = jnp.asarray(data.train_labels), jnp.asarray(data.test_labels)
  steps = len(x_train) // BATCH
  rows = []
  for seed in range(seeds):
    init_key, unbalance_key, batch_key = jax.random.split(jax.random.key(seed), 3)
    balanced = MODEL.init(init_key, x_train[:1])['params']
    inits = {
      'balanced': balanced,
      'unbalanced': optax_path.unbalance(unbalance_key, balanced, sum(HIDDEN) // 4),
    }
    orders = jax.vmap(lambda k: jax.random.permutation(k, len(x_train)))(
      jax.random.split(batch_key, epochs)
    )
    batches = orders[:, : steps * BATCH].reshape(epochs * steps, BATCH)
    for method, (make_tx, rates) in METHODS.items():
      train = make_train(make_tx)
      for rate in rates:
        for init, params in inits.items():
          final = train(params, jnp.float32(rate), batches, x_train, y_train)
          train_loss, test_error = evaluate(final, x_train, y_train, x_test, y_test)
          rows.append(
            dict(method=method, learning_rate=rate, init=init, seed=seed, epochs=epochs,
                 train_loss=float(train_loss), test_error=float(test_error))
          )
          print(f'{method:9s} {rate:<6g} {init:10s} seed {seed}: training loss '
                f'{float(train_loss):.4g}, test error {100 * float(test_error):.2f}%',
                file=sys.stderr, flush=True)
  return rows


def _cell(runs: list[dict]) -> str:
  losses = np.array([r['train_loss'] for r in runs])
  errors = np.array([r['test_error'] for r in runs])
  finite = np.isfinite(losses)
  if not finite.any():
    return 'diverged | -'
  if not finite.all():
    return (f'diverged in {np.sum(~finite)} of {len(runs)} seeds; '
            f'{"the other" if finite.sum() == 1 else "the others"}: '
            f'{losses[finite].mean():.3g} | {100 * errors[finite].mean():.2f}%')
  return f'{losses.mean():.3g} | {100 * errors.mean():.2f}%'


def table(rows: list[dict]) -> str:
  seeds = len({r['seed'] for r in rows})
  epochs = rows[0]['epochs']
  mean = f' (mean of {seeds} seeds)' if seeds > 1 else ''
  lines = [
    f'Digits, MLP 64-{"-".join(map(str, HIDDEN))}-10, float32, batch {BATCH}, {epochs} epochs'
    f'{mean}: final training loss and test error.',
    '',
    '| method | step size | training loss, balanced | test error, balanced '
    '| training loss, unbalanced | test error, unbalanced |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for method, (_, rates) in METHODS.items():
    for rate in rates:
      cells = [
        _cell([r for r in rows if (r['method'], r['learning_rate'], r['init']) == (method, rate, init)])
        for init in ('balanced', 'unbalanced')
      ]
      lines.append(f'| {method} | {rate:g} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines) + '\n'


def write_atomically(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--seeds', type=int, default=2, help='seeds 0 .. N-1')
  parser.add_argument('--out', type=pathlib.Path, help='directory for lr_sweep.md and .csv')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  rows = run(args.epochs, args.seeds)
  seconds = time.perf_counter() - start
  command = 'python examples/lr_sweep.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
  text = table(rows)
  print(text, end='')
  print(f'({seconds:.0f} s)', file=sys.stderr)
  if args.out is not None:
    md = (
      f'# Learning-rate sweep\n\n```bash\n{command.strip()}\n```\n\n{text}\n'
      f'{len(rows)} runs in {seconds:.0f} s ({os.cpu_count()} CPU cores, load average '
      f'{os.getloadavg()[0]:.1f} at the end; JAX {jax.__version__} on '
      f'{jax.devices()[0].platform}). Diverged: the final training loss is not finite.\n'
    )
    write_atomically(args.out / 'lr_sweep.md', md)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(args.out / 'lr_sweep.csv', buffer.getvalue())
    print(f'wrote {args.out / "lr_sweep.md"} and {args.out / "lr_sweep.csv"}', file=sys.stderr)


if __name__ == '__main__':
  main()
