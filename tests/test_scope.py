"""The general mode's scope: networks outside Path-SGD's class are refused, fixed weights
enter the pass as |c|.

Expected values come from explicit path enumeration in float64 (itertools over every
input-to-output path), written here and not taken from the library.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_path


class Net(nn.Module):
  """Dense(4) -> ``middle`` -> Dense(2)."""

  middle: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    if self.middle == 'layer_norm':
      h = nn.relu(nn.LayerNorm()(h))
    elif self.middle == 'layer_norm_no_params':
      h = nn.relu(nn.LayerNorm(use_scale=False, use_bias=False)(h))
    elif self.middle == 'remat_layer_norm':  # a lifted transform: no frame of ours inside
      h = nn.relu(nn.remat(nn.LayerNorm)()(h))
    elif self.middle == 'rms_norm':
      h = nn.relu(nn.RMSNorm()(h))
    elif self.middle == 'group_norm':
      h = nn.relu(nn.GroupNorm(num_groups=2)(h))
    elif self.middle == 'batch_norm_training':
      h = nn.relu(nn.BatchNorm(use_running_average=False)(h))
    elif self.middle == 'weight_norm':
      h = nn.relu(nn.WeightNorm(nn.Dense(4))(h))
    elif self.middle == 'attention':
      h = nn.relu(nn.MultiHeadDotProductAttention(num_heads=1)(h[:, None, :])[:, 0, :])
    elif self.middle == 'gating':
      h = nn.relu(h) * h
    else:  # an activation function
      h = getattr(jax.nn, self.middle)(h)
    return nn.Dense(2)(h)


OUT_OF_SCOPE = {
  'layer_norm': 'square',
  'layer_norm_no_params': 'square',
  'remat_layer_norm': 'square',
  'rms_norm': 'square',
  'group_norm': 'square',
  'batch_norm_training': 'square',
  'weight_norm': 'rsqrt',
  'attention': 'dot_general',
  'gating': 'mul',
  'gelu': 'integer_pow',
  'tanh': 'tanh',
  'sigmoid': 'logistic',
  'swish': 'logistic',
  'softmax': 'exp',
  'relu6': 'min',
}


@pytest.mark.parametrize('middle', sorted(OUT_OF_SCOPE))
def test_a_network_outside_path_sgd_is_refused_with_the_primitive_named(middle):
  model = Net(middle)
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  extra = {k: v for k, v in variables.items() if k != 'params'}

  def apply_fn(params, x):
    return model.apply({'params': params, **extra}, x, mutable=list(extra))[0]

  mode = {'apply_fn': apply_fn, 'input_shape': (3,)}
  params = variables['params']
  pattern = f'applies {OUT_OF_SCOPE[middle]} to values computed from the params or the input'
  for call in (
    lambda: optax_path.path_normalize(**mode).init(params),
    lambda: optax_path.path_adam(1e-3, **mode).init(params),  # path_geometry: at init too
    lambda: optax_path.path_norm(params, **mode),
    lambda: optax_path.path_scales(params, **mode),
  ):
    with pytest.raises(ValueError, match=pattern) as raised:
      call()
    assert 'Theorem 4.1' in str(raised.value) and 'another optimizer' in str(raised.value)
    assert MIDDLE_LINE[middle] in named_line(str(raised.value), 'Net.__call__')
    assert type(raised.value) is ValueError  # not a private subclass in the user's traceback


MIDDLE_LINE = {  # the text of the line in Net.__call__ that each refusal must name
  'layer_norm': 'nn.LayerNorm()(h)',
  'layer_norm_no_params': 'use_scale=False',
  'remat_layer_norm': 'nn.remat(nn.LayerNorm)()(h)',
  'rms_norm': 'nn.RMSNorm()',
  'group_norm': 'nn.GroupNorm(',
  'batch_norm_training': 'nn.BatchNorm(',
  'weight_norm': 'nn.WeightNorm(',
  'attention': 'nn.MultiHeadDotProductAttention(',
  'gating': 'nn.relu(h) * h',
  **{name: 'getattr(jax.nn, self.middle)(h)' for name in ('gelu', 'tanh', 'sigmoid', 'swish')},
  **{name: 'getattr(jax.nn, self.middle)(h)' for name in ('softmax', 'relu6')},
}


def test_the_library_folders_are_folders_not_name_prefixes():
  """A model in optax_path_models.py (beside the package) is the user's, not ours: the
  refusal named no line for it."""
  from optax_path._src import scope

  for folder in scope._LIBRARY_DIRS:
    assert folder.endswith(os.sep)
    assert not (folder.rstrip(os.sep) + '_models.py').startswith(scope._LIBRARY_DIRS)


def named_line(message: str, function: str) -> str:
  """The source line of this file that a refusal names, in ``function``."""
  found = re.search(rf'The line of apply_fn: {re.escape(__file__)}:(\d+), in {function}\.', message)
  assert found, message
  return linecache.getline(__file__, int(found[1]))


def test_in_scope_activations_and_a_batch_norm_with_running_averages_are_accepted():
  for middle in ('relu', 'leaky_relu'):
    model = Net(middle)
    params = model.init(jax.random.key(1), jnp.ones((1, 3)))['params']
    scales = optax_path.path_scales(
      params, apply_fn=lambda q, x, m=model: m.apply({'params': q}, x), input_shape=(3,)
    )
    assert all(bool(jnp.all(jnp.isfinite(s) & (s > 0))) for s in jax.tree.leaves(scales))

  class Eval(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))))

  variables = Eval().init(jax.random.key(2), jnp.ones((1, 3)))
  stats = variables['batch_stats']

  def apply_fn(q, x):
    return Eval().apply({'params': q, 'batch_stats': stats}, x)

  norm = optax_path.path_norm(variables['params'], apply_fn=apply_fn, input_shape=(3,))
  assert np.isfinite(float(norm)) and float(norm) > 0


# --------------------------------------------------------------- fixed weights: |c|


def brute_force(w1, b1, w2, b2, p, into_input, from_bias):
  """phi_p^p and the gradient with respect to q1 = |w1|^p, by enumerating paths.

  The input unit i reaches the first layer with fixed weight ``into_input[i]``, and a
  bias unit with fixed weight ``from_bias[i]`` (an input normalisation's constant).
  """
  q1, qb1, q2, qb2 = (np.abs(np.asarray(a, np.float64)) ** p for a in (w1, b1, w2, b2))
  phi, grad_q1 = 0.0, np.zeros_like(q1)
  n_in, n_hidden = q1.shape
  for i, h, o in itertools.product(range(n_in), range(n_hidden), range(q2.shape[1])):
    start = abs(into_input[i]) + abs(from_bias[i])  # the two paths into input unit i
    phi += start * q1[i, h] * q2[h, o]
    grad_q1[i, h] += start * q2[h, o]
  for h, o in itertools.product(range(n_hidden), range(q2.shape[1])):
    phi += qb1[h] * q2[h, o]
  phi += qb2.sum()
  return phi, grad_q1


def two_layers(params, x):
  return jax.nn.relu(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


PARAMS = {
  'w1': jnp.array([[0.5, -1.5, 2.0], [1.0, 0.25, -3.0]]),
  'b1': jnp.array([0.1, -0.2, 0.3]),
  'w2': jnp.array([[1.0, -2.0], [0.5, 1.5], [-0.75, 2.0]]),
  'b2': jnp.array([0.2, -0.4]),
}


@pytest.mark.parametrize('p', [1.0, 2.0, 3.0])
def test_an_input_normalisation_enters_as_the_magnitudes_of_its_constants(p):
  """(x - m) / s with m, s of mixed signs: before, the pass computed (1 - m) / s (paths
  cancelled, log scales NaN where negative)."""
  m, s = np.array([0.75, -2.0]), np.array([0.5, -4.0])

  def apply_fn(q, x):
    return two_layers(q, (x - m) / s)

  phi_p, grad_q1 = brute_force(**PARAMS, p=p, into_input=1 / s, from_bias=m / s)
  mode = {'apply_fn': apply_fn, 'input_shape': (2,)}
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    np.testing.assert_allclose(
      optax_path.path_norm(params, p, **mode), phi_p ** (1 / p), rtol=1e-12
    )
    scales = optax_path.path_scales(params, p, **mode)
  np.testing.assert_allclose(scales['w1'], grad_q1 ** (2 / p), rtol=1e-12)


def test_negation_and_subtraction_of_activations_count_their_paths_once():
  """-(x @ w1) and a residual difference: the paths of the plain sum, not a cancellation."""
  extra = {'w3': jnp.array([[2.0, -1.0, 0.5], [-0.5, 1.0, 1.5]])}
  params = {**PARAMS, **extra}

  def with_minus(q, x):
    h = jax.nn.relu(-(x @ q['w1']) + q['b1'] - x @ q['w3'])
    return h @ q['w2'] + q['b2']

  def with_plus(q, x):
    return jax.nn.relu(x @ q['w1'] + q['b1'] + x @ q['w3']) @ q['w2'] + q['b2']

  mode = {'input_shape': (2,)}
  for p in (1.0, 2.0):
    minus = optax_path.path_scales(params, p, apply_fn=with_minus, **mode)
    plus = optax_path.path_scales(params, p, apply_fn=with_plus, **mode)
    for a, b in zip(jax.tree.leaves(minus), jax.tree.leaves(plus)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(minus))
  # the plain sum equals brute force with w1 and w3 as parallel edges (p = 1: q adds)
  phi_1, _ = brute_force(
    np.abs(PARAMS['w1']) + np.abs(extra['w3']),
    PARAMS['b1'],
    PARAMS['w2'],
    PARAMS['b2'],
    1.0,
    into_input=np.ones(2),
    from_bias=np.zeros(2),
  )
  np.testing.assert_allclose(
    optax_path.path_norm(params, 1.0, apply_fn=with_minus, **mode), phi_1, rtol=1e-6
  )


# ------------------------------------------- siblings: clips, gates, masks, loops


def middle(act):
  """The two-layer net of PARAMS with ``act`` on its hidden units."""
  return lambda q, x: act(x @ q['w1'] + q['b1']) @ q['w2'] + q['b2']


C6 = jnp.full((3,), 6.0)
MASK = jnp.array([True, True, False])


@jax.jit
def clip_at(h, t):
  return jnp.minimum(h, t)


REFUSED = {
  'jnp.clip(h, 0, 6)': (lambda h: jnp.clip(h, 0.0, 6.0), 'max or min with a constant'),
  'maximum with a full_like 6': (lambda h: jnp.maximum(h, jnp.full_like(h, 6.0)), 'max or min'),
  'minimum with a closed-over 6': (lambda h: jnp.minimum(h, C6), 'max or min'),
  'a jitted clip called with 6': (lambda h: clip_at(h, 6.0), 'max or min'),
  'hard_tanh': (jax.nn.hard_tanh, 'comparison of activations with a constant'),
  'thresholded relu': (lambda h: jnp.where(h > 1.0, h, 0.0), 'comparison'),
  'where(h > 0, h, 1)': (lambda h: jnp.where(h > 0, h, 1.0), 'constant other than 0 chosen'),
  'h * sign(h - 1)': (lambda h: h * jnp.sign(h - 1), 'step function of another value'),
  'sign(h)': (jnp.sign, 'step function'),
  'heaviside': (lambda h: (h > 0).astype(h.dtype), 'step function'),
  'quantised': (lambda h: h.astype(jnp.int32).astype(h.dtype), 'cast of activations'),
  'gate from another unit': (lambda h: jnp.where(h[:, :1] > 0, h, 0.0), 'another value'),
  'while_loop': (
    lambda h: jax.lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, h))[
      1
    ],
    'while_loop',
  ),
  'masked max, -1e9': (
    lambda h: jnp.max(jnp.where(MASK, h, -1e9), -1, keepdims=True) * jnp.ones(3),
    'mask such as -1e9',
  ),
  'masked max, added -inf': (
    lambda h: jnp.max(h + jnp.where(MASK, 0.0, -jnp.inf), -1, keepdims=True) * jnp.ones(3),
    'infinite constant',
  ),
  'product pooling': (
    lambda h: jax.lax.reduce_window(h, 1.0, jax.lax.mul, (1, 3), (1, 1), 'VALID') * jnp.ones(3),
    'computation is mul',
  ),
}


@pytest.mark.parametrize('name', sorted(REFUSED))
def test_clips_gates_masks_and_loops_are_refused(name):
  """Each gave wrong scales (zeros for the clipped units' weights), NaN or +inf before."""
  act, pattern = REFUSED[name]
  with pytest.raises(ValueError, match=pattern):
    optax_path.path_scales(PARAMS, apply_fn=middle(act), input_shape=(2,))


def test_an_embedding_is_refused():
  class Embedded(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.Embed(5, 2)(x.astype(jnp.int32))).reshape(x.shape[0], -1))

  params = Embedded().init(jax.random.key(0), jnp.ones((1, 3)))['params']
  with pytest.raises(ValueError, match='embedding'):
    optax_path.path_norm(
      params, apply_fn=lambda q, x: Embedded().apply({'params': q}, x), input_shape=(3,)
    )


ACCEPTED = {
  'relu as h * (h > 0)': lambda h: h * (h > 0),
  'leaky relu by where': lambda h: jnp.where(h >= 0, h, 0.1 * h),
  'relu of a fixed bias': lambda h: jax.nn.relu(h - 1.0),
  'maximum with zeros_like': lambda h: jnp.maximum(h, jnp.zeros_like(h)),
}


@pytest.mark.parametrize('name', sorted(ACCEPTED))
def test_relu_written_other_ways_equals_relu(name):
  """On the pass every ReLU is the identity: the scales equal those of plain ReLU (the
  fixed bias -1 adds |-1| = 1 to the bias unit's |b|^p, p = 2 here)."""
  got = optax_path.path_scales(PARAMS, apply_fn=middle(ACCEPTED[name]), input_shape=(2,))
  if name == 'relu of a fixed bias':
    shifted = {**PARAMS, 'b1': jnp.sqrt(PARAMS['b1'] ** 2 + 1.0)}  # |b1'|^2 = |b1|^2 + |-1|
    want = optax_path.path_scales(shifted, apply_fn=middle(jax.nn.relu), input_shape=(2,))
    got, want = {k: got[k] for k in ('w1', 'w2')}, {k: want[k] for k in ('w1', 'w2')}
  else:
    want = optax_path.path_scales(PARAMS, apply_fn=middle(jax.nn.relu), input_shape=(2,))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_relu_rnn_in_lax_scan_with_constants_is_accepted():
  """A regression of the first scope check: constants inside scan counted as a rewrite the
  pass could not make. Expected: the same net unrolled by hand (p = 1, weights >= 0)."""
  q = {'wh': jnp.full((3, 3), 0.5), 'wx': jnp.full((2, 3), 0.25), 'wo': jnp.ones((3, 1))}

  def rnn(q, x):
    step = lambda c, xt: (jax.nn.relu(c @ q['wh'] * 0.5 + xt @ q['wx']), None)
    c, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
    return c @ q['wo']

  def unrolled(q, x):
    c = jnp.zeros((x.shape[0], 3))
    for t in range(x.shape[1]):
      c = jax.nn.relu(c @ q['wh'] * 0.5 + x[:, t] @ q['wx'])
    return c @ q['wo']

  mode = {'input_shape': (4, 2)}
  np.testing.assert_allclose(
    optax_path.path_norm(q, 1.0, apply_fn=rnn, **mode),
    optax_path.path_norm(q, 1.0, apply_fn=unrolled, **mode),
    rtol=1e-6,
  )


# ------------------------- branches chosen by the input or by the parameters' values


def test_a_cond_or_switch_chosen_by_the_activations_is_refused():
  """A hard gate written as control flow: on the pass (every activation >= 0) the sum is
  >= 0, so the pass took the first branch whatever the network did; before, the scales of
  w1 were those of that branch (x 4 for p = 2 where the network took 0.5 * h)."""
  chosen = {
    'lax.cond': lambda h: jax.lax.cond(jnp.sum(h) < 0, lambda h: h, lambda h: 0.5 * h, h),
    'lax.switch': lambda h: jax.lax.switch(
      (jnp.sum(h) > 0).astype(jnp.int32), [lambda h: h, lambda h: 0.5 * h], h
    ),
  }
  for act in chosen.values():
    with pytest.raises(ValueError, match='branch chosen by testing the input or the activations'):
      optax_path.path_scales(PARAMS, apply_fn=middle(act), input_shape=(2,))


PARAMS_A = {**PARAMS, 'a': jnp.array(-0.5), 'scores': jnp.array([1.0, -1.0, 2.0])}


def with_a(act):
  """``middle`` where ``act(q, h)`` also reads the params (``a`` and ``scores`` used)."""
  return lambda q, x: (
    act(q, x @ q['w1'] + q['b1']) @ q['w2'] + q['b2'] + q['a'] * jnp.sum(q['scores'])
  )


OF_PARAMS = {  # name: (network, the leaf the message must name)
  'jnp.where(a > 0, h, 0)': (lambda q, h: jnp.where(q['a'] > 0, jax.nn.relu(h), 0.0), 'a'),
  'lax.cond(a > 0, ...)': (
    lambda q, h: jax.lax.cond(q['a'] > 0, jax.nn.relu, jnp.zeros_like, h),
    'a',
  ),
  'a relu(w) kernel (input-convex nets)': (
    lambda q, h: jax.nn.relu(jax.nn.relu(h) @ jax.nn.relu(q['w2']) @ q['w2'].T),
    'w2',
  ),
  'a clip of the weights': (
    lambda q, h: jax.nn.relu(h * jnp.clip(q['scores'], -1.0, 1.0)),
    'scores',
  ),
  'a learned mask h * (scores > 0)': (lambda q, h: jax.nn.relu(h) * (q['scores'] > 0), 'scores'),
  'leaky relu of the weights': (
    lambda q, h: jax.nn.relu(h) * jnp.where(q['scores'] > 0, q['scores'], 0.1 * q['scores']),
    'scores',
  ),
  'a softplus of the weights (a max inside)': (
    lambda q, h: jax.nn.relu(h) * jax.nn.softplus(q['scores']),
    'scores',
  ),
  'a max of the weights': (lambda q, h: jax.nn.relu(h) * jnp.max(q['scores']), 'scores'),
  'indices from the weights': (
    lambda q, h: jax.nn.relu(h)[:, q['scores'].astype(jnp.int32) % 3],
    'scores',
  ),
  'indices from the sign of a weight': (
    lambda q, h: (
      jnp.take(jax.nn.relu(h), (q['a'] > 0).astype(jnp.int32), axis=1, mode='clip')[:, None]
      * jnp.ones((1, 3))
    ),
    'a',
  ),
  'a relu of a kernel built by scatter': (
    lambda q, h: (
      jax.nn.relu(h) * jax.nn.relu(jnp.zeros(3).at[jnp.array([0, 2])].add(q['scores'][:2]))
    ),
    'scores',
  ),
  'a mask of the weights through a 4-deep scan carry': (
    lambda q, h: (
      jax.lax.scan(
        lambda c, _: ((c[1], c[2], c[3], (q['a'] > 0).astype(h.dtype)), None),
        (jnp.ones(()),) * 4,
        None,
        length=5,
      )[0][0]
      * jax.nn.relu(h)
    ),
    'a',
  ),
}


@pytest.mark.parametrize('name', sorted(OF_PARAMS))
def test_choices_maxima_and_masks_of_the_parameters_are_refused_by_name(name):
  """On the pass every parameter is |theta|^p >= 0: a test of a negative parameter takes
  the other branch there. Before, ``where(a > 0, h, 0)`` with a = -0.5 (the network's
  output does not depend on w1) gave w1 the scales of the open gate, and a relu(w2)
  kernel counted its negative entries as |w|^p rather than 0: w1's first scale 5.0 where
  the network's is 1.0 (p = 2, PARAMS)."""
  act, leaf = OF_PARAMS[name]
  for call in (
    lambda: optax_path.path_scales(PARAMS_A, apply_fn=with_a(act), input_shape=(2,)),
    lambda: optax_path.path_normalize(apply_fn=with_a(act), input_shape=(2,)).init(PARAMS_A),
  ):
    with pytest.raises(ValueError, match=rf'applies \S+ to values of {leaf}: ') as raised:
      call()
    assert 'projection_non_negative' in str(raised.value)
    lines, _ = inspect.getsourcelines(act)  # the refusal names a line of ``act``
    assert named_line(str(raised.value), '<lambda>') in lines


def test_sums_and_magnitudes_of_parameters_are_parallel_edges_of_the_same_graph():
  """Accepted, and right: x @ (w1 + u @ v) is x @ w1 plus the paths through a rank-1
  bottleneck (float64 brute force over the explicit paths, p = 1 and 2), and a kernel
  |w1| gives the scales of w1, whose magnitudes |w|^p are what the pass uses."""
  u, v = np.array([[0.5], [-2.0]]), np.array([[1.5, -0.25, 1.0]])
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), {**PARAMS, 'u': u, 'v': v})

    def low_rank(q, x):
      return two_layers({**q, 'w1': q['w1'] + q['u'] @ q['v']}, x)

    def magnitude(q, x):
      return two_layers({**q, 'w1': jnp.abs(q['w1'])}, x)

    for p in (1.0, 2.0):
      # the bottleneck's paths i -> r -> h weigh |u_ir|^p |v_rh|^p: parallel to |w1_ih|^p
      q1 = np.abs(PARAMS['w1']) ** p + np.abs(u) ** p @ np.abs(v) ** p
      phi_p, _ = brute_force(
        q1 ** (1 / p), PARAMS['b1'], PARAMS['w2'], PARAMS['b2'], p, np.ones(2), np.zeros(2)
      )
      np.testing.assert_allclose(
        optax_path.path_norm(params, p, apply_fn=low_rank, input_shape=(2,)),
        phi_p ** (1 / p),
        rtol=1e-12,
      )
      plain = {k: params[k] for k in PARAMS}
      want = optax_path.path_scales(plain, p, apply_fn=two_layers, input_shape=(2,))
      got = optax_path.path_scales(plain, p, apply_fn=magnitude, input_shape=(2,))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


