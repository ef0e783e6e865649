"""The order of a network's dense layers, read from its own forward pass.

Params do not hold the order of the layers (see ``layers``); the forward pass does. It
is traced once, abstractly (no FLOPs), and the kernels are listed in the order in which
matrix products consume them, following every value from the kernel leaf to the
product through casts, transposes and nested calls (``jit``, ``custom_jvp``,
``checkpoint``). The result is what ``layers=`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

from optax_path._src import general
from optax_path._src import layers as layers_lib

_INNER_JAXPR_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')
_INPUT = -1  # marks values computed from the network's input


def _inner_jaxpr(eqn) -> Any | None:
  """The body of a call-like equation whose inputs are the equation's own, or None."""
  for name in _INNER_JAXPR_PARAMS:
    inner = eqn.params.get(name)
    inner = getattr(inner, 'jaxpr', inner)
    if isinstance(inner, jex_core.Jaxpr) and len(inner.invars) == len(eqn.invars):
      return inner
  return None


def _has_body(eqn) -> bool:
  """Whether an equation carries a jaxpr of its own (a loop, a branch, a call)."""
  def is_jaxpr(value):
    return isinstance(getattr(value, 'jaxpr', value), jex_core.Jaxpr)

  return any(
    is_jaxpr(v) or (isinstance(v, (tuple, list)) and any(is_jaxpr(x) for x in v))
    for v in eqn.params.values()
  )


def _walk(jaxpr, sources: dict, uses: list[int], opaque: set[int]) -> list[frozenset]:
  """Propagates, for every value, the set of leaves it is computed from; records, in
  program order, the leaf that is the weight operand of each matrix product (``uses``),
  and the leaves that flow into loops or branches it cannot see into (``opaque``)."""

  def read(atom) -> frozenset:
    return sources.get(atom, frozenset()) if isinstance(atom, jex_core.Var) else frozenset()

  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if inner is not None:
      sources.update(zip(inner.invars, inputs))
      outputs = _walk(inner, sources, uses, opaque)
    else:
      if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
        uses.extend(next(iter(d)) for d in inputs if len(d) == 1 and _INPUT not in d)
      elif _has_body(eqn):
        opaque.update(i for d in inputs for i in d if i != _INPUT)
      union = frozenset().union(*inputs)
      outputs = [union] * len(eqn.outvars)
    sources.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def layer_order(
  params: Any, *, apply_fn: Callable[[Any, jax.Array], Any], input_shape: Sequence[int]
) -> list[str]:
  """The dense layers of ``params``, in the order ``apply_fn`` applies them.

  Pass the result as ``layers=`` to ``path_normalize``, ``path_sgd`` and the other
  functions of the MLP mode, when the names of the layers do not decide their order
  (``encoder``/``decoder``, ``input``/``hidden``/``output``, submodules).

  Args:
    params: the params pytree that ``apply_fn`` takes.
    apply_fn: the network's forward pass ``apply_fn(params, x)`` on a batch ``x``, e.g.
      ``lambda q, x: model.apply({'params': q}, x)`` (Linen) or
      ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX). It is traced, not run.
    input_shape: the shape of one input, without the batch axis.

  Returns:
    The key path of every dense layer (a node with a 2-D ``kernel``), as ``'a/b'``
    strings, from input to output.

  Raises:
    ValueError: if ``apply_fn`` is not callable, ``input_shape`` is no shape, a kernel is
      not 2-D (a convolution, ``nn.scan``), a kernel is applied more than once (a layer
      called twice, tied weights) or inside a loop or branch, or is not the weight of a
      matrix product in the trace: such networks need the general mode or ``layers=``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_path
    >>> class AutoEncoder(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.Dense(3, name='encoder')(x))
    ...     return nn.Dense(4, name='decoder')(x)
    >>> model = AutoEncoder()
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> optax_path.layer_order(params, apply_fn=lambda q, x: model.apply({'params': q}, x),
    ...                        input_shape=(4,))
    ['encoder', 'decoder']
  """
  general.check_apply_fn(apply_fn)
  shape = general.check_input_shape(input_shape)
  named_leaves, treedef = layers_lib.flatten_with_names(params)
  leaves = [leaf for _, leaf in named_leaves]
  arrays = [i for i, leaf in enumerate(leaves) if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')]
  kernels = {
    i: path[:-1]
    for i, (path, leaf) in enumerate(named_leaves)
    if path and path[-1] == 'kernel' and getattr(leaf, 'ndim', None) == 2
  }
  others = [
    f'{layers_lib.format_path(path)} {tuple(leaf.shape)}'
    for path, leaf in named_leaves
    if path and path[-1] == 'kernel' and getattr(leaf, 'ndim', 2) != 2
  ]
  if others:
    raise ValueError(
      f'These kernels are not 2-D dense kernels: {"; ".join(others)} (convolutions, or '
      'layers stacked by nn.scan). The MLP mode and layer_order handle dense layers only: '
      'use the general mode (apply_fn=, input_shape=) for such networks.'
    )
  if not kernels:
    raise ValueError('params holds no dense layer (a node with a 2-D "kernel" leaf).')

  def forward(values, x):
    full = list(leaves)
    for i, value in zip(arrays, values):
      full[i] = value
    return apply_fn(jax.tree_util.tree_unflatten(treedef, full), x)

  avals = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in arrays]
  dtype = jnp.result_type(*[leaves[i] for i in kernels])
  try:
    jaxpr = jax.make_jaxpr(forward)(avals, jax.ShapeDtypeStruct((1, *shape), dtype)).jaxpr
  except Exception as error:
    raise ValueError(
      f'apply_fn failed on params and an input of shape (1, *input_shape) = {(1, *shape)}; '
      'check input_shape (one input, without the batch axis).'
    ) from error
  sources = {v: frozenset([i]) for v, i in zip(jaxpr.invars, arrays)}
  sources[jaxpr.invars[-1]] = frozenset([_INPUT])
  uses: list[int] = []
  opaque: set[int] = set()
  _walk(jaxpr, sources, uses, opaque)
  name = lambda i: layers_lib.format_path(kernels[i])
  looped = [name(i) for i in kernels if i in opaque]
  if looped:
    raise ValueError(
      f'The kernels of {", ".join(looped)} are used inside a loop or branch of apply_fn '
      '(lax.scan, fori_loop, while_loop, cond), so the order of the layers cannot be read '
      'from the trace: list the layers from input to output with layers=, or use the '
      'general mode (apply_fn=, input_shape=), which follows any graph.'
    )
  reused = sorted({name(i) for i in uses if i in kernels and uses.count(i) > 1})
  if reused:
    raise ValueError(
      f'apply_fn applies the kernels of {", ".join(reused)} more than once (a layer called '
      'twice, or tied weights): the network is not a chain of distinct dense layers, which '
      'the MLP mode needs. Use the general mode (apply_fn=, input_shape=), which counts '
      'every path through shared weights.'
    )
  order = [i for i in uses if i in kernels]
  missing = [name(i) for i in kernels if i not in order]
  if missing:
    raise ValueError(
      f'The kernels of {", ".join(missing)} are not the weight of a matrix product in the '
      'trace of apply_fn (unused, or applied inside a loop such as nn.scan): list the '
      'layers from input to output by hand with layers=.'
    )
  return [layers_lib.format_path(kernels[i]) for i in order]

