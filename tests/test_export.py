"""A jitted Path-SGD step lowers for the accelerators users have (``jax.export``).

No GPU or TPU is needed: ``jax.export`` lowers for platforms the process does not have,
which proves that every operation of the step (the bit-level exponent reads, the
``lax.cond`` of the warm start, the general mode's pass) has a lowering there, and gives
the StableHLO module each would compile.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import optax_path

MODEL = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])


def exported_step(mode: str, dtype) -> export.Exported:
  params = MODEL.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  params = jax.tree.map(lambda w: w.astype(dtype), params)
  general = {'apply_fn': lambda q, x: MODEL.apply({'params': q}, x), 'input_shape': (4,)}
  tx = optax_path.path_sgd(0.1, **(general if mode == 'general' else {}))

  def step(params, state, x, y):
    loss = lambda q: jnp.mean((MODEL.apply({'params': q}, x) - y) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  x, y = jnp.ones((2, 4), dtype), jnp.zeros((2, 3), dtype)
  return export.export(jax.jit(step), platforms=('cuda', 'tpu'))(params, tx.init(params), x, y)


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('mode', ['mlp', 'general'])
def test_path_sgd_step_lowers_for_cuda_and_tpu(mode, dtype):
  exported = exported_step(mode, dtype)
  assert exported.platforms == ('cuda', 'tpu')
  module = exported.mlir_module()
  assert 'stablehlo.dot_general' in module
  if mode == 'mlp':  # the exponent reads and the warm start's fallback are in there
    assert 'stablehlo.bitcast_convert' in module and 'stablehlo.case' in module


@pytest.mark.slow
def test_float64_step_lowers_too(x64):
  """It lowers (64-bit bitcasts included); TPUs emulate float64 slowly, GPUs run it."""
  exported = exported_step('mlp', jnp.float64)
  assert 'i64' in exported.mlir_module() and 'f64' in exported.mlir_module()