class PReLUNet(nn.Module):
  fixed_slope: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    h = jax.nn.leaky_relu(h, 0.25) if self.fixed_slope else nn.PReLU(negative_slope_init=0.25)(h)
    return nn.Dense(2)(h)


def test_a_learnable_prelu_slope_is_on_no_path_and_refused_by_name():
  """The pass always passes h through jnp.where(h >= 0, h, a * h), so the slope's scale
  was 0 and Path-SGD never trained it (accepted before, as a documented caveat). The path
  norm, which does not depend on the slope, stays: it equals the MLP mode's (an
  independent computation on the Dense kernels alone), and a fixed slope is accepted."""
  variables = PReLUNet().init(jax.random.key(3), jnp.ones((1, 3)))
  params = variables['params']
  mode = {'apply_fn': lambda q, x: PReLUNet().apply({'params': q}, x), 'input_shape': (3,)}
  for call in (
    lambda: optax_path.path_normalize(**mode).init(params),
    lambda: optax_path.path_sgd(0.1, **mode).init(params),
    lambda: optax_path.path_adam(1e-3, **mode).init(params),
    lambda: optax_path.path_scales(params, **mode),
  ):
    with pytest.raises(
      ValueError, match=r'times a constant 0\): PReLU_0/negative_slope \(\)'
    ) as raised:
      call()
    assert 'leaky_relu' in str(raised.value)
  dense = {k: v for k, v in params.items() if k.startswith('Dense')}
  np.testing.assert_allclose(
    optax_path.path_norm(params, **mode), optax_path.path_norm(dense), rtol=1e-6
  )
  fixed = PReLUNet(fixed_slope=True)
  tx = optax_path.path_normalize(
    apply_fn=lambda q, x: fixed.apply({'params': q}, x), input_shape=(3,)
  )
  tx.init(dense)


