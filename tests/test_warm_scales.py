"""The warm-started passes of path_normalize, and refresh_every.

The fast path must be taken where it should be (not only give right results through
its fallback), so these tests look at the internal check as well as at the results.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_mlp
from jax.experimental import checkify

import optax_path
from optax_path._src import scales, warm_scales

WIDTHS = [10, 32, 32, 5]


def exact_log_gammas(params, p=2.0):
  return scales.log_gammas(*scales.layer_arrays(params, None), p)


def known_state(params, p=2.0):
  """A path_normalize state holding the exact scales of ``params`` (as after an update)."""
  log_in, log_out = exact_log_gammas(params, p)
  return optax_path.PathNormalizeState(jnp.ones([], jnp.int32), tuple(log_in), tuple(log_out))


def warm(params, state, p=2.0):
  kernels, biases = scales.layer_arrays(params, None)
  return warm_scales.warm_passes(kernels, biases, p, state.log_gamma_in, state.log_gamma_out)


def float64_log_gammas(params):
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda w: jnp.asarray(np.asarray(w), jnp.float64), params)
    log_in, log_out = scales.exact_log_gammas(*scales.layer_arrays(params64, None), p=2.0)
    return [np.asarray(v) for v in log_in + log_out]


def assert_logs_close(actual, expected, ulps):
  """Logs equal to ``ulps`` float32 ulps of the largest one: the log domain's precision."""
  largest = max(1.0, *(float(np.max(np.abs(e))) for e in expected))
  atol = ulps * float(jnp.finfo(jnp.float32).eps) * largest
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=0, atol=atol)


def float32_net(kind):
  params = jax.tree.map(jnp.asarray, random_mlp(np.random.default_rng(0), WIDTHS, dtype=np.float32))
  if kind == 'unbalance':
    return optax_path.unbalance(jax.random.key(1), params, num_units=64, scheme='stress')
  if kind == 'factors_1e25':
    for layer, unit, decades in [(0, 3, 25), (0, 7, 20), (1, 0, 25), (1, 11, 15)]:
      params = optax_path.rescale(params, layer, unit, 10.0**decades)
  return params


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['balanced', 'unbalance', 'factors_1e25'])
def test_warm_passes_are_taken_and_exact_along_float32_training(kind):
  params = float32_net(kind)
  spread = max(float(jnp.max(v) - jnp.min(v)) for v in exact_log_gammas(params)[0])
  assert kind == 'balanced' or spread > 40  # gamma_in spans more than e^40 in one layer
  tx = optax_path.path_sgd(0.05, momentum=0.9)
  rng = np.random.default_rng(1)
  inputs = jnp.asarray(rng.normal(size=(8, 16, WIDTHS[0])), jnp.float32)

  def loss(q, x):
    h = x
    for l in range(len(WIDTHS) - 1):
      h = h @ q[f'Dense_{l}']['kernel'] + q[f'Dense_{l}']['bias']
      h = jax.nn.relu(h) if l < len(WIDTHS) - 2 else h
    return jnp.mean(jax.nn.logsumexp(h, axis=-1) - h[:, 0])

  @jax.jit
  def step(params, state, x):
    checked = warm(params, state[0])
    updates, state = tx.update(jax.grad(loss)(params, x), state, params)
    return optax.apply_updates(params, updates), state, checked

  state = tx.init(params)  # no scales known yet: the first update takes the exact passes
  for t, x in enumerate(inputs):
    before = params
    params, state, (log_in, log_out, accurate) = step(params, state, x)
    if t > 0:  # the first update has no warm start (refresh_count 0): the exact passes
      assert bool(accurate)
      assert_logs_close(log_in + log_out, float64_log_gammas(before), ulps=2)
  assert all(bool(jnp.all(jnp.isfinite(w))) for w in jax.tree.leaves(params))


@pytest.mark.slow
@pytest.mark.parametrize('hint', ['unrelated', 'unknown', 'nan', 'zero_gamma'])
def test_a_warm_start_it_cannot_vouch_for_gives_the_exact_passes(hint):
  params = float32_net('unbalance')
  if hint == 'unrelated':
    state = known_state(jax.tree.map(lambda w: w * 1e15, float32_net('balanced')))
  elif hint == 'unknown':  # as init leaves it
    state = optax_path.path_normalize().init(params)
  else:
    state = known_state(params)
    value = jnp.nan if hint == 'nan' else -jnp.inf
    state = state._replace(
      log_gamma_out=(state.log_gamma_out[0].at[3].set(value),) + tuple(state.log_gamma_out[1:])
    )
  known = hint != 'unknown'  # init's state: the warm passes do not run at all
  assert not known or not bool(warm(params, state)[2])
  kernels, biases = scales.layer_arrays(params, None)
  got = warm_scales.warm_log_gammas(
    kernels, biases, 2.0, state.log_gamma_in, state.log_gamma_out, state.refresh_count > 0
  )
  assert known == bool(state.refresh_count > 0)
  assert_logs_close(got[0] + got[1], float64_log_gammas(params), ulps=2)


