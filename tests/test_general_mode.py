"""The general mode (apply_fn=, input_shape=): conv nets, residual graphs, pooling, NNX."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normalize_once, random_mlp
from flax import nnx

import optax_path

# ---------------------------------------------------------------------------------------
# (a) Brute force: a conv net unrolled into explicit edges and paths, in float64.


class ConvNet(nn.Module):
  """5x5x1 input -> 3x3 conv with 2 channels -> ReLU -> flatten -> dense(3)."""

  strides: tuple = (1, 1)
  padding: object = 'SAME'

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3), strides=self.strides, padding=self.padding)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


INPUT = (5, 5, 1)


def conv_pads(padding, strides):
  """``(low, high)`` padding per spatial axis and whether it wraps around (CIRCULAR)."""
  if padding in ('SAME', 'CIRCULAR'):
    return jax.lax.padtype_to_pads(INPUT[:2], (3, 3), strides, 'SAME'), padding == 'CIRCULAR'
  if padding == 'VALID':
    return [(0, 0), (0, 0)], False
  return [tuple(p) for p in padding], False


def explicit_paths(params, strides, padding):
  """Every path of the unrolled net, as a list of ``(param, index)`` edges.

  Conv edge ``(h, w, c) -> (i, j, k)`` uses ``kernel[a, b, c, k]`` where
  ``(h, w) = (i s + a - low, j s + b - low)``, if that input exists (zero padding is no
  unit); a bias is an edge from a bias unit. Flatten is the identity on units.
  """
  (low_h, high_h), (low_w, high_w) = conv_pads(padding, strides)[0]
  circular = conv_pads(padding, strides)[1]
  out_h = (INPUT[0] + low_h + high_h - 3) // strides[0] + 1
  out_w = (INPUT[1] + low_w + high_w - 3) // strides[1] + 1
  channels = params['Conv_0']['kernel'].shape[-1]
  assert params['Dense_0']['kernel'].shape[0] == out_h * out_w * channels
  incoming = {}  # hidden unit -> list of edges into it
  for i, j, k in itertools.product(range(out_h), range(out_w), range(channels)):
    edges = [[('Conv_0/bias', (k,))]]
    for a, b in itertools.product(range(3), range(3)):
      h, w = i * strides[0] + a - low_h, j * strides[1] + b - low_w
      if circular:
        h, w = h % INPUT[0], w % INPUT[1]
      if 0 <= h < INPUT[0] and 0 <= w < INPUT[1]:
        edges.append([('Conv_0/kernel', (a, b, 0, k))])
    incoming[(i * out_w + j) * channels + k] = edges
  paths = []
  for o in range(params['Dense_0']['kernel'].shape[1]):
    paths.append([('Dense_0/bias', (o,))])
    for unit, edges in incoming.items():
      paths.extend(edge + [('Dense_0/kernel', (unit, o))] for edge in edges)
  return paths


def get(params, name):
  layer, leaf = name.split('/')
  return np.asarray(params[layer][leaf], np.float64)


def brute_force(params, p, strides, padding):
  """(scales, phi_p) by summing over explicit paths: a shared entry sums over its edges."""
  sums = {
    name: np.zeros(get(params, name).shape)
    for name in ('Conv_0/kernel', 'Conv_0/bias', 'Dense_0/kernel', 'Dense_0/bias')
  }
  phi_p = 0.0
  for path in explicit_paths(params, strides, padding):
    q = [abs(get(params, name)[index]) ** p for name, index in path]
    phi_p += np.prod(q)
    for e, (name, index) in enumerate(path):
      sums[name][index] += np.prod(q[:e] + q[e + 1 :])
  scales = {}
  for name, total in sums.items():
    layer, leaf = name.split('/')
    scales.setdefault(layer, {})[leaf] = total ** (2 / p)
  return scales, phi_p ** (1 / p)


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300)))


CONV_CASES = [  # every padding with stride 1 and one of the others
  (strides, padding)
  for padding in ('SAME', 'VALID', ((2, 1), (0, 1)), 'CIRCULAR')
  for strides in ((1, 1), (2, 1) if padding in ('VALID', 'CIRCULAR') else (2, 2))
]


def draw(shapes, seed=0, dtype=np.float64):
  """Arrays for a tree of shapes from numpy, without compiling an init (threefry is slow
  to compile on CPU): kernels N(0, 1/fan_in), biases N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)

  def one(s):
    std = 0.3 if len(s.shape) == 1 else 1 / np.sqrt(np.prod(s.shape[:-1]))
    return jnp.asarray((std * rng.normal(size=s.shape)).astype(dtype))

  return jax.tree.map(one, shapes)


