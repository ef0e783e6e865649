"""Path scales of any ReLU network: one gradient of its forward pass on ``|theta|^p``.

With every parameter ``theta`` replaced by ``q = |theta|^p`` and an all-ones input, every
pre-activation of a ReLU network is ``>= 0``, so every ReLU acts as the identity and the
network computes, at each unit ``v``, the sum over the paths from the inputs and the
bias units to ``v`` of the products of their ``q``: ``gamma_in(v)`` of Algorithm 1. The
summed output is therefore the path regulariser of eq. 5,

.. math::

  \\phi_p(w)^p = \\sum_j f_{|\\theta|^p}(\\mathbf{1})_j,

and its gradient with respect to a parameter's ``q`` is
``sum over the edges u -> v that share the parameter of gamma_in(u) * gamma_out(v)``
(``gamma_out(v)`` is the derivative of the summed output with respect to unit ``v``).
The path scale of eq. 9 is that gradient to the power ``2/p``. One ``jax.grad`` of a
batch-1 forward pass gives every scale at once, for dense and convolutional layers
(a kernel entry is shared by the edges at every position, so its scale sums over them;
zero padding is no unit, so it starts no path), residual additions, concatenations,
flattening and average pooling: the paper's ``(B + 1) T`` cost.

Scope. ReLU networks (also leaky ReLU, PReLU and linear layers: positively homogeneous
activations act as the identity on this pass, so the scales are those of the same
graph) built from dense and convolutional layers with any stride and padding, biases,
residual additions, average or sum pooling, flattening, reshapes. Out of scope, and
giving numbers that are not path scales: BatchNorm, LayerNorm and other normalisations,
non-homogeneous activations (GELU, tanh, sigmoid, swish), softmax or attention inside
the network, products of activations. A negative result, only possible out of scope,
gives a ``nan`` log scale. Run ``apply_fn`` deterministically (no dropout).

Fixed linear maps. The weights of maps that are not parameters enter the pass as the
network applies them, not to the power ``p``: an average pool over ``k`` inputs weighs
its paths by ``1/k`` rather than ``(1/k)^p``. For ``p = 1``, and for maps of weight 1
(sum pooling, flattening, residual additions, concatenation), this is eq. 5 exactly.
For other ``p`` it is the path regulariser of the same graph with those fixed weights
counted once; it is still invariant to every rescaling, and so is Path-SGD with it. To
count them to the power ``p``, give an ``apply_fn`` that multiplies each average pool
by ``k^(1-p)``.

Max pooling. The pass is still invariant to channel rescalings (a pooling window lies
in one channel, whose units are all scaled by the same ``c^p``), so Path-SGD stays
rescaling invariant (Theorem 4.1). But the scales follow the argmax paths of the
all-ones input: a pooled unit passes on only its window's largest ``gamma_in``, and
the gradient reaches only that member of the window (for ``flax.linen.max_pool`` and
``nnx.max_pool``, ties, as in the interior of a conv layer's output on the all-ones
input, go to the first member of the window; ``jnp.max`` splits them equally). These
are not the path scales of the argmax of the data. A shared conv kernel still gets a
scale from its winning positions; a weight used only by units that lose every window
(max over the units of a dense layer, say) gets scale 0, so its update is 0: it is
never trained. To get scales over every path, give an ``apply_fn`` in which max pooling
is replaced by average (or sum) pooling; the loss keeps the max pooling.

Float range. The pass runs in float32 at least, in float64 whenever 64-bit types are
enabled (``jax.config.update('jax_enable_x64', True)``), and in the dtype ``apply_fn``
computes in (a module with an explicit ``dtype=jnp.bfloat16`` computes its pass in
bfloat16). Unlike the MLP mode, which carries logarithms and is right over any range,
it needs ``|theta|^p``, every ``gamma_in``, ``gamma_out`` and ``phi_p^p`` to be normal
numbers: below about ``3e38`` in float32 (so ``|theta| < 1.8e19`` and ``phi_2 < 1.8e19``
for ``p = 2``), ``1.8e308`` in float64; the paper's unbalanced nets (units rescaled by
up to ``1e25``) need float64 or the MLP mode. What happens beyond:

- ``phi_p^p`` overflows (``inf``, or ``nan`` from ``inf * 0``): nothing computed in the
  pass can be trusted (a ReLU at a ``nan`` has derivative 0, so zeros appear that are
  not zero scales), so every log scale is ``+inf``: every update is 0, the step leaves
  the params as they are, and ``log_path_norm`` is ``+inf``. Check it when training
  stalls.
- ``phi_p^p`` is finite: a scale whose sum overflows is ``+inf`` (update 0, as in the
  MLP mode where a scale overflows); an ``inf * 0`` in the backward pass (a unit with
  ``gamma_in = 0`` under an overflowing ``gamma_out``) is read as such an overflow, also
  update 0; a scale that underflows reads 0, so its update is 0 where the MLP mode gives
  the largest finite value.

Finite params within scope never give ``nan``, within the range or beyond it.

Params. The leaves of ``params`` with a floating dtype are the parameters; other leaves
(integers) are passed to ``apply_fn`` unchanged. A floating leaf that ``apply_fn`` does
not use raises ``ValueError`` (its scale would be 0, so Path-SGD would silently never
update it): route it to another transformation with ``optax.partition`` or exclude it
with ``optax.masked``. Leaves so masked reach ``apply_fn`` as ``optax.MaskedNode()``,
so it must not use them: mask only what the forward pass does not need, such as an
auxiliary head. A unit whose incoming weights and bias are all exactly 0 has
``gamma_in = 0`` and pre-activation 0, where ReLU's derivative is 0: its incoming edges
get scale 0 rather than ``gamma_in(u) gamma_out(v)``, but their loss gradient is 0 as
well, so the update (0) is the MLP mode's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import optax

from optax_path._src import layers as layers_lib
from optax_path._src import numerics

ApplyFn = Callable[[Any, jax.Array], Any]


def _is_float_array(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and hasattr(leaf, 'shape') and jnp.issubdtype(dtype, jnp.floating)


def pass_dtype(float_leaves: Sequence[Any]) -> jnp.dtype:
  """Float64 where 64-bit types are enabled, else the leaves' dtype, at least float32."""
  widest = jax.dtypes.canonicalize_dtype(jnp.float64)
  return jnp.promote_types(numerics.compute_dtype(jnp.result_type(*float_leaves)), widest)


