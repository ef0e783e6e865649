"""Theorem 4.1 and Lemma 3.1: Path-SGD is invariant to node rescalings; SGD is not."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_path

HIDDEN = (32, 32)
STEPS = 50


class MLP(nn.Module):
  hidden: tuple = HIDDEN
  outputs: int = 5

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, bias_init=nn.initializers.normal(0.5))(x))
    return nn.Dense(self.outputs, bias_init=nn.initializers.normal(0.5))(x)


MODEL = MLP()


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.normal(size=(STEPS, 16, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=(STEPS, 16)))
  held_out = jnp.asarray(rng.normal(size=(64, 10)), jnp.float32)
  params = MODEL.init(jax.random.key(seed), held_out)['params']
  return params, inputs, labels, held_out


def loss_fn(params, x, y):
  logits = MODEL.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(tx, params, inputs, labels):
  """STEPS optimizer steps, one batch each, in a single compiled scan."""

  def step(carry, batch):
    params, state = carry
    grads = jax.grad(loss_fn)(params, *batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (inputs, labels))
  return params


def output_gap(params_a, params_b, held_out):
  """Largest output difference relative to the largest output, on held-out inputs."""
  a = MODEL.apply({'params': params_a}, held_out)
  b = MODEL.apply({'params': params_b}, held_out)
  gap = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
  return gap if np.isfinite(gap) else np.inf


def rescale_every_unit(params, key, max_decades):
  """Every hidden unit rescaled by 10^u, u uniform in [-max_decades, max_decades]."""
  for layer, width in enumerate(HIDDEN):
    key, subkey = jax.random.split(key)
    factors = 10.0 ** jax.random.uniform(subkey, (width,), minval=-max_decades, maxval=max_decades)
    for unit in range(width):
      params = optax_path.rescale(params, layer, unit, factors[unit])
  return params


def rescale_some_units(params):
  """A few units scaled up by up to 1e25, as in the paper's unbalanced nets.

  (Factors on consecutive layers multiply in the kernel between them, so a mix of huge
  and tiny ones would leave the float32 range in the weights themselves.)
  """
  for layer, unit, decades in [(0, 3, 25), (0, 7, 20), (1, 0, 25), (1, 11, 15), (1, 20, 22)]:
    params = optax_path.rescale(params, layer, unit, 10.0**decades)
  return params


@pytest.fixture(scope='module')
def problem():
  return make_problem()


@pytest.fixture(scope='module')
def rescaled_1e3(problem):
  return jax.jit(lambda q: rescale_every_unit(q, jax.random.key(1), 3.0))(problem[0])


@pytest.mark.slow
@pytest.mark.parametrize('momentum', [None, 0.9])
def test_path_sgd_keeps_rescaled_nets_equivalent(problem, rescaled_1e3, momentum):
  params, inputs, labels, held_out = problem
  assert output_gap(params, rescaled_1e3, held_out) < 1e-5  # same function to start with
  tx = optax_path.path_sgd(0.05, momentum=momentum)
  trained = jax.jit(train, static_argnums=0)(tx, params, inputs, labels)
  trained_rescaled = jax.jit(train, static_argnums=0)(tx, rescaled_1e3, inputs, labels)
  assert output_gap(params, trained, held_out) > 0.1  # training moved the function
  assert output_gap(trained, trained_rescaled, held_out) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('start', ['rescaled_1e3', 'unbalance'])
def test_stale_scales_keep_path_sgd_invariant(problem, rescaled_1e3, start):
  """refresh_every=5: each update divides by the scales of an equivalent earlier net."""
  params, inputs, labels, held_out = problem
  if start == 'rescaled_1e3':
    other = rescaled_1e3
  else:
    other = optax_path.unbalance(jax.random.key(3), params, num_units=64)
  tx = optax_path.path_sgd(0.05, momentum=0.9, refresh_every=5)
  trained = jax.jit(train, static_argnums=0)(tx, params, inputs, labels)
  trained_other = jax.jit(train, static_argnums=0)(tx, other, inputs, labels)
  assert output_gap(params, trained, held_out) > 0.1
  assert output_gap(trained, trained_other, held_out) < 1e-3
  exact = jax.jit(train, static_argnums=0)(
    optax_path.path_sgd(0.05, momentum=0.9), params, inputs, labels
  )
  assert output_gap(trained, exact, held_out) > 1e-4  # stale scales are another method


def test_sgd_does_not_keep_rescaled_nets_equivalent(problem, rescaled_1e3):
  params, inputs, labels, held_out = problem
  tx = optax.sgd(1e-4)  # small enough that the rescaled net does not blow up
  trained = jax.jit(train, static_argnums=0)(tx, params, inputs, labels)
  trained_rescaled = jax.jit(train, static_argnums=0)(tx, rescaled_1e3, inputs, labels)
  assert output_gap(trained, trained_rescaled, held_out) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize('make_unbalanced', ['factors_1e25', 'unbalance'])
def test_float32_path_sgd_is_invariant_at_the_papers_scales(problem, make_unbalanced):
  params, inputs, labels, held_out = problem
  if make_unbalanced == 'factors_1e25':
    unbalanced = rescale_some_units(params)
  else:
    unbalanced = optax_path.unbalance(jax.random.key(3), params, num_units=64, scheme='stress')
  leaves = jax.tree.leaves(unbalanced)
  assert max(float(jnp.max(jnp.abs(w))) for w in leaves) > 1e5  # badly scaled indeed
  assert output_gap(params, unbalanced, held_out) < 1e-5

  path_sgd = jax.jit(train, static_argnums=0)
  tx = optax_path.path_sgd(0.05, momentum=0.9)
  trained, trained_unbalanced = (
    path_sgd(tx, params, inputs, labels),
    path_sgd(tx, unbalanced, inputs, labels),
  )
  assert all(bool(jnp.all(jnp.isfinite(w))) for w in jax.tree.leaves(trained_unbalanced))
  assert output_gap(trained, trained_unbalanced, held_out) < 1e-3

  sgd = optax.sgd(0.05)
  trained_sgd = jax.jit(train, static_argnums=0)(sgd, params, inputs, labels)
  trained_sgd_unbalanced = jax.jit(train, static_argnums=0)(sgd, unbalanced, inputs, labels)
  assert output_gap(trained_sgd, trained_sgd_unbalanced, held_out) > 1.0  # SGD blows up


@pytest.mark.slow
def test_path_norm_is_invariant_and_rescalings_keep_the_function(problem, rescaled_1e3):
  params, _, _, held_out = problem
  unbalanced = optax_path.unbalance(jax.random.key(5), params, num_units=40)
  rebalanced = optax_path.rebalance(unbalanced)
  for other in (rescaled_1e3, unbalanced, rebalanced):
    assert output_gap(params, other, held_out) < 1e-4
    for p in (1.0, 2.0, 3.0):
      np.testing.assert_allclose(
        optax_path.log_path_norm(other, p), optax_path.log_path_norm(params, p), rtol=1e-5
      )


def test_rebalance_gives_unit_incoming_norms(problem):
  params = optax_path.unbalance(jax.random.key(6), problem[0], num_units=40)
  for p in (1.0, 2.0):
    rebalanced = optax_path.rebalance(params, p)
    for name in ('Dense_0', 'Dense_1'):
      incoming = jnp.concatenate([rebalanced[name]['kernel'], rebalanced[name]['bias'][None]])
      norms = jnp.sum(jnp.abs(incoming) ** p, axis=0) ** (1 / p)
      np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_rebalance_leaves_zero_units_alone():
  params = {
    'Dense_0': {'kernel': jnp.array([[0.0, 2.0], [0.0, 0.0]]), 'bias': jnp.zeros(2)},
    'Dense_1': {'kernel': jnp.array([[5.0], [3.0]])},
  }
  rebalanced = optax_path.rebalance(params)
  np.testing.assert_allclose(rebalanced['Dense_0']['kernel'], [[0.0, 1.0], [0.0, 0.0]])
  np.testing.assert_allclose(rebalanced['Dense_1']['kernel'], [[5.0], [6.0]])


@pytest.mark.slow
def test_lemma_3_1_path_norm_is_the_min_over_rescalings_of_the_max_norm_product(x64):
  """phi_p(w) = min over rescalings of prod_layers max_unit ||incoming||_p (no biases).

  Lemma 3.1 with d layers: mu_{p,inf}^d is the product over layers of the largest
  incoming p-norm. Rebalancing to unit norms layer by layer and then measuring the last
  layer attains the minimum; random rescalings never go below it.
  """
  rng = np.random.default_rng(0)
  widths = [4, 5, 3, 1]
  params = [{'kernel': jnp.asarray(rng.normal(size=(a, b)))} for a, b in itertools.pairwise(widths)]
  p = 2.0

  def max_norm_product(q):
    return np.prod(
      [float(jnp.max(jnp.sum(jnp.abs(l['kernel']) ** p, axis=0) ** (1 / p))) for l in q]
    )

  phi = float(optax_path.path_norm(params, p))
  np.testing.assert_allclose(max_norm_product(optax_path.rebalance(params, p)), phi, rtol=1e-12)
  for seed in range(20):
    q = params
    key = jax.random.key(seed)
    for layer, width in enumerate(widths[1:-1]):
      key, subkey = jax.random.split(key)
      factors = np.exp(np.asarray(jax.random.normal(subkey, (width,))))
      for unit in range(width):
        q = optax_path.rescale(q, layer, unit, float(factors[unit]))
    np.testing.assert_allclose(float(optax_path.path_norm(q, p)), phi, rtol=1e-12)
    assert max_norm_product(q) >= phi * (1 - 1e-12)