def random_params(model, shape, seed=0, dtype=np.float64):
  """Params of a Linen ``model``, drawn as in ``draw``."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, *shape)))['params']
  return draw(shapes, seed, dtype)


def random_nnx(cls, seed=0, dtype=np.float64):
  """``(graphdef, state)`` of ``cls(rngs)``, drawn as in ``draw``."""
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  return graphdef, draw(shapes, seed, dtype)


@pytest.mark.slow
@pytest.mark.parametrize('strides,padding', CONV_CASES, ids=str)
def test_conv_scales_update_and_norm_match_explicit_edges(x64, strides, padding):
  model = ConvNet(strides, padding)
  params = random_params(model, INPUT)
  mode = {'apply_fn': lambda q, x: model.apply({'params': q}, x), 'input_shape': INPUT}
  grads = jax.tree.map(lambda w: jnp.asarray(np.random.default_rng(1).normal(size=w.shape)), params)

  ps = (2.0, 1.0) if strides == (1, 1) else (2.0,)

  @jax.jit
  def general_mode(params, grads):
    updates, _ = optax_path.path_normalize(2.0, **mode).update(grads, optax.EmptyState(), params)
    return updates, [
      (optax_path.path_scales(params, p, **mode), optax_path.path_norm(params, p, **mode))
      for p in ps
    ]

  updates, results = general_mode(params, grads)
  for p, (scales, norm) in zip(ps, results):
    expected, expected_norm = brute_force(params, p, strides, padding)
    assert jax.tree.leaves(scales)[0].dtype == jnp.float64
    assert max(jax.tree.leaves(jax.tree.map(relative_error, scales, expected))) < 1e-10
    assert relative_error(norm, expected_norm) < 1e-10
    if p == 2.0:
      expected_updates = jax.tree.map(lambda g, s: np.asarray(g) / s, grads, expected)
      assert max(jax.tree.leaves(jax.tree.map(relative_error, updates, expected_updates))) < 1e-10


class NNXConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 2, (3, 3), strides=(2, 1), rngs=rngs)
    self.dense = nnx.Linear(3 * 5 * 2, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    return self.dense(x.reshape(x.shape[0], -1))


def test_nnx_conv_net_matches_explicit_edges(x64):
  graphdef, state = random_nnx(NNXConvNet)
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  scales = optax_path.path_scales(state, apply_fn=apply_fn, input_shape=INPUT)
  pure = nnx.to_pure_dict(state)
  as_linen = {'Conv_0': pure['conv'], 'Dense_0': pure['dense']}
  expected, expected_norm = brute_force(as_linen, 2.0, (2, 1), 'SAME')
  scales = nnx.to_pure_dict(scales)
  assert relative_error(scales['conv']['kernel'], expected['Conv_0']['kernel']) < 1e-10
  assert relative_error(scales['dense']['bias'], expected['Dense_0']['bias']) < 1e-10
  norm = optax_path.path_norm(state, apply_fn=apply_fn, input_shape=INPUT)
  assert relative_error(norm, expected_norm) < 1e-10


# ---------------------------------------------------------------------------------------
# (b) Theorem 4.1 for convolutions: channel rescalings inside a residual block.


class ResidualCNN(nn.Module):
  """stem conv -> [conv -> relu -> conv] + skip -> relu -> pool -> dense head."""

  pool: str = 'avg'
  mask: np.ndarray | None = None  # pool='mask': sum over the members of each window it picks

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), name='stem')(x))
    r = nn.relu(nn.Conv(6, (3, 3), strides=(1, 1), padding='SAME', name='branch_in')(h))
    r = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name='branch_out')(r)
    h = nn.relu(h + r)
    if self.pool == 'none':
      return h
    if self.pool == 'mask':
      h = 4 * nn.avg_pool(h * self.mask, (2, 2), (2, 2))
    else:
      h = (nn.avg_pool if self.pool == 'avg' else nn.max_pool)(h, (2, 2), (2, 2))
    return nn.Dense(3, name='head')(h.reshape(h.shape[0], -1))


IMAGE = (6, 6, 2)
STEPS = 30


def make_problem(pool):
  model = ResidualCNN(pool)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(STEPS, 16, *IMAGE)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(STEPS, 16)))
  held_out = jnp.asarray(rng.normal(size=(64, *IMAGE)), jnp.float32)
  params = random_params(model, IMAGE, dtype=np.float32)
  return model, params, inputs, labels, held_out


def rescale_branch_channels(params, factors):
  """Output channel k of branch_in (kernel slice, bias) times c_k; branch_out's input
  channel k divided by c_k. Inside the residual branch, so the skip is untouched."""
  params = jax.tree.map(lambda w: w, params)
  params['branch_in'] = {
    'kernel': params['branch_in']['kernel'] * factors,
    'bias': params['branch_in']['bias'] * factors,
  }
  params['branch_out'] = dict(
    params['branch_out'], kernel=params['branch_out']['kernel'] / factors[:, None]
  )
  return params


def train(model, tx, params, inputs, labels):
  def loss_fn(q, x, y):
    logits = model.apply({'params': q}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(params, *batch), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (inputs, labels))
  return params


@jax.jit(static_argnums=0)
def _output_gap(model, a, b, held_out):
  out_a, out_b = model.apply({'params': a}, held_out), model.apply({'params': b}, held_out)
  return jnp.max(jnp.abs(out_a - out_b)) / jnp.max(jnp.abs(out_a))


def output_gap(model, a, b, held_out):
  """Largest output difference relative to the largest output, on held-out inputs."""
  gap = float(_output_gap(model, a, b, held_out))
  return gap if np.isfinite(gap) else np.inf


@pytest.mark.slow
@pytest.mark.parametrize('pool', ['avg'])  # max pooling: test_general_maxpool.py
def test_path_sgd_keeps_channel_rescaled_residual_cnns_equivalent(pool):
  model, params, inputs, labels, held_out = make_problem(pool)
  factors = jnp.array([1e3, 1e-3, 30.0, 0.05, 1.0, 300.0])
  rescaled = rescale_branch_channels(params, factors)
  assert output_gap(model, params, rescaled, held_out) < 1e-5  # the same function

  apply_fn = lambda q, x: model.apply({'params': q}, x)
  mode = {'apply_fn': apply_fn, 'input_shape': IMAGE}
  log_norm = jax.jit(lambda q: optax_path.log_path_norm(q, **mode))
  np.testing.assert_allclose(log_norm(rescaled), log_norm(params), rtol=1e-5)

  run = jax.jit(train, static_argnums=(0, 1))
  path_sgd = optax.chain(optax_path.path_normalize(2.0, **mode), optax.sgd(0.02))
  trained, trained_rescaled = (run(model, path_sgd, q, inputs, labels) for q in (params, rescaled))
  assert output_gap(model, params, trained, held_out) > 0.1  # training moved the function
  path_gap = output_gap(model, trained, trained_rescaled, held_out)
  assert path_gap < 1e-3

  if pool == 'avg':
    sgd = optax.sgd(1e-3)
    trained, trained_rescaled = (run(model, sgd, q, inputs, labels) for q in (params, rescaled))
    sgd_gap = output_gap(model, trained, trained_rescaled, held_out)
    assert sgd_gap > 1e-2
    print(f'SGD gap {sgd_gap:.2e}', end=', ')
  print(f'{pool} pool: Path-SGD gap {path_gap:.2e}')


def test_max_pool_scales_count_every_path_like_a_sum_pool():
  """Max pooling: the scales are those of the same net with a sum pool, which counts
  every path through each window (Gonon et al.), not the argmax paths of the all-ones
  |theta|^2 pass that the old pass followed (there, windows 4:6 x 4:6 lie beyond the
  borders' reach, a 4-way tie that went to the first member)."""
  image = (10, 10, 2)
  model = ResidualCNN('max')
  params = random_params(model, image, dtype=np.float32)
  sum_pool = ResidualCNN('mask', np.ones((10, 10, 4)))  # 4 * avg_pool: a sum over each window

  def scales(net, params):
    return optax_path.path_scales(
      params, apply_fn=lambda q, x: net.apply({'params': q}, x), input_shape=image
    )

  max_pool, every_path = jax.jit(lambda q: [scales(model, q), scales(sum_pool, q)])(params)
  for a, b in zip(jax.tree.leaves(max_pool), jax.tree.leaves(every_path), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert all(bool(jnp.all(s > 0)) for s in jax.tree.leaves(max_pool))


# ---------------------------------------------------------------------------------------
# (c) The general mode equals the matmul (MLP) mode on MLPs, Linen and NNX.


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List(
      [nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def assert_trees_close(a, b, rtol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


def linen_mlp():
  model = MLP()
  params = random_params(model, (4,), dtype=np.float32)
  return params, lambda q, x: model.apply({'params': q}, x)


def nnx_mlp():
  graphdef, state = random_nnx(NNXMLP, dtype=np.float32)
  return nnx.as_pure(state), lambda s, x: nnx.merge(graphdef, s)(x)


@pytest.mark.slow
@pytest.mark.parametrize('make', [linen_mlp, nnx_mlp], ids=['linen', 'nnx'])
def test_general_mode_equals_the_mlp_mode(make):
  params, apply_fn = make()
  grads = draw(params, seed=2, dtype=np.float32)

  @jax.jit
  def both_modes(params, grads):
    results = []
    for mode in ({'apply_fn': apply_fn, 'input_shape': (4,)}, {}):
      updates = normalize_once(optax_path.path_normalize(p, **mode), grads, params)
      results.append((updates, optax_path.log_path_norm(params, p, **mode)))
    return results

  p = 3.0 if make is linen_mlp else 1.0  # p = 2 is in the tests below
  general, mlp = both_modes(params, grads)
  assert_trees_close(general, mlp)


@pytest.mark.slow
def test_nnx_optimizer_in_the_general_mode():
  graphdef, state = random_nnx(NNXMLP, dtype=np.float32)
  model = nnx.merge(graphdef, state)
  tx = optax.chain(
    optax_path.path_normalize(apply_fn=lambda s, x: nnx.merge(graphdef, s)(x), input_shape=(4,)),
    optax.sgd(0.1),
  )
  reference = nnx.merge(graphdef, state)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
  loss = lambda m: jnp.mean(m(x) ** 2)

  for net, transform in ((model, tx), (reference, optax_path.path_sgd(0.1))):
    optimizer = nnx.Optimizer(net, transform, wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer):
      optimizer.update(net, nnx.grad(loss)(net))

    for _ in range(3):
      step(net, optimizer)
  assert_trees_close(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(reference, nnx.Param))
  )


@pytest.mark.slow
def test_jit_compiles_once_and_p_may_be_injected():
  params, apply_fn = linen_mlp()
  grads = jax.tree.map(jnp.ones_like, params)
  expected = jax.jit(normalize_once, static_argnums=0)(
    optax_path.path_normalize(2.0), grads, params
  )
  tx = optax.inject_hyperparams(optax_path.path_normalize, static_args=('apply_fn', 'input_shape'))(
    p=2.0, apply_fn=apply_fn, input_shape=(4,)
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update(grads, state, params)
  updates, state = update(grads, state, params)
  assert update._cache_size() == 1
  assert_trees_close(updates, expected)


# ---------------------------------------------------------------------------------------
# Float range and edge cases.


@pytest.mark.slow
def test_overflow_gives_zero_updates_and_inf_norm_never_nan():
  """phi_2 beyond float32 in the |theta|^2 pass: no step, norm +inf, scales +inf."""
  params, apply_fn = linen_mlp()
  mode = {'apply_fn': apply_fn, 'input_shape': (4,)}
  huge = jax.tree.map(lambda w: w * 1e12, params)
  grads = jax.tree.map(jnp.ones_like, huge)

  @jax.jit
  def general_mode(huge, grads):
    updates = normalize_once(optax_path.path_normalize(**mode), grads, huge)
    return updates, optax_path.path_scales(huge, **mode), optax_path.log_path_norm(huge, **mode)

  updates, scales, norm = general_mode(huge, grads)
  assert float(norm) == np.inf
  assert 80 < float(jax.jit(optax_path.log_path_norm)(huge)) < 90  # the MLP mode's exact value
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert all(bool(jnp.all(s == np.inf)) for s in jax.tree.leaves(scales))


@pytest.mark.slow
def test_float64_pass_covers_what_float32_cannot(x64):
  params, apply_fn = linen_mlp()  # float32 params; the pass runs in float64 under x64
  huge = jax.tree.map(lambda w: w * 1e12, params)
  grads = jax.tree.map(jnp.ones_like, huge)

  @jax.jit
  def both_modes(huge, grads):
    huge64 = jax.tree.map(lambda w: w.astype(jnp.float64), huge)
    results = []
    for mode in ({'apply_fn': apply_fn, 'input_shape': (4,)}, {}):
      updates = normalize_once(optax_path.path_normalize(**mode), grads, huge)
      results.append((updates, optax_path.log_path_norm(huge if mode else huge64, **mode)))
    return results

  (updates, norm), (expected_updates, expected_norm) = both_modes(huge, grads)
  assert norm.dtype == jnp.float64 and jax.tree.leaves(updates)[0].dtype == jnp.float32
  np.testing.assert_allclose(norm, expected_norm, rtol=1e-12)
  assert_trees_close(updates, expected_updates)


def test_dead_units_and_overflowing_scales_give_zero_not_nan():
  """Finite phi, yet some scales beyond float32: behind a zero weight ``c`` sit two
  weights of 1e15 (gamma_out = 1e60 = inf), so ``c``'s scale overflows (update 0, as in
  the MLP mode) and ``e``'s gradient is 0 * inf = nan (read as an overflow: update 0).
  A unit with no path to the output gets scale 0 and update 0. (Behind a ReLU, ``c``'s
  scale is the same: ReLU is the identity on the pass, with derivative 1 also at 0.)"""
  params = {
    'a': jnp.array([[1.0, 2.0]]),
    'b': jnp.array([[3.0], [0.0]]),
    'c': jnp.array([[0.0]]),
    'e': jnp.array([[1.0]]),
    'd1': jnp.array([[1e15]]),
    'd2': jnp.array([[1e15]]),
  }

  def apply_fn(q, x):
    h = jax.nn.relu(x @ q['a']) @ q['b']
    return h + x @ q['c'] @ q['e'] @ q['d1'] @ q['d2']  # linear: no ReLU at 0

  mode = {'apply_fn': apply_fn, 'input_shape': (1,)}
  assert np.isclose(float(optax_path.path_norm(params, **mode)), 3.0)
  scales = optax_path.path_scales(params, **mode)
  np.testing.assert_allclose(scales['a'], [[9.0, 0.0]], rtol=1e-6)  # unit 1 reaches no output
  np.testing.assert_allclose(scales['b'], [[1.0], [4.0]], rtol=1e-6)
  assert float(scales['c'][0, 0]) == np.inf and float(scales['e'][0, 0]) == np.inf
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optax_path.path_normalize(**mode).update(grads, optax.EmptyState(), params)
  assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))
  np.testing.assert_allclose(updates['a'], [[1 / 9, 0.0]], rtol=1e-6)
  assert float(updates['c'][0, 0]) == 0.0 and float(updates['e'][0, 0]) == 0.0


MLP_LAYERS = ['Dense_0', 'Dense_1', 'Dense_2']


def mlp_forward(q, x):
  """The ReLU MLP of ``random_mlp``'s params, written out."""
  for name in MLP_LAYERS[:-1]:
    x = jax.nn.relu(x @ q[name]['kernel'] + q[name]['bias'])
  return x @ q[MLP_LAYERS[-1]]['kernel'] + q[MLP_LAYERS[-1]]['bias']


def mlp_loss(q):
  """Cross-entropy of ``mlp_forward`` (7 inputs, 5 classes) on a fixed batch of 16."""
  x = jax.random.normal(jax.random.key(1), (16, 7))
  logits = mlp_forward(q, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(16) % 5).mean()


@pytest.mark.parametrize('net', ['dead unit', 'zero head'])
def test_a_gradient_through_an_update_is_finite_with_zero_scales(x64, net):
  """jax.grad through one update (meta-learning a step, MAML) of a net with a dead hidden
  unit (its incoming column and bias 0) or a zero-initialised head: the general mode gave
  NaN in every kernel's gradient (log 0 = -inf with derivative 1/0). Expected: eq. 9's
  scales, written out in float64 with 0 / 0 as 0 (a zero scale, a zero update)."""
  params = jax.tree.map(jnp.asarray, random_mlp(np.random.default_rng(0), [7, 6, 6, 5]))
  if net == 'dead unit':
    params['Dense_0'] = {k: v.at[..., 2].set(0.0) for k, v in params['Dense_0'].items()}
  else:
    params['Dense_2'] = {k: jnp.zeros_like(v) for k, v in params['Dense_2'].items()}

  def eq9(grads, q):
    squares = [(q[n]['kernel'] ** 2, q[n]['bias'] ** 2) for n in MLP_LAYERS]
    gamma_in = [jnp.ones(7)]
    for w, b in squares:
      gamma_in.append(gamma_in[-1] @ w + b)
    gamma_out = [jnp.ones(5)]
    for w, _ in reversed(squares):
      gamma_out.insert(0, w @ gamma_out[0])
    divide = lambda g, s: jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)
    return {
      n: {
        'kernel': divide(grads[n]['kernel'], jnp.outer(gamma_in[l], gamma_out[l + 1])),
        'bias': divide(grads[n]['bias'], gamma_out[l + 1]),
      }
      for l, n in enumerate(MLP_LAYERS)
    }

  def meta_loss(q, normalize):
    updates = normalize(jax.grad(mlp_loss)(q), q)
    return mlp_loss(jax.tree.map(lambda a, u: a - 0.1 * u, q, updates))

  def transformation(**mode):
    tx = optax_path.path_normalize(**mode)
    return lambda g, q: tx.update(g, tx.init(q), q)[0]

  want = jax.grad(meta_loss)(params, eq9)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(want))
  for mode in ({}, {'apply_fn': mlp_forward, 'input_shape': (7,)}):
    got = jax.grad(meta_loss)(params, transformation(**mode))
    leaves = zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want), strict=True)
    for (path, a), b in leaves:
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=jax.tree_util.keystr(path))


