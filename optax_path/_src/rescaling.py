"""Node rescalings of ReLU MLPs (eq. 1): one unit, the paper's unbalancing, rebalancing.

The rescaling ``rho_{c,v}`` multiplies the incoming edges of hidden unit ``v`` (its
kernel column and its bias) by ``c > 0`` and divides its outgoing edges (its row of
the next kernel) by ``c``. Since ``relu(c z) = c relu(z)``, the network computes the
same function.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_path._src import layers as layers_lib
from optax_path._src import numerics
from optax_path._src.numerics import compute_dtype, validate_p


class _Net:
  """The flattened leaves of params and its layer chain, for rebuilding the tree."""

  def __init__(self, params: Any, layers):
    self.chain = layers_lib.find_layers(params, layers)
    named_leaves, self.treedef = layers_lib.flatten_with_names(params)
    self.leaves = [leaf for _, leaf in named_leaves]

  @property
  def hidden_widths(self) -> list[int]:
    return [self.leaves[layer.kernel].shape[1] for layer in self.chain[:-1]]

  def scale_units(self, l: int, *factors: jax.Array) -> None:
    """Applies rho of eq. 1 to every unit of dense layer ``l``, by the product of ``factors``.

    The factors are applied one after the other, so that their product may lie beyond
    the float range where the rescaled weights do not.
    """
    incoming, outgoing = self.chain[l], self.chain[l + 1]
    for factor in map(numerics.replicated, factors):  # meets rows and columns: whole
      self._update(incoming.kernel, lambda w, f=factor: w * f.astype(w.dtype)[None, :])
      if incoming.bias is not None:
        self._update(incoming.bias, lambda b, f=factor: b * f.astype(b.dtype))
      self._update(outgoing.kernel, lambda w, f=factor: w / f.astype(w.dtype)[:, None])

  def _update(self, index: int, fn) -> None:
    self.leaves[index] = fn(self.leaves[index])

  def tree(self) -> Any:
    return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_integer(name: str, value) -> None:
  """``value`` is an integer (Python, numpy or JAX, any shape), not a bool."""
  dtype = getattr(value, 'dtype', None)
  if isinstance(value, (bool, np.bool_)) or (
    dtype is not None and not jnp.issubdtype(dtype, jnp.integer)
  ):
    raise ValueError(f'{name} must be an int, got {value!r}.')
  if dtype is None and not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an int, got {value!r}.')


def _check_hidden_layer(net: _Net, layer) -> int:
  _check_integer('layer', layer)
  if _is_traced(layer) or np.ndim(layer) != 0:
    raise ValueError(f'layer must be a concrete int (it selects arrays), got {layer!r}.')
  layer = int(layer)
  if not 0 <= layer < len(net.chain) - 1:
    raise ValueError(
      f'layer={layer} is not a hidden layer: the chain has {len(net.chain)} dense layers '
      f'({", ".join(layers_lib.format_path(l.path) for l in net.chain)}), so the hidden '
      f'ones are 0..{len(net.chain) - 2}.'
    )
  return layer


def _check_unit(unit, layer: int, width: int) -> None:
  """An int index or an integer array of indices, in ``[0, width)`` when concrete."""
  _check_integer('unit', unit)
  if _is_traced(unit):
    return
  values = np.asarray(unit)
  outside = values[(values < 0) | (values >= width)]
  if outside.size:
    raise ValueError(
      f'unit={outside.reshape(-1)[0]} is out of range for layer {layer}, which has {width} '
      f'units (indices 0..{width - 1}).'
    )


def _check_factor(c) -> None:
  """``c`` real (Python, numpy or JAX; a scalar or one per unit), finite and > 0 when
  concrete."""
  if not numerics.is_real(c):
    raise ValueError(f'c must be a finite number > 0, got {c!r}.')
  if _is_traced(c):
    return
  values = np.asarray(c, np.float64)
  if not np.all(np.isfinite(values) & (values > 0)):
    raise ValueError(f'c must be a finite number > 0, got {c!r}.')


def _left_range(old: jax.Array, new: jax.Array) -> jax.Array:
  """Where a finite weight became non-finite, or a nonzero one 0 or subnormal."""
  tiny = float(jnp.finfo(new.dtype).tiny)
  return jnp.isfinite(old) & (~jnp.isfinite(new) | ((old != 0) & (jnp.abs(new) < tiny)))


def _scale_units_in_range(net: _Net, l: int, factors, describe) -> None:
  """``net.scale_units(l, *factors)``, then a ``ValueError`` if a weight left the range.

  Checked where everything is concrete (a traced call is not checked): a weight of the
  unit's kernel column, bias or next-kernel row that became ``inf``/NaN, or a nonzero
  one that became 0 or subnormal, in the params' dtype. ``describe(unit)`` says which
  rescaling it was, for the message.
  """
  incoming, outgoing = net.chain[l], net.chain[l + 1]
  axes = {incoming.kernel: 0, outgoing.kernel: 1}
  if incoming.bias is not None:
    axes[incoming.bias] = None
  before = {i: net.leaves[i] for i in axes}
  net.scale_units(l, *factors)
  arrays = list(before.values()) + [net.leaves[i] for i in axes] + list(factors)
  if any(_is_traced(a) for a in arrays):
    return
  bad = sum(
    numerics.replicated(
      jnp.any(_left_range(before[i], net.leaves[i]), axis=axis)
      if axis is not None
      else _left_range(before[i], net.leaves[i])
    )
    for i, axis in axes.items()
  )
  units = np.flatnonzero(np.asarray(bad))
  if units.size:
    dtype = jnp.dtype(net.leaves[incoming.kernel].dtype)
    raise ValueError(
      f'{describe(int(units[0]))} would take weights of unit {int(units[0])} of '
      f'{layers_lib.format_path(incoming.path)} out of the {dtype} range (to inf, or a '
      f'nonzero weight to 0 or a subnormal; {units.size} unit(s) in all): the rescaled '
      'network would not compute the same function.'
    )


def rescale(params: Any, layer: int, unit, c, *, layers=None) -> Any:
  """The rescaling ``rho_{c,v}`` of eq. 1 for hidden unit ``unit`` of dense ``layer``.

  Multiplies the unit's kernel column and bias in layer ``layer`` by ``c`` and divides
  its row of the kernel of layer ``layer + 1`` by ``c``: the same function.

  Python, numpy and JAX numbers are checked alike. A traced ``unit`` or ``c`` (inside
  ``jit``) cannot be checked: its values are then the caller's responsibility, and a
  factor out of range gives ``inf`` or 0 weights.

  Args:
    params: params pytree of a ReLU MLP.
    layer: 0-based index of a dense layer that is not the last one, a concrete int.
    unit: index of the unit among the layer's outputs, an int or an integer array of
      indices (may be traced).
    c: the factor, a real number > 0, or one per index of ``unit`` (may be traced).
    layers: optional layer key paths from input to output.

  Returns:
    The rescaled params, same structure and dtypes.

  Raises:
    ValueError: ``layer`` is not a hidden layer; ``unit`` is not an integer or out of
      range; ``c`` is not a finite real > 0 (``bool``, complex and strings included);
      or the rescaled weights would leave the params' dtype's range (a weight becoming
      ``inf``, or a nonzero one 0 or subnormal, e.g. ``c = 1e39`` in float32). The
      message names the layer, the unit and the factor.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = [{'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, {'kernel': jnp.ones((2, 1))}]
    >>> optax_path.rescale(params, 0, 1, 4.0)[1]['kernel']
    Array([[1.  ],
           [0.25]], dtype=float32)
  """
  net = _Net(params, layers)
  layer = _check_hidden_layer(net, layer)
  width = net.hidden_widths[layer]
  _check_unit(unit, layer, width)
  _check_factor(c)
  if np.ndim(c) > 0 and np.shape(c) != np.shape(unit):
    raise ValueError(
      f'c has shape {np.shape(c)} and unit {np.shape(unit)}: give one factor c (a scalar) '
      'or one per index of unit (an array of the shape of unit).'
    )
  c_dtype = jnp.result_type(c, jnp.float32)
  if not jnp.issubdtype(c_dtype, jnp.floating):
    c_dtype = jnp.float32
  factor = jnp.ones(width, c_dtype).at[unit].set(c)
  _scale_units_in_range(net, layer, [factor], lambda u: f'rescale by c={c!r}')
  return net.tree()


def _log10_headroom(net: _Net, l: int, margin: float) -> jax.Array:
  """Per unit of layer ``l``: how many decades it can be scaled up and stay normal."""
  incoming, outgoing = net.chain[l], net.chain[l + 1]
  kernel_in = jnp.abs(net.leaves[incoming.kernel]).astype(jnp.float32)
  largest_in = numerics.replicated(jnp.max(kernel_in, axis=0))
  if incoming.bias is not None:
    bias = numerics.replicated(net.leaves[incoming.bias])
    largest_in = jnp.maximum(largest_in, jnp.abs(bias).astype(jnp.float32))
  kernel_out = jnp.abs(net.leaves[outgoing.kernel]).astype(jnp.float32)
  smallest_out = numerics.replicated(
    jnp.min(jnp.where(kernel_out > 0, kernel_out, jnp.inf), axis=1)
  )
  info = jnp.finfo(net.leaves[incoming.kernel].dtype)
  up = jnp.log10(float(info.max)) - jnp.log10(largest_in)
  down = jnp.log10(smallest_out) - jnp.log10(float(info.tiny))
  return jnp.maximum(jnp.minimum(up, down) - margin, 0.0)


#: The factor of one pick of :func:`unbalance`, as ``log10(factor)`` of ``z ~ N(0, 1)``.
UNBALANCE_SCHEMES = {
  # The authors' MATLAB code (makeUnbalanced in path-sgd/initialize.m of
  # lokhande-vishnu/deepcg): scale = 10 * exp(randn).
  'authors': lambda z: 1.0 + z / math.log(10.0),
  # 10^exp(z): far harsher than the paper (a unit reaches 1e20 and beyond).
  'stress': jnp.exp,
}


def unbalance(
  key: jax.Array, params: Any, num_units: int, *, scheme: str = 'authors', layers=None
) -> Any:
  """The paper's unbalanced initialisation (Section 5): same function, badly scaled.

  Picks ``num_units`` hidden units uniformly with replacement over all hidden layers
  and applies ``rho_{c, v}`` (eq. 1) to each: the unit's incoming weights (kernel
  column and bias) are multiplied by ``c`` and its outgoing weights (row of the next
  kernel) divided by it. A unit picked twice is rescaled twice (the factors multiply).
  With ``z ~ N(0, 1)`` drawn per pick, the factor is

  - ``scheme='authors'`` (default): ``c = 10 * exp(z)``, as the authors' released MATLAB
    code does it (``makeUnbalanced`` in ``path-sgd/initialize.m``, github.com/
    lokhande-vishnu/deepcg), which settles the paper's ambiguous "10c, where c was chosen
    randomly from log-normal distribution". ``log(c / 10) ~ N(0, 1)``: factors of about
    1.4 to 74 (two standard deviations). This is the paper's init.
  - ``scheme='stress'``: ``c = 10^exp(z)``, much harsher than the paper: factors reach
    1e20 and beyond (a few units in a thousand), so that ``|W|^2`` and the path scales
    leave the float32 range. It exercises the float32-robust numerics of this library.

  Where a unit's factor would push one of its weights out of the normal range of the
  params' dtype (beyond 1e38 or below 1e-38 in float32; only ``'stress'`` gets there),
  the factor is capped so that its weights stay a thousand times inside that range, and
  the function is kept.

  Args:
    key: a ``jax.random`` key.
    params: params pytree of a ReLU MLP with at least one hidden layer.
    num_units: how many units to pick, an int >= 0 (the paper: 2000 for two layers of
      4000, a quarter of the hidden units).
    scheme: ``'authors'`` or ``'stress'`` (static), see above.
    layers: optional layer key paths from input to output.

  Returns:
    The unbalanced params, same structure, shapes and dtypes.

  Raises:
    ValueError: if the net has no hidden layer, ``num_units`` is not an int >= 0 or
      ``scheme`` is unknown.

  Example:
    >>> import jax, jax.numpy as jnp, optax_path
    >>> params = [{'kernel': jnp.ones((4, 8))}, {'kernel': jnp.ones((8, 1))}]
    >>> skewed = optax_path.unbalance(jax.random.key(0), params, 4)
    >>> bool(jnp.allclose(optax_path.path_norm(skewed), optax_path.path_norm(params)))
    True

  References:
    Neyshabur, Salakhutdinov & Srebro, Path-SGD, NeurIPS 2015, Section 5.
  """
  if scheme not in UNBALANCE_SCHEMES:
    raise ValueError(f'scheme must be one of {", ".join(UNBALANCE_SCHEMES)}, got {scheme!r}.')
  net = _Net(params, layers)
  widths = net.hidden_widths
  if not widths:
    raise ValueError('unbalance needs a hidden layer; params has a single dense layer.')
  if not (isinstance(num_units, int) and num_units >= 0):
    raise ValueError(f'num_units must be an int >= 0, got {num_units!r}.')
  pick_key, exponent_key = jax.random.split(key)
  picks = jax.random.randint(pick_key, (num_units,), 0, sum(widths))
  decades = UNBALANCE_SCHEMES[scheme](jax.random.normal(exponent_key, (num_units,)))
  total = jax.ops.segment_sum(decades, picks, num_segments=sum(widths))
  start = 0
  for l, width in enumerate(widths):
    log10_factor = jnp.minimum(total[start : start + width], _log10_headroom(net, l, margin=3.0))
    half = 10.0 ** (log10_factor / 2)
    net.scale_units(l, half, half)
    start += width
  return net.tree()


def _inverse_p_norm(pieces: list[jax.Array], p: float) -> tuple[list[jax.Array], jax.Array]:
  """``1 / ||x||_p`` of each column of ``pieces`` stacked (1 for zero columns), as two
  factors, and its log. (Not concatenated: a kernel and its bias may be split apart.)

  ``||x||_p = 2^e (sum (|x| 2^-e)^p)^(1/p)``, ``2^e`` the power of two just above
  ``max|x|``: every term of the sum lies in ``[0, 1)``, so nothing overflows, however
  large the entries or small ``p``. The factor is ``2^-ceil(e/2)`` times
  ``2^-floor(e/2) sum^(-1/p)``: both normal numbers wherever ``max|x|`` lies, the first
  exact, so that a factor beyond the float range (``max|x| = 3e38``) is still applied
  to a few ulps. (Dividing by ``max|x|`` would not do: XLA on CPU divides by
  multiplying with the reciprocal, which flushes ``1 / 3e38`` to 0.)
  """
  largest = functools.reduce(
    jnp.maximum, [numerics.replicated(jnp.max(jnp.abs(x), axis=0)) for x in pieces]
  )
  e = jnp.where(largest > 0, numerics.exponent(largest), 0)
  total = sum(
    numerics.replicated(jnp.sum(numerics.ldexp(jnp.abs(x), -e[None, :]) ** p, axis=0))
    for x in pieces
  )
  log_sum = jnp.log(jnp.where(largest > 0, total, 1.0))
  half = e >> 1
  first = numerics.ldexp(jnp.ones_like(largest), half - e)
  second = numerics.ldexp(jnp.exp(-log_sum / p), -half)
  return [first, second], e * numerics.LN2 + log_sum / p


def rebalance(params: Any, p: float = 2.0, *, layers=None) -> Any:
  """The rescaling-equivalent net whose hidden units have incoming vectors of p-norm 1.

  Going from the first hidden layer to the last, each unit ``v`` with incoming vector
  (kernel column and bias) ``x_v != 0`` gets ``rho_{1/||x_v||_p, v}``; units whose
  incoming vector is zero stay as they are. The function and ``path_norm`` are kept.

  The norms are computed scaled by their largest entry (``_inverse_p_norm``), so no ``|x|^p`` or
  ``||x||^p`` overflows; where the rebalanced weights themselves would leave the
  params' dtype's range, it raises rather than return ``inf`` or 0 weights.

  Args:
    params: params pytree of a ReLU MLP.
    p: the norm, a number in ``[0.5, 32]`` (``numerics.validate_p``; at ``p = 0.01``
      a norm is ``max|x| n^100``, beyond any float range).
    layers: optional layer key paths from input to output.

  Returns:
    The rebalanced params, same structure and dtypes.

  Raises:
    ValueError: ``p`` is invalid, or a rebalanced weight would leave the range of the
      params' dtype (the message names the layer, the unit and the factor).

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = [{'kernel': jnp.array([[3.], [4.]])}, {'kernel': jnp.array([[1.]])}]
    >>> optax_path.rebalance(params)[1]['kernel']
    Array([[5.]], dtype=float32)
  """
  p = validate_p(p)
  net = _Net(params, layers)
  for l in range(len(net.chain) - 1):
    layer = net.chain[l]
    dtype = compute_dtype(net.leaves[layer.kernel].dtype)
    incoming = [net.leaves[layer.kernel].astype(dtype)]
    if layer.bias is not None:
      incoming.append(net.leaves[layer.bias].astype(dtype)[None])
    factors, log_norm = _inverse_p_norm(incoming, p)
    _scale_units_in_range(
      net, l, factors, lambda u, n=log_norm: f'rebalance (1 / ||x||_p = exp(-{float(n[u]):.6g}))'
    )
  return net.tree()
