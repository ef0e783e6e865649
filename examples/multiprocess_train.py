"""Path-SGD on several processes: JAX's multi-controller runtime, a global device mesh.

Every process runs this same script. They meet at a coordinator
(``jax.distributed.initialize``), see all devices of all processes as one global mesh
with axes ``('data', 'model')``, and run the same jitted training step: each process
feeds only its own rows of every global batch (the batch is split over ``'data'``),
kernels and biases are split over ``'model'`` on their output axis, and XLA inserts
the collectives. The path scales are computed inside the step, from the sharded params,
so Path-SGD needs nothing else to run data- and model-parallel.

Two processes on one machine, on CPU, with two simulated devices each::

  python examples/multiprocess_train.py --coordinator 127.0.0.1:12345 \\
      --num-processes 2 --process-id 0 --local-devices 2 --out result.npz &
  python examples/multiprocess_train.py --coordinator 127.0.0.1:12345 \\
      --num-processes 2 --process-id 1 --local-devices 2

Several hosts (one process per host, or per GPU): run it on every host with
``--coordinator <host 0's address>:<port>``, the same ``--num-processes`` and each
host's own ``--process-id`` (0 on the coordinator's host); on GPUs leave out
``--local-devices``. On a cluster that JAX detects (SLURM, Open MPI, Cloud TPU), pass
``--auto`` instead of the three flags. Without any of them, it runs in one process.

It writes, from process 0, the final params (gathered to the host) and the loss of every
step to ``--out`` (``.npz``); the result does not depend on how many processes share the
devices.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--coordinator', help='host:port of process 0, e.g. 10.0.0.1:12345')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument(
    '--auto', action='store_true', help='let jax.distributed.initialize() detect the cluster'
  )
  parser.add_argument(
    '--local-devices',
    type=int,
    default=None,
    help='simulate this many CPU devices in each process (CPU only)',
  )
  parser.add_argument('--model-axis', type=int, default=2, help="size of the mesh's 'model' axis")
  parser.add_argument(
    '--model',
    choices=('cnn', 'mlp'),
    default='cnn',
    help='cnn: residual CNN, general mode; mlp: ReLU MLP, MLP mode',
  )
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=32, help='global batch size')
  parser.add_argument('--learning-rate', type=float, default=0.05)
  parser.add_argument(
    '--timeout', type=int, default=60, help='seconds to wait for the other processes at start-up'
  )
  parser.add_argument('--out', help='where process 0 writes the params and losses (.npz)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.local_devices:  # must be set before JAX starts its backend
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={args.local_devices}'
    )
  import jax

  # CPU processes exchange collectives through gloo (harmless on GPU and TPU).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if args.auto:
    jax.distributed.initialize(initialization_timeout=args.timeout)
  elif args.num_processes > 1:
    jax.distributed.initialize(
      args.coordinator, args.num_processes, args.process_id, initialization_timeout=args.timeout
    )
  try:
    losses, params = train(args)
    if jax.process_index() == 0 and args.out:
      save(args.out, params, losses)
  finally:
    if args.auto or args.num_processes > 1:
      jax.distributed.shutdown()
  return 0


def make_model(name):
  import flax.linen as nn

  class ResidualCNN(nn.Module):
    """conv -> [conv -> relu -> conv] + skip -> relu -> avg pool -> dense."""

    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(8, (3, 3))(x))
      r = nn.Conv(8, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(h)))
      h = nn.avg_pool(nn.relu(h + r), (2, 2), (2, 2))
      return nn.Dense(4)(h.reshape(h.shape[0], -1))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
      x = nn.relu(nn.Dense(32)(x))
      return nn.Dense(4)(x)

  return ResidualCNN() if name == 'cnn' else MLP()


def synthetic_data(steps, batch, seed=0):
  """The same ``(steps, batch, 8, 8, 2)`` images and labels in every process."""
  import numpy as np

  rng = np.random.default_rng(seed)
  images = rng.normal(size=(steps, batch, 8, 8, 2)).astype(np.float32)
  labels = (images[..., 0].mean(axis=(2, 3)) > 0).astype(np.int32) * 2 + (
    images[..., 1].mean(axis=(2, 3)) > 0
  ).astype(np.int32)
  return images, labels


def init_params(model, seed=0):
  """Identical params in every process: N(0, 1/fan_in) kernels, zero biases."""
  import jax
  import numpy as np

  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 2), np.float32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (
      (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
      if len(s.shape) > 1
      else np.zeros(s.shape, np.float32)
    ),
    shapes['params'],
  )


def local_rows(sharding, global_shape):
  """The rows of a global batch that this process's devices hold (a contiguous block)."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  return slice(min(starts), max(stops))


def train(args):
  import jax
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_path

  devices = jax.device_count()
  if devices % args.model_axis:
    raise SystemExit(
      f'{devices} devices do not fill a mesh with a model axis of {args.model_axis}.'
    )
  mesh = jax.make_mesh(
    (devices // args.model_axis, args.model_axis),
    ('data', 'model'),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  model = make_model(args.model)

  # Params: the same values in every process, each device keeping its slice of the
  # output axis.
  host_params = init_params(model)
  param_shardings = jax.tree.map(
    lambda w: NamedSharding(mesh, P(*([None] * (w.ndim - 1)), 'model')), host_params
  )
  params = jax.tree.map(
    lambda w, s: jax.make_array_from_callback(w.shape, s, lambda index, w=w: w[index]),
    host_params,
    param_shardings,
  )

  if args.model == 'cnn':
    normalize = optax_path.path_normalize(
      2.0, apply_fn=lambda q, x: model.apply({'params': q}, x), input_shape=(8, 8, 2)
    )
  else:
    normalize = optax_path.path_normalize(2.0)
  tx = optax.chain(normalize, optax.sgd(args.learning_rate))
  state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  replicated = NamedSharding(mesh, P())

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, state = tx.update(grads, state, params)
    params = jax.lax.with_sharding_constraint(optax.apply_updates(params, updates), param_shardings)
    return params, state, jax.lax.with_sharding_constraint(loss, replicated)

  images, labels = synthetic_data(args.steps, args.batch)
  batch_sharding = NamedSharding(mesh, P('data'))
  rows = local_rows(batch_sharding, images.shape[1:])
  losses = []
  for t in range(args.steps):
    # Each process reads only its rows of the global batch.
    x = jax.make_array_from_process_local_data(batch_sharding, images[t, rows], images.shape[1:])
    y = jax.make_array_from_process_local_data(batch_sharding, labels[t, rows], labels.shape[1:])
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  if jax.process_index() == 0:
    print(
      f'processes {jax.process_count()}, devices {devices}, mesh {dict(mesh.shape)}, '
      f'loss {losses[0]:.4f} -> {losses[-1]:.4f}',
      flush=True,
    )
  from jax.experimental import multihost_utils

  return np.asarray(losses), multihost_utils.process_allgather(params, tiled=True)


def save(path, params, losses):
  import jax
  import numpy as np

  flat = {
    '/'.join(str(getattr(k, 'key', k)) for k in key_path): np.asarray(leaf)
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  np.savez(path, losses=losses, **{f'params/{name}': value for name, value in flat.items()})


if __name__ == '__main__':
  sys.exit(main())