# ------------------------- loops, scatters and spellings of ReLU (a breaker's cases)


def scan_and_loop(step, h0, steps):
  """The same recurrent net as a lax.scan and as a Python loop over ``steps`` inputs."""

  def scanned(q, x):
    h, _ = jax.lax.scan(lambda h, xt: (step(q, h, xt), None), h0(x), jnp.swapaxes(x, 0, 1))
    return h @ q['wo']

  def looped(q, x):
    h = h0(x)
    for t in range(steps):
      h = step(q, h, x[:, t])
    return h @ q['wo']

  return scanned, looped


RNN = {'wh': jnp.array([[0.5]]), 'wx': jnp.array([[-1.5]]), 'wo': jnp.array([[0.75]])}


def test_differences_and_constants_inside_lax_scan_count_every_path():
  """Before, a scan body was evaluated as written on the pass: a leaky integrator gave
  phi_1 0.41 for 1.06, and relu((x_t - 2) @ wx) cut every path (phi_1 = 0, every scale 0,
  the net never trained). Expected: the loop unrolled by hand, p = 1, input ones."""
  wh, wx, wo = 0.5, 1.5, 0.75
  zeros = lambda x: jnp.zeros((x.shape[0], 1))
  leaky = lambda q, h, xt: h + 0.5 * (jax.nn.relu(h @ q['wh'] + xt[:, None] @ q['wx']) - h)
  centred = lambda q, h, xt: h + jax.nn.relu((xt[:, None] - 2.0) @ q['wx'])
  g_leaky = g_centred = 0.0
  for _ in range(3):  # the skip (1), the -h (|-0.5|) and the relu unit (0.5) into h'
    g_leaky = 1.5 * g_leaky + 0.5 * (g_leaky * wh + wx)
    g_centred = g_centred + (1.0 + 2.0) * wx  # x_t and the bias unit's |-2|
  no_wh = {k: v for k, v in RNN.items() if k != 'wh'}
  for step, g, params in ((leaky, g_leaky, RNN), (centred, g_centred, no_wh)):
    scanned, looped = scan_and_loop(step, zeros, 3)
    for apply_fn in (scanned, looped):
      norm = optax_path.path_norm(params, 1.0, apply_fn=apply_fn, input_shape=(3,))
      np.testing.assert_allclose(norm, g * wo, rtol=1e-6)
    scales = optax_path.path_scales(params, apply_fn=scanned, input_shape=(3,))
    assert all(bool(jnp.all(s > 0)) for s in jax.tree.leaves(scales))


def test_deep_pipelines_in_a_scan_carry_and_zero_initial_states_are_accepted():
  """The carry's kinds are followed to their fixed point (4 rounds before: a 5-deep
  pipeline's weights were 'on no path' and a mask of the weights 6 slots deep got
  through), and 0 @ w (a zero initial state) is 0, not a value of w. Expected: the
  unrolled loop, p = 1."""
  depth = 6
  q = {f'w{l}': jnp.array([[0.5 + 0.25 * l]]) for l in range(depth)} | {'wo': jnp.array([[2.0]])}

  def pipeline(q, hs, xt):
    return (jax.nn.relu(xt[:, None] @ q['w0']),) + tuple(
      jax.nn.relu(hs[l - 1] @ q[f'w{l}']) for l in range(1, depth)
    )

  def scanned(q, x):
    h0 = tuple(jnp.zeros((x.shape[0], 1)) for _ in range(depth))
    hs, _ = jax.lax.scan(lambda hs, xt: (pipeline(q, hs, xt), None), h0, jnp.swapaxes(x, 0, 1))
    return hs[-1] @ q['wo']

  optax_path.path_normalize(apply_fn=scanned, input_shape=(depth + 1,)).init(q)
  want = np.prod([0.5 + 0.25 * l for l in range(depth)]) * 2.0  # one path reaches the end
  np.testing.assert_allclose(
    optax_path.path_norm(q, 1.0, apply_fn=scanned, input_shape=(depth + 1,)), want, rtol=1e-6
  )
  rnn = scan_and_loop(
    lambda q, h, xt: jax.nn.relu(h @ q['wh']) + xt[:, None] @ q['wx'],
    lambda x: jnp.zeros((x.shape[0], 1)),
    3,
  )
  norms = [optax_path.path_norm(RNN, 1.0, apply_fn=f, input_shape=(3,)) for f in rnn]
  np.testing.assert_allclose(norms[0], norms[1], rtol=1e-6)
  np.testing.assert_allclose(norms[0], (1.5 * (1 + 0.5 + 0.25)) * 0.75, rtol=1e-6)


def test_scatters_of_activations_are_structural():
  """segment_sum (a GNN's aggregation over a fixed graph), .at[].add/.set and
  dynamic_update_slice place activations: refused before ('indices read from the
  input', or 'a nonlinearity'). Expected: the plain net whose w2 rows follow the units to
  where they were placed (h_j lands on unit ids[j], so it meets w2[ids[j]])."""
  ids = jnp.array([0, 2, 1])
  placed = {
    'segment_sum': (lambda h: jax.ops.segment_sum(h.T, ids, 3).T, ids),
    '.at[].add': (lambda h: jnp.zeros_like(h).at[:, ids].add(h), ids),
    '.at[].set': (lambda h: jnp.zeros_like(h).at[:, ids].set(h), ids),
    'dynamic_update_slice': (
      lambda h: jax.lax.dynamic_update_slice(jnp.zeros_like(h), h, (0, 0)),
      jnp.arange(3),
    ),
  }
  for name, (place, order) in placed.items():
    net = middle(lambda h, place=place: place(jax.nn.relu(h)))
    got = optax_path.path_norm(PARAMS, 1.0, apply_fn=net, input_shape=(2,))
    moved = {**PARAMS, 'w2': PARAMS['w2'][order]}
    want = optax_path.path_norm(moved, 1.0, apply_fn=middle(jax.nn.relu), input_shape=(2,))
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    scales = optax_path.path_scales(PARAMS, apply_fn=net, input_shape=(2,))
    assert all(bool(jnp.all(s > 0)) for s in jax.tree.leaves(scales)), name


GRAPH = jnp.array([0, 0, 1, 2, 2, 2])  # the segment (graph node) of each of 6 members


def graph_net(pool):
  """A GNN layer over a fixed graph: relu(x @ w1) per member, pooled per segment, @ w2."""

  def apply_fn(q, x):  # x: (batch, 6, 2)
    h = jax.nn.relu(x @ q['w1'])
    return (jax.vmap(lambda hb: pool(hb, GRAPH))(h) @ q['w2']).sum(1)

  return apply_fn


