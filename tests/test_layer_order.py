"""Never the wrong network: the layer order, masked layers and checks at the door.

Every expected value comes from an explicit enumeration of the paths of the network as it
really is (its true layer order), in float64, never from the code under test.
"""

import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_path


def brute_force_scales(layers, p=2.0):
  """Path scales (eq. 9) of the MLP ``layers = [(kernel, bias or None), ...]`` in true
  order, by summing over every explicit path from an input or bias unit to an output."""
  layers = [(np.asarray(w, np.float64), None if b is None else np.asarray(b, np.float64))
            for w, b in layers]
  kernel_sums = [np.zeros(w.shape) for w, _ in layers]
  bias_sums = [None if b is None else np.zeros(b.shape) for _, b in layers]
  for start, (w0, b0) in enumerate(layers):
    sources = (list(range(w0.shape[0])) if start == 0 else []) + ([None] if b0 is not None else [])
    for source in sources:
      for route in itertools.product(*[range(w.shape[1]) for w, _ in layers[start:]]):
        edges = []  # (layer, source unit or None for the bias unit, target unit)
        unit = source
        for k, target in enumerate(route):
          edges.append((start + k, unit, target))
          unit = target
        magnitudes = [
          abs(layers[l][1][v] if u is None else layers[l][0][u, v]) ** p for l, u, v in edges
        ]
        for i, (l, u, v) in enumerate(edges):
          rest = np.prod(magnitudes[:i] + magnitudes[i + 1:])
          if u is None:
            bias_sums[l][v] += rest
          else:
            kernel_sums[l][u, v] += rest
  power = 2 / p
  return [(k ** power, None if b is None else b ** power) for k, b in zip(kernel_sums, bias_sums)]


def assert_scales(scales, params, order, p=2.0, rtol=1e-5):
  """``scales`` (a tree like ``params``) equal the brute force of ``params`` in ``order``."""
  layers = [(_get(params, path)['kernel'], _get(params, path).get('bias')) for path in order]
  for path, (kernel, bias) in zip(order, brute_force_scales(layers, p)):
    np.testing.assert_allclose(_get(scales, path)['kernel'], kernel, rtol=rtol, err_msg=path)
    if bias is not None:
      np.testing.assert_allclose(_get(scales, path)['bias'], bias, rtol=rtol, err_msg=path)


def _get(tree, path):
  for key in path.split('/'):
    tree = tree[int(key) if isinstance(tree, (list, tuple)) else key]
  return tree


def random_layer(rng, n_in, n_out, bias=True):
  layer = {'kernel': jnp.asarray(rng.uniform(0.5, 2.0, (n_in, n_out)), jnp.float32)}
  if bias:
    layer['bias'] = jnp.asarray(rng.uniform(0.5, 2.0, n_out), jnp.float32)
  return layer


AMBIGUOUS = 'cannot be read from params'


# --- 1. the order ----------------------------------------------------------------------


