"""Finding the chain of dense layers in a params pytree, in the network's order.

A dense layer is a pytree node with a 2-D floating ``kernel`` leaf of shape ``(in, out)``
(the Flax layout) and, optionally, a 1-D ``bias`` leaf of shape ``(out,)``: Linen's
``{'Dense_0': {'kernel': ..., 'bias': ...}, ...}``, layers with names of one's own,
``layers_0``, ``layers_1``..., and NNX states of ``nnx.Linear`` attributes or
``nnx.List`` items.

The order of the layers is the network's data flow, which params alone do not hold
(JAX rebuilds dicts with sorted keys, so not even the insertion order survives a
step). It is taken, in this order of preference, from:

1. ``layers=``, the layer key paths from input to output (``layer_order`` reads them
   from the model's own forward pass);
2. the names, where they decide it: the layers form one numbered family, their key
   paths differing only in components ``<prefix><n>`` with one prefix per position and
   distinct numbers (``Dense_0..Dense_11``, ``layers_0..``, ``nnx.List`` items,
   ``Block_0/Dense_1``), compared as numbers;
3. the shapes, where exactly one order of all the layers forms a chain (each ``in``
   equal to the previous ``out``).

Otherwise (several orders chain, as square layers always do) it raises a
``ValueError`` that lists the layers and the fix: never a guess.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

KeyPath = tuple[str, ...]
LayerSpec = str | int | Sequence[Any]

_ROUTING_ADVICE = (
  'path_normalize handles the dense layers of a ReLU MLP only. Route other leaves '
  'to another transformation with optax.partition (alias optax.multi_transform), or '
  'exclude them with optax.masked.'
)

_NORMALISATION_ADVICE = (
  '{} look like a normalisation layer (LayerNorm, BatchNorm, GroupNorm, RMSNorm), '
  "which is outside Path-SGD's rescaling argument: it divides its units by statistics "
  'of their values, so rescaling one unit (incoming weights times c, outgoing divided by '
  'c) changes the function, and path scales do not describe the network. To run anyway, '
  'mask these leaves (optax.masked, or optax.partition to another optimizer): they are '
  'then trained by the other optimizer, the dense layers get the path scales of the '
  "network without the normalisation, and Path-SGD's invariance no longer holds for the "
  'whole network.'
)

_NORMALISATION_NAME = re.compile(r'norm', re.IGNORECASE)


def _looks_like_normalisation(path: KeyPath) -> bool:
  """A leaf of LayerNorm, BatchNorm, GroupNorm, RMSNorm (Linen or NNX), or a ``scale``."""
  return bool(path) and (
    path[-1] in ('scale', 'mean', 'var') or any(_NORMALISATION_NAME.search(p) for p in path[:-1])
  )


class DenseLayer(NamedTuple):
  """Where one dense layer's leaves sit in the flattened params.

  Attributes:
    path: the layer's key path, e.g. ``('params', 'Dense_0')``.
    kernel: index of the ``(in, out)`` kernel among the flattened leaves.
    bias: index of the ``(out,)`` bias among the flattened leaves, or ``None``.
  """

  path: KeyPath
  kernel: int
  bias: int | None


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def key_path_names(key_path: Sequence[Any]) -> KeyPath:
  """A leaf's key path as strings, without NNX's trailing ``.value`` attribute."""
  names = tuple(_key_name(k) for k in key_path)
  if (
    key_path
    and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
    and names[-1] in ('value', 'raw_value')
  ):
    names = names[:-1]
  return names


def format_path(path: Sequence[str]) -> str:
  return '/'.join(path) if path else '<root>'


def _is_masked(leaf: Any) -> bool:
  return isinstance(leaf, optax.MaskedNode)


def flatten_with_names(tree: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
  """Flattens ``tree`` to ``(names, leaf)`` pairs, keeping ``MaskedNode`` leaves."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  return [(key_path_names(kp), leaf) for kp, leaf in leaves], treedef