def _used_inputs(fn: Callable[[list[jax.Array]], jax.Array], args: list[jax.Array]) -> list[bool]:
  """Which of ``args`` the value of ``fn(args)`` depends on, read from its jaxpr.

  An equation counts as using all of its inputs when any of its outputs is used, so an
  input read inside a nested call whose other outputs matter counts as used.
  """
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  jaxpr = jax.make_jaxpr(fn)(avals).jaxpr
  live = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars if isinstance(v, jex_core.Var)):
      live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  return [v in live for v in jaxpr.invars]


def _positive_pass(
  params: Any,
  p: numerics.Exponent,
  apply_fn: ApplyFn,
  input_shape: tuple[int, ...],
  check_used: bool,
):
  """``(phi_p^p, [d phi_p^p / d q_i], indices i)`` over the floating leaves ``i``."""
  named_leaves, treedef = layers_lib.flatten_with_names(params)
  leaves = [leaf for _, leaf in named_leaves]
  indices = [i for i, leaf in enumerate(leaves) if _is_float_array(leaf)]
  if not indices:
    raise ValueError(
      'params has no floating-point leaf; found: '
      + ('; '.join(layers_lib.format_path(path) for path, _ in named_leaves) or 'no leaves')
      + '.'
    )
  masked = [path for path, leaf in named_leaves if isinstance(leaf, optax.MaskedNode)]
  dtype = pass_dtype([leaves[i] for i in indices])
  ones = jnp.ones((1, *input_shape), dtype)

  def phi_p_to_the_p(q: list[jax.Array]) -> jax.Array:
    full = list(leaves)
    for i, q_i in zip(indices, q):
      full[i] = q_i
    try:
      out = apply_fn(jax.tree_util.tree_unflatten(treedef, full), ones)
    except Exception as error:
      if not masked:
        raise
      raise ValueError(
        'apply_fn failed on params in which optax.masked or optax.partition replaced '
        f'{", ".join(map(layers_lib.format_path, masked))} with optax.MaskedNode(). The '
        'general mode evaluates apply_fn on the params it is given: mask only leaves that '
        'the forward pass does not use, or apply path_normalize to the whole params tree.'
      ) from error
    return sum(jnp.sum(o.astype(dtype)) for o in jax.tree.leaves(out))

  q = [numerics.abs_pow(leaves[i].astype(dtype), p) for i in indices]
  if check_used:
    unused = [i for i, used in zip(indices, _used_inputs(phi_p_to_the_p, q)) if not used]
    if unused:
      raise ValueError(
        'apply_fn does not use these params leaves: '
        + '; '.join(
          f'{layers_lib.format_path(named_leaves[i][0])} {tuple(leaves[i].shape)}' for i in unused
        )
        + '. Their path scale would be 0, so Path-SGD would never update them. Check '
        'apply_fn, or route these leaves to another transformation with optax.partition '
        '(alias optax.multi_transform), or exclude them with optax.masked.'
      )
  value, grads = jax.value_and_grad(phi_p_to_the_p)(q)
  return value, grads, indices