def test_two_square_layers_named_b_then_a():
  """The issue's case: meant as b then a; sorted names would put a first."""
  params = {'b': {'kernel': jnp.array([[3.0, 1.0], [1.0, 1.0]])}, 'a': {'kernel': jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=AMBIGUOUS + r".*\['a', 'b'\].*\['b', 'a'\].*layer_order"):
    optax_path.path_scales(params)
  with pytest.raises(ValueError, match=AMBIGUOUS):
    optax_path.path_sgd(0.1).init(params)
  assert_scales(optax_path.path_scales(params, layers=['b', 'a']), params, ['b', 'a'])


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(6)(x)


class AutoEncoder(nn.Module):
  """6 -> 5 -> 3 -> 5 -> 6; Flax names the submodules Encoder_0 and Decoder_0."""

  @nn.compact
  def __call__(self, x):
    return Decoder()(nn.relu(Encoder()(x)))


def linen_apply(model):
  return lambda q, x: model.apply({'params': q}, x)


@pytest.mark.slow
def test_linen_autoencoder_refuses_to_guess_and_layer_order_reads_the_model():
  model = AutoEncoder()
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))['params']
  assert sorted(params) == ['Decoder_0', 'Encoder_0']
  with pytest.raises(ValueError, match=AMBIGUOUS + '.*Encoder_0/Dense_0 \\(6, 5\\)'):
    optax_path.path_sgd(0.1).init(params)
  order = optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape=(6,))
  truth = ['Encoder_0/Dense_0', 'Encoder_0/Dense_1', 'Decoder_0/Dense_0', 'Decoder_0/Dense_1']
  assert order == truth
  assert_scales(optax_path.path_scales(params, layers=order), params, truth)

  # Theorem 4.1 on the test: rescale the latent unit 0 by 100; the Path-SGD step,
  # mapped back through the rescaling, is the same.
  x = jax.random.normal(jax.random.key(1), (8, 6))
  loss = lambda q: jnp.mean((model.apply({'params': q}, x) - x) ** 2)
  tx = optax_path.path_sgd(0.1, layers=order)
  rescaled = optax_path.rescale(params, 1, 0, 100.0, layers=order)

  def step(q):
    updates, _ = tx.update(jax.grad(loss)(q), tx.init(q), q)
    return optax.apply_updates(q, updates)

  mapped_back = optax_path.rescale(step(rescaled), 1, 0, 0.01, layers=order)
  for a, b in zip(jax.tree.leaves(step(params)), jax.tree.leaves(mapped_back)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


class SetupMLP(nn.Module):
  def setup(self):
    self.input = nn.Dense(64)
    self.hidden = nn.Dense(64)
    self.output = nn.Dense(10)

  def __call__(self, x):
    return self.output(nn.relu(self.hidden(nn.relu(self.input(x)))))


@pytest.mark.slow
def test_setup_mlp_with_names_input_hidden_output():
  model = SetupMLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 64)))['params']
  with pytest.raises(ValueError, match=AMBIGUOUS):
    optax_path.path_scales(params)
  order = optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape=(64,))
  assert order == ['input', 'hidden', 'output']
  small = {  # 64 -> 64 -> 64 -> 10 has too many paths to enumerate: 3 -> 4 -> 4 -> 2
    name: {'kernel': params[name]['kernel'][:n_in, :n_out], 'bias': params[name]['bias'][:n_out]}
    for name, n_in, n_out in (('input', 3, 4), ('hidden', 4, 4), ('output', 4, 2))
  }
  assert_scales(optax_path.path_scales(small, layers=order), small, order)


class NNXAutoEncoder(nnx.Module):
  def __init__(self, rngs):
    self.encoder = nnx.Linear(4, 4, rngs=rngs)
    self.decoder = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.decoder(nnx.relu(self.encoder(x)))


