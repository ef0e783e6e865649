"""Checks on 8 devices, run by test_many_devices.py in a subprocess that simulates them.

Params sharded over the 'model' axis of a ('data', 'model') mesh (kernels on their output
axis), batches over 'data'. Not collected by the main test session (the file name does
not start with ``test_``); run it alone with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice_checks.py``.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_path

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 (simulated) devices')


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.3)
    x = nn.relu(nn.Dense(8, bias_init=init)(x))
    x = nn.relu(nn.Dense(8, bias_init=init)(x))
    return nn.Dense(4, bias_init=init)(x)


class ResidualCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.3)
    h = nn.relu(nn.Conv(4, (3, 3), bias_init=init)(x))
    r = nn.Conv(4, (3, 3), bias_init=init)(nn.relu(nn.Conv(6, (3, 3), bias_init=init)(h)))
    h = nn.avg_pool(nn.relu(h + r), (2, 2), (2, 2))
    return nn.Dense(4, bias_init=init)(h.reshape(h.shape[0], -1))


CASES = {'mlp': (MLP(), (4,)), 'cnn': (ResidualCNN(), (6, 6, 2))}


def mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


def model_parallel(tree, mesh):
  """Every leaf split over 'model' on its last (output) axis."""
  return jax.tree.map(
    lambda w: jax.device_put(w, NamedSharding(mesh, P(*([None] * (w.ndim - 1)), 'model'))), tree
  )


def problem(name, steps=1):
  """Model, input shape, params and ``steps`` batches of 16."""
  model, shape = CASES[name]
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, *shape)))['params']
  params = jax.tree.map(
    lambda s: jnp.asarray(
      rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 3),
      jnp.float32,
    ),
    shapes,
  )
  inputs = jnp.asarray(rng.normal(size=(steps, 16, *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(steps, 16)))
  return model, shape, params, inputs, labels


def loss_fn(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def modes(name):
  model, shape = CASES[name]
  general = {'apply_fn': lambda q, x: model.apply({'params': q}, x), 'input_shape': shape}
  return {'mlp_mode': {}, 'general': general} if name == 'mlp' else {'general': general}


def assert_close(a, b, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_sharded_updates_equal_unsharded_and_keep_the_shardings(name):
  model, _, params, inputs, labels = problem(name)
  device = jax.devices()[0]
  grad = jax.jit(jax.grad(lambda q, x, y: loss_fn(model, q, x, y)))
  one = jax.device_put((params, inputs[0], labels[0]), device)
  m = mesh()
  sharded = model_parallel(params, m)
  batch = jax.device_put((inputs[0], labels[0]), NamedSharding(m, P('data')))
  # XLA may lay the gradient out otherwise; a training step constrains it like the params.
  grads_sharded = jax.device_put(grad(sharded, *batch), jax.tree.map(lambda w: w.sharding, sharded))

  for mode in modes(name).values():
    tx = optax_path.path_normalize(2.0, **mode)
    expected, _ = jax.jit(tx.update)(grad(*one), tx.init(one[0]), one[0])
    updates, _ = jax.jit(tx.update)(grads_sharded, tx.init(sharded), sharded)
    assert_close(updates, expected)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(sharded)):
      assert u.sharding.is_equivalent_to(w.sharding, w.ndim), (u.sharding, w.sharding)
    if mode:
      norm = jax.jit(lambda q, mode=mode: optax_path.path_norm(q, **mode))
      np.testing.assert_allclose(norm(sharded), norm(one[0]), rtol=1e-5)


def make_train(model, tx):
  """A jitted training step and a loop over batches that records the losses."""

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda q: loss_fn(model, q, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def train(params, batches):
    state, losses = tx.init(params), []
    for x, y in batches:
      params, state, loss = step(params, state, x, y)
      losses.append(float(loss))
    return params, losses

  return step, train


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_data_and_model_parallel_path_sgd_training(name):
  steps = 3
  model, _, params, inputs, labels = problem(name)
  inputs, labels = inputs.repeat(steps, axis=0), labels.repeat(steps, axis=0)  # one batch
  m = mesh()
  for mode in modes(name).values():
    tx = optax.chain(optax_path.path_normalize(2.0, **mode), optax.sgd(0.05))
    step, train = make_train(model, tx)
    device = jax.devices()[0]
    expected, expected_losses = train(
      jax.device_put(params, device), jax.device_put(list(zip(inputs, labels)), device)
    )
    sharded = model_parallel(params, m)
    batches = [jax.device_put(b, NamedSharding(m, P('data'))) for b in zip(inputs, labels)]
    trained, losses = train(sharded, batches)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_close(trained, expected)
    for w, w0 in zip(jax.tree.leaves(trained), jax.tree.leaves(sharded)):
      assert w.sharding.is_equivalent_to(w0.sharding, w0.ndim)
    if name == 'mlp' and mode:
      hlo = step.lower(sharded, tx.init(sharded), *batches[0]).compile().as_text()
      assert 'all-reduce' in hlo  # the batch gradient is summed over the 'data' axis


# --- explicit sharding (jax.make_mesh's default axis types) ------------------------------


def mse(model, params, x, y):
  """A loss whose ops all take explicit shardings (integer-label gathers need out_sharding)."""
  return jnp.mean((model.apply({'params': params}, x) - jax.nn.one_hot(y, 4)) ** 2)


@pytest.mark.parametrize(
  'axis_type, method',
  [
    ('Explicit', 'path_sgd'),
    ('Auto', 'path_sgd'),
    ('Explicit', 'path_adam'),
    ('Explicit', 'path_sgd_refresh3'),
  ],
)
def test_explicit_and_auto_axes_train_like_one_device(axis_type, method):
  """MLP and general mode: init, 3 jitted steps, path_norm, path_scales, on a (4, 2) mesh
  whose axes are Explicit or Auto; the same values as one device, shardings kept, and
  no kernel gathered: only per-unit vectors cross devices."""
  types = (getattr(jax.sharding.AxisType, axis_type),) * 2
  m = jax.make_mesh((4, 2), ('data', 'model'), axis_types=types)
  model, shape, params, inputs, labels = problem('mlp')
  for mode_name, mode in modes('mlp').items():
    if method == 'path_sgd_refresh3' and mode:
      continue  # refresh_every is the MLP mode's
    tx = {
      'path_sgd': lambda: optax_path.path_sgd(0.1, **mode),
      'path_adam': lambda: optax_path.path_adam(1e-2, **mode),
      'path_sgd_refresh3': lambda: optax_path.path_sgd(0.1, refresh_every=3),
    }[method]()

    def step(q, s, x, y):
      updates, s = tx.update(jax.grad(lambda w: mse(model, w, x, y))(q), s, q)
      return optax.apply_updates(q, updates), s

    expected, state = params, tx.init(params)
    for _ in range(3):
      expected, state = jax.jit(step)(expected, state, inputs[0], labels[0])
    with jax.set_mesh(m):
      sharded = model_parallel(params, m)
      x, y = (jax.device_put(b, NamedSharding(m, P('data'))) for b in (inputs[0], labels[0]))
      trained, state = sharded, tx.init(sharded)
      for _ in range(3):
        trained, state = jax.jit(step)(trained, state, x, y)
      assert_close(trained, expected)
      for w, w0 in zip(jax.tree.leaves(trained), jax.tree.leaves(sharded)):
        assert w.sharding.is_equivalent_to(w0.sharding, w0.ndim), (mode_name, w.sharding)
      norm = jax.jit(lambda q: optax_path.path_norm(q, **mode))
      np.testing.assert_allclose(norm(sharded), norm(params), rtol=1e-5)
      assert_close(optax_path.path_scales(sharded, **mode), optax_path.path_scales(params, **mode))
      hlo = jax.jit(tx.update).lower(sharded, tx.init(sharded), sharded).compile().as_text()
      gathered = [
        re.search(r'= \w+\[([\d,]*)\]', line).group(1)
        for line in hlo.splitlines()
        if ' all-gather(' in line
      ]  # a vector (a layer's units, or the batch-1 pass's activations) at most
      assert all(sum(int(d) > 1 for d in dims.split(',') if d) <= 1 for dims in gathered), (
        mode_name,
        gathered,
      )


LAYOUTS = {  # kernel, bias
  'outputs over model': (P(None, 'model'), P('model')),
  'FSDP: first axis over data': (P('data', None), P('data')),
  'inputs over model': (P('model', None), P('model')),
  '2-D, biases over data': (P('data', 'model'), P('data')),
}


def assert_same_values_and_shardings(got, expected, like):
  assert_close(got, expected)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(like), strict=True):
    assert g.sharding.is_equivalent_to(w.sharding, w.ndim), (g.sharding, w.sharding)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_every_layout_and_the_rescalings_under_explicit_axes(layout):
  """MLP mode, leaves split by ``layout`` over Explicit axes: the update, path_norm,
  path_scales (eager and jitted), rebalance, unbalance and rescale equal one device's and
  keep the params' shardings. Before, a bias split like its kernel's inputs (FSDP) made
  every one of them raise ShardingTypeError, rebalance and unbalance raised under every
  layout, and path_scales came back whole on every device."""
  kernel_spec, bias_spec = LAYOUTS[layout]
  m = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  _, _, params, _, _ = problem('mlp')
  grads = jax.tree.map(lambda w: jnp.cos(3 * w), params)
  tx = optax_path.path_sgd(0.1, momentum=0.9)
  calls = {
    'update': lambda q, g: jax.jit(tx.update)(g, tx.init(q), q)[0],
    'path_scales': lambda q, g: optax_path.path_scales(q),
    'jitted path_scales': lambda q, g: jax.jit(optax_path.path_scales)(q),
    'rebalance': lambda q, g: optax_path.rebalance(q),
    'unbalance': lambda q, g: optax_path.unbalance(jax.random.key(1), q, 6, scheme='stress'),
    'rescale': lambda q, g: optax_path.rescale(q, 1, 3, 7.0),
  }
  expected = {name: call(params, grads) for name, call in calls.items()}
  with jax.set_mesh(m):
    split = lambda w: NamedSharding(m, kernel_spec if w.ndim == 2 else bias_spec)
    sharded, grads = (jax.device_put(t, jax.tree.map(split, t)) for t in (params, grads))
    for name, call in calls.items():
      assert_same_values_and_shardings(call(sharded, grads), expected[name], sharded)
    np.testing.assert_allclose(optax_path.path_norm(sharded), optax_path.path_norm(params), 1e-6)
  # Without jax.set_mesh: the arrays carry their mesh (this raised for a bare P() before,
  # and the scale state, made without a mesh, came back split after one step).
  np.testing.assert_allclose(optax_path.path_norm(sharded), optax_path.path_norm(params), 1e-6)
  for tx in (optax_path.path_sgd(0.1, 1.0, refresh_every=3), optax_path.path_adam(1e-2)):
    step = jax.jit(
      lambda q, s, tx=tx: (lambda u, s: (optax.apply_updates(q, u), s))(*tx.update(q, s, q))
    )
    (one, state_one), (split, state) = (params, tx.init(params)), (sharded, tx.init(sharded))
    for _ in range(4):
      (one, state_one), (split, state) = step(one, state_one), step(split, state)
    assert_same_values_and_shardings(split, one, sharded)


def megatron(params, x, m):
  """A Megatron-style MLP in shard_map: w1 split on its outputs over 'model', w2 on its
  inputs, a psum of the partial outputs, a last layer w3 on every device; inside, an
  input normalisation, ReLUs against zeros made in the body (jnp.zeros_like, jnp.zeros:
  constants to fold under the manual mesh) and a max of each shard's two units (a max
  pool within a shard)."""

  def body(x, w1, b1, w2, b2, w3):
    z = ((x - 0.5) / -2.0) @ w1 + b1
    h = jnp.where(z > 0, z, jnp.zeros_like(z))
    h = jnp.maximum(h, h[:, ::-1])
    y = jax.lax.psum(h @ w2, 'model') + b2
    return jnp.maximum(y, jnp.zeros((1, 2))) @ w3

  specs = (P(), P(None, 'model'), P('model'), P('model', None), P(), P())
  mapped = jax.shard_map(body, mesh=m, in_specs=specs, out_specs=P())
  return mapped(x, *(params[k] for k in ('w1', 'b1', 'w2', 'b2', 'w3')))


def megatron_unsharded(params, x):
  """The same function without shard_map: each shard's pair of units pooled."""
  z = ((x - 0.5) / -2.0) @ params['w1'] + params['b1']
  h = jnp.where(z > 0, z, 0.0).reshape(x.shape[0], 4, 2)
  h = jnp.maximum(h, h[..., ::-1]).reshape(x.shape[0], 8)
  y = h @ params['w2'] + params['b2']
  return jnp.where(y > 0, y, 0.0) @ params['w3']


