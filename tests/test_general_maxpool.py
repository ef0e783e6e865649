"""The general mode counts every path through a max pool; its gradient, compile cache and
argument checks.

References are independent of the code under test: explicit paths of the unrolled
network enumerated one by one in float64 numpy (a max pool is a unit with an edge of
weight 1 from each member of its window, as in Gonon et al.'s path-norm toolkit),
numbers worked out by hand, and the MLP mode.
"""

import functools
import gc
import itertools
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_path

# ---------------------------------------------------------------------------------------
# (a) Brute force over explicit paths: conv -> ReLU -> max pools -> dense, in float64.

IMAGE = (4, 4, 1)


class PoolNet(nn.Module):
  """4x4x1 -> conv 3x3 SAME (2 channels) -> ReLU -> ``pool`` -> dense(3).

  ``'window'``: a 3x3 max pool with stride 2 and SAME padding: overlapping windows, the
  last ones cut by the padding (a 2x2x2 output).
  ``'global'``: ``jnp.max`` over the image, and an elementwise max of that with a
  ReLU dense branch from the input (a (2,) output).
  """

  pool: str

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(2, (3, 3), padding='SAME', name='conv')(x))
    if self.pool == 'window':
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding='SAME')
    else:
      branch = nn.relu(nn.Dense(2, name='branch')(x.reshape(x.shape[0], -1)))
      h = jnp.maximum(jnp.max(h, axis=(1, 2)), branch)
    return nn.Dense(3, name='head')(h.reshape(h.shape[0], -1))


def pool_net_graph(pool):
  """The unrolled net: ``{unit: [(source unit, edge)]}`` and its output units.

  An edge is ``(leaf name, index)`` of the parameter on it, or ``None`` for weight 1;
  the source ``'bias'`` is the bias unit. Input units have no incoming edges.
  """
  incoming = {}
  for i, j, k in itertools.product(range(4), range(4), range(2)):
    edges = [('bias', ('conv/bias', (k,)))]
    for a, b in itertools.product(range(3), range(3)):
      h, w = i + a - 1, j + b - 1  # SAME padding of a 3x3 kernel: one row/column each side
      if 0 <= h < 4 and 0 <= w < 4:  # zero padding is no unit
        edges.append((('x', h, w), ('conv/kernel', (a, b, 0, k))))
    incoming[('conv', i, j, k)] = edges
  pooled = []
  if pool == 'window':  # 4 -> 2 with window 3, stride 2: padding (0, 1), windows 0:3, 2:4
    for I, J, k in itertools.product(range(2), range(2), range(2)):
      members = itertools.product(range(2 * I, min(2 * I + 3, 4)), range(2 * J, min(2 * J + 3, 4)))
      incoming[('pool', I, J, k)] = [(('conv', h, w, k), None) for h, w in members]
      pooled.append(('pool', I, J, k))
  else:
    for k in range(2):
      image = itertools.product(range(4), range(4))
      incoming[('global', k)] = [(('conv', h, w, k), None) for h, w in image]
      incoming[('branch', k)] = [('bias', ('branch/bias', (k,)))] + [
        (('x', h, w), ('branch/kernel', (4 * h + w, k)))
        for h, w in itertools.product(range(4), range(4))
      ]
      incoming[('max', k)] = [(('global', k), None), (('branch', k), None)]
      pooled.append(('max', k))
  outputs = []
  for o in range(3):
    incoming[('out', o)] = [('bias', ('head/bias', (o,)))] + [
      (unit, ('head/kernel', (n, o))) for n, unit in enumerate(pooled)
    ]
    outputs.append(('out', o))
  return incoming, outputs


def explicit_paths(incoming, unit):
  """Every path from an input or bias unit to ``unit``, as a list of its edges."""
  if unit == 'bias' or unit[0] == 'x':
    return [[]]
  return [
    path + [edge] for source, edge in incoming[unit] for path in explicit_paths(incoming, source)
  ]