def test_nnx_encoder_decoder():
  graphdef, state = nnx.split(NNXAutoEncoder(nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match=AMBIGUOUS):
    optax_path.path_scales(state)
  order = optax_path.layer_order(
    state, apply_fn=lambda s, x: nnx.merge(graphdef, s)(x), input_shape=(4,)
  )
  assert order == ['encoder', 'decoder']
  pure = nnx.to_pure_dict(state)
  assert_scales(nnx.to_pure_dict(optax_path.path_scales(state, layers=order)), pure, order)


def test_numbered_family_is_ordered_by_number_after_jax_sorts_the_dicts():
  """Insertion order is not evidence: after tree.map and jit the keys are sorted."""
  rng = np.random.default_rng(0)
  widths = [2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2]  # 12 layers, all but two square
  params = {f'Dense_{l}': random_layer(rng, a, b) for l, (a, b) in enumerate(zip(widths, widths[1:]))}
  shuffled = {k: params[k] for k in sorted(params)}  # Dense_0, Dense_1, Dense_10, Dense_11, ...
  order = [f'Dense_{l}' for l in range(12)]
  via_jit = jax.jit(optax_path.path_scales)(jax.tree.map(lambda x: x, shuffled))
  explicit = optax_path.path_scales(params, layers=order)
  for a, b in zip(jax.tree.leaves(via_jit), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)


def test_nested_numbered_family():
  rng = np.random.default_rng(1)
  params = {
    f'Block_{i}': {f'Dense_{j}': random_layer(rng, 2, 2) for j in range(2)} for i in range(2)
  }
  order = ['Block_0/Dense_0', 'Block_0/Dense_1', 'Block_1/Dense_0', 'Block_1/Dense_1']
  assert_scales(optax_path.path_scales(params), params, order)


def test_unique_chain_of_shapes_is_used_whatever_the_names():
  rng = np.random.default_rng(2)
  params = {'0': random_layer(rng, 2, 3), 'head': random_layer(rng, 3, 1), 'z': random_layer(rng, 4, 2)}
  order = ['z', '0', 'head']  # 4 -> 2 -> 3 -> 1, the only chain
  assert_scales(optax_path.path_scales(params), params, order)


def test_numbers_that_compare_equal_decide_nothing():
  rng = np.random.default_rng(3)
  params = {'Dense_01': random_layer(rng, 2, 2), 'Dense_1': random_layer(rng, 2, 2)}
  with pytest.raises(ValueError, match=AMBIGUOUS):
    optax_path.path_scales(params)


def test_numbered_family_that_does_not_chain_is_refused_even_when_another_order_does():
  rng = np.random.default_rng(4)
  params = {'Dense_0': random_layer(rng, 3, 2), 'Dense_1': random_layer(rng, 4, 3)}
  with pytest.raises(ValueError, match='do not form a chain.*order by name.*layer_order'):
    optax_path.path_scales(params)


def test_layer_order_errors():
  model = AutoEncoder()
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))['params']
  with pytest.raises(ValueError, match='apply_fn must be the forward pass.*not callable'):
    optax_path.layer_order(params, apply_fn=None, input_shape=(6,))
  with pytest.raises(ValueError, match="input_shape must be the shape of one input.*'6'"):
    optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape='6')
  with pytest.raises(ValueError, match=re.escape('(1, *input_shape) = (1, 7)')):
    optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape=(7,))
  first_half = lambda q, x: Encoder().apply({'params': q['Encoder_0']}, x)
  with pytest.raises(ValueError, match='Decoder_0/Dense_0, Decoder_0/Dense_1 are not the weight'):
    optax_path.layer_order(params, apply_fn=first_half, input_shape=(6,))


# --- 2. masked layers ------------------------------------------------------------------


def mlp(widths, seed=0):
  rng = np.random.default_rng(seed)
  return {f'Dense_{l}': random_layer(rng, a, b) for l, (a, b) in enumerate(zip(widths, widths[1:]))}


def path_sgd_step(params, grads, lr=0.1):
  """The Path-SGD update from the brute-force scales of the whole network."""
  order = [f'Dense_{l}' for l in range(len(params))]
  scales = brute_force_scales([(params[n]['kernel'], params[n]['bias']) for n in order])
  return {
    n: {'kernel': -lr * np.asarray(grads[n]['kernel']) / k, 'bias': -lr * np.asarray(grads[n]['bias']) / b}
    for n, (k, b) in zip(order, scales)
  }


@pytest.mark.slow
@pytest.mark.parametrize('widths, frozen', [([1, 2, 2, 1], 1), ([4, 3, 3, 3], 1), ([1, 2, 2, 1], 0)])
def test_frozen_layer_routed_away_is_an_error_and_the_right_recipe_is_exact(widths, frozen):
  params = mlp(widths)
  grads = jax.tree.map(lambda w: jnp.cos(3 * w), params)
  labels = {n: jax.tree.map(lambda _: 'freeze' if n == f'Dense_{frozen}' else 'train', layer)
            for n, layer in params.items()}
  wrong = optax.partition({'train': optax_path.path_sgd(0.1), 'freeze': optax.set_to_zero()}, labels)
  with pytest.raises(ValueError, match=f'Dense_{frozen} arrives masked.*optax.masked\\(optax.set_to_zero'):
    wrong.update(grads, wrong.init(params), params)
  frozen_mask = jax.tree.map(lambda label: label == 'freeze', labels)
  right = optax.chain(
    optax_path.path_normalize(), optax.masked(optax.set_to_zero(), frozen_mask), optax.sgd(0.1)
  )
  updates, _ = right.update(grads, right.init(params), params)
  expected = path_sgd_step(params, grads)
  for name in params:
    for leaf in ('kernel', 'bias'):
      want = 0 * expected[name][leaf] if name == f'Dense_{frozen}' else expected[name][leaf]
      np.testing.assert_allclose(updates[name][leaf], want, rtol=1e-5, atol=1e-30)


