"""The edges of the core (issue 11): p at the ends of its range, invalid and traced p,
non-finite params. References: brute-force sums over paths in float64 and closed forms,
never the library's own passes."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normalize_once

import optax_path
from optax_path._src import numerics, scales, warm_scales

P_ENDS = [numerics.P_MIN, 1.0, numerics.P_MAX]


def brute_force_log_gammas(kernels, biases, p):
  """``log gamma_in``, ``log gamma_out`` by enumerating every path, in float64 logs."""
  kernels = [np.asarray(w, np.float64) for w in kernels]
  widths = [kernels[0].shape[0]] + [w.shape[1] for w in kernels]

  def log_sum(terms):
    terms = [t for t in terms if t > -np.inf]
    if not terms:
      return -np.inf
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))

  def log_abs_p(x):
    return p * math.log(abs(x)) if x != 0 else -np.inf

  log_in = [np.zeros(widths[0])]
  for l, w in enumerate(kernels):  # paths from an input or a bias unit into each unit
    sources = [
      [log_in[l][u] + log_abs_p(w[u, v]) for u in range(widths[l])] for v in range(w.shape[1])
    ]
    if biases[l] is not None:
      sources = [s + [log_abs_p(biases[l][v])] for v, s in enumerate(sources)]
    log_in.append(np.array([log_sum(s) for s in sources]))
  log_out = [np.zeros(widths[-1])]
  for w in reversed(kernels):
    ahead = [
      log_sum([log_abs_p(w[u, v]) + log_out[-1][v] for v in range(w.shape[1])])
      for u in range(w.shape[0])
    ]
    log_out.append(np.array(ahead))
  return log_in, log_out[::-1]


def wide_range_net(rng, widths, spread=30.0, dtype=np.float32):
  """A net whose weights span e^-spread..e^spread, with biases."""
  params = {}
  for l, (a, b) in enumerate(itertools.pairwise(widths)):
    kernel = rng.choice([-1, 1], (a, b)) * np.exp(rng.uniform(-spread, spread, (a, b)))
    params[f'Dense_{l}'] = {
      'kernel': jnp.asarray(kernel, dtype),
      'bias': jnp.asarray(
        rng.normal(size=b) * np.exp(rng.uniform(-spread, spread, b) * 2 / 3), dtype
      ),
    }
  return params


# --- p: its range and its type, checked at the door ---------------------------------


@pytest.mark.parametrize(
  'p',
  [0.49, 32.5, 100.0, 150.0, 200.0, 1e-3, 0.01, 0.0, -1.0, float('nan'), float('inf'),
   True, np.bool_(True), '2', b'2', None, 2 + 0j, np.complex64(2.0), jnp.array([2.0]),
   np.array([2.0, 3.0]), jnp.array(True), jnp.array(100.0), np.float32(0.1)],
)
def test_invalid_p_is_a_value_error_at_construction(p):
  for make in (
    lambda: optax_path.path_normalize(p),
    lambda: optax_path.path_sgd(0.1, p=p),
    lambda: optax_path.path_scales({'Dense_0': {'kernel': jnp.ones((1, 1))}}, p),
  ):
    with pytest.raises(ValueError, match='p must be a'):
      make()


@pytest.mark.parametrize(
  'p', [2, 2.0, np.float32(2.0), np.float64(2.0), np.int64(2), jnp.array(2.0), jnp.float32(2.0)]
)
def test_numpy_and_jax_scalar_p_are_accepted_like_python_ones(p):
  assert numerics.validate_p(p) == 2.0 and type(numerics.validate_p(p)) is float
  params = {'Dense_0': {'kernel': jnp.array([[1.0, 2.0]])}, 'Dense_1': {'kernel': jnp.ones((2, 1))}}
  np.testing.assert_allclose(optax_path.path_scales(params, p)['Dense_0']['kernel'], [[1.0, 1.0]])


# --- p at the ends of its range -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('p', P_ENDS)
def test_one_one_net_of_weight_one_at_the_ends_of_p(p):
  """Issue 11: at p = 150 or 200 every scale was 0, every update 0 and log_path_norm
  -inf (now a ValueError); at the ends of the range: scales 1, updates = gradients."""
  params = {'Dense_0': {'kernel': jnp.ones((1, 1))}, 'Dense_1': {'kernel': jnp.ones((1, 1))}}
  for leaf in jax.tree.leaves(optax_path.path_scales(params, p)):
    np.testing.assert_allclose(leaf, [[1.0]], rtol=1e-6)
  grads = jax.tree.map(lambda w: 3 * w, params)
  for leaf in jax.tree.leaves(normalize_once(optax_path.path_normalize(p), grads, params)):
    np.testing.assert_allclose(leaf, [[3.0]], rtol=1e-6)
  assert abs(float(optax_path.log_path_norm(params, p))) < 1e-6


@pytest.mark.parametrize('p', P_ENDS)
def test_biases_count_at_the_ends_of_p(p):
  """Issue 11: a 1-1-1 net of ones with biases had log_path_norm 693.1 at p = 1e-3
  (log(2)/p, a bias lost) for log(3)/p = 1098.6. Three paths: x-w-w, b-w, b."""
  layer = {'kernel': jnp.ones((1, 1)), 'bias': jnp.ones(1)}
  params = {'Dense_0': layer, 'Dense_1': layer}
  np.testing.assert_allclose(float(optax_path.log_path_norm(params, p)), math.log(3) / p, rtol=1e-6)
  # A weight of 2^(1/2): the scales of Dense_1's kernel are (1 + 1)^(2/p) * 1.
  params['Dense_0'] = {'kernel': jnp.full((1, 1), 2.0 ** (1 / p)), 'bias': jnp.ones(1)}
  scale = optax_path.path_scales(params, p)['Dense_1']['kernel']
  np.testing.assert_allclose(scale, [[3.0 ** (2 / p)]], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('p', P_ENDS)
def test_exact_passes_match_brute_force_at_the_ends_of_p(p):
  """``log_matvec`` over weights spanning e^-30..e^30 with biases, against a float64 sum
  over every path: logs right to float32 rounding, so every scale to 1e-5."""
  rng = np.random.default_rng(int(p * 100))
  params = wide_range_net(rng, [3, 4, 5, 2])
  kernels, biases = scales.layer_arrays(params, None)
  log_in, log_out = scales.exact_log_gammas(kernels, biases, p=p)
  ref_in, ref_out = brute_force_log_gammas(kernels, biases, p)
  for actual, expected in zip(log_in + log_out, ref_in + ref_out):
    tol = 4e-7 * max(1.0, float(np.max(np.abs(expected)))) + 1e-6
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize('p', [1.0, numerics.P_MAX])
def test_warm_passes_are_taken_and_exact_at_the_ends_of_p(p):
  """The warm-started passes (p >= 1) up to the top of the range: taken from nearby
  weights (spanning e^-8..e^8: at p = 1 the window is 43 nats), and equal to the
  float64 brute force."""
  rng = np.random.default_rng(7)
  params = wide_range_net(rng, [3, 4, 5, 2], spread=8.0)
  kernels, biases = scales.layer_arrays(params, None)
  hint_in, hint_out = scales.exact_log_gammas(kernels, biases, p=p)
  moved = [w * (1 + 1e-3 * jnp.asarray(rng.normal(size=w.shape), w.dtype)) for w in kernels]
  log_in, log_out, accurate = warm_scales.warm_passes(moved, biases, p, hint_in, hint_out)
  assert bool(accurate)
  ref_in, ref_out = brute_force_log_gammas(moved, biases, p)
  for actual, expected in zip(log_in + log_out, ref_in + ref_out):
    tol = 4e-7 * max(1.0, float(np.max(np.abs(expected)))) + 1e-6
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=tol)


# --- a traced p out of range: NaN updates, never silent training ----------------------


BAD_P = [-1.0, 0.0, float('nan'), float('inf'), 100.0, 0.1]


@pytest.mark.slow
def test_injected_invalid_p_gives_nan_updates_that_apply_if_finite_skips():
  """Issue 11: p = -1 written into inject_hyperparams' state gave finite updates
  (garbage that trains). Traced, any p out of [0.5, 32] now gives NaN updates."""
  params = {
    'Dense_0': {'kernel': jnp.array([[1.0, 2.0], [3.0, 4.0]]), 'bias': jnp.ones(2)},
    'Dense_1': {'kernel': jnp.array([[1.0], [2.0]])},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.inject_hyperparams(optax_path.path_sgd)(learning_rate=0.1, p=2.0)
  state = tx.init(params)
  update = jax.jit(tx.update)  # p is traced: one compilation for every value below
  # apply_if_finite checks the gradients it is given: it goes after path_normalize.
  guarded = optax.chain(
    optax.inject_hyperparams(optax_path.path_normalize)(p=2.0),
    optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3),
  )
  guarded_update = jax.jit(guarded.update)
  for bad_p in BAD_P:
    state.hyperparams['p'] = jnp.asarray(bad_p)
    updates, _ = update(grads, state, params)
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(updates)), bad_p
    guarded_state = guarded.init(params)
    guarded_state[0].hyperparams['p'] = jnp.asarray(bad_p)
    updates, guarded_state = guarded_update(grads, guarded_state, params)
    assert int(guarded_state[1].notfinite_count) == 1
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match='p must be a'):  # eagerly, p is concrete
    tx.update(grads, state, params)
  state.hyperparams['p'] = jnp.asarray(2.0)  # in range: the same traced path trains
  updates, _ = update(grads, state, params)
  np.testing.assert_allclose(updates['Dense_1']['kernel'], [[-0.1 / 11], [-0.1 / 21]], rtol=1e-5)


# --- non-finite params surface -------------------------------------------------------


def small_net():
  return {
    'Dense_0': {
      'kernel': jnp.array([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]),
      'bias': jnp.array([1.0, 1.0, 0.0]),
    },
    'Dense_1': {'kernel': jnp.array([[1.0], [2.0], [0.0]]), 'bias': jnp.ones(1)},
  }


@pytest.mark.parametrize(
  'where, value, warm',
  [
    (('Dense_0', 'kernel', (0, 1)), float('nan'), True),
    (('Dense_1', 'kernel', (1, 0)), float('inf'), False),
    (('Dense_0', 'bias', (1,)), -float('inf'), True),
    (('Dense_1', 'kernel', (2, 0)), float('nan'), True),  # the row of a unit with no path in
  ],
)
@pytest.mark.slow
def test_a_non_finite_param_gives_nan_updates_everywhere(where, value, warm):
  """Issue 11: a NaN weight gave finite updates (its unit's 0) and NaN log-scales in the
  state, so apply_if_finite never noticed. Now every update and log_path_norm are NaN."""
  params = small_net()
  layer, leaf, index = where
  bad = jax.tree.map(lambda a: a, params)
  bad[layer][leaf] = bad[layer][leaf].at[index].set(value)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax_path.path_normalize(2.0)
  state = tx.init(params if warm else bad)  # warm: the state from finite params
  updates, state = jax.jit(tx.update)(grads, state, bad)
  assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(updates))
  assert all(np.all(np.isnan(v)) for v in state.log_gamma_in + state.log_gamma_out)
  assert np.isnan(float(optax_path.log_path_norm(bad)))
  guarded = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
  _, guarded_state = guarded.update(grads, guarded.init(params), bad)
  assert int(guarded_state[1].notfinite_count) == 1
  # Finite again: the state's NaN warm start is not trusted, the update is right.
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates['Dense_1']['bias'], [1.0])


# --- rescale and rebalance: checked at the door, never out of the range ----------------


def three_layer_net(dtype=jnp.float32):
  rng = np.random.default_rng(4)
  return {
    'Dense_0': {
      'kernel': jnp.asarray(rng.normal(size=(3, 4)), dtype),
      'bias': jnp.ones(4, dtype),
    },
    'Dense_1': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), dtype)},
  }


def forward(params, x):
  h = jax.nn.relu(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  return h @ params['Dense_1']['kernel']


@pytest.mark.parametrize(
  'unit, c, message',
  [
    (0, np.float32(-2.0), 'c must be a finite number > 0'),  # issue 11: changed the function
    (0, jnp.array(-2.0), 'c must be a finite number > 0'),
    (0, np.float64(np.nan), 'c must be a finite number > 0'),
    (0, np.inf, 'c must be a finite number > 0'),
    (0, True, 'c must be a finite number > 0'),
    (0, 2 + 0j, 'c must be a finite number > 0'),
    (0, '2', 'c must be a finite number > 0'),
    (jnp.array([1, 4]), 2.0, 'unit=4 is out of range for layer 0, which has 4 units'),  # no-op
    (np.int64(-1), 2.0, 'unit=-1 is out of range'),
    (True, 2.0, 'unit must be an int'),
    (1.0, 2.0, 'unit must be an int'),
    (0, 1e39, r'rescale by c=1e\+39 would take weights of unit 0 of Dense_0 out of the float32'),
    (2, 1e-39, 'rescale by c=1e-39 would take weights of unit 2 of Dense_0 out'),
  ],
)
def test_rescale_rejects_what_would_change_the_function(unit, c, message):
  with pytest.raises(ValueError, match=message):
    optax_path.rescale(three_layer_net(), 0, unit, c)


def test_rescale_takes_numpy_and_jax_numbers_and_keeps_the_function():
  params = three_layer_net()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  for unit, c in [(np.int32(1), np.float32(3.0)), (jnp.array(2), jnp.array(0.25)),
                  (jnp.array([0, 3]), jnp.array([8.0, 0.5])), (3, 1e30)]:
    out = optax_path.rescale(params, 0, unit, c)
    np.testing.assert_allclose(forward(out, x), forward(params, x), rtol=1e-5, atol=1e-6)
  out = optax_path.rescale(params, 0, np.int64(1), np.float64(3.0))
  np.testing.assert_allclose(out['Dense_0']['kernel'][:, 1], 3 * params['Dense_0']['kernel'][:, 1])
  # Traced unit and factor: not checked, documented; a valid one works under jit.
  out = jax.jit(lambda q, u, c: optax_path.rescale(q, 0, u, c))(params, 1, 3.0)
  expected = params['Dense_1']['kernel'][1] / 3
  np.testing.assert_allclose(out['Dense_1']['kernel'][1], expected, rtol=1e-6)


@pytest.mark.slow
def test_rebalance_is_exact_near_the_ends_of_the_range_or_raises():
  """Issue 11: rebalance(..., p=0.01) gave inf/0 weights; now p is checked, the norms
  never overflow, and weights that would leave the range raise."""
  params = three_layer_net()
  with pytest.raises(ValueError, match='p must be a number in'):
    optax_path.rebalance(params, p=0.01)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  for p in (0.5, 2.0, 32.0):
    out = optax_path.rebalance(params, p=p)
    np.testing.assert_allclose(forward(out, x), forward(params, x), rtol=1e-5, atol=1e-6)
    incoming = np.concatenate([np.asarray(out['Dense_0']['kernel'], np.float64),
                               np.asarray(out['Dense_0']['bias'], np.float64)[None]])
    np.testing.assert_allclose(np.sum(np.abs(incoming) ** p, axis=0), 1.0, rtol=2e-5)
  # Incoming weights of 3e38 (norm beyond float32, 1/norm subnormal): still exact.
  huge = {
    'Dense_0': {'kernel': jnp.full((3, 2), 3e38)},
    'Dense_1': {'kernel': jnp.full((2, 1), 1e-30)},
  }
  out = optax_path.rebalance(huge)
  np.testing.assert_allclose(out['Dense_0']['kernel'], np.full((3, 2), 3**-0.5), rtol=1e-6)
  np.testing.assert_allclose(out['Dense_1']['kernel'], np.full((2, 1), 3e8 * 3**0.5), rtol=1e-6)
  # Outgoing weights of 1e30 times a norm of 1e10: 1e40, beyond float32.
  over = {
    'Dense_0': {'kernel': jnp.full((1, 2), 1e10)},
    'Dense_1': {'kernel': jnp.full((2, 1), 1e30)},
  }
  message = r'rebalance \(1 / \|\|x\|\|_p = exp\(-23.02.*unit 0 of Dense_0'
  with pytest.raises(ValueError, match=message):
    optax_path.rebalance(over)


# --- cases from the review of issue 11 --------------------------------------------------


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_path_scales_of_a_net_with_a_non_finite_weight_are_nan_eager_and_jitted(bad):
  """XLA:CPU once returned logs or uninitialised memory here (exp of a NaN select)."""
  params = {
    'Dense_0': {'kernel': jnp.array([[1.0, 2.0]]), 'bias': jnp.array([0.5, 1.0])},
    'Dense_1': {'kernel': jnp.array([[bad], [3.0]])},
  }
  for scales in (optax_path.path_scales(params), jax.jit(optax_path.path_scales)(params)):
    assert all(bool(jnp.all(jnp.isnan(s))) for s in jax.tree.leaves(scales))
  assert np.isnan(float(optax_path.path_norm(params)))


@pytest.mark.parametrize('p', [0.5, 0.75, 0.99])
def test_path_norm_gradient_is_finite_at_zero_weights_for_p_below_1(p):
  """d|w|^p/dw is unbounded at 0 for p < 1; the convention is 0 there (as ReLU's at 0).
  Elsewhere it is the derivative of the explicit path sum."""
  zero_head = {'Dense_0': {'kernel': jnp.ones((2, 3))}, 'Dense_1': {'kernel': jnp.zeros((3, 2))}}
  grads = jax.grad(lambda q: optax_path.path_norm(q, p) ** p)(zero_head)
  assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
  one_zero = {'Dense_0': {'kernel': jnp.array([[1.0, 0.0]])}, 'Dense_1': {'kernel': jnp.array([[2.0], [3.0]])}}
  grads = jax.grad(lambda q: optax_path.path_norm(q, p) ** p)(one_zero)
  # phi^p = |a|^p |c|^p + |b|^p |d|^p with a = 1, b = 0, c = 2, d = 3.
  np.testing.assert_allclose(grads['Dense_0']['kernel'], [[p * 2.0**p, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(grads['Dense_1']['kernel'], [[p * 2.0 ** (p - 1)], [0.0]], rtol=1e-6)


def test_rescale_with_one_factor_per_unit_needs_as_many_units():
  params = [{'kernel': jnp.ones((2, 2))}, {'kernel': jnp.ones((2, 1))}]
  with pytest.raises(ValueError, match=re.escape('c has shape (2,) and unit ()')):
    optax_path.rescale(params, 0, 0, jnp.array([2.0, 3.0]))
  out = optax_path.rescale(params, 0, jnp.array([0, 1]), jnp.array([2.0, 3.0]))
  np.testing.assert_allclose(out[1]['kernel'], [[0.5], [1 / 3]], rtol=1e-6)