def brute_force(params, p, pool):
  """``(scales, phi_p)``: sums over the explicit paths of the products of ``|w|^p``."""
  incoming, outputs = pool_net_graph(pool)
  leaf = {
    f'{layer}/{name}': np.abs(np.asarray(value, np.float64)) ** p
    for layer, leaves in params.items()
    for name, value in leaves.items()
  }
  sums = {name: np.zeros(q.shape) for name, q in leaf.items()}
  phi_p_p = 0.0
  for out in outputs:
    for path in explicit_paths(incoming, out):
      weights = [e for e in path if e is not None]
      q = [leaf[name][index] for name, index in weights]
      phi_p_p += np.prod(q)
      for n, (name, index) in enumerate(weights):
        sums[name][index] += np.prod(q[:n] + q[n + 1 :])
  scales = {}
  for name, total in sums.items():
    layer, leaf_name = name.split('/')
    scales.setdefault(layer, {})[leaf_name] = total ** (2 / p)
  return scales, phi_p_p ** (1 / p)


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def draw(model, shape, seed=0, dtype=np.float64):
  """Params of a Linen ``model`` from numpy: kernels N(0, 1/fan_in), biases N(0, 0.3^2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, *shape)))['params']
  rng = np.random.default_rng(seed)

  def one(s):
    std = 0.3 if len(s.shape) == 1 else 1 / np.sqrt(np.prod(s.shape[:-1]))
    return jnp.asarray((std * rng.normal(size=s.shape)).astype(dtype))

  return jax.tree.map(one, shapes)


def general_mode(model, shape):
  return {'apply_fn': lambda q, x: model.apply({'params': q}, x), 'input_shape': shape}


@pytest.mark.slow
@pytest.mark.parametrize('pool', ['window', 'global'])
def test_scales_and_norm_equal_a_sum_over_every_path(x64, pool):
  """p = 1 inside jit (the pass traced into the caller), p = 2 eagerly (the cached pass)."""
  model = PoolNet(pool)
  params = draw(model, IMAGE)
  mode = general_mode(model, IMAGE)
  jitted = jax.jit(
    lambda q: (optax_path.path_scales(q, 1.0, **mode), optax_path.path_norm(q, 1.0, **mode))
  )
  eager = (optax_path.path_scales(params, 2.0, **mode), optax_path.path_norm(params, 2.0, **mode))
  for p, (scales, norm) in zip((1.0, 2.0), (jitted(params), eager)):
    expected, expected_norm = brute_force(params, p, pool)
    assert jax.tree.leaves(scales)[0].dtype == jnp.float64
    assert relative_error(norm, expected_norm) < 1e-12
    assert max(jax.tree.leaves(jax.tree.map(relative_error, scales, expected))) < 1e-12


class MaxOverUnits(nn.Module):
  """x (2) -> dense(2) -> ReLU -> max over the 2 units -> dense(1), no biases."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(2, use_bias=False, name='hidden')(x))
    return nn.Dense(1, use_bias=False, name='head')(jnp.max(h, axis=-1, keepdims=True))


def test_units_that_lose_every_max_still_have_their_paths():
  """By hand: the units compute 1 + 2 = 3 and 0.5 + 0.5 = 1 on the all-ones |w| pass,
  so the old pass followed only unit 0: its phi_1 was 3 * 2 = 6, and unit 1's weights
  got scale 0. Every path: phi_1 = (3 + 1) * 2 = 8; phi_2^2 = (1 + 4 + 0.25 + 0.25) * 4."""
  params = {
    'hidden': {'kernel': jnp.array([[1.0, -0.5], [2.0, 0.5]])},
    'head': {'kernel': jnp.array([[-2.0]])},
  }
  mode = general_mode(MaxOverUnits(), (2,))
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def everything(params):
    norms = [optax_path.path_norm(params, p, **mode) for p in (1.0, 2.0)]
    scales = optax_path.path_scales(params, 1.0, **mode)
    updates, _ = optax_path.path_normalize(1.0, **mode).update(grads, optax.EmptyState(), params)
    return norms, scales, updates

  (norm_1, norm_2), scales, updates = everything(params)
  np.testing.assert_allclose(norm_1, 8.0, rtol=1e-6)
  np.testing.assert_allclose(norm_2, np.sqrt(22.0), rtol=1e-6)
  # (|head|)^2 and (sum of |hidden| into the unit)^2
  np.testing.assert_allclose(scales['hidden']['kernel'], [[4.0, 4.0], [4.0, 4.0]], rtol=1e-6)
  np.testing.assert_allclose(scales['head']['kernel'], [[16.0]], rtol=1e-6)
  assert bool(jnp.all(updates['hidden']['kernel'] > 0))  # unit 1 is trained too


# ---------------------------------------------------------------------------------------
# (b) Theorem 4.1 through max pools: channel rescalings over 30 Path-SGD steps.


