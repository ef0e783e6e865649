"""Node rescalings of ReLU MLPs (eq. 1): one unit, the paper's unbalancing, rebalancing.

The rescaling ``rho_{c,v}`` multiplies the incoming edges of hidden unit ``v`` (its
kernel column and its bias) by ``c > 0`` and divides its outgoing edges (its row of
the next kernel) by ``c``. Since ``relu(c z) = c relu(z)``, the network computes the
same function.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from optax_path._src import layers as layers_lib
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
    for factor in factors:
      self._update(incoming.kernel, lambda w, f=factor: w * f.astype(w.dtype)[None, :])
      if incoming.bias is not None:
        self._update(incoming.bias, lambda b, f=factor: b * f.astype(b.dtype))
      self._update(outgoing.kernel, lambda w, f=factor: w / f.astype(w.dtype)[:, None])

  def _update(self, index: int, fn) -> None:
    self.leaves[index] = fn(self.leaves[index])

  def tree(self) -> Any:
    return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


def _check_hidden_layer(net: _Net, layer: int) -> None:
  if not 0 <= layer < len(net.chain) - 1:
    raise ValueError(
      f'layer={layer} is not a hidden layer: the chain has {len(net.chain)} dense layers '
      f'({", ".join(layers_lib.format_path(l.path) for l in net.chain)}), so the hidden '
      f'ones are 0..{len(net.chain) - 2}.'
    )


def rescale(params: Any, layer: int, unit, c, *, layers=None) -> Any:
  """The rescaling ``rho_{c,v}`` of eq. 1 for hidden unit ``unit`` of dense ``layer``.

  Multiplies the unit's kernel column and bias in layer ``layer`` by ``c`` and divides
  its row of the kernel of layer ``layer + 1`` by ``c``: the same function.

  Args:
    params: params pytree of a ReLU MLP.
    layer: 0-based index of a dense layer that is not the last one.
    unit: index of the unit among the layer's outputs (may be traced).
    c: the factor, > 0 (may be traced).
    layers: optional layer key paths from input to output.

  Returns:
    The rescaled params, same structure and dtypes.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = [{'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, {'kernel': jnp.ones((2, 1))}]
    >>> optax_path.rescale(params, 0, 1, 4.0)[1]['kernel']
    Array([[1.  ],
           [0.25]], dtype=float32)
  """
  net = _Net(params, layers)
  _check_hidden_layer(net, layer)
  width = net.hidden_widths[layer]
  if isinstance(unit, int) and not 0 <= unit < width:
    raise ValueError(f'unit={unit} is out of range for layer {layer}, which has {width} units.')
  if isinstance(c, (int, float)) and not (math.isfinite(c) and c > 0):
    raise ValueError(f'c must be a finite number > 0, got {c!r}.')
  factor = jnp.ones(width, jnp.result_type(c, jnp.float32)).at[unit].set(c)
  net.scale_units(layer, factor)
  return net.tree()


def _log10_headroom(net: _Net, l: int, margin: float) -> jax.Array:
  """Per unit of layer ``l``: how many decades it can be scaled up and stay normal."""
  incoming, outgoing = net.chain[l], net.chain[l + 1]
  kernel_in = jnp.abs(net.leaves[incoming.kernel]).astype(jnp.float32)
  largest_in = jnp.max(kernel_in, axis=0)
  if incoming.bias is not None:
    largest_in = jnp.maximum(largest_in, jnp.abs(net.leaves[incoming.bias]).astype(jnp.float32))
  kernel_out = jnp.abs(net.leaves[outgoing.kernel]).astype(jnp.float32)
  smallest_out = jnp.min(jnp.where(kernel_out > 0, kernel_out, jnp.inf), axis=1)
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


def _p_norm(columns: jax.Array, p: float) -> jax.Array:
  """``||x||_p`` of each column, 1 for zero columns; ``|x|^p`` never overflows."""
  largest = jnp.max(jnp.abs(columns), axis=0)
  safe = jnp.where(largest > 0, largest, 1.0)
  norm = safe * jnp.sum((jnp.abs(columns) / safe) ** p, axis=0) ** (1 / p)
  return jnp.where(largest > 0, norm, 1.0)


def rebalance(params: Any, p: float = 2.0, *, layers=None) -> Any:
  """The rescaling-equivalent net whose hidden units have incoming vectors of p-norm 1.

  Going from the first hidden layer to the last, each unit ``v`` with incoming vector
  (kernel column and bias) ``x_v != 0`` gets ``rho_{1/||x_v||_p, v}``; units whose
  incoming vector is zero stay as they are. The function and ``path_norm`` are kept.

  Args:
    params: params pytree of a ReLU MLP.
    p: the norm, a number > 0.
    layers: optional layer key paths from input to output.

  Returns:
    The rebalanced params, same structure and dtypes.

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
    incoming = net.leaves[layer.kernel].astype(dtype)
    if layer.bias is not None:
      incoming = jnp.concatenate([incoming, net.leaves[layer.bias].astype(dtype)[None]])
    net.scale_units(l, 1 / _p_norm(incoming, p))
  return net.tree()