def _log_scales(params, p, apply_fn, input_shape) -> dict[int, jax.Array]:
  phi_p_p, grads, indices = _positive_pass(params, p, apply_fn, input_shape, check_used=True)
  trusted = jnp.isfinite(phi_p_p)
  log_scales = {}
  for i, g in zip(indices, grads):
    # g = 0 -> -inf (no path: update 0); g = inf -> inf; g = nan (inf * 0) -> inf.
    log_g = jnp.where(jnp.isnan(g), jnp.inf, (2 / p) * jnp.log(g))
    log_scales[i] = jnp.where(trusted, log_g, jnp.inf)
  return log_scales


def _log_path_norm(params, p, apply_fn, input_shape) -> jax.Array:
  phi_p_p, _, _ = _positive_pass(params, p, apply_fn, input_shape, check_used=False)
  finite = jnp.isfinite(phi_p_p)
  return jnp.where(finite, jnp.log(jnp.where(finite, phi_p_p, 1.0)) / p, jnp.inf)


_STATIC = ('p', 'apply_fn', 'input_shape')
_log_scales_jit = jax.jit(_log_scales, static_argnames=_STATIC)
_log_path_norm_jit = jax.jit(_log_path_norm, static_argnames=_STATIC)


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _call(fn, compiled, params, p, apply_fn, input_shape):
  """``fn``, compiled once per ``p``, ``apply_fn`` and shape where ``p`` is concrete.

  A traced ``p`` (from ``optax.inject_hyperparams``) or an unhashable ``apply_fn``
  takes the uncompiled path; inside an outer ``jit`` the inner one is inlined anyway.
  """
  input_shape = _check_input_shape(input_shape)
  if isinstance(p, float) and _hashable(apply_fn):
    return compiled(params, p=p, apply_fn=apply_fn, input_shape=input_shape)
  return fn(params, p, apply_fn, input_shape)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in input_shape)
  except TypeError:
    raise ValueError(
      f'input_shape must be the shape of one input without the batch axis, a tuple of '
      f'ints such as (28, 28, 1); got {input_shape!r}.'
    ) from None
  if any(d < 0 for d in shape):
    raise ValueError(f'input_shape must hold sizes >= 0, got {input_shape!r}.')
  return shape


