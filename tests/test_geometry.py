"""path_geometry: any Optax optimizer, whitened by the path scales, rescaling invariant."""

import jax
import numpy as np
import optax
import pytest
from test_invariance import loss_fn, make_problem, output_gap, rescale_every_unit, train

import optax_path

PROBLEM = make_problem(seed=1)


@pytest.fixture(scope='module')
def rescaled():
  params = PROBLEM[0]
  return {
    'factors_1e3': jax.jit(lambda q: rescale_every_unit(q, jax.random.key(2), 3.0))(params),
    'unbalance': optax_path.unbalance(jax.random.key(4), params, num_units=64),
  }


@pytest.mark.slow
def test_path_geometry_of_sgd_is_path_sgd():
  """Equal for plain SGD. (With momentum both are invariant but differ: path_geometry
  averages whitened gradients and maps the average back with the current scales.)"""
  params, inputs, labels, held_out = PROBLEM
  run = jax.jit(train, static_argnums=0)
  a = run(optax_path.path_geometry(optax.sgd(0.05)), params, inputs, labels)
  b = run(optax_path.path_sgd(0.05), params, inputs, labels)
  assert output_gap(params, b, held_out) > 0.1
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert output_gap(a, b, held_out) < 1e-6


INVARIANT = {
  'adam': lambda: optax_path.path_adam(3e-3),
  'adagrad': lambda: optax_path.path_geometry(optax.adagrad(0.05)),
  'rmsprop': lambda: optax_path.path_geometry(optax.rmsprop(1e-3)),
  'sgd_momentum': lambda: optax_path.path_geometry(optax.sgd(0.02, momentum=0.9)),
}


@pytest.mark.slow
@pytest.mark.parametrize('start', ['factors_1e3', 'unbalance'])
@pytest.mark.parametrize('name', sorted(INVARIANT))
def test_path_geometry_keeps_rescaled_nets_equivalent(rescaled, name, start):
  params, inputs, labels, held_out = PROBLEM
  other = rescaled[start]
  tx = INVARIANT[name]()
  run = jax.jit(train, static_argnums=0)
  trained, trained_other = run(tx, params, inputs, labels), run(tx, other, inputs, labels)
  assert output_gap(params, trained, held_out) > 0.1  # it trained
  assert output_gap(trained, trained_other, held_out) < 1e-3


NOT_INVARIANT = {
  'optax.adam': lambda: optax.adam(3e-3),
  'chained path_adagrad': lambda: optax_path.path_adagrad(0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(NOT_INVARIANT))
def test_plain_adam_and_chained_path_adagrad_are_not_invariant(rescaled, name):
  params, inputs, labels, held_out = PROBLEM
  tx = NOT_INVARIANT[name]()
  run = jax.jit(train, static_argnums=0)
  trained = run(tx, params, inputs, labels)
  trained_other = run(tx, rescaled['factors_1e3'], inputs, labels)
  assert output_gap(trained, trained_other, held_out) > 1e-2


def test_inner_may_not_read_params():
  params = PROBLEM[0]
  tx = optax_path.path_geometry(optax.adamw(1e-3, weight_decay=1e-2))
  with pytest.raises(ValueError):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match='requires the current value of parameters'):
    optax_path.path_adam(1e-3).update(params, tx.init(params))


@pytest.mark.slow
def test_one_step_of_path_geometry_sgd_is_path_sgd_to_1e6():
  params, inputs, labels, _ = PROBLEM
  grads = jax.grad(loss_fn)(params, inputs[0], labels[0])
  steps = []
  for tx in (optax_path.path_geometry(optax.sgd(0.05)), optax_path.path_sgd(0.05)):
    steps.append(tx.update(grads, tx.init(params), params)[0])
  for x, y in zip(jax.tree.leaves(steps[0]), jax.tree.leaves(steps[1]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-30)