def _describe(path: KeyPath, leaf: Any) -> str:
  shape = getattr(leaf, 'shape', None)
  return f'{format_path(path)} {tuple(shape) if shape is not None else type(leaf).__name__}'


_ORDER_ADVICE = (
  "Pass the order with layers=, from input to output, or read it from the model's own "
  'forward pass: layers = optax_path.layer_order(params, apply_fn=lambda q, x: '
  "model.apply({'params': q}, x), input_shape=(n_in,)) for Flax Linen, or with "
  'graphdef, params = nnx.split(model, nnx.Param) and apply_fn=lambda q, x: '
  'nnx.merge(graphdef, q)(x) for Flax NNX; then '
  'optax_path.path_sgd(lr, layers=layers) (or path_normalize(p, layers=layers)).'
)


def _describe_dtype(path: KeyPath, leaf: Any) -> str:
  return f'{_describe(path, leaf)} {getattr(leaf, "dtype", "")}'.rstrip()


# --- layers= -------------------------------------------------------------------------


def _parse_spec(position: int, spec: Any) -> KeyPath:
  """One entry of ``layers=`` as a key path: ``'a/b'``, an int, or a sequence of keys."""
  if isinstance(spec, str):
    path = tuple(part for part in spec.split('/') if part)
  elif isinstance(spec, int) and not isinstance(spec, bool):
    path = (str(spec),)
  elif isinstance(spec, (tuple, list)) and all(
    not isinstance(k, (bool, float)) and k is not None for k in spec
  ):
    path = tuple(_key_name(k) for k in spec)
  else:
    path = ()
  if not path:
    raise ValueError(
      f"layers=[{position}] is {spec!r}: each entry must be a layer's key path, as a "
      "string 'a/b' (e.g. 'Dense_0' or 'params/encoder'), an int (a list index) or a "
      'sequence of keys.'
    )
  return path


def normalize_layer_specs(layers: Any) -> tuple[KeyPath, ...] | None:
  """``layers=`` as a tuple of key paths, checked; ``None`` stays ``None``.

  Raises:
    ValueError: if ``layers`` is a string or mapping rather than a sequence of layer
      paths, is empty, has an entry that is no key path, or lists a layer twice.
  """
  if layers is None:
    return None
  if isinstance(layers, (str, bytes)) or hasattr(layers, 'keys'):
    raise ValueError(
      f'layers= must be a sequence of layer key paths from input to output, such as '
      f"['Dense_0', 'Dense_1']; got {layers!r}. For a single layer write [{layers!r}]."
    )
  try:
    specs = tuple(layers)
  except TypeError:
    raise ValueError(
      f'layers= must be a sequence of layer key paths from input to output; got {layers!r}.'
    ) from None
  if not specs:
    raise ValueError(
      'layers= is empty: list the dense layers from input to output, or leave it None to find them.'
    )
  paths = tuple(_parse_spec(i, spec) for i, spec in enumerate(specs))
  if len(set(paths)) != len(paths):
    raise ValueError(f'layers= lists a layer twice: {[format_path(p) for p in paths]}.')
  return paths


# --- the layers of params ----------------------------------------------------------------


def _group_by_parent(named_leaves) -> dict[KeyPath, dict[str, int]]:
  groups: dict[KeyPath, dict[str, int]] = {}
  for index, (path, leaf) in enumerate(named_leaves):
    groups.setdefault(path[:-1], {})[path[-1] if path else ''] = index
  return groups


def _check_float_leaf(path: KeyPath, leaf: Any) -> None:
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'{_describe_dtype(path, leaf)}: the weights of a dense layer must be real floating '
      'point arrays (float32, bfloat16, float16 or float64).'
    )