def test_an_update_differentiates_by_an_injected_p_and_by_what_apply_fn_closes_over(x64):
  """The overflow guard (a custom_jvp) closed over p and apply_fn's constants: a gradient
  by an injected p, or by a value apply_fn closes over, raised TypeError. Expected: the
  MLP mode's derivative by p, and central differences by the closed-over value."""
  params = jax.tree.map(jnp.asarray, random_mlp(np.random.default_rng(0), [7, 6, 6, 5]))
  grads = jax.grad(mlp_loss)(params)

  def meta_loss(tx):
    updates = tx.update(grads, tx.init(params), params)[0]
    return mlp_loss(jax.tree.map(lambda a, u: a - 0.1 * u, params, updates))

  general = {'apply_fn': mlp_forward, 'input_shape': (7,)}
  injected = optax.inject_hyperparams(optax_path.path_normalize, static_args=tuple(general))
  by_p = lambda p, **mode: meta_loss(injected(p=p, **mode))
  want = jax.grad(by_p)(2.0)
  for derivative in (jax.grad, jax.jacfwd, lambda f: jax.jit(jax.grad(f))):
    np.testing.assert_allclose(derivative(lambda p: by_p(p, **general))(2.0), want, rtol=1e-10)

  def by_t(t):  # apply_fn scales its input by t: the pass's constants depend on t
    scaled = lambda q, x: mlp_forward(q, x * t)
    return meta_loss(optax_path.path_normalize(apply_fn=scaled, input_shape=(7,)))

  h = 1e-5
  central = (by_t(1.5 + h) - by_t(1.5 - h)) / (2 * h)
  np.testing.assert_allclose(jax.grad(by_t)(1.5), central, rtol=1e-7)


