"""Finding the dense layers of Linen and NNX params, and every error on bad input."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normalize_once
from flax import nnx

import optax_path


def chain_params(widths, names=None, bias=True):
  names = names or [f'Dense_{l}' for l in range(len(widths) - 1)]
  rng = np.random.default_rng(0)
  params = {}
  for name, a, b in zip(names, widths, widths[1:]):
    params[name] = {'kernel': jnp.asarray(rng.normal(size=(a, b)), jnp.float32)}
    if bias:
      params[name]['bias'] = jnp.asarray(rng.normal(size=b), jnp.float32)
  return params


def normalize(params, grads=None, **kwargs):
  grads = params if grads is None else grads
  return normalize_once(optax_path.path_normalize(2.0, **kwargs), grads, params)


@pytest.mark.slow
def test_twelve_linen_layers_are_ordered_numerically():
  """Dense_10 sorts before Dense_2 as a string; the chain only fits in numeric order."""
  widths = list(range(2, 16))  # 13 layers, every width distinct
  model = nn.Sequential([m for w in widths[1:] for m in (nn.Dense(w), nn.relu)][:-1])
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))['params']
  assert 'layers_10' in params
  scales = optax_path.path_scales(params)
  explicit = optax_path.path_scales(params, layers=[f'layers_{2 * l}' for l in range(13)])
  for a, b in zip(jax.tree.leaves(scales), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)


def test_own_names_and_nested_variables_dict():
  params = chain_params([3, 4, 2], names=['hidden', 'output'])
  variables = {'params': params}
  a = optax_path.path_scales(params)
  b = optax_path.path_scales(variables)['params']
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 5, rngs=rngs), nnx.Linear(5, 4, rngs=rngs)])
    self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


def test_nnx_state_with_list_and_attribute_ordered_by_its_only_chain():
  """Names do not decide (layers/0, layers/1, head); the shapes chain one way only."""
  model = NNXNet(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  order = ['layers/0', 'layers/1', 'head']
  scales = optax_path.path_scales(state, layers=order)
  found = optax_path.path_scales(state)
  for a, b in zip(jax.tree.leaves(scales), jax.tree.leaves(found)):
    np.testing.assert_array_equal(a, b)
  linen_like = {
    f'Dense_{i}': {k: v for k, v in layer.items()}
    for i, layer in enumerate(
      [
        nnx.to_pure_dict(state)['layers'][0],
        nnx.to_pure_dict(state)['layers'][1],
        nnx.to_pure_dict(state)['head'],
      ]
    )
  }
  reference = optax_path.path_scales(linen_like)
  np.testing.assert_allclose(scales['head']['kernel'], reference['Dense_2']['kernel'])
  np.testing.assert_allclose(scales['layers'][0]['bias'], reference['Dense_0']['bias'])


def test_lists_of_layers():
  params = [{'kernel': jnp.ones((2, 3))}, {'kernel': jnp.ones((3, 1)), 'bias': jnp.ones(1)}]
  scales = optax_path.path_scales(params)
  np.testing.assert_allclose(scales[0]['kernel'], np.full((2, 3), 1.0))
  np.testing.assert_allclose(scales[1]['kernel'], np.full((3, 1), 2.0))


# --- errors ---------------------------------------------------------------------------


def test_update_without_params():
  params = chain_params([2, 2])
  with pytest.raises(ValueError, match='requires the current value of parameters'):
    optax_path.path_normalize().update(params, optax.EmptyState())


@pytest.mark.parametrize('p', [0.0, -1.0, float('nan'), float('inf'), 'two', None])
def test_bad_p(p):
  with pytest.raises(ValueError, match='p must be a'):
    optax_path.path_normalize(p)
  with pytest.raises(ValueError, match='p must be a'):
    optax_path.path_norm(chain_params([2, 1]), p)


def test_leaves_that_are_not_dense_layers_are_named():
  params = chain_params([3, 4, 2])
  params['LayerNorm_0'] = {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
  with pytest.raises(ValueError) as error:
    normalize(params)
  message = str(error.value)
  assert 'LayerNorm_0/scale (4,)' in message and 'LayerNorm_0/bias (4,)' in message
  assert 'optax.partition' in message and 'optax.masked' in message


def test_conv_kernel_is_rejected_with_its_shape():
  params = chain_params([3, 2])
  params['Conv_0'] = {'kernel': jnp.ones((3, 3, 1, 8))}
  with pytest.raises(ValueError, match=re.escape('Conv_0/kernel (3, 3, 1, 8)') + '.*2-D'):
    normalize(params)


@pytest.mark.slow
def test_cnn_params_in_the_mlp_mode_name_the_general_mode():
  """A real Flax CNN's params, given without apply_fn=: the error names the fix."""

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(3)(h.reshape(h.shape[0], -1))

  params = CNN().init(jax.random.key(0), jnp.ones((1, 6, 6, 1)))['params']
  with pytest.raises(ValueError) as error:
    normalize(params)
  message = str(error.value)
  assert 'Conv_0/kernel (3, 3, 1, 4)' in message and 'general mode' in message
  assert 'apply_fn=lambda q, x:' in message and 'input_shape=' in message
  # and the fix it names works
  tx = optax_path.path_sgd(
    0.1, apply_fn=lambda q, x: CNN().apply({'params': q}, x), input_shape=(6, 6, 1)
  )
  updates, _ = tx.update(params, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['LayerNorm', 'BatchNorm', 'RMSNorm'])
