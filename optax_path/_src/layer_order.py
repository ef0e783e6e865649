"""The order of a network's dense layers, read from its own forward pass.

Params do not hold the order of the layers (see ``layers``); the forward pass does. It
is traced once, abstractly (no FLOPs), and the kernels are listed in the order in which
matrix products consume them, following every value from the kernel leaf to the
product through casts, transposes and nested calls (``jit``, ``custom_jvp``,
``checkpoint``). Each kernel must be contracted over its first axis, as the MLP mode
reads it (``(in, out)``); one applied as ``x @ W.T`` is refused. The result is what
``layers=`` takes.
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
  """The body of a call-like equation whose inputs are the equation's own, or None (a
  loop or branch: its body may run several times, or not at all)."""
  if eqn.primitive.name in ('scan', 'while', 'cond'):
    return None
  for name in _INNER_JAXPR_PARAMS:
    inner = eqn.params.get(name)
    inner = getattr(inner, 'jaxpr', inner)
    if isinstance(inner, jex_core.Jaxpr) and len(inner.invars) == len(eqn.invars):
      return inner
  return None


class _Trace:
  """What ``_walk`` finds: per value, the leaves it is computed from (``sources``) and
  the last dense layers on its paths from the input (``frontier``: the kernels of the
  latest matrix products by a kernel, or ``_INPUT``); in program order, the weight leaf of each
  product (``uses``) and the frontier of its other operand (``feeds``); and the leaves
  that flow into loops or branches it cannot see into (``opaque``)."""

  def __init__(self, sources: dict, frontier: dict, kernels, axes: dict | None = None):
    self.sources, self.frontier, self.kernels = sources, frontier, kernels
    self.axes = {} if axes is None else axes  # a kernel, cast or transposed: its axes
    self.uses: list[int] = []
    self.feeds: list[frozenset] = []
    self.opaque: set[int] = set()
    self.transposed: set[int] = set()  # kernels contracted on their out axis (x @ W.T)
    self.unverified: set[int] = set()  # kernels reshaped or gathered before a product

  def read(self, table: dict, atom) -> frozenset:
    return table.get(atom, frozenset()) if isinstance(atom, jex_core.Var) else frozenset()


def _walk(jaxpr, trace: _Trace) -> list[frozenset]:
  """Fills ``trace`` for ``jaxpr``; returns the frontier of its outputs."""
  for eqn in jaxpr.eqns:
    inputs = [trace.read(trace.sources, v) for v in eqn.invars]
    fronts = [trace.read(trace.frontier, v) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if inner is not None:
      trace.sources.update(zip(inner.invars, inputs))
      trace.frontier.update(zip(inner.invars, fronts))
      trace.axes.update(
        (i, trace.axes[v]) for i, v in zip(inner.invars, eqn.invars) if trace.read(trace.axes, v)
      )
      _walk(inner, trace)
      trace.axes.update(
        (v, trace.axes[i]) for v, i in zip(eqn.outvars, inner.outvars) if trace.read(trace.axes, i)
      )
      outputs = [trace.read(trace.sources, v) for v in inner.outvars]
      out_fronts = [trace.read(trace.frontier, v) for v in inner.outvars]
    else:
      union = frozenset().union(*inputs)
      front = frozenset().union(*fronts)
      _follow_axes(eqn, trace)
      if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
        weights = [next(iter(d)) for d in inputs if len(d) == 1 and _INPUT not in d]
        data = [f for d, f in zip(inputs, fronts) if not (len(d) == 1 and _INPUT not in d)]
        trace.uses.extend(weights)
        trace.feeds.extend([frozenset().union(*data)] * len(weights))
        if weights and not (set(weights) - trace.kernels and front == {_INPUT}):
          front = frozenset(weights)  # a product by a param that is no kernel: on the input
          # side (one_hot(x) @ E) part of the input, elsewhere a map the chain does not see
      elif eqn.primitive.name in ('mul', 'div'):
        factors = [next(iter(d)) for d in inputs if len(d) == 1 and _INPUT not in d]
        if factors and front != {_INPUT}:  # h * g, a param that scales units (LayerScale)
          front = frozenset(factors)
      else:  # in a loop or branch, the kernels applied inside (none elsewhere)
        trace.opaque.update(_kernels_in_bodies(eqn, inputs, trace.kernels))
      outputs, out_fronts = [union] * len(eqn.outvars), [front] * len(eqn.outvars)
    trace.sources.update(zip(eqn.outvars, outputs))
    trace.frontier.update(zip(eqn.outvars, out_fronts))
  return [trace.read(trace.frontier, v) for v in jaxpr.outvars]


def _follow_axes(eqn, trace: _Trace) -> None:
  """Which axes of a kernel a cast or transposed copy has, and whether a matrix product
  contracts a kernel over its output axis (``x @ W.T``, an Einsum ``'bi,oi->bo'``)."""
  name, axes = eqn.primitive.name, [trace.read(trace.axes, v) or None for v in eqn.invars]
  if name == 'optimization_barrier':
    trace.axes.update((out, kept) for out, kept in zip(eqn.outvars, axes) if kept is not None)
  elif (
    name == 'reshape'
    and axes[0] is not None
    and eqn.outvars[0].aval.shape == eqn.invars[0].aval.shape
  ):
    trace.axes[eqn.outvars[0]] = axes[0]
  elif name == 'transpose' and axes[0] is not None:
    trace.axes[eqn.outvars[0]] = tuple(axes[0][i] for i in eqn.params['permutation'])
  elif _elementwise(eqn):  # tanh(W), W * mask, a flip or a cumsum: the axes stay
    shape = eqn.outvars[0].aval.shape
    kept = [a for a, v in zip(axes, eqn.invars) if a is not None and v.aval.shape == shape]
    if kept:
      trace.axes[eqn.outvars[0]] = kept[0]
  elif name == 'dot_general':
    contracting = eqn.params['dimension_numbers'][0]
    for operand, dims, kept in zip(eqn.invars, contracting, axes):
      sources = trace.read(trace.sources, operand)
      if kept is not None and {kept[d] for d in dims} == {1}:
        trace.transposed |= sources
      elif kept is None and len(sources) == 1 and sources <= trace.kernels:
        trace.unverified |= sources


def _elementwise(eqn) -> bool:
  """Whether ``eqn`` maps its operands entry by entry, or within each axis: one output,
  every operand of its shape up to broadcast axes of size 1, or a scalar (not a gather,
  product or reshape, whose operands differ in shape; a transpose is followed on its
  own)."""
  if len(eqn.outvars) != 1 or eqn.primitive.name in ('transpose', 'reshape'):
    return False
  shape = eqn.outvars[0].aval.shape
  broadcast = lambda s: (
    s == () or (len(s) == len(shape) and all(n in (1, m) for n, m in zip(s, shape)))
  )  # W - W.mean(0, keepdims=True)
  return all(broadcast(getattr(v.aval, 'shape', None)) for v in eqn.invars)


def _kernels_in_bodies(eqn, inputs: list[frozenset], kernels: set[int]) -> set[int]:
  """The kernels that a loop's or branch's bodies apply (or that they hide in loops of
  their own): those the trace cannot order."""
  found: set[int] = set()
  for value in eqn.params.values():
    for body in value if isinstance(value, (tuple, list)) else [value]:
      jaxpr = getattr(body, 'jaxpr', body)
      if not isinstance(jaxpr, jex_core.Jaxpr):
        continue
      if len(jaxpr.invars) == len(inputs):
        sources = dict(zip(jaxpr.invars, inputs))
      elif len(jaxpr.invars) == len(inputs) - 1:  # a cond's branches: not its index
        sources = dict(zip(jaxpr.invars, inputs[1:]))
      else:  # a while's bodies: each input may be any of them
        sources = dict.fromkeys(jaxpr.invars, frozenset().union(*inputs))
      inner = _Trace(sources, {}, kernels)
      _walk(jaxpr, inner)
      found |= {i for i in inner.uses if i in kernels} | inner.opaque
  return found


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
      matrix product in the trace: such networks need the general mode or ``layers=``;
      or if the layers do not form a chain (a residual or skip connection: a layer, or
      the output, computed from other than the previous layer), which needs the general
      mode.

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
  axes = {jaxpr.invars[arrays.index(i)]: (0, 1) for i in kernels}
  trace = _Trace(sources, {jaxpr.invars[-1]: frozenset([_INPUT])}, set(kernels), axes)
  output = frozenset().union(*_walk(jaxpr, trace))
  uses, opaque = trace.uses, trace.opaque
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
  unverified = [name(i) for i in kernels if i in trace.unverified]
  if unverified:
    raise ValueError(
      f'apply_fn reshapes, slices or gathers the kernels of {", ".join(unverified)} before '
      'a matrix product, so it cannot be told which of their axes is the input one. The '
      'MLP mode reads every kernel as (in, out): use the general mode (apply_fn=, '
      'input_shape=), which follows the products as apply_fn computes them.'
    )
  transposed = [name(i) for i in kernels if i in trace.transposed]
  if transposed:
    raise ValueError(
      f'apply_fn contracts the kernels of {", ".join(transposed)} over their second axis '
      "(x @ W.T, an Einsum 'bi,oi->bo'): they are stored (out, in), the PyTorch layout. The "
      'MLP mode reads every kernel as (in, out), the Flax layout, so it would compute the '
      'scales of another network: store the transposes, or use the general mode '
      '(apply_fn=, input_shape=), which follows the products as apply_fn computes them.'
    )
  order = [i for i in uses if i in kernels]
  missing = [name(i) for i in kernels if i not in order]
  if missing:
    raise ValueError(
      f'The kernels of {", ".join(missing)} are not the weight of a matrix product in the '
      'trace of apply_fn (unused, applied inside a loop such as nn.scan, or combined '
      "with other params before the product, as a LoRA's W + A @ B, which the MLP mode "
      'would not see): list the layers from input to output by hand with layers=, or use '
      'the general mode (apply_fn=, input_shape=).'
    )

  def describe(i):
    return name(i) if i in kernels else f'{layers_lib.format_path(named_leaves[i][0])} (no kernel)'

  _check_chain(order, [f for i, f in zip(uses, trace.feeds) if i in kernels], output, describe)
  return [layers_lib.format_path(kernels[i]) for i in order]


def _check_chain(order: list[int], feeds: list[frozenset], output: frozenset, name) -> None:
  """Raises unless each layer takes the previous layer's output (or the input, the
  first) and the network returns the last one's: the chain the MLP mode computes."""
  wanted = [frozenset([_INPUT])] + [frozenset([i]) for i in order]
  for j, (i, feed) in enumerate(zip(order, feeds)):
    if feed != wanted[j]:
      _not_a_chain(f'the input of {name(i)}', feed, name)
  if output != wanted[-1]:
    _not_a_chain('the output', output, name)


def _not_a_chain(what: str, front: frozenset, name) -> None:
  sources = sorted('the input' if i == _INPUT else f'{name(i)}' for i in front) or ['no layer']
  raise ValueError(
    f'apply_fn is not a chain of dense layers: {what} is computed from {" and ".join(sources)} '
    '(a residual or skip connection, a concatenation, branches or several heads, a product '
    "by a param that is no dense layer's kernel). The MLP mode "
    'sees only a chain, so its path scales would be those of another network: use the general '
    'mode (apply_fn=, input_shape=), which counts every path of this one.'
  )
