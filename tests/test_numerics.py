"""Float range: deep and unbalanced nets, dead units, low-precision dtypes."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normalize_once
from scipy.special import logsumexp

import optax_path

F32 = np.finfo(np.float32)


def reference_log_scales(kernels, p):
  """Float64 log-domain Algorithm 1 (no biases), independent of the library's passes."""
  log_w = [p * np.log(np.abs(np.asarray(w, np.float64))) for w in kernels]
  log_in = [np.zeros(kernels[0].shape[0])]
  for lw in log_w:
    log_in.append(logsumexp(log_in[-1][:, None] + lw, axis=0))
  log_out = [np.zeros(kernels[-1].shape[1])]
  for lw in reversed(log_w):
    log_out.append(logsumexp(lw + log_out[-1][None, :], axis=1))
  log_out = log_out[::-1]
  return [(2 / p) * (log_in[l][:, None] + log_out[l + 1][None, :]) for l in range(len(kernels))]


def deep_net(seed=0, depth=40, width=6):
  """A float32 net whose phi_2 is far beyond 1e38, with some units rescaled by 1e15."""
  rng = np.random.default_rng(seed)
  kernels = [rng.normal(scale=2.0 / np.sqrt(width), size=(width, width)) for _ in range(depth)]
  kernels[20] *= 1e30  # a layer of huge weights: phi_2 ~ 1e30 * 2^39
  kernels[5][:, 2] *= 1e15  # an unbalanced unit...
  kernels[6][2, :] /= 1e15  # ...with its outgoing edges scaled down
  kernels[30][:, 4] /= 1e12
  kernels[31][4, :] *= 1e12
  return [np.asarray(k, np.float32) for k in kernels]


def test_deep_net_scales_match_float64_log_reference_where_representable():
  kernels = deep_net()
  params = {f'layers_{l}': {'kernel': jnp.asarray(k)} for l, k in enumerate(kernels)}
  assert float(optax_path.log_path_norm(params)) > np.log(1e38)
  assert np.isinf(float(optax_path.path_norm(params)))  # phi_2 itself is beyond float32

  scales = optax_path.path_scales(params)
  reference = reference_log_scales(kernels, 2.0)
  representable_count = 0
  for l, ref in enumerate(reference):
    actual = np.asarray(scales[f'layers_{l}']['kernel'], np.float64)
    assert not np.any(np.isnan(actual))
    representable = (ref > np.log(F32.tiny)) & (ref < np.log(F32.max))
    representable_count += representable.sum()
    rel = np.abs(actual - np.exp(ref)) / np.exp(ref)
    assert np.all(rel[representable] < 1e-4), (l, rel[representable].max())
    assert np.all(np.isinf(actual[ref > np.log(F32.max) + 1]))
    assert np.all(actual[ref < np.log(F32.tiny) - 1] == 0)
  assert representable_count >= 36  # the huge layer's edges and the rescaled units'

  rng = np.random.default_rng(1)
  grads = {
    k: {'kernel': jnp.asarray(rng.normal(size=v['kernel'].shape), jnp.float32)}
    for k, v in params.items()
  }
  updates = jax.jit(normalize_once, static_argnums=0)(optax_path.path_normalize(2.0), grads, params)
  for l, ref in enumerate(reference):
    actual = np.asarray(updates[f'layers_{l}']['kernel'], np.float64)
    g = np.asarray(grads[f'layers_{l}']['kernel'], np.float64)
    log_expected = np.log(np.abs(g)) - ref
    assert np.all(np.isfinite(actual))
    inside = (log_expected > np.log(F32.tiny)) & (log_expected < np.log(F32.max))
    expected = np.sign(g) * np.exp(log_expected)
    assert np.all(np.abs(actual - expected)[inside] <= 1e-4 * np.abs(expected)[inside])
    np.testing.assert_array_equal(np.abs(actual[log_expected > np.log(F32.max)]), F32.max)
    assert np.all(np.abs(actual[log_expected < np.log(F32.tiny)]) <= F32.tiny)