def _check_layer(path: KeyPath, children: dict[str, int], named_leaves) -> DenseLayer:
  """Validates one layer node: a 2-D floating kernel with units, an optional bias."""
  kernel = named_leaves[children['kernel']][1]
  if getattr(kernel, 'ndim', None) != 2:
    raise ValueError(
      f'{_describe(path + ("kernel",), kernel)}: a dense kernel must be 2-D, (in, out). '
      'This is the MLP mode, which reads a chain of dense layers from the params. For '
      'convolutions and any other ReLU network, use the general mode: pass the forward '
      'pass and the shape of one input, e.g. optax_path.path_sgd(lr, apply_fn=lambda q, x: '
      "model.apply({'params': q}, x), input_shape=(28, 28, 1)) (path_normalize, "
      'path_adam, path_scales and path_norm take apply_fn= and input_shape= too). (Routing '
      'the conv leaves elsewhere with optax.partition or optax.masked would give the dense '
      'layers the scales of another network, one without the convolutions.) If the first '
      'axis stacks copies of one net (an ensemble from jax.vmap(model.init)), map over it: '
      'jax.vmap(tx.init) and jax.vmap(tx.update).'
    )
  _check_float_leaf(path + ('kernel',), kernel)
  if 0 in kernel.shape:
    raise ValueError(
      f'{_describe(path + ("kernel",), kernel)}: a dense layer needs at least one input '
      'and one output unit.'
    )
  bias = children.get('bias')
  if bias is not None:
    bias_leaf = named_leaves[bias][1]
    if tuple(getattr(bias_leaf, 'shape', ())) != (kernel.shape[1],):
      raise ValueError(
        f'{_describe(path + ("bias",), bias_leaf)}: the bias of a dense layer with kernel '
        f'shape {tuple(kernel.shape)} must have shape ({kernel.shape[1]},).'
      )
    _check_float_leaf(path + ('bias',), bias_leaf)
  return DenseLayer(path, children['kernel'], bias)


def _masked_layer_error(path: KeyPath, listed: bool) -> ValueError:
  where = (
    'it is listed in layers=, so it is part of the chain'
    if listed
    else 'the library cannot tell whether it is part of the chain'
  )
  return ValueError(
    f'Dense layer {format_path(path)} arrives masked (optax.MaskedNode where its kernel '
    f'would be; {where}). Path scales need every layer of the network, frozen ones '
    'included: routing a frozen layer away from path_normalize (optax.partition, '
    'optax.masked) gives the scales of another network. Normalise the whole tree, then '
    'freeze: optax.chain(optax_path.path_normalize(), optax.masked(optax.set_to_zero(), '
    'frozen), optax.sgd(lr)), with frozen True on the frozen leaves.'
    + (
      ''
      if listed
      else " If this layer is not part of the network's chain of dense layers (an "
      'auxiliary head), pass layers= listing the chain from input to output.'
    )
  )


def _check_masking(path: KeyPath, children: dict[str, int], named_leaves) -> None:
  masked = [name for name, i in children.items() if _is_masked(named_leaves[i][1])]
  if masked and masked != list(children):
    raise ValueError(
      f'Layer {format_path(path)} is partly masked '
      f'({", ".join(format_path(path + (m,)) for m in masked)}): path scales need every '
      'weight and bias of each dense layer. Mask whole layers or other subtrees, not '
      'parts of a layer.'
    )


def _check_coverage(chain: set[KeyPath], named_leaves) -> None:
  """Every leaf must be masked or the kernel or bias of a layer in the chain."""
  stray = [
    _describe(path, leaf)
    for path, leaf in named_leaves
    if not _is_masked(leaf) and not (path[:-1] in chain and path[-1] in ('kernel', 'bias'))
  ]
  if stray:
    norms = [
      _describe(path, leaf)
      for path, leaf in named_leaves
      if not _is_masked(leaf)
      and not (path[:-1] in chain and path[-1] in ('kernel', 'bias'))
      and _looks_like_normalisation(path)
    ]
    raise ValueError(
      'These params leaves are not the kernel or bias of a dense layer in the chain: '
      + '; '.join(stray)
      + '. '
      + (
        _NORMALISATION_ADVICE.format(
          'They' if len(norms) == len(stray) else 'Of these, ' + '; '.join(norms)
        )
        if norms
        else _ROUTING_ADVICE
      )
    )


