"""path_scales, path_normalize and path_norm against explicit path enumeration (eq. 5, 9)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normalize_once, random_mlp

import optax_path


def enumerate_paths(params):
  """Every path to an output, as a list of edges ``(layer, source, target)``.

  ``source`` is a unit index, or ``'bias'`` for the bias unit of that layer.
  """
  kernels = [params[f'Dense_{l}']['kernel'] for l in range(len(params))]
  has_bias = ['bias' in params[f'Dense_{l}'] for l in range(len(params))]
  depth = len(kernels)
  paths = []
  for start in range(depth):
    sources = list(range(kernels[0].shape[0])) if start == 0 else []
    if has_bias[start]:
      sources.append('bias')
    units = [range(k.shape[1]) for k in kernels[start:]]
    for source in sources:
      for route in itertools.product(*units):
        nodes = (source,) + route
        paths.append([(start + i, nodes[i], nodes[i + 1]) for i in range(len(route))])
  return paths


def weight(params, edge):
  layer, source, target = edge
  if source == 'bias':
    return params[f'Dense_{layer}']['bias'][target]
  return params[f'Dense_{layer}']['kernel'][source, target]


def brute_force(params, p):
  """(scales, phi_p) from eq. 9 and eq. 5, summing over explicit paths in float64."""
  sums = {}
  phi_p = 0.0
  for path in enumerate_paths(params):
    magnitudes = [abs(float(weight(params, e))) ** p for e in path]
    phi_p += np.prod(magnitudes)
    for i, edge in enumerate(path):
      sums[edge] = sums.get(edge, 0.0) + np.prod(magnitudes[:i] + magnitudes[i + 1 :])
  scales = {}
  for name, layer in params.items():
    l = int(name.split('_')[1])
    n_in, n_out = layer['kernel'].shape
    scales[name] = {
      'kernel': np.array(
        [[sums.get((l, u, v), 0.0) ** (2 / p) for v in range(n_out)] for u in range(n_in)]
      )
    }
    if 'bias' in layer:
      scales[name]['bias'] = np.array(
        [sums.get((l, 'bias', v), 0.0) ** (2 / p) for v in range(n_out)]
      )
  return scales, phi_p ** (1 / p)


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300))


CASES = [
  (depth, bias, p, seed)
  for depth in (1, 2, 3, 4)
  for bias in (False, True)
  for p in (1.0, 1.5, 2.0, 3.0)
  for seed in (0,)
]


@pytest.mark.slow
@pytest.mark.parametrize('depth,bias,p,seed', CASES)
def test_scales_update_and_norm_match_path_enumeration(x64, depth, bias, p, seed):
  rng = np.random.default_rng(1000 * depth + 10 * int(bias) + int(2 * p) + seed)
  widths = list(rng.integers(1, 5, size=depth + 1))
  params = random_mlp(rng, widths, bias=bias, dtype=np.float64)
  expected_scales, expected_norm = brute_force(params, p)
  params = jax.tree.map(jnp.asarray, params)

  scales = jax.jit(optax_path.path_scales, static_argnums=1)(params, p)
  assert jax.tree.structure(scales) == jax.tree.structure(params)
  errors = jax.tree.leaves(jax.tree.map(relative_error, scales, expected_scales))
  assert max(errors) < 1e-10

  grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape)), params)
  expected_updates = jax.tree.map(lambda g, s: np.asarray(g) / s, grads, expected_scales)
  # The state's warm start from these params, from nearby ones, and from unrelated ones.
  nearby = jax.tree.map(lambda w: w * (1 + 0.1 * jnp.asarray(rng.normal(size=w.shape))), params)
  unrelated = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape)) * 1e6, params)
  for hint_params in (params, nearby, unrelated):
    updates = jax.jit(normalize_once, static_argnums=0)(
      optax_path.path_normalize(p), grads, params, hint_params
    )
    assert max(jax.tree.leaves(jax.tree.map(relative_error, updates, expected_updates))) < 1e-10
    assert jax.tree.leaves(updates)[0].dtype == jnp.float64

  assert relative_error(optax_path.path_norm(params, p), expected_norm) < 1e-10


def test_zero_weights_and_dead_units_match_enumeration(x64):
  """Exact zeros: a unit with no incoming path, one with no outgoing path."""
  rng = np.random.default_rng(7)
  params = random_mlp(rng, [3, 4, 4, 2], bias=True)
  params['Dense_0']['kernel'][:, 1] = 0.0  # unit 1 of layer 0: no path from the input...
  params['Dense_0']['bias'][1] = 0.0  # ...nor from a bias: gamma_in = 0
  params['Dense_2']['kernel'][2, :] = 0.0  # unit 2 of layer 1: no path to the output
  params['Dense_1']['kernel'][0, 3] = 0.0
  expected_scales, expected_norm = brute_force(params, 2.0)
  params = jax.tree.map(jnp.asarray, params)
  scales = optax_path.path_scales(params)
  for actual, expected in zip(jax.tree.leaves(scales), jax.tree.leaves(expected_scales)):
    np.testing.assert_array_equal(np.asarray(actual) == 0, expected == 0)
    assert relative_error(actual, expected) < 1e-10
  assert relative_error(optax_path.path_norm(params), expected_norm) < 1e-10


def test_path_norm_gradient_matches_finite_differences(x64):
  rng = np.random.default_rng(3)
  params = jax.tree.map(jnp.asarray, random_mlp(rng, [3, 4, 2], bias=True))
  p = 1.5
  grads = jax.grad(lambda q: optax_path.path_norm(q, p))(params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  norm = jax.jit(lambda v: optax_path.path_norm(unravel(v), p))
  eps = 1e-6
  numeric = np.array(
    [(norm(flat.at[i].add(eps)) - norm(flat.at[i].add(-eps))) / (2 * eps) for i in range(flat.size)]
  )
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], numeric, rtol=1e-6, atol=1e-9)