@pytest.mark.slow
@pytest.mark.parametrize('revived', [False, True])
def test_dead_units_keep_the_warm_passes_and_get_zero_updates(x64, revived):
  """A unit with gamma_in = 0 (all incoming weights and bias 0) and one with
  gamma_out = 0 (all outgoing weights 0): their warm starts of -inf are taken as such
  (before, every step fell back to the exact passes); a revived one is not."""
  params = random_mlp(np.random.default_rng(2), [3, 4, 4, 2])
  params['Dense_0']['kernel'][:, 1] = 0.0  # unit 1 of layer 0: gamma_in = 0
  params['Dense_0']['bias'][1] = 0.0
  params['Dense_2']['kernel'][2, :] = 0.0  # unit 2 of layer 1: gamma_out = 0
  params = jax.tree.map(jnp.asarray, params)
  tx = optax_path.path_normalize()
  state = known_state(params)
  log_in, log_out, accurate = warm(params, state)
  assert bool(accurate)
  assert float(log_in[1][1]) == -np.inf and float(log_out[2][2]) == -np.inf
  exact_in, exact_out = exact_log_gammas(params)
  for got, expected in zip(log_in + log_out, exact_in + exact_out):
    np.testing.assert_allclose(got, expected, rtol=1e-13)  # -inf where exact says -inf
  if revived:  # the state still says dead, the weights no longer do
    params['Dense_0']['kernel'] = params['Dense_0']['kernel'].at[0, 1].set(0.5)
    params['Dense_2']['kernel'] = params['Dense_2']['kernel'].at[2, 0].set(0.5)
    assert not bool(warm(params, state)[2])
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  expected = jax.tree.map(lambda s: jnp.where(s > 0, 1 / s, 0.0), optax_path.path_scales(params))
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(u, e, rtol=1e-12)


@pytest.mark.parametrize('refresh_every', [1, 2])
def test_a_dead_unit_leaves_the_state_finite(refresh_every):
  """A dead unit's log gamma of -inf was kept in the state: a jitted step under
  jax_debug_infs raised, and optax.lookahead(reset_state=True), which mixes the state
  with the initial one, made it NaN. Now the state is finite, and the steps are those
  without the reset (the scales never depend on the warm start)."""
  params = jax.tree.map(
    jnp.asarray, random_mlp(np.random.default_rng(2), [3, 4, 4, 2], dtype=np.float32)
  )
  params['Dense_0'] = {k: v.at[..., 1].set(0.0) for k, v in params['Dense_0'].items()}
  params['Dense_2']['kernel'] = params['Dense_2']['kernel'].at[2, :].set(0.0)  # gamma_out 0
  grads = jax.tree.map(jnp.ones_like, params)
  expected = jax.tree.map(lambda s: jnp.where(s > 0, 1 / s, 0.0), optax_path.path_scales(params))
  tx = optax_path.path_normalize(refresh_every=refresh_every)
  update, state = jax.jit(tx.update), tx.init(params)
  with jax.debug_infs(True):
    for _ in range(3):
      updates, state = update(grads, state, params)
      assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
      chex.assert_trees_all_close(updates, expected, rtol=1e-5)
  trajectories = []
  for reset in (False, True):
    tx = optax.lookahead(optax_path.path_sgd(0.1, refresh_every=refresh_every), 2, 0.5, reset)
    update, q = jax.jit(tx.update), optax.LookaheadParams.init_synced(params)
    state = tx.init(q)
    for _ in range(5):
      updates, state = update(jax.tree.map(lambda g: 0.01 * g, grads), state, q)
      q = optax.apply_updates(q, updates)
      assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
    trajectories.append(q)
  chex.assert_trees_all_close(*trajectories, rtol=1e-5)