def test_naive_float32_pass_would_overflow_on_this_net():
  """The test above is not vacuous: plain float32 Algorithm 1 gives inf and NaN here."""
  kernels = [jnp.asarray(k) for k in deep_net()]
  g_in = jnp.ones(kernels[0].shape[0])
  for w in kernels:
    g_in = g_in @ w**2
  g_out = jnp.ones(kernels[-1].shape[1])
  for w in reversed(kernels):
    g_out = w**2 @ g_out
  assert not np.all(np.isfinite(g_in)) or not np.all(np.isfinite(g_out))


def test_dead_units_give_zero_not_nan():
  params = {
    'Dense_0': {
      'kernel': jnp.array([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]]),
      'bias': jnp.array([0.0, 0.0, 1.0]),
    },
    'Dense_1': {
      'kernel': jnp.array([[1.0, 2.0], [4.0, 5.0], [0.0, 0.0]]),
      'bias': jnp.array([1.0, 1.0]),
    },
  }
  # Unit 1 of the hidden layer has no path in; unit 2 has no path out.
  grads = jax.tree.map(jnp.ones_like, params)
  updates = normalize_once(optax_path.path_normalize(2.0), grads, params)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))
  np.testing.assert_array_equal(updates['Dense_1']['kernel'][1], [0.0, 0.0])  # no path in
  np.testing.assert_array_equal(updates['Dense_0']['kernel'][:, 2], [0.0, 0.0])  # no path out
  assert updates['Dense_0']['bias'][2] == 0.0
  scales = optax_path.path_scales(params)
  np.testing.assert_allclose(scales['Dense_0']['kernel'][:, 0], [5.0, 5.0])  # 1 * (1^2 + 2^2)


def test_non_finite_gradients_pass_through_and_dtypes_are_kept():
  params = {'Dense_0': {'kernel': jnp.ones((2, 2))}, 'Dense_1': {'kernel': jnp.ones((2, 1))}}
  grads = {
    'Dense_0': {'kernel': jnp.array([[jnp.nan, jnp.inf], [-jnp.inf, 1.0]])},
    'Dense_1': {'kernel': jnp.array([[2.0], [0.0]])},
  }
  updates = normalize_once(optax_path.path_normalize(), grads, params)
  kernel = np.asarray(updates['Dense_0']['kernel'])
  assert np.isnan(kernel[0, 0]) and kernel[0, 1] == np.inf and kernel[1, 0] == -np.inf
  np.testing.assert_allclose(kernel[1, 1], 1.0)  # scale 1 * 1^2
  np.testing.assert_allclose(updates['Dense_1']['kernel'], [[1.0], [0.0]], rtol=1e-6)  # 1^2 + 1^2


def test_float16_updates_clip_to_the_largest_finite_value():
  params = {
    'Dense_0': {'kernel': jnp.full((2, 2), 1e-3, jnp.float16)},
    'Dense_1': {'kernel': jnp.full((2, 1), 1e-3, jnp.float16)},
  }
  grads = jax.tree.map(lambda w: jnp.full_like(w, -1.0), params)
  updates = normalize_once(optax_path.path_normalize(), grads, params)
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.float16
    np.testing.assert_array_equal(leaf, -np.finfo(np.float16).max)  # 1/(2e-6) > 65504


class BF16MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x))
    return nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)


def test_bfloat16_params_scales_in_float32_updates_in_bfloat16():
  model = BF16MLP()
  x = jnp.ones((4, 8), jnp.bfloat16)
  params = model.init(jax.random.key(0), x)['params']
  params = optax_path.unbalance(jax.random.key(1), params, 8)
  grads = jax.grad(lambda q: jnp.sum(model.apply({'params': q}, x).astype(jnp.float32) ** 2))(
    params
  )
  updates = normalize_once(optax_path.path_normalize(), grads, params)
  as_f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  reference = normalize_once(optax_path.path_normalize(), as_f32(grads), as_f32(params))
  for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(reference)):
    assert u.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
    np.testing.assert_allclose(np.asarray(u, np.float32), r, rtol=1e-2, atol=0)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(optax_path.path_scales(params)))