# --- the order ---------------------------------------------------------------------------

_NUMBERED = re.compile(r'^(.*?)(\d+)$')


def order_by_names(paths: Sequence[KeyPath]) -> list[KeyPath] | None:
  """``paths`` in numeric order where the names decide it, else ``None``.

  They decide it when the paths have one length and, at every position where they
  differ, every component is ``<prefix><n>`` with one prefix, the numbers making each
  path distinct: ``Dense_2`` before ``Dense_10``, ``Block_0/Dense_1`` before
  ``Block_1/Dense_0``. ``Dense_01`` and ``Dense_1`` (the same number), ``encoder`` and
  ``decoder``, ``Encoder_0`` and ``Decoder_0`` decide nothing.
  """
  if len(paths) == 1:
    return list(paths)
  if len({len(p) for p in paths}) != 1:
    return None
  varying = [i for i in range(len(paths[0])) if len({p[i] for p in paths}) > 1]
  keys = {}
  for path in paths:
    parts = [_NUMBERED.match(path[i]) for i in varying]
    if not all(parts):
      return None
    keys[path] = tuple(int(m.group(2)) for m in parts)
  for i, position in enumerate(varying):
    if len({_NUMBERED.match(p[position]).group(1) for p in paths}) != 1:
      return None
  if len(set(keys.values())) != len(paths):
    return None
  return sorted(paths, key=keys.__getitem__)


def _trail_exists(shapes, used, start: int) -> bool:
  """Whether the unused layers chain in some order whose first input width is ``start``.

  Layers are the edges ``in -> out`` of a multigraph on the widths, and a chain of all of
  them is an Eulerian trail: it exists iff the out-minus-in degrees are (1 at ``start``,
  -1 at one end, 0 elsewhere) or all 0, and every edge is reachable from ``start``.
  """
  edges = [s for s, u in zip(shapes, used) if not u]
  if not edges:
    return True
  balance: dict[int, int] = {}
  for a, b in edges:
    balance[a] = balance.get(a, 0) + 1
    balance[b] = balance.get(b, 0) - 1
  surplus = sorted(v for v in balance.values() if v)
  if start not in balance or surplus not in ([], [-1, 1]):
    return False
  if surplus and balance[start] != 1:
    return False
  reached, frontier = {start}, [start]
  while frontier:
    vertex = frontier.pop()
    for a, b in edges:
      for x, y in ((a, b), (b, a)):
        if x == vertex and y not in reached:
          reached.add(y)
          frontier.append(y)
  return all(a in reached for a, _ in edges)


def orders_by_shape(shapes: Sequence[tuple[int, int]], limit: int = 2) -> list[list[int]]:
  """Up to ``limit`` orders of the layers (indices) whose ``(in, out)`` shapes chain.

  A depth-first search that only extends partial chains that can still be completed
  (``_trail_exists``), so it finds each order in polynomial time, however many layers.
  """
  found: list[list[int]] = []
  used = [False] * len(shapes)
  order: list[int] = []

  def extend(width: int | None) -> None:
    if len(order) == len(shapes):
      found.append(list(order))
      return
    for i, (n_in, n_out) in enumerate(shapes):
      if len(found) >= limit:
        return
      if used[i] or (width is not None and n_in != width):
        continue
      used[i] = True
      if _trail_exists(shapes, used, n_out):
        order.append(i)
        extend(n_out)
        order.pop()
      used[i] = False

  extend(None)
  return found


def _listing(chain: Sequence[DenseLayer], shapes) -> str:
  return ', '.join(f'{format_path(l.path)} {s}' for l, s in zip(chain, shapes))


def _not_a_chain(chain, shapes, how: str) -> ValueError:
  return ValueError(
    'The dense layers do not form a chain (each kernel must be (in, out) with in equal to '
    f'the previous out). In order: {_listing(chain, shapes)}. {how}'
  )