def test_a_gradient_through_an_update_is_finite_where_the_pass_overflows():
  """Float32, p = 3, a hidden unit rescaled by 1e18 (the function unchanged): the pass
  overflows, every update is 0, and the gradient through the update was NaN in every
  kernel. The saturated scales are constants: the meta-gradient is the loss's own."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jnp.asarray(a, jnp.float32), random_mlp(rng, [7, 6, 6, 5], dtype=np.float32)
  )
  params['Dense_0'] = {k: v.at[..., 1].multiply(1e18) for k, v in params['Dense_0'].items()}
  params['Dense_1']['kernel'] = params['Dense_1']['kernel'].at[1].multiply(1e-18)
  tx = optax_path.path_normalize(3.0, apply_fn=mlp_forward, input_shape=(7,))

  def meta_loss(q):
    updates = tx.update(jax.grad(mlp_loss)(q), tx.init(q), q)[0]
    return mlp_loss(jax.tree.map(lambda a, u: a - 0.1 * u, q, updates))

  updates = tx.update(jax.grad(mlp_loss)(params), tx.init(params), params)[0]
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  chex.assert_trees_all_close(jax.grad(meta_loss)(params), jax.grad(mlp_loss)(params), rtol=1e-6)
  balanced = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_mlp(rng, [7, 6, 6, 5]))
  ensemble = jax.tree.map(lambda a, b: jnp.stack([a, b]), balanced, params)  # vmap: a select
  batched = jax.vmap(jax.grad(meta_loss))(ensemble)
  chex.assert_trees_all_close(
    jax.tree.map(lambda a: a[1], batched), jax.grad(mlp_loss)(params), rtol=1e-5
  )
  chex.assert_trees_all_close(
    jax.tree.map(lambda a: a[0], batched), jax.grad(meta_loss)(balanced), rtol=1e-5
  )


@pytest.mark.slow
def test_masked_leaves_are_passed_through_when_the_forward_pass_does_not_need_them():
  params, apply_fn = linen_mlp()
  tree = {'trunk': params, 'aux': {'kernel': jnp.ones((3, 2))}}
  mask = {'trunk': jax.tree.map(lambda _: True, params), 'aux': {'kernel': False}}
  inner = optax_path.path_normalize(apply_fn=lambda q, x: apply_fn(q['trunk'], x), input_shape=(4,))
  tx = optax.masked(inner, mask)
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
  expected = jax.jit(normalize_once, static_argnums=0)(
    optax_path.path_normalize(), grads['trunk'], params
  )
  assert_trees_close(updates['trunk'], expected)
  np.testing.assert_allclose(updates['aux']['kernel'], 1.0)

  uses_aux = optax.masked(
    optax_path.path_normalize(
      apply_fn=lambda q, x: apply_fn(q['trunk'], x) @ q['aux']['kernel'], input_shape=(4,)
    ),
    mask,
  )
  with pytest.raises(ValueError, match='MaskedNode'):
    uses_aux.update(grads, uses_aux.init(tree), tree)


# ---------------------------------------------------------------------------------------
# (d) Errors.


def test_errors():
  params, apply_fn = linen_mlp()
  for fn in (optax_path.path_scales, optax_path.path_norm, optax_path.log_path_norm):
    with pytest.raises(ValueError, match='both apply_fn and input_shape'):
      fn(params, apply_fn=apply_fn)
    with pytest.raises(ValueError, match='both apply_fn and input_shape'):
      fn(params, input_shape=(4,))
    with pytest.raises(ValueError, match='not both'):
      fn(params, layers=['Dense_0', 'Dense_1', 'Dense_2'], apply_fn=apply_fn, input_shape=(4,))
  with pytest.raises(ValueError, match='both apply_fn and input_shape'):
    optax_path.path_normalize(apply_fn=apply_fn)
  with pytest.raises(ValueError, match='both apply_fn and input_shape'):
    optax_path.path_normalize(input_shape=(4,))
  with pytest.raises(ValueError, match='not both'):
    optax_path.path_normalize(layers=['Dense_0'], apply_fn=apply_fn, input_shape=(4,))

  with pytest.raises(ValueError, match=r'does not use these params leaves: extra/kernel \(2, 2\)'):
    optax_path.path_scales(
      {**params, 'extra': {'kernel': jnp.ones((2, 2))}}, apply_fn=apply_fn, input_shape=(4,)
    )
  with pytest.raises(ValueError, match='input_shape must be the shape of one input'):
    optax_path.path_scales(params, apply_fn=apply_fn, input_shape=4)


def test_path_scales_of_params_closed_over_inside_jit():
  """Params that a jitted function closes over (concrete) while the scales are traced:
  path_scales raised AttributeError ('sharding' of a traced array), in both modes."""
  params, apply_fn = linen_mlp()
  for mode in ({}, {'apply_fn': apply_fn, 'input_shape': (4,)}):
    want = optax_path.path_scales(params, **mode)
    got = jax.jit(lambda mode=mode: optax_path.path_scales(params, **mode))()
    assert_trees_close(got, want)


def test_errors_name_the_cause_a_breaker_met():
  """apply_fn failures and refusals that blamed input_shape or 'a normalisation layer':
  an NNX module in training mode (it updates its batch statistics or RNG counter), the
  Linen variables dict with batch_stats given as params, an nn.Embed fed floats."""

  class Train(nnx.Module):
    def __init__(self, rngs):
      self.dense, self.norm = nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.norm(self.dense(x))))

  model = Train(nnx.Rngs(0))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  in_training = lambda s, x: nnx.merge(graphdef, s, rest)(x)
  with pytest.raises(ValueError, match=r'a module in training mode.*m.eval\(\)'):
    optax_path.path_scales(state, apply_fn=in_training, input_shape=(3,))
  copy = nnx.clone(model)
  copy.eval()  # what the message says to do
  graphdef, state, rest = nnx.split(copy, nnx.Param, ...)
  optax_path.path_scales(
    state, apply_fn=lambda s, x: nnx.merge(graphdef, s, rest)(x), input_shape=(3,)
  )

  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))))

  variables = Normed().init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(
    ValueError,
    match=r'rsqrt .* by batch_stats/BatchNorm_0/var alone.*'
    r"only the 'params' collection",
  ):
    optax_path.path_scales(variables, apply_fn=Normed().apply, input_shape=(3,))
  stats = variables['batch_stats']
  apply_fn = lambda q, x: Normed().apply({'params': q, 'batch_stats': stats}, x)
  optax_path.path_scales(variables['params'], apply_fn=apply_fn, input_shape=(3,))

  class Embedded(nn.Module):
    @nn.compact
    def __call__(self, t):
      return nn.Dense(2)(nn.relu(nn.Embed(5, 3)(t)).reshape(t.shape[0], -1))

  params = Embedded().init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))['params']
  with pytest.raises(ValueError, match=r'such as the token ids of an embedding.*after the'):
    optax_path.path_scales(
      params, apply_fn=lambda q, x: Embedded().apply({'params': q}, x), input_shape=(2,)
    )


def test_general_mode_surfaces_non_finite_params_and_an_invalid_traced_p():
  """A NaN weight or an injected p out of [0.5, 32] gives NaN updates and path norm, so
  NaN checks see them; a valid injected p gives the updates of the concrete one."""
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))['params']
  mode = {'apply_fn': lambda q, x: model.apply({'params': q}, x), 'input_shape': (2,)}
  tx = optax_path.path_sgd(0.1, **mode)
  bad = jax.tree.map(lambda w: w, params)
  bad['layers_0']['kernel'] = bad['layers_0']['kernel'].at[0, 0].set(jnp.nan)
  updates, _ = jax.jit(tx.update)(params, tx.init(bad), bad)
  assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates))
  assert np.isnan(float(optax_path.log_path_norm(bad, **mode)))
  injected = optax.inject_hyperparams(optax_path.path_sgd, static_args=('apply_fn', 'input_shape'))(
    learning_rate=0.1, p=2.0, **mode
  )
  state = injected.init(params)
  expected, _ = tx.update(params, tx.init(params), params)
  for p, valid in [(-1.0, False), (0.0, False), (float('nan'), False), (100.0, False), (2.0, True)]:
    state.hyperparams['p'] = jnp.asarray(p)
    updates, _ = jax.jit(injected.update)(params, state, params)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      if valid:
        np.testing.assert_allclose(u, e, rtol=1e-6)
      else:
        assert bool(jnp.all(jnp.isnan(u))), p