@pytest.mark.parametrize('p', [0.5, 1.0, 2.0, 7.0])
def test_unbalanced_paper_init_scales_match_float64(p, x64):
  """float32 scales of a paper-style unbalanced net equal float64 ones where representable."""
  rng = np.random.default_rng(2)
  widths = [20, 30, 30, 10]
  params = [{'kernel': rng.normal(size=(a, b)) / np.sqrt(a)} for a, b in itertools.pairwise(widths)]
  params = optax_path.unbalance(jax.random.key(0), jax.tree.map(jnp.asarray, params), 30)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  reference = reference_log_scales([l['kernel'] for l in params], p)
  scales = optax_path.path_scales(f32, p)
  for layer, ref in zip(scales, reference):
    actual = np.asarray(layer['kernel'], np.float64)
    ok = (ref > np.log(F32.tiny) + 1) & (ref < np.log(F32.max) - 1)
    assert ok.mean() > 0.5
    np.testing.assert_allclose(actual[ok], np.exp(ref[ok]), rtol=1e-4)


@pytest.mark.parametrize('terms', ['per unit', 'per parameter'])
def test_division_is_right_wherever_the_quotient_is_representable(terms):
  """g / exp(row + col) in float32 against float64, over the whole exponent range.

  Per unit: a row and a column vector (the MLP mode, split once per unit); per
  parameter: one full-size term (the general mode, split inside the division).
  """
  from optax_path._src.numerics import divide_by_scale

  rng = np.random.default_rng(11)
  g = (rng.choice([-1, 1], (64, 48)) * 10.0 ** rng.uniform(-37, 38, (64, 48))).astype(np.float32)
  row = rng.uniform(-250, 250, (64, 1)).astype(np.float32)  # scales from e^-500 to e^500
  col = rng.uniform(-250, 250, (1, 48)).astype(np.float32)
  row[0, 0], col[0, 1] = -np.inf, -np.inf  # zero scales
  log_scale = (row, col) if terms == 'per unit' else (row + col,)
  quotient = np.asarray(divide_by_scale(jnp.asarray(g), *map(jnp.asarray, log_scale)))
  with np.errstate(over='ignore', under='ignore'):
    exact = g.astype(np.float64) * np.exp(-sum(t.astype(np.float64) for t in log_scale))
  zero = np.isinf(row) | np.isinf(col)
  normal = ~zero & (np.abs(exact) >= F32.tiny) & (np.abs(exact) <= F32.max)
  assert normal.sum() > 300 and (~zero & (np.abs(exact) > F32.max)).sum() > 300
  np.testing.assert_allclose(quotient[normal], exact[normal], rtol=1e-6)
  beyond = ~zero & (np.abs(exact) > F32.max)
  np.testing.assert_array_equal(quotient[beyond], np.sign(g[beyond]) * F32.max)
  below = ~zero & (np.abs(exact) < F32.tiny)
  np.testing.assert_allclose(quotient[below], exact[below], rtol=0, atol=F32.tiny)  # or flushed
  assert np.all(quotient[zero] == 0)


def test_dividing_a_tree_splits_all_layers_together_yet_equals_leaf_by_leaf():
  """``divide_by_scales`` (all per-unit terms split in one computation, float32 and
  bfloat16 leaves together) gives bit for bit the leaf-by-leaf division."""
  from optax_path._src.numerics import divide_by_scale
  from optax_path._src.transform import divide_by_scales

  rng = np.random.default_rng(5)
  shapes = [(6, 5), (5,), (5, 3), (3,)]
  dtypes = [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16]
  tree = [jnp.asarray(rng.normal(size=s) * 1e3, d) for s, d in zip(shapes, dtypes)]
  vec = lambda n: jnp.asarray(rng.uniform(-120, 120, n), jnp.float32)
  log_scales = {
    0: (vec(6)[:, None], vec(5)[None, :]),
    1: (vec(5),),
    2: (vec(5)[:, None], vec(3)[None, :]),
    3: (vec(3),),
  }
  divided = jax.jit(divide_by_scales)(tree, log_scales)
  for i, leaf in enumerate(tree):
    expected = jax.jit(divide_by_scale)(leaf, *log_scales[i])
    assert divided[i].dtype == leaf.dtype
    np.testing.assert_array_equal(
      np.asarray(divided[i], np.float32), np.asarray(expected, np.float32)
    )
