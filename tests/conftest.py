"""Shared fixtures: float64 on demand, small random MLPs."""

import itertools

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
  """Runs the test with 64-bit JAX types enabled."""
  with jax.enable_x64(True):
    yield


def random_mlp(rng: np.random.Generator, widths, *, bias=True, dtype=np.float64, scale=1.0):
  """Linen-layout params of an MLP with the given widths (input first)."""
  params = {}
  for l, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
    layer = {'kernel': (scale * rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(dtype)}
    if bias:
      layer['bias'] = (scale * rng.normal(size=n_out)).astype(dtype)
    params[f'Dense_{l}'] = layer
  return params


def normalize_once(tx, grads, params, hint_params=None):
  """One ``tx.update`` of ``grads`` at ``params``, its state from ``tx.init(hint_params)``.

  ``hint_params`` (default ``params``) are the params the state's warm start is from.
  """
  state = tx.init(params if hint_params is None else hint_params)
  return tx.update(grads, state, params)[0]