def test_refresh_every_divides_by_the_scales_of_the_last_refresh(x64):
  rng = np.random.default_rng(3)
  trajectory = [jax.tree.map(jnp.asarray, random_mlp(rng, [4, 6, 3])) for _ in range(7)]
  grads = jax.tree.map(jnp.ones_like, trajectory[0])
  tx = optax_path.path_normalize(2.0, refresh_every=3)
  update = jax.jit(tx.update)
  state = tx.init(trajectory[0])
  for t, params in enumerate(trajectory):
    updates, state = update(grads, state, params)
    refreshed_at = trajectory[3 * (t // 3)]
    expected = jax.tree.map(lambda s: 1 / s, optax_path.path_scales(refreshed_at))
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(u, e, rtol=1e-12)
  assert int(state.refresh_count) == len(trajectory)
  assert update._cache_size() == 1


def test_injected_hyperparameters_give_the_same_updates():
  params = jax.tree.map(jnp.asarray, random_mlp(np.random.default_rng(4), WIDTHS, dtype=np.float32))
  grads = jax.tree.map(jnp.ones_like, params)
  plain = optax_path.path_normalize(2.0, refresh_every=2)
  injected = optax.inject_hyperparams(optax_path.path_normalize)(p=2.0, refresh_every=2)
  update = jax.jit(injected.update)
  plain_state, state = plain.init(params), injected.init(params)
  for scale in (1.0, 1.5, 2.0):
    moved = jax.tree.map(lambda w, s=scale: w * s, params)
    expected, plain_state = plain.update(grads, plain_state, moved)
    updates, state = update(grads, state, moved)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(u, e, rtol=1e-6)
  assert update._cache_size() == 1


@pytest.mark.parametrize('refresh_every', [0, -2, 1.5, 'often', None])
def test_refresh_every_must_be_a_positive_int(refresh_every):
  with pytest.raises(ValueError, match='refresh_every must be an int >= 1'):
    optax_path.path_normalize(refresh_every=refresh_every)


def test_refresh_every_is_for_the_mlp_mode():
  with pytest.raises(ValueError, match='general mode'):
    optax_path.path_normalize(refresh_every=2, apply_fn=lambda q, x: x, input_shape=(3,))


def test_a_state_from_other_layers_is_refused():
  rng = np.random.default_rng(5)
  params = jax.tree.map(jnp.asarray, random_mlp(rng, [4, 6, 3]))
  other = jax.tree.map(jnp.asarray, random_mlp(rng, [4, 7, 3]))
  tx = optax_path.path_normalize()
  with pytest.raises(ValueError, match=r'widths \[4, 7, 3\].*widths \[4, 6, 3\]'):
    tx.update(params, tx.init(other), params)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_init_computes_no_scale(dtype):
  """init only allocates: the first update takes the exact passes in its own compiled
  step, so that init compiles nothing (before, it compiled the exact passes, 1.8 s of the
  6.6 s to the first deep-net step)."""
  params = jax.tree.map(
    lambda w: jnp.asarray(w, dtype), random_mlp(np.random.default_rng(6), [4, 6, 3])
  )
  tx = optax_path.path_normalize()
  jaxpr = jax.make_jaxpr(tx.init)(params)
  assert {e.primitive.name for e in jaxpr.eqns} <= {'broadcast_in_dim'}
  state = tx.init(params)
  assert [v.shape for v in state.log_gamma_in] == [(4,), (6,), (3,)]
  assert int(state.refresh_count) == 0  # no scale known
  assert all(v.dtype == jnp.float32 and bool(jnp.all(v == 0)) for v in state.log_gamma_out)
  updates, state = tx.update(params, state, params)
  expected = jax.tree.map(lambda w, s: w / s, params, optax_path.path_scales(params))
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.float32(u), np.float32(e), rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6
    )
  expected = float64_log_gammas(jax.tree.map(lambda w: w.astype(jnp.float32), params))
  assert_logs_close(list(state.log_gamma_in) + list(state.log_gamma_out), expected, ulps=4)


def test_the_first_update_computes_no_inf_or_nan():
  """Found by trying it: an init state of +inf hints (an earlier version) gave inf - inf
  inside the skipped warm passes, so checkify flagged every first update, jax_debug_infs
  failed at init, and the gradient through the first update was NaN."""
  params = jax.tree.map(
    jnp.asarray, random_mlp(np.random.default_rng(7), [2, 3, 1], dtype=np.float32)
  )
  grads = jax.tree.map(jnp.ones_like, params)
  for tx in (optax_path.path_sgd(0.1), optax_path.path_adam(1e-3)):
    state = tx.init(params)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(state))
    checked = jax.jit(checkify.checkify(tx.update, errors=checkify.float_checks))
    error, (_, later) = checked(grads, state, params)
    assert error.get() is None
    assert checked(grads, later, params)[0].get() is None

  tx = optax_path.path_sgd(0.1)

  def loss_after_one_step(q, state):
    updates, _ = tx.update(grads, state, q)
    return sum(jnp.sum(w**2) for w in jax.tree.leaves(optax.apply_updates(q, updates)))

  first = jax.jit(jax.grad(loss_after_one_step))(params, tx.init(params))
  state = tx.init(params)
  known = jax.jit(jax.grad(loss_after_one_step))(params, (known_state(params), *state[1:]))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(known)):
    np.testing.assert_allclose(a, b, rtol=1e-5)  # finite, and the same from either state