def test_masked_auxiliary_head_is_skipped_when_layers_lists_the_chain():
  params = mlp([3, 4, 2])
  params['aux_head'] = random_layer(np.random.default_rng(5), 4, 7)
  mask = {n: jax.tree.map(lambda _: n != 'aux_head', layer) for n, layer in params.items()}
  tx = optax.masked(optax_path.path_normalize(), mask)
  with pytest.raises(ValueError, match='aux_head arrives masked.*pass layers='):
    tx.update(params, tx.init(params), params)
  tx = optax.masked(optax_path.path_normalize(layers=['Dense_0', 'Dense_1']), mask)
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_array_equal(updates['aux_head']['kernel'], params['aux_head']['kernel'])
  scales = brute_force_scales([(params[n]['kernel'], params[n]['bias']) for n in ('Dense_0', 'Dense_1')])
  np.testing.assert_allclose(updates['Dense_1']['kernel'], params['Dense_1']['kernel'] / scales[1][0], rtol=1e-5)
  listed = optax.masked(optax_path.path_normalize(layers=['Dense_0', 'Dense_1', 'aux_head']), mask)
  with pytest.raises(ValueError, match='aux_head arrives masked.*listed in layers='):
    listed.update(params, listed.init(params), params)


# --- 3. checks at the door -------------------------------------------------------------


@pytest.mark.parametrize('shape', [(1, 3), (), (2, 4, 5), (3, 2)])
def test_updates_must_have_the_params_shapes(shape):
  params = mlp([2, 3, 1])
  grads = jax.tree.map(jnp.ones_like, params)
  grads['Dense_0']['kernel'] = jnp.ones(shape)
  tx = optax_path.path_sgd(0.1)
  with pytest.raises(ValueError, match=re.escape(f'Dense_0/kernel has shape {shape}, its parameter (2, 3)')):
    tx.update(grads, tx.init(params), params)


def test_integer_updates_are_refused():
  params = mlp([2, 1])
  grads = jax.tree.map(lambda w: jnp.ones(w.shape, jnp.int32), params)
  with pytest.raises(ValueError, match='Dense_0/bias has dtype int32'):
    optax_path.path_normalize().update(grads, optax_path.path_normalize().init(params), params)


@pytest.mark.parametrize(
  'layers, message',
  [
    ([], 'layers= is empty'),
    ('enc', "For a single layer write \\['enc'\\]"),
    (['Dense_0', None], r'layers=\[1\] is None'),
    ([1.5], r'layers=\[0\] is 1.5'),
    (['Dense_0', 'Dense_0'], 'twice'),
    ({'Dense_0': 1}, 'must be a sequence'),
  ],
)
def test_bad_layers_argument_is_refused_at_construction(layers, message):
  with pytest.raises(ValueError, match=message):
    optax_path.path_normalize(layers=layers)
  with pytest.raises(ValueError, match=message):
    optax_path.path_geometry(optax.sgd(0.1), layers=layers)
  with pytest.raises(ValueError, match=message):
    optax_path.path_scales(mlp([2, 2]), layers=layers)