def log_scale_leaves(
  params: Any, p: numerics.Exponent, apply_fn: ApplyFn, input_shape: Sequence[int]
) -> tuple[list[Any], Any, dict[int, jax.Array]]:
  """The log path scale of every floating leaf, from one gradient of the ``|theta|^p`` pass.

  .. math::

    \\log \\gamma_p(w, e) = \\frac{2}{p} \\log \\frac{\\partial}{\\partial q_e}
    \\sum_j f_q(\\mathbf{1})_j \\Big|_{q = |\\theta|^p},

  which for a parameter shared by several edges (a conv kernel entry) is the sum over
  those edges of ``gamma_in(u) gamma_out(v)``, to the power ``2/p``. See the module
  docstring for the scope, max pooling, the float range and what happens beyond it.

  Args:
    params: the params pytree that ``apply_fn`` takes (a Linen ``params`` dict, an NNX
      ``State``, possibly with ``optax.MaskedNode`` leaves).
    p: the ``l_p`` path geometry, a number > 0 (may be traced).
    apply_fn: ``apply_fn(params, x)``, the network's forward pass on a batch ``x``:
      ``lambda q, x: model.apply({'params': q}, x)`` for Linen,
      ``lambda s, x: nnx.merge(graphdef, s)(x)`` for NNX.
    input_shape: the shape of one input, without the batch axis.

  Returns:
    ``(leaves, treedef, log_scales)``: the flattened params (``MaskedNode`` kept as
    leaves), their treedef, and a map from the index of each floating leaf to its log
    scale, an array shaped like the leaf in float32 or wider: ``-inf`` where the scale
    is exactly 0, ``+inf`` where it overflows or the pass did.

  Raises:
    ValueError: if ``input_shape`` is no shape, ``params`` has no floating leaf,
      ``apply_fn`` does not use one of them, or fails on masked params.

  Example:
    >>> import jax, jax.numpy as jnp, optax_path
    >>> import flax.linen as nn
    >>> class CNN(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.Conv(2, (3, 3), use_bias=False)(x))
    ...     return nn.Dense(1, use_bias=False)(x.reshape(x.shape[0], -1))
    >>> model = CNN()
    >>> params = jax.tree.map(jnp.ones_like,
    ...                       model.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))['params'])
    >>> scales = optax_path.path_scales(params, p=1.0, apply_fn=lambda q, x: model.apply(
    ...     {'params': q}, x), input_shape=(4, 4, 1))
    >>> jnp.round(scales['Conv_0']['kernel'][:, :, 0, 0])  # (positions reading it)^2
    Array([[ 81., 144.,  81.],
           [144., 256., 144.],
           [ 81., 144.,  81.]], dtype=float32)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep
    Neural Networks <https://arxiv.org/abs/1506.02617>`_, NeurIPS 2015, eq. 9 and
    Algorithm 1.
  """
  named_leaves, treedef = layers_lib.flatten_with_names(params)
  log_scales = _call(_log_scales, _log_scales_jit, params, p, apply_fn, input_shape)
  return [leaf for _, leaf in named_leaves], treedef, log_scales


def log_path_norm(
  params: Any, p: numerics.Exponent, apply_fn: ApplyFn, input_shape: Sequence[int]
) -> jax.Array:
  """``log phi_p(w) = log(sum(f_{|theta|^p}(1))) / p``, differentiable.

  Args:
    params: the params pytree that ``apply_fn`` takes.
    p: a number > 0.
    apply_fn: ``apply_fn(params, x)``, the network's forward pass.
    input_shape: the shape of one input, without the batch axis.

  Returns:
    A scalar in float32 or wider (float64 where 64-bit types are enabled); ``+inf``
    where ``phi_p^p`` overflows that dtype (see the module docstring), ``-inf`` where
    there is no path.

  Example:
    >>> import jax, jax.numpy as jnp, optax_path
    >>> params = {'w': jnp.array([[1., 2.]]), 'v': jnp.array([[3.], [4.]])}
    >>> apply_fn = lambda q, x: jax.nn.relu(x @ q['w']) @ q['v']
    >>> round(float(optax_path.path_norm(params, p=1.0, apply_fn=apply_fn, input_shape=(1,))), 5)
    11.0
  """
  return _call(_log_path_norm, _log_path_norm_jit, params, p, apply_fn, input_shape)