@pytest.mark.parametrize('p', [1.0, 2.0])
def test_a_max_pool_over_a_graph_counts_every_member(p):
  """segment_max and .at[].max (a GNN's max aggregation) were refused as 'a nonlinearity
  that is not positively homogeneous'. As a max pool, they count the paths through every
  member: the reference pools with a fixed 0/1 matrix, ``M @ h``, a plain linear map."""
  rng = np.random.default_rng(3)
  params = {
    k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in {'w1': (2, 4), 'w2': (4, 3)}.items()
  }
  members = (GRAPH[None, :] == jnp.arange(3)[:, None]).astype(jnp.float32)
  reference = graph_net(lambda hb, seg: members @ hb)
  mode = {'input_shape': (6, 2)}
  want_norm = optax_path.path_norm(params, p, apply_fn=reference, **mode)
  want_scales = optax_path.path_scales(params, p, apply_fn=reference, **mode)
  pools = {
    'segment_max': lambda hb, seg: jax.ops.segment_max(hb, seg, num_segments=3),
    '.at[].max into zeros': lambda hb, seg: jnp.zeros((3, 4)).at[seg].max(hb),
    '-segment_min(-h)': lambda hb, seg: -jax.ops.segment_min(-hb, seg, num_segments=3),
  }
  for name, pool in pools.items():
    got = optax_path.path_norm(params, p, apply_fn=graph_net(pool), **mode)
    np.testing.assert_allclose(got, want_norm, rtol=1e-6, err_msg=name)
    scales = optax_path.path_scales(params, p, apply_fn=graph_net(pool), **mode)
    for a, b in zip(jax.tree.leaves(scales), jax.tree.leaves(want_scales), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
  clips = (  # a max with 1, a min with -inf: not ReLU, not a pool
    lambda hb, seg: jnp.ones((3, 4)).at[seg].max(hb),
    lambda hb, seg: jnp.full((3, 4), -jnp.inf).at[seg].min(hb),
  )
  for pool in clips:
    with pytest.raises(ValueError, match='a max or min with a constant other than 0'):
      optax_path.path_scales(params, apply_fn=graph_net(pool), **mode)
  of_params = lambda q, x: (
    graph_net(lambda hb, seg: hb)(q, x)
    * jax.ops.segment_max(q['w2'][0], jnp.array([0, 0, 1]), num_segments=2).sum()
  )
  with pytest.raises(ValueError, match='applies scatter-max to values of w2'):
    optax_path.path_scales(params, apply_fn=of_params, **mode)


SPARSE = np.array([0, 0, 2, 2, 2, 2])  # 4 graph nodes; nodes 1 and 3 have no member


def guarded_graph_net(guard, pool=None):
  """relu(x @ w1) per member, max-pooled per node of SPARSE, ``guard``, + b, relu, @ w2."""
  pool = pool or (lambda hb: jax.ops.segment_max(hb, jnp.asarray(SPARSE), num_segments=4))

  def apply_fn(q, x):  # x: (batch, 6, 2)
    s = jax.vmap(pool)(jax.nn.relu(x @ q['w1']))
    return (jax.nn.relu(guard(s) + q['b']) @ q['w2']).sum(1)

  return apply_fn


def sparse_graph_brute_force(params, p):
  """phi_p^p and its gradient with respect to every ``|theta|^p``, float64, by listing
  the paths: input feature i of member m -> channel c (w1) -> its node (max pool, weight
  1) -> output k (w2); and bias b[c] -> channel c of every node, members or not -> k."""
  q = {k: np.abs(np.asarray(v, np.float64)) ** p for k, v in params.items()}
  grads = {k: np.zeros_like(v) for k, v in q.items()}
  phi = 0.0
  n_in, n_channels = q['w1'].shape
  paths = [
    [('w1', (i, c)), ('w2', (c, k))]
    for _, i, c, k in itertools.product(SPARSE, range(n_in), range(n_channels), range(3))
  ] + [
    [('b', (c,)), ('w2', (c, k))]
    for _, c, k in itertools.product(range(4), range(n_channels), range(3))
  ]
  for path in paths:
    phi += np.prod([q[leaf][index] for leaf, index in path])
    for j, (leaf, index) in enumerate(path):
      grads[leaf][index] += np.prod([q[o][x] for o, x in path[:j] + path[j + 1 :]])
  return phi, grads


GRAPH_PARAMS = {
  'w1': np.array([[0.5, -1.5, 2.0, 1.0], [1.0, 0.25, -3.0, -0.5]]),
  'b': np.array([0.1, -0.2, 0.3, 0.05]),
  'w2': np.array([[1.0, -2.0, 0.5], [0.5, 1.5, -1.0], [-0.75, 2.0, 1.0], [0.25, 1.0, -0.5]]),
}


@pytest.mark.parametrize('p', [1.0, 2.0])
def test_an_empty_graph_node_set_to_zero_is_no_unit(p):
  """segment_max gives -inf for a node without members. jnp.where(jnp.isfinite(s), s, 0),
  jnp.isneginf, jnp.isinf, s == -inf, s > -inf, jnp.nan_to_num(s, neginf=0), and -min(-h)
  pooled so, were refused as hard gates or thresholds. They set the node to 0, as ReLU does:
  expected, a float64 enumeration of the paths where such a node is reached by its bias
  alone."""
  phi, grads = sparse_graph_brute_force(GRAPH_PARAMS, p)
  guards = {
    'isfinite': lambda s: jnp.where(jnp.isfinite(s), s, 0.0),
    'isneginf': lambda s: jnp.where(jnp.isneginf(s), 0.0, s),
    'isinf': lambda s: jnp.where(jnp.isinf(s), 0.0, s),
    '== -inf': lambda s: jnp.where(s == -jnp.inf, 0.0, s),
    '> -inf': lambda s: jnp.where(s > -jnp.inf, s, 0.0),
    'not isfinite': lambda s: jnp.where(~jnp.isfinite(s), 0.0, s),
    'nan_to_num': lambda s: jnp.nan_to_num(s, neginf=0.0),
    'relu': jax.nn.relu,
    'where s > 0': lambda s: jnp.where(s > 0, s, 0.0),
  }
  ids = jnp.asarray(SPARSE)
  nets = {name: guarded_graph_net(guard) for name, guard in guards.items()}
  nets['-segment_min(-h)'] = guarded_graph_net(
    guards['isfinite'], lambda hb: -jax.ops.segment_min(-hb, ids, num_segments=4)
  )
  nets['.at[].max into -inf'] = guarded_graph_net(
    guards['nan_to_num'], lambda hb: jnp.full((4, 4), -jnp.inf).at[ids].max(hb)
  )
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, GRAPH_PARAMS)
    for name, net in nets.items():
      mode = {'apply_fn': net, 'input_shape': (6, 2)}
      np.testing.assert_allclose(
        optax_path.path_norm(params, p, **mode), phi ** (1 / p), rtol=1e-12, err_msg=name
      )
      scales = optax_path.path_scales(params, p, **mode)
      for leaf, grad in grads.items():
        np.testing.assert_allclose(scales[leaf], grad ** (2 / p), rtol=1e-12, err_msg=name)
      out = net(params, jnp.ones((1, 6, 2)))  # and the network itself stays finite
      assert bool(jnp.all(jnp.isfinite(out))), name


def test_an_empty_graph_node_used_as_it_is_or_set_to_another_value_is_refused():
  """Unguarded, the -inf of an empty node was accepted: the pass, where that node is 0 and
  its bias reaches it, counted paths (b -> node -> w2) that the network, where
  relu(-inf + b) = 0, does not have. Every use other than passing it on, a max, or
  setting it to 0 is refused with what to write instead."""
  params = jax.tree.map(jnp.asarray, GRAPH_PARAMS)
  refused = {
    'relu(s + b)': lambda s: s,
    'where(isfinite(s), s, 1)': lambda s: jnp.where(jnp.isfinite(s), s, 1.0),
    'nan_to_num (neginf: finfo.min)': jnp.nan_to_num,
    's * isfinite(s)': lambda s: s * jnp.isfinite(s),
    'where(isnan(s), 0, s)': lambda s: jnp.where(jnp.isnan(s), 0.0, s),
    'leaky relu': jax.nn.leaky_relu,
    'isfinite | isnan': lambda s: jnp.where(jnp.isfinite(s) | jnp.isnan(s), s, 0.0),
  }
  for name, guard in refused.items():
    with pytest.raises(ValueError, match=r'segment_max or segment_min pools no member') as info:
      optax_path.path_scales(params, apply_fn=guarded_graph_net(guard), input_shape=(6, 2))
    assert 'jnp.where(jnp.isfinite(s), s, 0)' in str(info.value) or 'Put 0 there' in str(
      info.value
    ), name
  other = lambda s: jnp.where(jnp.isfinite(s), s, jax.nn.relu(jnp.flip(s, 0)))  # another node
  with pytest.raises(ValueError, match='a value other than 0 put where'):
    optax_path.path_scales(params, apply_fn=guarded_graph_net(other), input_shape=(6, 2))
  for chosen in (  # on the pass every node has members: these would always take the other
    lambda s: jnp.where(jnp.isfinite(s), jnp.flip(s, 0), 0.0),
    lambda s: jnp.where(jnp.isfinite(s), jnp.ones_like(s) @ jnp.eye(4) * s.sum(), 0.0),
  ):
    with pytest.raises(ValueError, match='testing whether a segment_max has members|-inf where'):
      optax_path.path_scales(params, apply_fn=guarded_graph_net(chosen), input_shape=(6, 2))
  windows = {  # a max pool's window of padding alone, a -inf pad: the same -inf
    'reduce_window': lambda h: jax.lax.reduce_window(
      h, -jnp.inf, jax.lax.max, (1, 2, 1), (1, 2, 1), ((0, 0), (2, 2), (0, 0))
    ),
    'pad -inf': lambda h: jnp.pad(h, ((0, 0), (1, 0), (0, 0)), constant_values=-jnp.inf),
  }
  for name, pool in windows.items():
    net = lambda q, x, pool=pool: jax.nn.relu(pool(jax.nn.relu(x @ q['w1'])) + q['b']) @ q['w2']
    with pytest.raises(ValueError, match='-inf where a segment_max'):
      optax_path.path_scales(params, apply_fn=net, input_shape=(6, 2))