def _order(layers: list[DenseLayer], shapes) -> list[DenseLayer]:
  """The layers from input to output, from their names or else their shapes."""
  by_name = order_by_names([layer.path for layer in layers])
  if by_name is not None:
    index = {layer.path: i for i, layer in enumerate(layers)}
    ordered = [layers[index[path]] for path in by_name]
    ordered_shapes = [shapes[index[path]] for path in by_name]
    if not _chains(ordered_shapes):
      raise _not_a_chain(ordered, ordered_shapes, 'That is their order by name. ' + _ORDER_ADVICE)
    return ordered
  orders = orders_by_shape(shapes)
  if not orders:
    raise _not_a_chain(layers, shapes, 'Nor does any other order. ' + _ORDER_ADVICE)
  if len(orders) > 1:
    a, b = ([format_path(layers[i].path) for i in o] for o in orders)
    raise ValueError(
      'The order of the dense layers cannot be read from params: their names do not '
      'decide it (they are not one numbered family like Dense_0, Dense_1, ...) and more '
      f'than one order forms a chain, e.g. {a} and {b}. Layers: {_listing(layers, shapes)}. '
      'Path scales computed in the wrong order are those of another network. ' + _ORDER_ADVICE
    )
  return [layers[i] for i in orders[0]]


def _chains(shapes) -> bool:
  return all(a[1] == b[0] for a, b in itertools.pairwise(shapes))


def find_layers(params: Any, layers: Any = None) -> list[DenseLayer]:
  """Finds the dense layers of ``params``, from input to output.

  Args:
    params: a params pytree (Flax Linen dict, NNX state, nested lists or tuples);
      leaves that ``optax.masked`` replaced with ``optax.MaskedNode`` are skipped,
      unless they are a dense layer's.
    layers: optional layer key paths from input to output (see
      ``normalize_layer_specs``); by default the order is read from the names or the
      shapes (see the module docstring).

  Returns:
    The layers, each with the indices of its leaves in ``flatten_with_names(params)``.

  Raises:
    ValueError: if params has no dense layer, leaves that are not part of a layer in
      the chain, malformed, non-floating, empty or masked layers, layers that do not
      chain, or layers whose order neither names nor shapes decide.
  """
  specs = normalize_layer_specs(layers)
  named_leaves, _ = flatten_with_names(params)
  groups = _group_by_parent(named_leaves)
  found = [path for path, children in groups.items() if 'kernel' in children]
  for path in found:
    _check_masking(path, groups[path], named_leaves)
  masked = [p for p in found if _is_masked(named_leaves[groups[p]['kernel']][1])]
  live = [p for p in found if p not in masked]
  if specs is not None:
    for path in specs:
      if path in masked:
        raise _masked_layer_error(path, listed=True)
    missing = [p for p in specs if p not in live]
    if missing:
      raise ValueError(
        f'layers= names {", ".join(map(format_path, missing))}, which is not a dense layer '
        f'of params. The dense layers found are: {", ".join(map(format_path, live)) or "none"}.'
      )
  elif masked:
    raise _masked_layer_error(masked[0], listed=False)
  if not live:
    flat = len(named_leaves) == 1 and getattr(named_leaves[0][1], 'ndim', None) == 1
    raise ValueError(
      'params holds no dense layer (a node with a 2-D "kernel" leaf); found: '
      + ('; '.join(_describe(p, leaf) for p, leaf in named_leaves) or 'no leaves')
      + '.'
      + (
        ' A flat vector (optax.flatten ravels the params for the transformation inside '
        'it) has no layers: put path_normalize outside, optax.chain(path_normalize(), '
        'optax.flatten(...)).'
        if flat
        else ''
      )
    )
  chain_paths = list(specs) if specs is not None else live
  _check_coverage(set(chain_paths), named_leaves)
  chain = [_check_layer(path, groups[path], named_leaves) for path in chain_paths]
  shapes = [tuple(named_leaves[layer.kernel][1].shape) for layer in chain]
  if specs is None:
    return _order(chain, shapes)
  if not _chains(shapes):
    raise _not_a_chain(chain, shapes, 'Check the order given in layers=.')
  return chain