@pytest.mark.parametrize('axis_type', ['Explicit', 'Auto'])
def test_shard_map_inside_apply_fn_counts_the_paths_of_the_network(axis_type):
  """The general mode evaluates a shard_map's body per shard with its substitutions
  (a max as a sum, a constant c as |c|, a NaN of the pass read as inf), collectives
  bound as they are, constants made there folded under the user's mesh (refused before
  as 'a constant other than 0', a clip). Before, every substitution there was refused ('not inside
  shard_map'), pvary (inserted wherever a replicated value meets a split one) was
  refused as a nonlinearity, and a ReLU written with jnp.where set an overflow of the
  pass (a weight of 1e20, p = 2, times a row of zeros: NaN) to 0: path_norm 0 and the
  first kernel's scales 0, where the network's are inf. Expected: the same function
  without shard_map."""
  types = (getattr(jax.sharding.AxisType, axis_type),) * 2
  m = jax.make_mesh((2, 4), ('data', 'model'), axis_types=types)
  rng = np.random.default_rng(3)
  shapes = {'w1': (3, 8), 'b1': (8,), 'w2': (8, 2), 'b2': (2,), 'w3': (2, 2)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  overflow = dict(params, w1=params['w1'].at[0, 0].set(1e20), w2=params['w2'].at[:2].set(0.0))
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  specs = {'w1': P(None, 'model'), 'b1': P('model'), 'w2': P('model', None), 'b2': P(), 'w3': P()}
  sharded_fn = lambda q, x: megatron(q, x, m)
  for q in (params, overflow):
    with jax.set_mesh(m):
      split = {k: jax.device_put(v, NamedSharding(m, specs[k])) for k, v in q.items()}
      np.testing.assert_allclose(sharded_fn(split, x), megatron_unsharded(q, x), rtol=1e-5)
      for p in (1.0, 2.0):
        got = optax_path.path_scales(split, p, apply_fn=sharded_fn, input_shape=(3,))
        norm = optax_path.path_norm(split, p, apply_fn=sharded_fn, input_shape=(3,))
        want = optax_path.path_scales(q, p, apply_fn=megatron_unsharded, input_shape=(3,))
        want_norm = optax_path.path_norm(q, p, apply_fn=megatron_unsharded, input_shape=(3,))
        assert_close(got, want)
        np.testing.assert_allclose(norm, want_norm, rtol=1e-5)
        assert np.isinf(float(want_norm)) == (q is overflow and p == 2.0)


def test_constants_meeting_split_activations_under_explicit_axes():
  """Kernels split over an Explicit axis: an activation times a constant vector, and a
  ReLU against a zero that was resharded onto the mesh. Before, the first raised
  ShardingTypeError from the pass (a select between a replicated mask and a split
  activation), the second was refused as a clip (reshard was not folded). Expected: the
  same nets on one device (the constant vector entering as |c|)."""
  m = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(5)
  params = {
    'w1': jnp.asarray(rng.normal(size=(3, 16)), jnp.float32),
    'w2': jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
    'w3': jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
  }
  c = jnp.linspace(-2.0, 2.0, 16)  # a 0 among them
  relu = jax.nn.relu
  scaled = lambda q, x: relu(jax.sharding.reshard(relu(x @ q['w1']) * c, P()) @ q['w2']) @ q['w3']
  magnitudes = lambda q, x: relu((relu(x @ q['w1']) * jnp.abs(c)) @ q['w2']) @ q['w3']
  zero = lambda: jax.sharding.reshard(jnp.zeros((1, 16)), P(None, 'x'))
  against = lambda q, x: relu(jnp.maximum(x @ q['w1'], zero()) @ q['w2']) @ q['w3']
  plain = lambda q, x: relu(relu(x @ q['w1']) @ q['w2']) @ q['w3']
  with jax.set_mesh(m):
    split = dict(params, w1=jax.device_put(params['w1'], NamedSharding(m, P(None, 'x'))))
    for net, reference in ((scaled, magnitudes), (against, plain)):
      for p in (1.0, 2.0):
        got = optax_path.path_scales(split, p, apply_fn=net, input_shape=(3,))
        assert_close(got, optax_path.path_scales(params, p, apply_fn=reference, input_shape=(3,)))
      tx = optax_path.path_normalize(apply_fn=net, input_shape=(3,))
      updates, _ = jax.jit(tx.update)(split, tx.init(split), split)
      assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