def test_the_minus_inf_of_empty_windows_and_segments_is_tracked_to_where_it_is():
  """Only the entries that can be -inf are: a max pool whose windows all hold a member, a
  global max over nodes, a max of a segment_max with its flip (no two empty nodes meet),
  pooling into zeros: no -inf is left, as the first tracking (any -inf anywhere) refused.
  Expected: the same network with every max as a sum (the pass counts every member) and
  the guard or the -inf dropped, through a fixed 0/1 matrix or a sum pool."""
  params = jax.tree.map(jnp.asarray, GRAPH_PARAMS)
  ids = jnp.asarray(SPARSE)
  members = (ids[None, :] == jnp.arange(4)[:, None]).astype(jnp.float32)  # (4, 6)
  segment_max = lambda hb: jax.ops.segment_max(hb, ids, num_segments=4)
  window = {'window_dimensions': (1, 2, 1), 'window_strides': (1, 2, 1)}
  pairs = {
    'a global max over nodes': (
      lambda h: jnp.max(jax.vmap(segment_max)(h), axis=1),
      lambda h: jnp.sum(members @ h, axis=1),
    ),
    'a max with its flip': (
      lambda h: jnp.maximum(jax.vmap(segment_max)(h), jnp.flip(jax.vmap(segment_max)(h), 1)),
      lambda h: members @ h + jnp.flip(members @ h, 1),
    ),
    'pooled again into zeros': (
      lambda h: jax.vmap(lambda s: jnp.zeros((2, 4)).at[jnp.array([0, 1, 1, 0])].max(s))(
        jax.vmap(segment_max)(h)
      ),
      lambda h: jnp.array([[1.0, 0, 0, 1], [0, 1, 1, 0]]) @ (members @ h),
    ),
    'a -inf pad, then a max pool': (
      lambda h: jax.lax.reduce_window(
        jnp.pad(h, ((0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf),
        -jnp.inf,
        jax.lax.max,
        **window,
        padding='VALID',
      ),
      lambda h: jax.lax.reduce_window(
        jnp.pad(h, ((0, 0), (1, 1), (0, 0))), 0.0, jax.lax.add, **window, padding='VALID'
      ),
    ),
  }
  for name, (pool, reference) in pairs.items():
    nets = [
      lambda q, x, f=f: (jax.nn.relu(f(jax.nn.relu(x @ q['w1'])) + q['b']) @ q['w2']).sum()
      for f in (pool, reference)
    ]
    got, want = (optax_path.path_scales(params, apply_fn=n, input_shape=(6, 2)) for n in nets)
    for leaf in params:
      np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, err_msg=f'{name}: {leaf}')
    out = nets[0](params, jnp.ones((1, 6, 2)))
    assert bool(jnp.isfinite(out)), name


def test_a_finiteness_test_of_a_finite_unit_is_constant_and_an_overflow_stays_visible():
  """jnp.where(jnp.isfinite(h), h, 0) or jnp.nan_to_num(h) on a ReLU's output (finite for
  finite params) were refused as hard gates; they change nothing, so the scales are plain
  ReLU's. Where the float32 pass overflows (|w1|^2 = 1e40), the guard must not turn the
  inf into 0, which would leave phi finite through the skip connection and every scale of
  w1 0: every scale is +inf, as without the guard."""

  def net(guard):
    return lambda q, x: (
      guard(jax.nn.relu(x @ q['w1'] + q['b1'])) @ q['w2'] + x @ q['skip'] + q['b2']
    )

  params = {**PARAMS, 'skip': jnp.ones((2, 2))}
  plain = optax_path.path_scales(params, 2.0, apply_fn=net(lambda h: h), input_shape=(2,))
  for guard in (lambda h: jnp.where(jnp.isfinite(h), h, 0.0), jnp.nan_to_num):
    scales = optax_path.path_scales(params, 2.0, apply_fn=net(guard), input_shape=(2,))
    for a, b in zip(jax.tree.leaves(scales), jax.tree.leaves(plain), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    huge = {**params, 'w1': params['w1'] * 1e20}
    scales = optax_path.path_scales(huge, 2.0, apply_fn=net(guard), input_shape=(2,))
    assert all(bool(jnp.all(a == jnp.inf)) for a in jax.tree.leaves(scales))


def test_an_overflow_of_the_pass_is_never_set_to_zero_by_a_gate():
  """Where the float32 pass overflows, inf * 0 (a zero weight) is NaN, and a ReLU written
  jnp.where(h > 0, h, 0) took NaN > 0 as False: the overflowed paths became 0, phi_2 came
  out 1.41 through the skip connection and the scales of w1 0, silently. And h * 0 == 0
  (which scope takes as true) was NaN == 0 on the pass. Expected: every scale +inf, as for
  any overflow of the pass."""

  def where_relu(q, x):
    z = x @ q['w1']
    h = jnp.where(z > 0, z, 0.0) @ q['w2']  # column 0 of w2 is 0: inf * 0 = NaN
    return jnp.where(h > 0, h, 0.0)[:, :1] @ q['w3'] + x @ q['skip']

  def times_zero(q, x):
    g = jax.nn.relu(x @ q['w1']) @ q['w2']
    return jnp.where(g * 0 == 0, g, 0.0)[:, :1] @ q['w3'] + x @ q['skip']

  params = {
    'w1': jnp.full((2, 2), 1e20),
    'w2': jnp.array([[0.0, 1.0], [0.0, 1.0]]),
    'w3': jnp.ones((1, 1)),
    'skip': jnp.ones((2, 1)),
  }
  for net in (where_relu, times_zero):
    assert float(optax_path.path_norm(params, apply_fn=net, input_shape=(2,))) == np.inf
    scales = optax_path.path_scales(params, apply_fn=net, input_shape=(2,))
    assert all(bool(jnp.all(a == jnp.inf)) for a in jax.tree.leaves(scales)), net.__name__
    normal = jax.tree.map(lambda a: a * 1e-20 if a.size == 4 and a[0, 0] > 1 else a, params)
    finite = optax_path.path_scales(normal, apply_fn=net, input_shape=(2,))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(finite)), net.__name__


def test_a_min_with_zero_and_other_spellings_of_relu_count_their_paths():
  """min(h, 0) = -relu(-h) passed 0 on the pass before: phi_1 0 for 21.75, every scale 0.
  lax.clamp(0, h, inf) and h * where(h > 0, 1, 0) were refused. Expected: plain ReLU's."""
  want = optax_path.path_norm(PARAMS, 1.0, apply_fn=middle(jax.nn.relu), input_shape=(2,))
  for act in (
    lambda h: jnp.minimum(h, 0.0),
    lambda h: jax.lax.clamp(0.0, h, jnp.inf),
    lambda h: h * jnp.where(h > 0, 1.0, 0.0),
  ):
    got = optax_path.path_norm(PARAMS, 1.0, apply_fn=middle(act), input_shape=(2,))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_params_only_in_the_branch_a_fixed_flag_never_takes_are_named():
  """Like a leaf apply_fn does not use: scale 0, never trained (accepted before)."""
  params = {**PARAMS, 'other': jnp.ones((3, 2))}

  def apply_fn(q, x):
    h = jax.nn.relu(x @ q['w1'] + q['b1'])
    out = jax.lax.cond(USE_FIRST, lambda h: h @ q['w2'], lambda h: h @ q['other'], h)
    return out + q['b2']

  with pytest.raises(ValueError, match=r'times a constant 0\): other \(3, 2\)'):
    optax_path.path_normalize(apply_fn=apply_fn, input_shape=(2,)).init(params)


USE_FIRST = jnp.asarray(True)


def test_a_use_under_stop_gradient_still_counts_in_the_scales():
  """The scales are the gradient of the pass, which stop_gradient cut: w1 used twice,
  once under stop_gradient, got the scales of one use (4.0 where eq. 9 gives 8.0 with
  both, p = 2), while path_norm counted both. Expected: the same net without it."""

  def twice(stop):
    def apply_fn(q, x):
      w1 = jax.lax.stop_gradient(q['w1']) if stop else q['w1']
      return two_layers(q, x) + jax.nn.relu(x @ w1 + q['b1']) @ q['w2']

    return apply_fn

  got = optax_path.path_scales(PARAMS, apply_fn=twice(True), input_shape=(2,))
  want = optax_path.path_scales(PARAMS, apply_fn=twice(False), input_shape=(2,))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------- a second breaker's cases (carries)


def test_a_constant_initial_carry_enters_the_pass_as_its_magnitude():
  """h0 = -1 (a constant), h = relu(h @ wh + x_t @ wx), two steps: the scan passed -1 on
  and its relu cut the paths from it (phi_1 0.9 for 2.58 in the breaker's net, wh's scale
  0). Expected, p = 1: |-1| wh^2 wo + wx wh wo + wx wo, and the Python loop's value."""
  q = {k: v for k, v in RNN.items()}
  step = lambda q, h, xt: jax.nn.relu(h @ q['wh'] + xt[:, None] @ q['wx'])
  minus_one = lambda x: -jnp.ones((x.shape[0], 1))
  scanned, looped = scan_and_loop(step, minus_one, 2)
  want = 0.75 * (1.0 * 0.5**2 + 1.5 * 0.5 + 1.5)
  for apply_fn in (scanned, looped):
    np.testing.assert_allclose(
      optax_path.path_norm(q, 1.0, apply_fn=apply_fn, input_shape=(2,)), want, rtol=1e-6
    )


def counter_scan(body):
  """A scan whose carry holds a counter t = 0, 1, 2 beside the state h."""

  def apply_fn(q, x):
    def step(carry, xt):
      t, h = carry
      return (t + 1.0, body(q, t, h, xt[:, None] @ q['wx'])), None

    h0 = jnp.zeros((x.shape[0], 1))
    (_, h), _ = jax.lax.scan(step, (jnp.zeros(()), h0), jnp.swapaxes(x, 0, 1))
    return h @ q['wo']

  return apply_fn


def test_a_counter_in_the_carry_is_checked_in_every_round_and_carries_are_units():
  """The fixed point compared kinds, not values, so the body was checked only with t = 0:
  h + (t u) u (a product of activations), where(u > t, u, 0) (a threshold) and
  tanh(t u) got through, and h + t u was refused ('on no path'). Two carries were one
  unit to the check, so where(a > 0, b, 0) between them got through as a ReLU."""
  q = {'wx': RNN['wx'], 'wo': RNN['wo']}
  weighted = counter_scan(lambda q, t, h, u: h + t * u)
  want = (0 + 1 + 2) * 1.5 * 0.75  # x_t reaches the output with weight t |wx| |wo|
  np.testing.assert_allclose(
    optax_path.path_norm(q, 1.0, apply_fn=weighted, input_shape=(3,)), want, rtol=1e-6
  )
  optax_path.path_normalize(apply_fn=weighted, input_shape=(3,)).init(q)
  for body, pattern in (
    (lambda q, t, h, u: h + (t * u) * u, 'product of two activations'),
    (lambda q, t, h, u: h + jnp.where(u > t, u, 0.0), 'comparison of activations with a constant'),
    (lambda q, t, h, u: h + jnp.tanh(t * u), 'not positively homogeneous'),
  ):
    with pytest.raises(ValueError, match=pattern):
      optax_path.path_normalize(apply_fn=counter_scan(body), input_shape=(3,)).init(q)

  def two_carries(q, x):
    def step(carry, xt):
      a, b = carry
      u = xt[:, None] @ q['wx']
      return (jax.nn.relu(u), jnp.where(a > 0, b + u, 0.0)), None

    zeros = jnp.zeros((x.shape[0], 1))
    (_, b), _ = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return b @ q['wo']

  with pytest.raises(ValueError, match='testing another value'):
    optax_path.path_normalize(apply_fn=two_carries, input_shape=(3,)).init(q)
  halves = lambda h: jnp.where(jnp.split(h, [1], axis=-1)[0] > 0, h, 0.0)  # unit 0 gates all
  with pytest.raises(ValueError, match='testing another value'):
    optax_path.path_scales(PARAMS, apply_fn=middle(halves), input_shape=(2,))


def test_masks_and_placed_constants_that_would_cut_or_negate_paths_are_refused():
  """h * where(h < 0, 1, 0) (= min(h, 0)) gave phi 0 and zero updates; h * where(h > 0,
  -1, 0) (= -relu(h)) and h.at[i].set(-3) gave NaN. A constant added by scatter-add
  enters as |c|, as a plain + c does (NaN before)."""
  for act in (
    lambda h: h * jnp.where(h < 0, 1.0, 0.0),
    lambda h: h * jnp.where(h > 0, -1.0, 0.0),
  ):
    with pytest.raises(ValueError, match='mask of constants that is not positive'):
      optax_path.path_scales(PARAMS, apply_fn=middle(act), input_shape=(2,))
  for act in (
    lambda h: jax.nn.relu(h).at[:, 1].set(-3.0),
    lambda h: jax.lax.dynamic_update_slice(jax.nn.relu(h), jnp.full((1, 1), -3.0), (0, 1)),
  ):
    with pytest.raises(ValueError, match='constant other than 0 put in place'):
      optax_path.path_scales(PARAMS, apply_fn=middle(act), input_shape=(2,))
  added = middle(lambda h: jax.nn.relu(h).at[:, 1].add(-3.0))
  plain = middle(lambda h: jax.nn.relu(h) + jnp.array([0.0, -3.0, 0.0]))
  for p in (1.0, 2.0):
    got = optax_path.path_norm(PARAMS, p, apply_fn=added, input_shape=(2,))
    np.testing.assert_allclose(
      got, optax_path.path_norm(PARAMS, p, apply_fn=plain, input_shape=(2,)), rtol=1e-6
    )
    assert np.isfinite(float(got))
  stacked = middle(lambda h: jnp.stack([jax.nn.relu(h), jax.nn.relu(h)]).sum(0))
  summed = middle(lambda h: jax.nn.relu(h) + jax.nn.relu(h))
  np.testing.assert_allclose(
    optax_path.path_norm(PARAMS, 1.0, apply_fn=stacked, input_shape=(2,)),
    optax_path.path_norm(PARAMS, 1.0, apply_fn=summed, input_shape=(2,)),
    rtol=1e-6,
  )


def test_a_relu_written_with_where_inside_shard_map_is_evaluated_as_before():
  """The pass now reads a NaN as inf in comparisons, a rewrite it cannot make inside
  shard_map; it refused jnp.where(z > 0, z, 0) there ('a substitution inside shard_map'),
  which it evaluated rightly before. Expected: the net without shard_map."""
  mesh = jax.make_mesh((1,), ('d',))
  spec = jax.sharding.PartitionSpec()

  def body(x, w1, w2):
    z = x @ w1
    return jnp.where(z > 0, z, 0.0) @ w2

  def sharded(q, x):
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(x, q['w1'], q['w2'])

  params = {'w1': PARAMS['w1'], 'w2': PARAMS['w2']}
  plain = lambda q, x: body(x, q['w1'], q['w2'])
  for p in (1.0, 2.0):
    got = optax_path.path_scales(params, p, apply_fn=sharded, input_shape=(2,))
    want = optax_path.path_scales(params, p, apply_fn=plain, input_shape=(2,))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_inside_shard_map_the_pass_makes_its_substitutions_as_outside():
  """The body of a shard_map is evaluated with every substitution, over the same mesh.
  Before, the pass left comparisons there as they were: where it overflowed (a weight of
  1e20 to the power 2, times a row of zeros: NaN), jnp.where(z > 0, z, 0) set the NaN to
  0, and path_norm came out 0 and the first kernel's scales 0 where the network's are
  inf; and a max, a difference or a constant factor inside shard_map was refused.
  Expected: the net without shard_map."""
  mesh = jax.make_mesh((1,), ('d',))
  spec = jax.sharding.PartitionSpec()
  w2 = jnp.array([[1.0, -0.5, 2.0], [0.5, 1.5, -1.0], [-2.0, 1.0, 0.25]])
  finite = {'w1': PARAMS['w1'], 'w2': w2, 'w3': PARAMS['w2']}
  overflow = dict(finite, w1=finite['w1'].at[0, 0].set(1e20), w2=finite['w2'].at[0].set(0.0))
  pools = {'none': lambda h: h, 'max, difference': lambda h: jnp.maximum(h, h[:, ::-1]) - 0.5 * h}
  for pool, params in itertools.product(pools.values(), (finite, overflow)):

    def body(x, w1, w2, w3, pool=pool):
      z = jax.nn.relu(x @ w1) @ w2
      return pool(jnp.where(z > 0, z, 0.0)) @ w3

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    sharded = lambda q, x, mapped=mapped: mapped(x, q['w1'], q['w2'], q['w3'])
    plain = lambda q, x, body=body: body(x, q['w1'], q['w2'], q['w3'])
    for p in (1.0, 2.0):
      got = optax_path.path_scales(params, p, apply_fn=sharded, input_shape=(2,))
      want = optax_path.path_scales(params, p, apply_fn=plain, input_shape=(2,))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
      norm = optax_path.path_norm(params, p, apply_fn=sharded, input_shape=(2,))
      assert np.isinf(float(norm)) == (params is overflow and p == 2.0)


def test_tiles_subtractions_into_entries_and_composites_are_linear():
  """jnp.tile (a primitive of its own in today's JAX) and h.at[i].subtract(g) were
  refused as nonlinearities, and a max inside lax.composite as 'not inside composite'.
  Expected: the same maps written with concatenate, .at[i].add (a difference counts the
  paths of both) and no composite."""
  cases = {
    'tile': (lambda h: jnp.tile(h, (1, 2)), lambda h: jnp.concatenate([h, h], 1)),
    '.at[].subtract': (
      lambda h: h.at[:, 1].subtract(h[:, 0]).at[:, 2].subtract(0.5),
      lambda h: h.at[:, 1].add(h[:, 0]).at[:, 2].add(0.5),
    ),
    'composite': (
      lambda h: jax.lax.composite(lambda a: jnp.maximum(a, a[:, ::-1]), name='test.pool')(h),
      lambda h: jnp.maximum(h, h[:, ::-1]),
    ),
  }
  for name, (op, reference) in cases.items():
    width = 6 if name == 'tile' else 3
    params = {**PARAMS, 'w2': jnp.tile(PARAMS['w2'], (width // 3, 1))}
    got, want = (middle(lambda h, f=f: f(jax.nn.relu(h))) for f in (op, reference))
    x = jnp.array([[0.3, -1.2], [2.0, 0.7]])
    np.testing.assert_allclose(
      got(params, x), want(params, x) if name == 'composite' else got(params, x), rtol=1e-6
    )
    for p in (1.0, 2.0):
      a = optax_path.path_scales(params, p, apply_fn=got, input_shape=(2,))
      b = optax_path.path_scales(params, p, apply_fn=want, input_shape=(2,))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, err_msg=name)


def test_a_flax_apply_given_as_apply_fn_is_told_to_take_the_params_tree():
  """model.apply takes Flax's variables ({'params': ...}); apply_fn takes the params tree.
  The message led with input_shape, which was right; it now says how to wrap it."""
  model = Net('relu')
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  with pytest.raises(ValueError, match=r"lambda q, x: model.apply\(\{'params': q\}, x\)"):
    optax_path.path_norm(params, apply_fn=model.apply, input_shape=(3,))
  with pytest.raises(ValueError, match='apply_fn failed') as raised:
    optax_path.path_norm(
      params, apply_fn=lambda q, x: model.apply({'params': q}, x), input_shape=(4,)
    )
  assert "Flax's variables" not in str(raised.value)  # the hint only where it applies


def test_a_leaf_passed_into_a_call_but_unused_there_is_named_as_unused():
  """A leaf handed to a jit, shard_map, cond or scan whose bodies never read it was
  reported as used 'only on branches that the |theta|^p pass never takes' (PReLU,
  lax.cond advice): such an equation counted as using every operand. Expected: the
  message for an unused leaf."""
  mesh = jax.make_mesh((1,), ('d',))
  spec = jax.sharding.PartitionSpec()
  body = lambda x, w1, v: jax.nn.relu(x @ w1)
  calls = {
    'jit': jax.jit(body),
    'shard_map': jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec),
    'cond': lambda x, w1, v: jax.lax.cond(True, body, lambda *a: body(*a) * 2, x, w1, v),
    'scan': lambda x, w1, v: jax.lax.scan(lambda h, _: (body(h, w1, v), None), x, None, 1)[0],
  }
  params = {'w1': PARAMS['w1'][:, :2], 'v': PARAMS['b2']}  # square: a scan's carry
  for call in calls.values():
    net = lambda q, x, call=call: call(x, q['w1'], q['v'])
    with pytest.raises(ValueError, match=r'apply_fn does not use these params leaves: v \(2,\)'):
      optax_path.path_scales(params, apply_fn=net, input_shape=(2,))
    used = lambda q, x, call=call: call(x, q['w1'], q['v']) + q['v'].sum()
    optax_path.path_scales(params, apply_fn=used, input_shape=(2,))  # read outside: used


LINEAR_MAPS = {  # fixed linear maps of activations, each weight on its own edge (no cancelling)
  'tile': lambda h: jnp.tile(h, (1, 2)),
  'repeat': lambda h: jnp.repeat(h, 2, axis=1),
  'roll': lambda h: jnp.roll(h, 1, axis=1),
  'pad reflect': lambda h: jnp.pad(h, ((0, 0), (1, 1)), mode='reflect')[:, 1:5],
  'pad edge': lambda h: jnp.pad(h, ((0, 0), (2, 2)), mode='edge'),
  'take': lambda h: jnp.take(h, jnp.array([3, 2, 1, 0]), axis=1),
  'cumsum': lambda h: jnp.cumsum(h, 1),
  'reverse cumsum': lambda h: jax.lax.cumsum(h, axis=1, reverse=True),
  'plus mean': lambda h: h + jnp.mean(h, 1, keepdims=True),
  'diff': lambda h: jnp.concatenate([jnp.diff(h, axis=1), h[:, :1]], 1),
  'constant mask': lambda h: h * (jnp.arange(4) > 1),
  'resize nearest': lambda h: jax.image.resize(h, (h.shape[0], 8), 'nearest'),
  'resize cubic': lambda h: jax.image.resize(h, (h.shape[0], 8), 'cubic'),
  'kron': lambda h: jnp.kron(h, jnp.ones((1, 2))),
  'dynamic slice': lambda h: jax.lax.dynamic_slice_in_dim(jnp.concatenate([h, h], 1), 2, 4, 1),
  'convolve': lambda h: jnp.convolve(h[0], jnp.array([1.0, -2.0]), mode='same')[None],
  'signed matrix': lambda h: h @ (jnp.tril(jnp.ones((4, 4))) - 2 * jnp.eye(4)),
  'scatter set': lambda h: jnp.zeros_like(h).at[:, jnp.array([1, 0, 3, 2])].set(h),
  '.at[].subtract': lambda h: h.at[:, 1].subtract(h[:, 0]),
  'average pool': lambda h: jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2), (1, 1), 'SAME') / 2,
  'segment_sum': lambda h: jax.ops.segment_sum(h.T, jnp.array([0, 0, 2, 3]), 4).T,
  'reversed minus': lambda h: h[:, ::-1] - h,
  'fori_loop': lambda h: jax.lax.fori_loop(0, 2, lambda i, a: jnp.roll(a, 1, 1) + a, h),
  'lax.map': lambda h: jax.lax.map(lambda r: r * jnp.array([1.0, -1.0, 2.0, 0.5]), h),
  '.at[].multiply': lambda h: h.at[:, jnp.array([1, 1, 2])].multiply(jnp.array([-2.0, 3.0, 0.5])),
  '.at[].multiply by 0': lambda h: h.at[:, 3].multiply(0.0),
}