class PoolCNN(nn.Module):
  """6x6x2 -> conv(4) -> ReLU -> 2x2 max pool -> conv(3) -> ReLU -> global max -> dense(3)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), name='conv_a')(x))
    h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = nn.relu(nn.Conv(3, (3, 3), name='conv_b')(h))
    return nn.Dense(3, name='head')(jnp.max(h, axis=(1, 2)))


def rescale_channels(params, a, b):
  """conv_a's output channel k times ``a_k``, conv_b's input channel k divided by it;
  conv_b's output channel k times ``b_k``, the head's input k divided by it: each
  factor passes through a max pool (a 2x2 window, then the whole image)."""
  conv_a = {'kernel': params['conv_a']['kernel'] * a, 'bias': params['conv_a']['bias'] * a}
  kernel_b = params['conv_b']['kernel'] / a[:, None] * b
  conv_b = {'kernel': kernel_b, 'bias': params['conv_b']['bias'] * b}
  head = dict(params['head'], kernel=params['head']['kernel'] / b[:, None])
  return {'conv_a': conv_a, 'conv_b': conv_b, 'head': head}


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_both(model, tx, params, rescaled, inputs, labels, held_out):
  """30 steps from each start; the largest output gap relative to the largest output."""

  def loss_fn(q, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': q}, x), y).mean()

  def step(carry, batch):
    q, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(q, *batch), state, q)
    return (optax.apply_updates(q, updates), state), None

  def train(q):
    return jax.lax.scan(step, (q, tx.init(q)), (inputs, labels))[0][0]

  def gap(a, b):
    out_a, out_b = model.apply({'params': a}, held_out), model.apply({'params': b}, held_out)
    return jnp.max(jnp.abs(out_a - out_b)) / jnp.max(jnp.abs(out_a))

  trained, trained_rescaled = train(params), train(rescaled)
  return gap(params, rescaled), gap(params, trained), gap(trained, trained_rescaled)


@pytest.mark.slow
def test_path_sgd_is_invariant_to_channel_rescalings_through_max_pools():
  model = PoolCNN()
  shape = (6, 6, 2)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(30, 16, *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(30, 16)))
  held_out = jnp.asarray(rng.normal(size=(64, *shape)), jnp.float32)
  params = draw(model, shape, dtype=np.float32)
  rescaled = rescale_channels(
    params, jnp.array([1e2, 1e-2, 7.0, 0.2]), jnp.array([0.05, 30.0, 1.0])
  )
  normalize = optax_path.path_normalize(2.0, **general_mode(model, shape))
  path_sgd = optax.chain(normalize, optax.sgd(0.05))
  data = (inputs, labels, held_out)
  start_gap, moved, path_gap = train_both(model, path_sgd, params, rescaled, *data)
  sgd_gap = train_both(model, optax.sgd(0.05), params, rescaled, *data)[2]
  print(f'start gap {start_gap:.1e}, moved {moved:.2f}, Path-SGD gap {path_gap:.1e}, ', end='')
  print(f'SGD gap {sgd_gap:.1e}')
  assert start_gap < 1e-6  # the same function
  assert moved > 0.1  # training moved it
  assert path_gap < 2e-5
  assert sgd_gap > 1e-2


# ---------------------------------------------------------------------------------------
# (c) What the pass cannot count, and a max pool inside cond.


def test_selecting_units_by_value_is_an_error():
  params = {'w': jnp.ones((3, 3))}
  mode = {'input_shape': (3,)}
  with pytest.raises(ValueError, match='argmax'):
    optax_path.path_norm(params, apply_fn=lambda q, x: x @ q['w'] * jnp.argmax(x @ q['w']), **mode)
  with pytest.raises(ValueError, match='sort'):
    optax_path.path_scales(params, apply_fn=lambda q, x: jnp.sort(x @ q['w']), **mode)


def test_a_max_inside_lax_scan_counts_every_path_as_unrolled():
  """The scan body is rewritten as the unrolled steps are (it was an error). By hand,
  p = 1, w = ones(3, 3), input ones: each unit is max(h @ |w|, h) -> 3 h + h, so after
  two steps 4 * 4 = 16 per unit, 48 in all."""
  params = {'w': jnp.ones((3, 3))}
  mode = {'input_shape': (3,)}
  step = lambda q, h: jnp.maximum(h @ q['w'], h)
  scanned = lambda q, x: jax.lax.scan(lambda h, _: (step(q, h), None), x, None, length=2)[0]
  unrolled = lambda q, x: step(q, step(q, x))
  norm = optax_path.path_norm(params, 1.0, apply_fn=scanned, **mode)
  np.testing.assert_allclose(norm, 48.0, rtol=1e-6)
  np.testing.assert_allclose(
    norm, optax_path.path_norm(params, 1.0, apply_fn=unrolled, **mode), rtol=1e-6
  )


USE_MAX = jnp.asarray(True)


def test_max_inside_cond_and_jit_counts_every_path():
  """By hand: x @ |w| on ones is (3, 6), relu keeps it; max over the units -> 3 + 6."""
  params = {'w': jnp.array([[1.0, 2.0], [2.0, -4.0]])}  # |w|: (1 + 2, 2 + 4)

  def apply_fn(q, x):
    h = jax.nn.relu(x @ q['w'])
    branches = (lambda h: jnp.max(h, axis=-1), lambda h: jnp.min(h, axis=-1))
    pooled = jax.lax.cond(USE_MAX, *branches, h)  # a fixed flag (the network's own choice)
    return jax.jit(jnp.max)(h) + pooled

  np.testing.assert_allclose(
    optax_path.path_norm(params, 1.0, apply_fn=apply_fn, input_shape=(2,)), 18.0, rtol=1e-6
  )


def test_explicit_minus_inf_padding_is_no_unit():
  """By hand: |w| on ones gives units (1, 2, 3); windows of 2 over (pad, 1, 2, 3, pad)
  sum to 1 + 3 + 5 + 3 = 12, with the -inf padding read as no unit (0), as SAME does."""
  params = {'w': jnp.array([[1.0, -2.0, 3.0]])}

  def padded(q, x):
    h = jax.nn.relu(x @ q['w'])[..., None]
    h = jnp.pad(h, ((0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(h, (2,), strides=(1,), padding='VALID')

  norm = optax_path.path_norm(params, 1.0, apply_fn=padded, input_shape=(1,))
  np.testing.assert_allclose(norm, 12.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# (d) The gradient of the path regulariser where phi_p = 0: 0, not NaN, in both modes.


def mlp_params(head_scale, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'Dense_0': {'kernel': rng.normal(size=(2, 8)), 'bias': rng.normal(size=8)},
    'Dense_1': {
      'kernel': head_scale * rng.normal(size=(8, 3)),
      'bias': head_scale * rng.normal(size=3),
    },
  }


def mlp_apply(q, x):
  h = jax.nn.relu(x @ q['Dense_0']['kernel'] + q['Dense_0']['bias'])
  return h @ q['Dense_1']['kernel'] + q['Dense_1']['bias']


def brute_force_gradient(params, p):
  """``d phi_p^p / d w`` of the 2-8-3 MLP from its explicit paths, in float64.

  A path ``input i -> j -> k`` (or from a bias unit) adds ``prod |w|^p``; its
  derivative in each of its weights ``w`` is ``p |w|^(p-1) sign(w)`` times the rest.
  """
  w0, b0 = params['Dense_0']['kernel'], params['Dense_0']['bias']
  w1, b1 = params['Dense_1']['kernel'], params['Dense_1']['bias']
  grads = jax.tree.map(np.zeros_like, params)
  d = lambda w: p * np.abs(w) ** (p - 1) * np.sign(w)
  for j, k in itertools.product(range(8), range(3)):
    for i in range(2):
      grads['Dense_0']['kernel'][i, j] += d(w0[i, j]) * abs(w1[j, k]) ** p
      grads['Dense_1']['kernel'][j, k] += abs(w0[i, j]) ** p * d(w1[j, k])
    grads['Dense_0']['bias'][j] += d(b0[j]) * abs(w1[j, k]) ** p
    grads['Dense_1']['kernel'][j, k] += abs(b0[j]) ** p * d(w1[j, k])
  for k in range(3):
    grads['Dense_1']['bias'][k] += d(b1[k])
  return grads


MODES = {'general': {'apply_fn': mlp_apply, 'input_shape': (2,)}, 'mlp': {}}


@jax.jit(static_argnums=(0, 1))
def regulariser_gradients(mode, p, params):
  """The gradients of ``path_norm ** p`` and ``log_path_norm``, and ``log_path_norm``."""
  mode = MODES[mode]
  regulariser = lambda w: optax_path.path_norm(w, p, **mode) ** p
  log_norm = lambda w: optax_path.log_path_norm(w, p, **mode)
  return jax.grad(regulariser)(params), jax.grad(log_norm)(params), log_norm(params)


@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_path_norm_gradient_is_finite_and_right_at_phi_zero(x64, mode):
  """A zero-initialised head (phi_p = 0): the regulariser's gradient is 0, as from the
  explicit paths, and log_path_norm is -inf with gradient 0; then a head of N(0, 1)."""
  for p, head_scale in itertools.product((2.0, 3.0), (0.0, 1.0)):
    params = mlp_params(head_scale)
    grads, log_grads, log_norm = regulariser_gradients(mode, p, jax.tree.map(jnp.asarray, params))
    expected = brute_force_gradient(params, p)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-300)  # 0 exactly where e = 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(log_grads))
    if head_scale == 0:
      assert float(log_norm) == -np.inf
      assert not any(bool(jnp.any(g)) for g in jax.tree.leaves(log_grads))
    else:
      assert np.isfinite(float(log_norm))


# ---------------------------------------------------------------------------------------
# (e) Eager calls with a fresh but equal lambda: one compilation, no closure kept alive.


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.max_pool(nn.relu(nn.Conv(3, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(2)(h.reshape(h.shape[0], -1))


def fresh_apply_fn(model):
  """A new lambda per call, as ``lambda q, x: model.apply({'params': q}, x)`` written
  inside a training loop; its closure holds ``model``."""
  return lambda q, x: model.apply({'params': q}, x)


def test_eager_calls_with_fresh_lambdas_compile_once_and_keep_no_closure():
  shape = (6, 6, 1)
  params = draw(SmallCNN(), shape, dtype=np.float32)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    counts, norms, alive = [], [], []
    for _ in range(3):
      model = SmallCNN()
      apply_fn = fresh_apply_fn(model)
      alive.append((weakref.ref(model), weakref.ref(apply_fn)))
      before = len(compiles)
      norms.append(float(optax_path.path_norm(params, apply_fn=apply_fn, input_shape=shape)))
      optax_path.path_scales(params, apply_fn=apply_fn, input_shape=shape)
      counts.append(len(compiles) - before)
      del model, apply_fn
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  gc.collect()
  assert counts[1:] == [0, 0], counts
  assert norms[0] == norms[1] == norms[2]
  assert [(m(), f()) for m, f in alive] == [(None, None)] * 3


def test_equal_structure_with_other_constants_is_not_confused():
  """Two apply_fns that differ only in an array they close over share a compiled pass,
  with the array as its argument: each gets its own value (by hand: 2 and 3 paths)."""
  params = {'w': jnp.ones((2, 1))}
  for factor, expected in ((np.array([1.0, 0.0]), 1.0), (np.array([1.0, 2.0]), 3.0)):
    apply_fn = lambda q, x, c=jnp.asarray(factor, jnp.float32): (x * c) @ q['w']
    norm = optax_path.path_norm(params, 1.0, apply_fn=apply_fn, input_shape=(2,))
    np.testing.assert_allclose(norm, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# (f) Arguments checked at the door.


def test_apply_fn_and_input_shape_are_checked():
  params = {'Dense_0': {'kernel': jnp.ones((4, 3))}}
  apply_fn = lambda q, x: x @ q['Dense_0']['kernel']
  for bad in ('28', '4', 4, 4.0, (4.0,), (True,), ('4',)):
    with pytest.raises(ValueError, match='input_shape must be'):
      optax_path.path_norm(params, apply_fn=apply_fn, input_shape=bad)
  with pytest.raises(ValueError, match='sizes >= 0'):
    optax_path.path_scales(params, apply_fn=apply_fn, input_shape=(-1,))
  with pytest.raises(ValueError, match='apply_fn must be .* not callable'):
    optax_path.path_scales(params, apply_fn='model.apply', input_shape=(4,))
  with pytest.raises(ValueError, match=r'input_shape=\(5,\)') as error:
    optax_path.path_scales(params, apply_fn=apply_fn, input_shape=(5,))
  assert isinstance(error.value.__cause__, TypeError)
  norm = optax_path.path_norm(params, 1.0, apply_fn=apply_fn, input_shape=np.array([4]))
  assert np.isclose(float(norm), 12.0)
