"""Path scales (eq. 9, Algorithm 1) and the path regulariser (eq. 5) of a ReLU MLP.

For kernels ``W_1..W_L`` (``(in, out)``) and biases ``b_1..b_L``, with ``A^p`` the
elementwise ``|A|^p``:

.. math::

  \\gamma_{in,0} = 1, \\quad \\gamma_{in,l} = \\gamma_{in,l-1} W_l^p + b_l^p, \\qquad
  \\gamma_{out,L} = 1, \\quad \\gamma_{out,l-1} = W_l^p \\gamma_{out,l},

a bias being an edge from a source unit whose ``gamma_in`` is 1. The scale of kernel
edge ``u -> v`` of layer ``l`` is ``(gamma_in,l-1[u] gamma_out,l[v])^(2/p)``, that of
bias ``b_l[v]`` is ``gamma_out,l[v]^(2/p)``, and ``phi_p(w)^p = sum(gamma_in,L)``.

Every vector is carried as its logarithm (see ``numerics``), so none of this overflows
or underflows, however deep or unbalanced the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_path._src import layers as layers_lib
from optax_path._src import numerics


def _layer_arrays(leaves, chain):
  kernels = [leaves[layer.kernel] for layer in chain]
  biases = [None if layer.bias is None else leaves[layer.bias] for layer in chain]
  return kernels, biases


def in_compute_dtype(kernels, biases):
  """The kernels and biases in the dtype the scales are computed in."""
  dtype = numerics.compute_dtype(jnp.result_type(*kernels))
  kernels = [w.astype(dtype) for w in kernels]
  biases = [None if b is None else b.astype(dtype) for b in biases]
  return kernels, biases


def log_gamma_in(kernels, biases, p) -> list[jax.Array]:
  """``log gamma_in`` of the units entering each layer, and of the outputs (last)."""
  log_in = [jnp.zeros(kernels[0].shape[0], kernels[0].dtype)]
  for w, b in zip(kernels, biases):
    log_in.append(numerics.log_matvec(log_in[-1], w, b, p))
  return log_in


def log_gamma_out(kernels, p) -> list[jax.Array]:
  """``log gamma_out`` of the units entering each layer, and of the outputs (last)."""
  log_out = [jnp.zeros(kernels[-1].shape[1], kernels[-1].dtype)]
  for w in reversed(kernels):
    log_out.append(numerics.log_matvec(log_out[-1], w.T, None, p))
  return log_out[::-1]


def compiled_for_concrete_p(fn):
  """``fn(..., p)``, compiled once per shape and ``p`` when ``p`` is a float.

  Called eagerly, the passes would dispatch (and compile) dozens of small ops one by
  one; inside an outer ``jit`` the inner one is inlined, and a traced ``p`` (from
  ``optax.inject_hyperparams``) takes the uncompiled path.
  """
  compiled = jax.jit(fn, static_argnames='p')

  def wrapped(*args, p):
    return compiled(*args, p=p) if isinstance(p, float) else fn(*args, p=p)

  return wrapped


LogScale = tuple[jax.Array, ...]  # terms that broadcast to a leaf and sum to its log scale


def log_gammas(kernels, biases, p) -> tuple[list[jax.Array], list[jax.Array]]:
  """``(log gamma_in, log gamma_out)`` of every layer's units, by the exact passes.

  All NaN if a weight or bias is not finite, or a traced ``p`` is out of range
  (``numerics.surface_invalid``).
  """
  kernels, biases = in_compute_dtype(kernels, biases)
  guarded = numerics.guard_p(p)
  log_in, log_out = log_gamma_in(kernels, biases, guarded), log_gamma_out(kernels, guarded)
  vectors = numerics.surface_invalid(log_in + log_out, p)
  return vectors[: len(log_in)], vectors[len(log_in) :]


def layer_log_scales(log_in, log_out, biases, p) -> tuple[list[LogScale], list[LogScale | None]]:
  """The log scales of every kernel and bias (eq. 9), as a row and a column term.

  ``log gamma_p(w, u -> v) = (2/p) (log gamma_in[u] + log gamma_out[v])``: kept as the
  two vectors, so that a layer's scales are never formed.
  """
  kernel_scales = [
    ((2 / p) * log_in[l][:, None], (2 / p) * log_out[l + 1][None, :]) for l in range(len(biases))
  ]
  bias_scales = [None if b is None else ((2 / p) * log_out[l + 1],) for l, b in enumerate(biases)]
  return kernel_scales, bias_scales


def _formed(log_scale: LogScale | None, leaf) -> jax.Array | None:
  if log_scale is None:
    return None
  return numerics.exp_keeping_nan(sum(numerics.sharded_like(t, leaf) for t in log_scale))


def _formed_scales(kernels, biases, p):
  kernel_scales, bias_scales = layer_log_scales(*log_gammas(kernels, biases, p), biases, p)
  return (
    [_formed(t, w) for t, w in zip(kernel_scales, kernels)],
    [_formed(t, b) for t, b in zip(bias_scales, biases)],
  )


def _log_path_norm_of_layers(kernels, biases, p) -> jax.Array:
  kernels, biases = in_compute_dtype(kernels, biases)
  log_in = numerics.surface_invalid(log_gamma_in(kernels, biases, numerics.guard_p(p)), p)
  return jax.nn.logsumexp(log_in[-1]) / p


exact_log_gammas = compiled_for_concrete_p(log_gammas)
_layer_scales = compiled_for_concrete_p(_formed_scales)
_log_path_norm = compiled_for_concrete_p(_log_path_norm_of_layers)


def check_mode(layers, apply_fn, input_shape) -> None:
  """Either the MLP mode (``layers`` optional) or the general one (both of the others)."""
  if (apply_fn is None) != (input_shape is None):
    raise ValueError(
      'The general mode needs both apply_fn and input_shape (the shape of one input, '
      f'without the batch axis); got apply_fn={apply_fn!r}, input_shape={input_shape!r}.'
    )
  if apply_fn is not None and layers is not None:
    raise ValueError(
      'Pass layers= (MLP mode) or apply_fn= and input_shape= (general mode), not both.'
    )
  if apply_fn is not None:
    from optax_path._src import general

    general.check_apply_fn(apply_fn)
    general.check_input_shape(input_shape)


def log_scale_leaves(
  params: Any,
  p: numerics.Exponent,
  layers: Sequence[layers_lib.LayerSpec] | None = None,
  apply_fn=None,
  input_shape=None,
  gammas: tuple[list[jax.Array], list[jax.Array]] | None = None,
) -> tuple[list[Any], Any, dict[int, LogScale]]:
  """The log path scale of every leaf that has one.

  Args:
    params: the params pytree.
    p: the exponent.
    layers, apply_fn, input_shape: the mode (see ``path_normalize``).
    gammas: MLP mode: the ``(log gamma_in, log gamma_out)`` of the layers, when known.

  Returns:
    ``(leaves, treedef, log_scales)``: the flattened params (``MaskedNode`` kept as
    leaves), their treedef, and a map from leaf index to that leaf's log scale, as
    terms that broadcast to the leaf and sum to it.
  """
  if apply_fn is not None:
    from optax_path._src import general

    leaves, treedef, log_scales = general.log_scale_leaves(params, p, apply_fn, input_shape)
    return leaves, treedef, {i: (log_scale,) for i, log_scale in log_scales.items()}
  chain, leaves, treedef = chain_and_leaves(params, layers)
  kernels, biases = _layer_arrays(leaves, chain)
  if gammas is None:
    gammas = exact_log_gammas(kernels, biases, p=p)
  return leaves, treedef, _by_leaf(chain, *layer_log_scales(*gammas, biases, p))


def chain_and_leaves(params: Any, layers) -> tuple[list[layers_lib.DenseLayer], list[Any], Any]:
  """The dense layers of ``params``, its flattened leaves and its treedef."""
  chain = layers_lib.find_layers(params, layers)
  named_leaves, treedef = layers_lib.flatten_with_names(params)
  return chain, [leaf for _, leaf in named_leaves], treedef


def layer_arrays(params: Any, layers) -> tuple[list[jax.Array], list[jax.Array | None]]:
  """The kernels and biases of the dense layers of ``params``, from input to output."""
  chain, leaves, _ = chain_and_leaves(params, layers)
  return _layer_arrays(leaves, chain)


def _by_leaf(chain, kernel_values, bias_values) -> dict[int, Any]:
  by_leaf = {layer.kernel: v for layer, v in zip(chain, kernel_values)}
  by_leaf.update({layer.bias: v for layer, v in zip(chain, bias_values) if v is not None})
  return by_leaf


def path_scales(
  params: Any, p: float = 2.0, *, layers=None, apply_fn=None, input_shape=None
) -> Any:
  """The path scale ``gamma_p(w, e)`` of every weight and bias (eq. 9).

  .. math::

    \\gamma_p(w, e) = \\Big(\\sum_{\\text{paths through } e}
    \\prod_{e' \\neq e} |w_{e'}|^p\\Big)^{2/p},

  computed with one forward and one backward pass of ``|W|^p`` products (Algorithm 1).
  Path-SGD divides each gradient by its scale.

  Args:
    params: params pytree of a ReLU MLP (see ``path_normalize`` for the layouts).
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]`` (``numerics.validate_p``).
    layers: optional layer key paths from input to output (default: found).
    apply_fn: general mode: a ReLU network's forward pass ``apply_fn(params, x)``
      (see ``path_normalize``).
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    A pytree shaped like ``params``, in float32 or wider: scales beyond that range
    read ``inf`` or ``0`` (``path_normalize`` divides by them without forming them).
    MLP mode: every scale is NaN if a weight or bias is not finite.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = {'Dense_0': {'kernel': jnp.array([[1., 2.]])},
    ...           'Dense_1': {'kernel': jnp.array([[3.], [4.]])}}
    >>> optax_path.path_scales(params)['Dense_0']['kernel']
    Array([[ 9., 16.]], dtype=float32)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep
    Neural Networks <https://arxiv.org/abs/1506.02617>`_, NeurIPS 2015, eq. 9.
  """
  p = numerics.validate_p(p)
  check_mode(layers, apply_fn, input_shape)
  if apply_fn is None:
    chain, leaves, treedef = chain_and_leaves(params, layers)
    scales = _by_leaf(chain, *_layer_scales(*_layer_arrays(leaves, chain), p=p))
  else:
    leaves, treedef, log_scales = log_scale_leaves(params, p, None, apply_fn, input_shape)
    scales = {i: numerics.exp_keeping_nan(log_scale) for i, (log_scale,) in log_scales.items()}
  scales = [_placed_like(scales.get(i, leaf), leaf) for i, leaf in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, scales)


def _placed_like(scale, leaf):
  """``scale`` on the devices and with the sharding of ``leaf``, when both are concrete
  (under ``jit`` with Auto axes, where the result goes is XLA's choice, or ``out_shardings``)."""
  concrete = lambda a: isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
  if concrete(leaf) and concrete(scale) and scale.sharding != leaf.sharding:
    return jax.device_put(scale, leaf.sharding)
  return scale


def log_path_norm(
  params: Any, p: float = 2.0, *, layers=None, apply_fn=None, input_shape=None
) -> jax.Array:
  """``log phi_p(w)``: finite even where ``phi_p`` is beyond the float range.

  See ``path_norm`` (same arguments). Differentiable. MLP mode: NaN if a weight or
  bias is not finite, or a traced ``p`` lies outside ``[0.5, 32]``.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = [{'kernel': jnp.full((3, 3), 1e30)}, {'kernel': jnp.full((3, 1), 1e30)}]
    >>> round(float(optax_path.log_path_norm(params, p=2.0)), 3)  # log(3e60)
    139.254
  """
  p = numerics.validate_p(p)
  check_mode(layers, apply_fn, input_shape)
  if apply_fn is not None:
    from optax_path._src import general

    return general.log_path_norm(params, p, apply_fn, input_shape)
  return _log_path_norm(*layer_arrays(params, layers), p=p)


def path_norm(
  params: Any, p: float = 2.0, *, layers=None, apply_fn=None, input_shape=None
) -> jax.Array:
  """The path regulariser ``phi_p(w)`` of eq. 5, rescaling-invariant and differentiable.

  .. math::

    \\phi_p(w) = \\Big(\\sum_{\\text{paths } v_{in}[i] \\to v_{out}[j]}
    \\prod_k |w_{e_k}|^p\\Big)^{1/p} = \\Big(\\sum \\gamma_{in,L}\\Big)^{1/p},

  where a bias starts paths of its own (from a bias unit). Add ``lam * path_norm(params)
  ** p`` to a loss to regularise with it; use ``log_path_norm`` where ``phi_p`` may
  exceed the float range.

  Args:
    params: params pytree of a ReLU MLP.
    p: a number in ``[0.5, 32]`` (``numerics.validate_p``).
    layers: optional layer key paths from input to output (default: found).
    apply_fn: general mode: a ReLU network's forward pass ``apply_fn(params, x)``
      (see ``path_normalize``).
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    A scalar in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = {'Dense_0': {'kernel': jnp.array([[1., 2.]]), 'bias': jnp.array([1., 0.])},
    ...           'Dense_1': {'kernel': jnp.array([[3.], [4.]])}}
    >>> round(float(optax_path.path_norm(params, p=1.0)), 4)  # paths 1*3 + 2*4 + bias 1*3
    14.0

  References:
    Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015, eq. 5 and Lemma 3.1;
    Neyshabur, Tomioka & Srebro, `Norm-Based Capacity Control in Neural Networks
    <https://arxiv.org/abs/1503.00036>`_, COLT 2015.
  """
  return numerics.exp_keeping_nan(
    log_path_norm(params, p, layers=layers, apply_fn=apply_fn, input_shape=input_shape)
  )