def test_layers_from_a_generator_and_int_keys_of_a_list():
  params = [random_layer(np.random.default_rng(6), 2, 2), random_layer(np.random.default_rng(7), 2, 2)]
  tx = optax_path.path_sgd(0.1, layers=(i for i in (1, 0)))  # read once, kept as a tuple
  state = tx.init(params)
  first, _ = tx.update(params, state, params)
  second, _ = tx.update(params, state, params)
  scales = brute_force_scales([(params[i]['kernel'], params[i]['bias']) for i in (1, 0)])
  np.testing.assert_allclose(first[1]['kernel'], -0.1 * params[1]['kernel'] / scales[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  'kernel, message',
  [
    (jnp.ones((0, 2)), 'Dense_0/kernel \\(0, 2\\): a dense layer needs at least one input'),
    (jnp.ones((3, 2), jnp.int32), 'Dense_0/kernel \\(3, 2\\) int32: .*real floating'),
    (jnp.ones((3, 2), bool), 'Dense_0/kernel \\(3, 2\\) bool: .*real floating'),
    (jnp.ones((3, 2), jnp.complex64), 'Dense_0/kernel \\(3, 2\\) complex64: .*real floating'),
  ],
)
def test_kernels_that_are_no_dense_weights(kernel, message):
  params = {'Dense_0': {'kernel': kernel}, 'Dense_1': {'kernel': jnp.ones((2, 1))}}
  with pytest.raises(ValueError, match=message):
    optax_path.path_scales(params)


# --- 4. fuzz ---------------------------------------------------------------------------

NAMINGS = {
  'dense': lambda l: f'Dense_{l}',
  'layers': lambda l: f'layers_{l}',
  'own': lambda l: ['input', 'hidden', 'middle', 'output'][l],
  'letters': lambda l: 'dcba'[l],
  'padded': lambda l: f'Dense_{l:02d}' if l % 2 else f'Dense_{l}',
  'nested': lambda l: f'Block_{l // 2}/Dense_{l % 2}',
  'mixed': lambda l: ['0', 'head', 'encoder', 'Decoder_0'][l],
}


def nest(path, value):
  tree = value
  for key in reversed(path.split('/')):
    tree = {key: tree}
  return tree


def merge(a, b):
  """``b`` merged into ``a``; leaves of ``b`` replace those of ``a``."""
  if not isinstance(b, dict):
    return b
  for key, value in b.items():
    a[key] = merge(a[key], value) if key in a else value
  return a


@pytest.mark.slow
def test_fuzz_right_scales_or_a_clear_error():
  """Random small nets, names, masks and dtypes: the library's scales are those of the
  true network (brute force, in its true order), or it raises a ValueError."""
  rng = np.random.default_rng(2026)
  outcomes = {'right': 0, 'refused': 0}
  for trial in range(70):
    depth = int(rng.integers(1, 4))
    widths = [int(w) for w in rng.integers(1, 4, size=depth + 1)]
    naming = list(NAMINGS)[trial % len(NAMINGS)]
    dtype = [jnp.float32, jnp.bfloat16, jnp.float16][trial % 3]
    names = [NAMINGS[naming](l) for l in range(depth)]
    layers = [random_layer(rng, a, b, bias=bool(rng.integers(2))) for a, b in zip(widths, widths[1:])]
    layers = [jax.tree.map(lambda w: w.astype(dtype), layer) for layer in layers]
    params = {}
    for name, layer in zip(names, layers):
      merge(params, nest(name, layer))
    masked_layer = rng.integers(depth + 2)  # sometimes mask one layer
    tx = optax_path.path_normalize()
    if masked_layer < depth:
      mask = jax.tree.map(lambda _: True, params)
      for leaf in layers[masked_layer]:
        merge(mask, nest(f'{names[masked_layer]}/{leaf}', False))
      tx = optax.masked(tx, mask)
    grads = jax.tree.map(jnp.ones_like, params)
    try:
      updates, _ = tx.update(grads, tx.init(params), params)
    except ValueError:
      outcomes['refused'] += 1
      continue
    assert masked_layer >= depth, 'a masked layer of the chain must be refused'
    truth = brute_force_scales([(l['kernel'], l.get('bias')) for l in layers])
    for name, (kernel_scale, bias_scale) in zip(names, truth):
      got = _get(updates, name)
      with np.errstate(divide='ignore'):
        np.testing.assert_allclose(np.asarray(got['kernel'], np.float64), 1 / kernel_scale, rtol=2e-2, err_msg=f'{trial} {names}')
      if bias_scale is not None:
        np.testing.assert_allclose(np.asarray(got['bias'], np.float64), 1 / bias_scale, rtol=2e-2)
    outcomes['right'] += 1
  assert outcomes["right"] > 15 and outcomes["refused"] > 15, outcomes


# --- 5. the README's recipes: tests/test_readme.py runs every README block, these among them.


class CalledTwice(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(3)
    return nn.Dense(3)(shared(nn.relu(shared(x))))


class TiedAutoEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    encoder = nn.Dense(3)
    h = nn.relu(nn.Dense(3)(nn.relu(encoder(x))))
    return h @ encoder.variables['params']['kernel'].T


@pytest.mark.parametrize('model', [CalledTwice(), TiedAutoEncoder()])
def test_layer_order_refuses_a_kernel_applied_twice(model):
  """Shared weights are no chain of distinct layers: the general mode, not a silent 2-layer net."""
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  with pytest.raises(ValueError, match='Dense_0 more than once.*general mode'):
    optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape=(3,))


def test_layer_order_refuses_kernels_stored_out_in():
  """A square kernel applied as x @ W.T (the PyTorch layout, an Einsum 'bi,oi->bo') was
  ordered without a word, and the MLP mode read it as (in, out): Einsum_1's scales were
  off by up to 3.4x (the general mode's are right). The same kernels contracted over
  their first axis, however written, are ordered."""
  rng = np.random.default_rng(0)
  params = {f'Dense_{l}': {'kernel': jnp.asarray(rng.normal(size=(4, 4)))} for l in range(3)}
  relu = jax.nn.relu
  k = lambda q, l: q[f'Dense_{l}']['kernel']
  refused = {
    'x @ W.T': lambda q, x: relu(relu(x @ k(q, 0)) @ k(q, 1).T) @ k(q, 2),
    "einsum 'bi,oi->bo'": lambda q, x: jnp.einsum(
      'bi,oi->bo', relu(x @ k(q, 0)) @ k(q, 1), k(q, 2)
    ),
    'jit, cast': lambda q, x: jax.jit(lambda h, w: h @ w.astype(h.dtype).T)(
      relu(x @ k(q, 0)) @ k(q, 1), k(q, 2)
    ),
    'scaled, stopped, barrier': lambda q, x: (
      relu(relu(x @ k(q, 0)) @ jax.lax.stop_gradient(2.0 * k(q, 1)).T)
      @ jax.lax.optimization_barrier(k(q, 2)).T
    ),
    'rot90 then flip': lambda q, x: relu(relu(x @ k(q, 0)) @ jnp.flip(jnp.rot90(k(q, 1)), 0))
    @ k(q, 2),
  }
  for net in refused.values():
    with pytest.raises(
      ValueError, match=r'kernels of Dense_[12](, Dense_2)? over their second axis.*\(out, in\)'
    ):
      optax_path.layer_order(params, apply_fn=net, input_shape=(4,))
  adapted = {**params, 'lora': {'a': jnp.ones((4, 1)), 'b': jnp.ones((1, 4))}}
  delta = lambda q: q['lora']['a'] @ q['lora']['b']
  lora = lambda q, x: relu(relu(x @ k(q, 0)) @ (k(q, 1) + delta(q))) @ k(q, 2)
  with pytest.raises(ValueError, match=r'Dense_1 are not the weight.*LoRA'):
    optax_path.layer_order(adapted, apply_fn=lora, input_shape=(4,))
  raveled = lambda q, x: relu(relu(x @ k(q, 0)) @ k(q, 1).ravel().reshape(4, 4).T) @ k(q, 2)
  with pytest.raises(ValueError, match=r'reshapes, slices or gathers the kernels of Dense_1'):
    optax_path.layer_order(params, apply_fn=raveled, input_shape=(4,))
  moved = optax_path.path_scales(params, apply_fn=refused['x @ W.T'], input_shape=(4,))['Dense_1']
  assert not np.allclose(moved['kernel'], optax_path.path_scales(params)['Dense_1']['kernel'])
  accepted = {
    "einsum 'io,bi->bo'": lambda q, x: jnp.einsum(
      'io,bi->bo', k(q, 2), relu(relu(x @ k(q, 0)) @ k(q, 1))
    ),
    'W.T.T': lambda q, x: relu(relu(x @ k(q, 0)) @ k(q, 1).T.T) @ k(q, 2),
    '(W.T @ h.T).T': lambda q, x: (k(q, 2).T @ relu(relu(x @ k(q, 0)) @ k(q, 1)).T).T,
    'tanh(W), W - W.mean(0)': lambda q, x: (
      relu(relu(x @ jnp.tanh(k(q, 0))) @ (k(q, 1) - k(q, 1).mean(0))) @ k(q, 2)
    ),
    'W / |W|.sum(0) and a clip': lambda q, x: (
      relu(relu(x @ (k(q, 0) / jnp.abs(k(q, 0)).sum(0))) @ jnp.clip(k(q, 1), -1, 1)) @ k(q, 2)
    ),
  }
  for net in accepted.values():
    order = optax_path.layer_order(params, apply_fn=net, input_shape=(4,))
    assert order == ['Dense_0', 'Dense_1', 'Dense_2']


def test_layer_order_refuses_stacked_kernels():
  params = {'Dense_0': {'kernel': jnp.ones((3, 3))}, 'ScanCell_0': {'kernel': jnp.ones((2, 3, 3))}}
  apply_fn = lambda q, x: x @ q['Dense_0']['kernel'] @ q['ScanCell_0']['kernel'][0]
  with pytest.raises(ValueError, match=re.escape('ScanCell_0/kernel (2, 3, 3)') + '.*general mode'):
    optax_path.layer_order(params, apply_fn=apply_fn, input_shape=(3,))


class Residual(nn.Module):
  """8 -> 6 -> 6 -> 3, with ``h + relu(Dense_1(h))`` around the middle layer."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))
    h = h + nn.relu(nn.Dense(6)(h))
    return nn.Dense(3)(h)


class SkipFromInput(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)) + x)


class ResidualOutput(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x))
    return nn.Dense(8)(h) + h


class TwoHeads(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(h), nn.Dense(2)(h)


@pytest.mark.parametrize(
  'model, says',
  [
    (Residual(), 'the input of Dense_2 is computed from Dense_0 and Dense_1'),
    (SkipFromInput(), 'the input of Dense_0 is computed from Dense_1 and the input'),  # built first
    (ResidualOutput(), 'the output is computed from Dense_0 and Dense_1'),
    (TwoHeads(), 'the input of Dense_2 is computed from Dense_0'),
  ],
)
def test_layer_order_refuses_a_network_that_is_not_a_chain(model, says):
  """layer_order gave an order for a residual MLP (Dense_0, Dense_1, Dense_2), and with it
  the MLP mode computed the scales of the plain chain: for the residual block, the first
  kernel's scales were up to 76% off the general mode's, which counts the skip paths.
  Expected: a ValueError that says where the chain breaks and points to the general mode."""
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))['params']
  with pytest.raises(ValueError, match=re.escape(says) + '.*general mode'):
    optax_path.layer_order(params, apply_fn=linen_apply(model), input_shape=(8,))
  if isinstance(model, Residual):  # why: the chain's scales are not this network's
    chain = optax_path.path_scales(params)
    true = optax_path.path_scales(params, apply_fn=linen_apply(model), input_shape=(8,))
    gap = np.abs(chain['Dense_0']['kernel'] / true['Dense_0']['kernel'] - 1).max()
    assert gap > 0.3, gap


def test_layer_order_sees_loops_and_products_by_other_params():
  """A layer applied in a lax.scan was walked as if called once: ['D0', 'D1', 'D2'], with
  which the MLP mode computes the scales of a 3-layer chain, not of D1 applied 3 times. A product by a
  param that is no kernel (a 1-D head, a 'proj' matrix) made layer_order fail with a
  KeyError. Expected: the loop and the products in the chain refused with ValueError; a
  one-hot embedding before the first layer is part of the input, as before."""
  relu = jax.nn.relu
  dense = lambda a, b: {'kernel': jnp.ones((a, b))}
  in_scan = (
    {'D0': dense(4, 4), 'D1': dense(4, 4), 'D2': dense(4, 2)},
    lambda q, x: jax.lax.scan(
      lambda h, _: (relu(h @ q['D1']['kernel']), None), relu(x @ q['D0']['kernel']), None, length=3
    )[0] @ q['D2']['kernel'],
  )
  with pytest.raises(ValueError, match='The kernels of D1 are used inside a loop'):
    optax_path.layer_order(in_scan[0], apply_fn=in_scan[1], input_shape=(4,))
  refused = {
    'the output is computed from v (no kernel)': (
      {'D0': dense(4, 3), 'D1': dense(3, 2), 'v': jnp.ones(2)},
      lambda q, x: relu(relu(x @ q['D0']['kernel']) @ q['D1']['kernel']) @ q['v'],
    ),
    'the input of D1 is computed from proj (no kernel)': (
      {'D0': dense(4, 3), 'proj': jnp.ones((3, 3)), 'D1': dense(3, 2)},
      lambda q, x: relu(relu(x @ q['D0']['kernel']) @ q['proj']) @ q['D1']['kernel'],
    ),
  }
  for says, (params, apply_fn) in refused.items():
    with pytest.raises(ValueError, match=re.escape(says) + '.*general mode'):
      optax_path.layer_order(params, apply_fn=apply_fn, input_shape=(4,))
  embedded = {'E': jnp.ones((5, 4)), 'D0': dense(4, 3), 'D1': dense(3, 2)}
  one_hot = lambda q, x: jax.nn.one_hot(x[:, 0].astype(int), 5) @ q['E']
  apply_fn = lambda q, x: relu(relu(one_hot(q, x) @ q['D0']['kernel']) @ q['D1']['kernel'])
  assert optax_path.layer_order(embedded, apply_fn=apply_fn, input_shape=(4,)) == ['D0', 'D1']


def test_a_loop_without_layers_passes_and_a_param_that_scales_units_breaks_the_chain():
  """Second round: a fori_loop, lax.map or cond with no layer inside, between two layers,
  was refused as 'kernels used inside a loop' (every leaf flowing in counted); a
  LayerScale ``h * g`` between layers was accepted, and the MLP mode, with g routed away
  as its message advises, gave scales 0.06 to 100 times the network's."""
  relu = jax.nn.relu
  params = {'a': {'kernel': jnp.ones((4, 4))}, 'b': {'kernel': jnp.ones((4, 2))}}
  between = {
    'fori_loop': lambda h: jax.lax.fori_loop(0, 2, lambda i, h: h * 1.0, h),
    'lax.map': lambda h: jax.lax.map(lambda r: r[::-1], h),
    'cond': lambda h: jax.lax.cond(True, lambda h: h, lambda h: 2 * h, h),
  }
  for name, middle in between.items():
    apply_fn = lambda q, x, m=middle: m(relu(x @ q['a']['kernel'])) @ q['b']['kernel']
    assert optax_path.layer_order(params, apply_fn=apply_fn, input_shape=(4,)) == ['a', 'b'], name
  scaled = {**params, 'g': jnp.ones(4)}
  apply_fn = lambda q, x: (relu(x @ q['a']['kernel']) * q['g']) @ q['b']['kernel']
  with pytest.raises(ValueError, match=re.escape('the input of b is computed from g (no kernel)')):
    optax_path.layer_order(scaled, apply_fn=apply_fn, input_shape=(4,))