@pytest.mark.parametrize('name', sorted(LINEAR_MAPS))
def test_a_fixed_linear_map_of_activations_is_the_matrix_of_its_magnitudes(name):
  """A linear map between two layers, written with jnp or lax ops, against the same net
  with the map as one matrix: M = the Jacobian of the map, entering as |M| (each weight
  is on its own edge here, so no path cancels another). Float64, p = 1 and 2."""
  rng = np.random.default_rng(0)
  cut = lambda y: y.reshape(y.shape[0], -1)[:, :4]
  op = LINEAR_MAPS[name]
  with jax.enable_x64(True):
    params = {
      'w1': jnp.asarray(rng.normal(size=(3, 4))),
      'w2': jnp.asarray(rng.normal(size=(4, 2))),
    }
    jacobian = jax.jacobian(lambda h: cut(op(h))[0])(jnp.full((1, 4), 0.7))[:, 0, :].T
    net = lambda q, x: cut(op(jax.nn.relu(x @ q['w1']))) @ q['w2']
    matrix = lambda q, x: jax.nn.relu(x @ q['w1']) @ jnp.abs(jacobian) @ q['w2']
    for p in (1.0, 2.0):
      got = optax_path.path_scales(params, p, apply_fn=net, input_shape=(3,))
      want = optax_path.path_scales(params, p, apply_fn=matrix, input_shape=(3,))
      for key in params:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(
      optax_path.path_norm(params, apply_fn=net, input_shape=(3,)),
      optax_path.path_norm(params, apply_fn=matrix, input_shape=(3,)),
      rtol=1e-12,
    )


THREE = {  # a 3-4-4-2 net
  'w1': jnp.array([[0.5, -1.5, 2.0, 0.3], [1.0, 0.25, -3.0, -0.7], [-0.2, 0.9, 0.4, 1.1]]),
  'w2': jnp.array(
    [[1.0, -2.0, 0.5, 0.1], [0.5, 1.5, -0.3, 2.0], [-0.75, 2.0, 1.2, -0.4], [0.3, 0.2, -1.0, 0.6]]
  ),
  'w3': jnp.array([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75], [0.5, 0.5]]),
}


def three(act, mid=lambda h: h):
  return lambda q, x: act(mid(act(x @ q['w1'])) @ q['w2']) @ q['w3']


