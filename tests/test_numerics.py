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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


DIVISION_DTYPES = ['float32', 'bfloat16', 'float16', 'float64']


def exact_quotients(g, log_scale):
  """``g / exp(sum(log_scale))`` in a wider float, independent of the library: float64
  for 32-bit and narrower ``g``, the x87 long double (range 1e4932) for float64."""
  wide = np.float64 if g.dtype.itemsize < 8 else np.longdouble
  if wide is np.longdouble and np.finfo(wide).maxexp < 4096:
    pytest.skip('no long double wider than float64 on this platform')
  with np.errstate(over='ignore', under='ignore', invalid='ignore'):
    return g.astype(wide) * np.exp(-sum(t.astype(wide) for t in log_scale))


def division_grid(dtype, rng):
  """Gradients over the whole range of ``dtype`` (its largest finite value, its smallest
  normal, 1, every exponent between) against scales from 0 to far beyond the range."""
  info = jnp.finfo(dtype)
  lo, hi = np.log2(float(info.tiny)), np.log2(float(info.max))
  g = rng.choice([-1, 1], (96, 64)) * 2.0 ** rng.uniform(lo, hi, (96, 64))
  g[:8] = np.array([1, -1, 1, -1, 1, 1, 1, 1])[:, None] * [
    [float(info.max)], [float(info.max)], [float(info.tiny)], [float(info.tiny)],
    [1.0], [2 * float(info.tiny)], [float(info.max) / 2], [float(info.max) * 0.99],
  ]
  g = np.asarray(jnp.asarray(g, dtype))  # rounded to dtype (never beyond its max)
  compute = np.float64 if dtype == 'float64' else np.float32
  reach = 1.2 * (hi - lo) * np.log(2)  # quotients from far below to far beyond the range
  row = rng.uniform(-reach / 2, reach / 2, (96, 1)).astype(compute)
  col = rng.uniform(-reach / 2, reach / 2, (1, 64)).astype(compute)
  row[:8] = 0.0
  col[0, 8] = (hi - lo + 2) * np.log(2)  # the largest g over 2^256: 2^-128 (NaN before)
  col[0, :8] = [0.0, np.log(1.754**2), -np.log(1.754**2), np.log(1e-3), 0.7, -0.7, 2.0, -2.0]
  row[8, 0], row[9, 0] = -np.inf, np.inf  # a zero and an infinite scale
  return g, row, col


@pytest.mark.slow
@pytest.mark.parametrize('terms', ['per unit', 'per parameter'])
@pytest.mark.parametrize('dtype', DIVISION_DTYPES)
def test_division_is_right_wherever_the_quotient_is_representable(dtype, terms, x64):
  """``g / exp(row + col)`` per dtype against a wider float, over the joint range: ``g``
  up to the largest finite value, scales from 0 to far beyond the range.

  Per unit: a row and a column vector (the MLP mode, split once per unit); per
  parameter: one full-size term (the general mode, split inside the division). Before
  issue 11, float32 ``g = 3e38`` over ``1.754^2`` gave 3.4e38 (``g`` times the
  mantissa overflowed), 64 of such entries were off by up to 19x, and NaN came out
  where ``g`` was huge and the scale far beyond the range.
  """
  from optax_path._src.numerics import divide_by_scale

  g, row, col = division_grid(dtype, np.random.default_rng(11))
  log_scale = (row, col) if terms == 'per unit' else (row + col,)
  quotient = divide_by_scale(jnp.asarray(g, dtype), *map(jnp.asarray, log_scale))
  assert quotient.dtype == jnp.dtype(dtype)
  quotient = np.asarray(quotient.astype(jnp.float64 if dtype == 'float64' else jnp.float32))
  exact = exact_quotients(g, log_scale)
  info = jnp.finfo(dtype)
  tiny, largest = float(info.tiny), float(info.max)
  saturated = np.isinf(row) | np.isinf(col)
  normal = ~saturated & (np.abs(exact) >= tiny) & (np.abs(exact) <= largest)
  beyond = ~saturated & (np.abs(exact) > largest)
  below = ~saturated & (np.abs(exact) < tiny)
  assert normal.sum() > 1000 and beyond.sum() > 1000 and below.sum() > 1000
  assert normal[0, 1] and normal[2, 7] and normal[7, 0]  # largest over 1.754^2, and so on
  assert not np.any(np.isnan(quotient))
  # Rounded once to dtype: half an ulp, plus a few ulps of the compute dtype.
  rtol = float(info.eps) / 2 + 8 * float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps)
  np.testing.assert_allclose(quotient[normal], exact[normal].astype(np.float64), rtol=rtol, atol=0)
  np.testing.assert_array_equal(quotient[beyond], np.sign(g[beyond]) * largest)
  np.testing.assert_allclose(quotient[below], exact[below], rtol=0, atol=tiny)  # or flushed
  assert np.all(quotient[saturated] == 0)