def test_normalisation_leaves_say_the_network_is_outside_path_sgd(norm):
  """LayerNorm/BatchNorm leaves: the error says why Path-SGD does not cover them and
  what masking them means."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4)(x)
      h = (
        nn.BatchNorm(use_running_average=True)(h) if norm == 'BatchNorm' else getattr(nn, norm)()(h)
      )
      return nn.Dense(2)(nn.relu(h))

  params = Net().init(jax.random.key(0), jnp.ones((1, 3)))['params']
  with pytest.raises(ValueError) as error:
    normalize(params)
  message = str(error.value)
  assert f'{norm}_0/scale (4,)' in message
  assert 'normalisation layer' in message
  assert "outside Path-SGD's rescaling argument" in message
  assert 'rescaling one unit' in message and 'changes the function' in message
  assert 'trained by the other optimizer' in message
  assert 'invariance no longer holds for the whole network' in message
  assert 'optax.masked' in message and 'optax.partition' in message
  # masking them, as the message describes, runs
  mask = {name: jax.tree.map(lambda _: 'Norm' not in name, layer) for name, layer in params.items()}
  tx = optax.masked(optax_path.path_normalize(), mask)
  updates, _ = tx.update(params, tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates['Dense_0']['kernel']))


def test_other_stray_leaves_keep_the_routing_advice():
  params = chain_params([3, 4, 2])
  params['Embed_0'] = {'embedding': jnp.ones((5, 3))}
  with pytest.raises(ValueError) as error:
    normalize(params)
  message = str(error.value)
  assert 'Embed_0/embedding (5, 3)' in message and 'optax.partition' in message
  assert 'normalisation' not in message


def test_chain_that_does_not_fit_names_every_layer():
  params = chain_params([3, 4, 2])
  params['Dense_1']['kernel'] = jnp.ones((5, 2))
  params['Dense_1']['bias'] = jnp.ones(2)
  with pytest.raises(ValueError) as error:
    normalize(params)
  message = str(error.value)
  assert 'Dense_0 (3, 4)' in message and 'Dense_1 (5, 2)' in message and 'layers=' in message


def test_explicit_layers_errors():
  params = chain_params([3, 4, 2])
  with pytest.raises(
    ValueError, match='names Dense_7, which is not a dense layer.*Dense_0, Dense_1'
  ):
    optax_path.path_scales(params, layers=['Dense_0', 'Dense_7'])
  with pytest.raises(
    ValueError, match='not the kernel or bias of a dense layer in the chain.*Dense_1/kernel'
  ):
    optax_path.path_scales(params, layers=['Dense_0'])
  with pytest.raises(ValueError, match='Check the order given in layers='):
    optax_path.path_scales(params, layers=['Dense_1', 'Dense_0'])
  with pytest.raises(ValueError, match='twice'):
    optax_path.path_scales(params, layers=['Dense_0', 'Dense_0', 'Dense_1'])


def test_bias_of_wrong_shape():
  params = chain_params([3, 4])
  params['Dense_0']['bias'] = jnp.ones(3)
  with pytest.raises(
    ValueError, match=re.escape('Dense_0/bias (3,)') + '.*must have shape \\(4,\\)'
  ):
    optax_path.path_scales(params)


def test_no_dense_layer():
  with pytest.raises(ValueError, match=re.escape('no dense layer') + '.*w \\(3,\\)'):
    optax_path.path_scales({'w': jnp.ones(3)})


def test_a_flat_vector_and_a_stacked_ensemble_get_their_fix():
  """optax.flatten(path_sgd) and ensemble params (jax.vmap(model.init)) given without
  vmap: the messages did not say what to do. The fixes they give work."""
  params = chain_params([3, 4, 2])
  with pytest.raises(ValueError, match=r'<root> \(26,\).*put path_normalize outside'):
    optax.flatten(optax_path.path_sgd(0.1)).init(params)
  outside = optax.chain(optax_path.path_normalize(), optax.flatten(optax.sgd(0.1)))
  updates, _ = outside.update(params, outside.init(params), params)
  want = jax.tree.map(lambda g, s: -0.1 * g / s, params, optax_path.path_scales(params))
  chex.assert_trees_all_close(updates, want, rtol=1e-5)

  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
  tx = optax_path.path_sgd(0.1)
  with pytest.raises(ValueError, match=r'\(2, 3, 4\).*jax.vmap\(tx.init\) and jax.vmap'):
    tx.init(stacked)
  updates, _ = jax.vmap(tx.update)(stacked, jax.vmap(tx.init)(stacked), stacked)
  second = jax.tree.map(lambda a: a[1], stacked)
  want = jax.tree.map(lambda g, s: -0.1 * g / s, second, optax_path.path_scales(second))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], updates), want, rtol=1e-5)


def test_updates_with_another_structure():
  params = chain_params([3, 2])
  with pytest.raises(ValueError, match='same tree structure'):
    normalize(params, grads={'Dense_0': {'kernel': jnp.ones((3, 2))}})


def test_partly_masked_layer():
  params = chain_params([3, 4, 2])
  mask = jax.tree.map(lambda _: True, params)
  mask['Dense_1']['bias'] = False
  tx = optax.masked(optax_path.path_normalize(), mask)
  with pytest.raises(ValueError, match='Dense_1 is partly masked.*Dense_1/bias'):
    tx.update(params, tx.init(params), params)


def test_rescaling_errors():
  params = chain_params([3, 4, 2])
  with pytest.raises(ValueError, match='layer=1 is not a hidden layer.*0..0'):
    optax_path.rescale(params, 1, 0, 2.0)
  with pytest.raises(ValueError, match='unit=4 is out of range for layer 0, which has 4 units'):
    optax_path.rescale(params, 0, 4, 2.0)
  with pytest.raises(ValueError, match='c must be a finite number > 0, got -2.0'):
    optax_path.rescale(params, 0, 1, -2.0)
  with pytest.raises(ValueError, match='needs a hidden layer'):
    optax_path.unbalance(jax.random.key(0), chain_params([3, 2]), 4)
  with pytest.raises(ValueError, match='num_units must be an int >= 0, got -1'):
    optax_path.unbalance(jax.random.key(0), params, -1)


def test_rescale_matches_eq_1():
  params = chain_params([3, 4, 2])
  out = optax_path.rescale(params, 0, 2, 8.0)
  np.testing.assert_allclose(out['Dense_0']['kernel'][:, 2], 8 * params['Dense_0']['kernel'][:, 2])
  np.testing.assert_allclose(out['Dense_0']['bias'][2], 8 * params['Dense_0']['bias'][2])
  np.testing.assert_allclose(out['Dense_1']['kernel'][2], params['Dense_1']['kernel'][2] / 8)
  np.testing.assert_array_equal(out['Dense_0']['kernel'][:, 1], params['Dense_0']['kernel'][:, 1])


@pytest.mark.slow
def test_unbalance_picks_units_over_all_hidden_layers():
  params = chain_params([5, 50, 50, 2], bias=False)
  out = optax_path.unbalance(jax.random.key(0), params, 40)
  ratio = [
    np.asarray(
      jnp.max(jnp.abs(out[f'Dense_{l}']['kernel'] / params[f'Dense_{l}']['kernel']), axis=0)
    )
    for l in (0, 1)
  ]
  for r in ratio:
    changed = r > 1.0 + 1e-6
    assert 5 <= changed.sum() <= 40
    assert np.all(r[changed] > 1.0)  # 10^c with c > 0