def assert_same_scales(params, net, reference, ps=(1.0, 2.0), rtol=1e-6):
  for p in ps:
    got = optax_path.path_scales(params, p, apply_fn=net, input_shape=(3,))
    want = optax_path.path_scales(params, p, apply_fn=reference, input_shape=(3,))
    for key in params:
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=key)


def test_custom_derivatives_do_not_change_the_scales():
  """The scales are the gradient of the path polynomial, not of the derivatives a user
  chose. Before, the pass kept custom_vjp/custom_jvp rules: a gradient reversal layer
  (backward -0.5 g, as in domain-adversarial training) gave NaN scales for w2 and a
  quarter of w1's, a negated tangent NaN, a jvp that ignores dw scales 0. Expected: the
  net without them."""

  @jax.custom_vjp
  def reverse(h):
    return h

  reverse.defvjp(lambda h: (h, None), lambda _, g: (-0.5 * g,))

  @jax.custom_jvp
  def negated(h):
    return h

  negated.defjvp(lambda primals, tangents: (primals[0], -tangents[0]))

  @jax.custom_jvp
  def layer(h, w):
    return jax.nn.relu(h @ w)

  layer.defjvp(lambda primals, tangents: (layer(*primals), tangents[0] @ primals[1]))
  plain = three(jax.nn.relu)
  assert_same_scales(THREE, lambda q, x: reverse(three(jax.nn.relu, reverse)(q, x)), plain)
  assert_same_scales(THREE, three(jax.nn.relu, negated), plain)
  assert_same_scales(THREE, lambda q, x: layer(layer(x, q['w1']), q['w2']) @ q['w3'], plain)


@pytest.mark.parametrize(
  'relu',
  ['jax.nn.relu', 'jnp.maximum', 'jnp.where', 'h * (h > 0)', 'lax.clamp', 'abs of relu'],
)
def test_a_unit_with_all_incoming_weights_zero_has_the_scales_of_the_graph(relu):
  """A hidden layer initialised (or pruned) to zeros: its units are exactly 0 on the
  pass, where ReLU's derivative is 0 (0.5 for jnp.maximum, a tie). Before, their
  incoming edges got scale 0 (or half) instead of gamma_in(u) gamma_out(v), so Path-SGD
  took twice the step there (jnp.maximum) or divided by 0. Expected: the MLP mode's
  scales, computed by its own passes over the kernels (no activation in them)."""
  act = {
    'jax.nn.relu': jax.nn.relu,
    'jnp.maximum': lambda h: jnp.maximum(h, 0.0),
    'jnp.where': lambda h: jnp.where(h > 0, h, 0.0),
    'h * (h > 0)': lambda h: h * (h > 0),
    'lax.clamp': lambda h: jax.lax.clamp(0.0, h, jnp.inf),
    'abs of relu': lambda h: jnp.abs(jax.nn.relu(h)),
  }[relu]
  rng = np.random.default_rng(0)
  layers = {
    'Dense_0': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=4)},
    'Dense_1': {'kernel': np.zeros((4, 4)), 'bias': np.zeros(4)},
    'Dense_2': {'kernel': rng.normal(size=(4, 2)), 'bias': rng.normal(size=2)},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layers)

  def net(q, x):
    for i in range(3):
      x = x @ q[f'Dense_{i}']['kernel'] + q[f'Dense_{i}']['bias']
      x = act(x) if i < 2 else x
    return x

  for p in (1.0, 2.0):
    got = optax_path.path_scales(params, p, apply_fn=net, input_shape=(3,))
    want = optax_path.path_scales(params, p)  # the MLP mode
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5)
    assert float(jnp.min(got['Dense_1']['kernel'])) > 0


def test_a_running_max_from_minus_inf_in_a_loop_is_a_max_pool_over_time():
  """A max over time written as a scan or fori_loop from -inf (a min from +inf): the
  initial carry entered the pass as |-inf| = inf, so path_norm and every scale were inf
  (every update 0). Expected: jnp.max / jnp.min over time."""
  relu = jax.nn.relu

  def over_time(pool, init):
    def net(q, x):  # x: (batch, 3 steps, 3)
      hs = relu(jnp.einsum('btd,dh->tbh', x, q['w1']))
      m = jax.lax.scan(lambda m, h: (pool(m, h), None), jnp.full(hs.shape[1:], init), hs)[0]
      return relu(m @ q['w2']) @ q['w3']

    return net

  def reduced(pool):
    return lambda q, x: (
      relu(pool(relu(jnp.einsum('btd,dh->tbh', x, q['w1'])), 0) @ q['w2']) @ q['w3']
    )

  for pool, init, reference in ((jnp.maximum, -jnp.inf, jnp.max), (jnp.minimum, jnp.inf, jnp.min)):
    net = over_time(pool, init)
    for p in (1.0, 2.0):
      got = optax_path.path_scales(THREE, p, apply_fn=net, input_shape=(3, 3))
      want = optax_path.path_scales(THREE, p, apply_fn=reduced(reference), input_shape=(3, 3))
      for key in THREE:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
      norm = optax_path.path_norm(THREE, p, apply_fn=net, input_shape=(3, 3))
      assert np.isfinite(float(norm))


def test_a_leaf_cut_off_by_a_constant_the_check_cannot_read_is_refused():
  """A lax.cond whose predicate, or a mask whose zeros, scope cannot compute (over
  2^20 entries, a loop counter): it took every branch as possible,
  and the leaf on no path was accepted with scale 0 everywhere. Now the pass with every
  parameter 1 finds it. A mask of such constants that cuts nothing is accepted, with the
  scales of the net without it."""
  relu = jax.nn.relu
  params = {**THREE, 'w4': THREE['w2'][::-1]}

  def choosing(predicate):
    def net(q, x):
      h = relu(x @ q['w1'])
      h = jax.lax.cond(predicate(), lambda h: relu(h @ q['w2']), lambda h: relu(h @ q['w4']), h)
      return h @ q['w3']

    return net

  def counted(q, x):
    h = relu(x @ q['w1'])
    step = lambda i, h: jax.lax.cond(
      i > 100, lambda h: relu(h @ q['w4']), lambda h: relu(h @ q['w2']), h
    )
    return jax.lax.fori_loop(0, 2, step, h) @ q['w3']

  def masked(mask):
    return lambda q, x: relu(relu(x @ q['w1']) @ (q['w4'] * mask())) @ q['w3'] + three(relu)(q, x)

  refused = {
    'large predicate': choosing(lambda: jnp.ones((1100, 1000)).sum() > 0),
    'loop counter': counted,
    'large zeros': masked(lambda: jnp.zeros((1100, 1000))[:4, :4]),
  }
  for net in refused.values():
    for call in (
      lambda net=net: optax_path.path_scales(params, apply_fn=net, input_shape=(3,)),
      lambda net=net: optax_path.path_normalize(apply_fn=net, input_shape=(3,)).init(params),
    ):
      with pytest.raises(ValueError, match=r'on no path of the network: w4 \(4, 4\)'):
        call()
  ones = masked(lambda: jnp.ones((1100, 1000))[:4, :4])
  reference = lambda q, x: relu(relu(x @ q['w1']) @ q['w4']) @ q['w3'] + three(relu)(q, x)
  assert_same_scales(params, ones, reference)


def test_a_fixed_mask_of_minus_inf_before_a_max_is_no_unit():
  """jnp.max(h, where=mask, initial=0) (a masked global max pool, as over padded sets)
  puts -inf where the mask is off, and was refused as 'a constant other than 0 chosen in
  place of activations', though jnp.where(mask, h, 0).max() was accepted. Expected: the
  scales of the latter. An empty row's -inf must still be set to 0 before it is used."""
  relu = jax.nn.relu
  params = {'w1': THREE['w1'], 'w2': THREE['w3'][:2]}
  mask = jnp.array([[True, False], [True, True]])
  empty = jnp.array([[False, False], [True, True]])

  def pooled(pool):
    return lambda q, x: pool(relu(x @ q['w1']).reshape(-1, 2, 2)) @ q['w2']

  reference = pooled(lambda h: jnp.where(mask, h, 0.0).max(2))
  for pool in (
    lambda h: jnp.where(mask, h, -jnp.inf).max(2),
    lambda h: jnp.max(h, axis=2, where=mask, initial=0.0),
    lambda h: -jnp.where(mask, -h, jnp.inf).min(2),
  ):
    assert_same_scales(params, pooled(pool), reference)
  for guard in (
    lambda s: jnp.maximum(s, 0.0),
    lambda s: jnp.where(jnp.isfinite(s), s, 0.0),
    lambda s: jnp.nan_to_num(s, neginf=0.0),
  ):
    guarded = pooled(lambda h, guard=guard: guard(jnp.where(empty, h, -jnp.inf).max(2)))
    assert_same_scales(params, guarded, pooled(lambda h: jnp.where(empty, h, 0.0).max(2)))
  for pool in (
    lambda h: jnp.where(empty, h, -jnp.inf).max(2),  # -inf @ w2
    lambda h: jnp.where(mask, h, -jnp.inf).sum(2),
  ):
    with pytest.raises(ValueError, match='inf'):
      optax_path.path_scales(params, apply_fn=pooled(pool), input_shape=(3,))


def test_a_cond_on_a_python_bool_is_the_branch_it_takes():
  """lax.cond(False, out_of_scope, relu, h), as a model's eval flag: scope refused what
  the branch never taken computes (a random draw; argmax, by the pass, which evaluated
  every branch). Expected: the net of the branch taken; out of scope when taken."""
  relu = jax.nn.relu
  picked = lambda h: jax.nn.one_hot(jnp.argmax(h, -1), 4)
  noisy = lambda h: h + jax.random.normal(jax.random.key(0), h.shape)
  for other in (picked, noisy, jax.nn.gelu):
    assert_same_scales(
      THREE, three(relu, lambda h, o=other: jax.lax.cond(False, o, relu, h)), three(relu)
    )
    with pytest.raises(ValueError, match='apply_fn'):
      optax_path.path_scales(
        THREE,
        apply_fn=three(relu, lambda h, o=other: jax.lax.cond(True, o, relu, h)),
        input_shape=(3,),
      )