def test_division_of_the_largest_float32_gradient_by_a_scale_above_one():
  """Issue 11: ``{'Dense_0': [[1.]], 'Dense_1': [[1.754]]}``, a Dense_0 gradient of 3e38:
  the update is 3e38 / 1.754^2 = 9.7513e37, not the clipped 3.4e38."""
  params = {
    'Dense_0': {'kernel': jnp.array([[1.0]])},
    'Dense_1': {'kernel': jnp.array([[1.754]])},
  }
  grads = {'Dense_0': {'kernel': jnp.array([[3e38]])}, 'Dense_1': {'kernel': jnp.array([[0.0]])}}
  updates = normalize_once(optax_path.path_normalize(2.0), grads, params)
  expected = float(np.float32(3e38)) / float(np.float32(1.754)) ** 2
  np.testing.assert_allclose(float(updates['Dense_0']['kernel'][0, 0]), expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('dtype', DIVISION_DTYPES)
@pytest.mark.parametrize('weight', ['1', 'huge'])
def test_updates_of_the_largest_gradients_match_exact_division(dtype, weight, x64):
  """Issue 11: gradients at the top of the range with weights ~1 or ~1e30 (1e200 in
  float64, 1e3 in float16) gave wrong entries (up to 19x) or NaN. Reference: scales
  from a float64 brute-force sum over paths of a 2-layer net, exact division."""
  rng = np.random.default_rng(3)
  info = jnp.finfo(dtype)
  big = {'float32': 1e30, 'bfloat16': 1e30, 'float16': 1e2, 'float64': 1e200}[dtype]
  factor = 1.0 if weight == '1' else big
  w0 = rng.uniform(0.5, 1.5, (8, 8)) * factor
  w1 = rng.uniform(0.5, 1.5, (8, 1)) / factor
  params = {
    'Dense_0': {'kernel': jnp.asarray(w0, dtype)},
    'Dense_1': {'kernel': jnp.asarray(w1, dtype)},
  }
  w0, w1 = (np.asarray(params[k]['kernel'].astype(jnp.float64)) for k in ('Dense_0', 'Dense_1'))
  grads = jax.tree.map(lambda w: jnp.full_like(w, float(info.max) * 0.9), params)
  updates = normalize_once(optax_path.path_normalize(2.0), grads, params)
  # Two layers: the scale of W0[u, v] is w1[v]^2 (one path), of W1[v] it is sum_u w0[u, v]^2.
  log_scales = [2 * np.log(np.abs(w1.T)) + 0 * w0, logsumexp(2 * np.log(w0), axis=0)[:, None]]
  for key, log_scale in zip(('Dense_0', 'Dense_1'), log_scales):
    g = np.asarray(grads[key]['kernel'].astype(jnp.float64))
    exact = exact_quotients(g, (log_scale,)).astype(np.float64)
    actual = np.asarray(updates[key]['kernel'].astype(jnp.float64))
    expected = np.clip(exact, -float(info.max), float(info.max))
    assert not np.any(np.isnan(actual))
    np.testing.assert_allclose(actual, expected, rtol=float(info.eps) + 1e-5)


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