def test_random_draws_in_apply_fn_are_refused():
  """Dropout left on in apply_fn (Linen deterministic=False, NNX Rngs made in the call)
  was accepted: the scales were those of one thinned network (18 of 24 first-layer
  scales 0, the rest 2x; those weights never trained). So were noise, stochastic depth
  and masks drawn from a key. Expected: a ValueError saying to use eval mode."""
  relu = jax.nn.relu
  key = jax.random.key(3)

  class Linen(nn.Module):
    deterministic: bool

    @nn.compact
    def __call__(self, x):
      h = nn.Dropout(0.5, deterministic=self.deterministic)(nn.relu(nn.Dense(8)(x)))
      return nn.Dense(2)(h)

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
      self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs=None):
      h = self.drop(nnx.relu(self.l1(x)), deterministic=rngs is None, rngs=rngs)
      return self.l2(h)

  linen = Linen(True).init(key, jnp.ones((1, 3)))['params']
  graphdef, state = nnx.split(NNX(nnx.Rngs(0)))
  nets = {
    'linen dropout': (
      linen,
      lambda d: lambda q, x: Linen(d).apply({'params': q}, x, rngs={'dropout': key}),
    ),
    'nnx dropout': (
      state,
      lambda d: lambda s, x: nnx.merge(graphdef, s)(x, rngs=None if d else nnx.Rngs(dropout=3)),
    ),
  }
  for params, net in nets.values():
    optax_path.path_scales(params, apply_fn=net(True), input_shape=(3,))  # eval mode: taken
    with pytest.raises(ValueError, match=r'draws random numbers.*dropout.*eval mode'):
      optax_path.path_scales(params, apply_fn=net(False), input_shape=(3,))
    with pytest.raises(ValueError, match=r'draws random numbers'):
      optax_path.path_normalize(apply_fn=net(False), input_shape=(3,)).init(params)
  drawn = {
    'noise': three(relu, lambda h: h + 0.1 * jax.random.normal(key, h.shape)),
    'mask from a key': three(relu, lambda h: h * (jax.random.uniform(key, (4,)) > 0.5)),
    'stochastic depth': three(
      relu, lambda h: jax.lax.cond(jax.random.bernoulli(key), lambda h: h, jnp.zeros_like, h)
    ),
    'zeros from a key': three(relu, lambda h: h * (jax.random.uniform(key, (4,)) * 0.0)),
  }
  for net in drawn.values():
    with pytest.raises(ValueError, match=r'draws random numbers'):
      optax_path.path_scales(THREE, apply_fn=net, input_shape=(3,))
  noisy = lambda h: h + 0.1 * jax.random.normal(key, h.shape)
  off = three(relu, lambda h: jax.lax.cond(False, noisy, lambda h: h, h))  # a fixed flag
  assert_same_scales(THREE, off, three(relu))


def test_more_idioms_a_breaker_tried():
  """A loop of no rounds returns its initial carry (fori_loop(0, 0, ..., w2) is w2: it
  said 'does not use w2'); jax.debug.print was refused as a nonlinearity (it returns
  nothing; dropped from the pass); h.at[i].multiply(c) was refused (now: h times |c| at
  i), c.at[i].multiply(h) is; a leaf feeding only a scan's discarded outputs is named as
  unused."""
  relu = jax.nn.relu
  loop = lambda q, x: (
    relu(relu(x @ q['w1']) @ jax.lax.fori_loop(0, 0, lambda i, c: jnp.ones_like(c), q['w2']))
    @ q['w3']
  )
  assert_same_scales(THREE, loop, three(relu))

  def printing(q, x):
    h = relu(x @ q['w1'])
    jax.debug.print('h = {h}', h=h)
    return relu(h @ q['w2']) @ q['w3']

  assert_same_scales(THREE, printing, three(relu))
  multiplied = three(relu, lambda h: h.at[:, 1].multiply(-1.0))
  assert_same_scales(THREE, multiplied, three(relu))
  into_constant = three(relu, lambda h: jnp.ones_like(h).at[:, 1].multiply(h[:, 0]))
  with pytest.raises(ValueError, match=r'activations multiplied into entries'):
    optax_path.path_scales(THREE, apply_fn=into_constant, input_shape=(3,))
  gains = {**THREE, 'gain': jnp.array([2.0, -1.0])}  # a learned gain of units 1 and 3
  idx = jnp.array([1, 3])
  placed = lambda h, q: h.at[:, idx].multiply(q['gain'], unique_indices=True)
  set_ = lambda h, q: h * jnp.ones(4).at[idx].set(q['gain'])
  with_gain = lambda mid: lambda q, x: relu(mid(relu(x @ q['w1']), q) @ q['w2']) @ q['w3']
  assert_same_scales(gains, with_gain(placed), with_gain(set_))
  repeating = lambda h, q: h.at[:, idx].multiply(q['gain'])  # JAX cannot differentiate it
  with pytest.raises(ValueError, match=r'indices that may repeat.*unique_indices=True'):
    optax_path.path_scales(gains, apply_fn=with_gain(repeating), input_shape=(3,))
  overflowing = {**THREE, 'w1': THREE['w1'].at[:, 0].set(1e30)}  # unit 0: inf on the pass
  cut = three(relu, lambda h: h.at[:, 0].multiply(0.0))  # inf * 0 would be NaN
  masked = three(relu, lambda h: h * jnp.array([0.0, 1.0, 1.0, 1.0]))
  assert_same_scales(overflowing, cut, masked)
  assert np.isfinite(optax_path.path_norm(overflowing, apply_fn=cut, input_shape=(3,)))

  def discarded(q, x):
    h = relu(x @ q['w1'])
    _, _ys = jax.lax.scan(lambda c, _: (c, c @ q['w4']), h, None, length=2)
    return relu(h @ q['w2']) @ q['w3']

  with pytest.raises(ValueError, match=r'does not use these params leaves: w4 \(4, 4\)'):
    optax_path.path_scales({**THREE, 'w4': THREE['w2']}, apply_fn=discarded, input_shape=(3,))


def test_a_second_breaker_round_on_the_minus_inf_of_empty_segments():
  """Found by a helper after the tracking landed, each accepted with wrong scales or
  refused wrongly. Refused now: a min that passes one member's -inf on (the network is
  -inf there, the pass sums the other member in: w1 scales 52.5 for 42), a min over nodes
  and a scatter-min of a segment_max, a test moved before it chooses, an add into a -inf
  constant (phi inf), a generic reduce_window over a window of padding alone (b scales
  26.25 for 15.75). Accepted, equal to the sum-pool reference: a max with a gather that
  fills -inf out of range (the pass filled -inf: b 26.25 for 31.5), a guard by a constant
  count of members, and a ReLU mapped over the nodes by lax.map (refused before)."""
  params = jax.tree.map(jnp.asarray, GRAPH_PARAMS)
  ids = jnp.asarray(SPARSE)
  members = (ids[None, :] == jnp.arange(4)[:, None]).astype(jnp.float32)
  seg = jax.vmap(lambda hb: jax.ops.segment_max(hb, ids, num_segments=4))
  fin = lambda s: jnp.where(jnp.isfinite(s), s, 0.0)
  net = lambda pool: lambda q, x: jax.nn.relu(pool(jax.nn.relu(x @ q['w1'])) + q['b']) @ q['w2']
  scales = lambda f: optax_path.path_scales(params, apply_fn=f, input_shape=(6, 2))
  padding = ((0, 0), (2, 2), (0, 0))
  refused = {
    'passes on the -inf': lambda h: fin(jnp.minimum(seg(h), h[:, :4])),
    'a min over nodes': lambda h: fin(jnp.min(seg(h), axis=1, keepdims=True)),
    'scatter-min': lambda h: fin(
      jax.vmap(lambda r: jnp.zeros((2, 4)).at[jnp.array([0, 0, 1, 1])].min(r))(seg(h))
    ),
    'moved test': lambda h: fin(jnp.where(jnp.flip(jnp.isfinite(seg(h)), 1), seg(h), 0.0)),
    'add into -inf': lambda h: fin(
      jax.vmap(
        lambda r: (
          (jnp.array([[0.0], [-jnp.inf], [0.0], [-jnp.inf]]) * jnp.ones((1, 4))).at[ids].add(r)
        )
      )(h)
    ),
    'generic reduce_window': lambda h: jax.lax.reduce_window(
      h, -jnp.inf, jnp.maximum, (1, 2, 1), (1, 2, 1), padding
    ),
  }
  for name, pool in refused.items():
    with pytest.raises(ValueError, match='-inf|infinite constant'):
      scales(net(pool))
  shifted = jnp.arange(1, 7)  # 6 is out of range
  accepted = {
    'gather fill -inf': (
      lambda h: jnp.maximum(h, h.at[:, shifted].get(mode='fill', fill_value=-jnp.inf)),
      lambda h: h + h.at[:, shifted].get(mode='fill', fill_value=0.0),
    ),
    'a constant count': (
      lambda h: jnp.where(
        jax.ops.segment_sum(jnp.ones(6), ids, num_segments=4)[None, :, None] > 0, seg(h), 0.0
      ),
      lambda h: members @ h,
    ),
    'lax.map relu': (
      lambda h: jax.lax.map(jax.nn.relu, seg(h)[0])[None],
      lambda h: members @ h,
    ),
  }
  for name, (pool, reference) in accepted.items():
    got, want = scales(net(pool)), scales(net(reference))
    for leaf in params:
      np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, err_msg=f'{name}: {leaf}')


def test_a_max_pool_that_starts_from_a_constant_is_a_clip():
  """lax.reduce_window(h, 5.0, jnp.maximum, ...) is max(5, window): a clip, no max pool.
  It was accepted, its phi that of the max pool from -inf. Expected: refused; from 0 (a
  ReLU of the pool) or -inf, accepted, equal."""

  def net(init):
    return lambda q, x: (
      jax.lax.reduce_window(
        jax.nn.relu(x @ q['w1']), init, jnp.maximum, (1, 2, 1), (1, 2, 1), 'VALID'
      )
      @ q['w2']
    )

  params = {'w1': PARAMS['w1'], 'w2': PARAMS['w2']}
  norms = [
    optax_path.path_norm(params, apply_fn=net(c), input_shape=(4, 2)) for c in (-jnp.inf, 0.0)
  ]
  np.testing.assert_allclose(norms[0], norms[1], rtol=1e-6)
  with pytest.raises(ValueError, match='starts from a constant other than 0'):
    optax_path.path_norm(params, apply_fn=net(5.0), input_shape=(4, 2))


def test_segment_ids_not_known_when_checked_still_leave_a_minus_inf():
  """Ids that a lax.scan slices from its xs are not known to the check. The -inf of the
  empty nodes was then dropped: relu(s + b) was accepted with b scales twice the
  network's (21.0 for 10.5: 2 of the 4 nodes are empty). Expected: refused unguarded, as
  with the ids closed over; guarded, equal to the fixed 0/1 matrix."""
  params = jax.tree.map(jnp.asarray, GRAPH_PARAMS)
  ids = jnp.asarray(SPARSE)
  members = (ids[None, :] == jnp.arange(4)[:, None]).astype(jnp.float32)

  def net(guard):
    def apply_fn(q, x):
      h = jax.nn.relu(x @ q['w1'])
      pool = jax.vmap(lambda hb, i: jax.ops.segment_max(hb, i, num_segments=4), (0, None))
      s = jax.lax.scan(lambda c, i: (c, pool(h, i)), 0.0, ids[None])[1][0]
      return jax.nn.relu(guard(s) + q['b']) @ q['w2']

    return apply_fn

  with pytest.raises(ValueError, match='-inf where a segment_max'):
    optax_path.path_scales(params, apply_fn=net(lambda s: s), input_shape=(6, 2))
  got = optax_path.path_scales(
    params, apply_fn=net(lambda s: jnp.where(jnp.isfinite(s), s, 0.0)), input_shape=(6, 2)
  )
  reference = lambda q, x: jax.nn.relu(members @ jax.nn.relu(x @ q['w1']) + q['b']) @ q['w2']
  want = optax_path.path_scales(params, apply_fn=reference, input_shape=(6, 2))
  for leaf in params:
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, err_msg=leaf)
