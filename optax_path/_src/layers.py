"""Finding the chain of dense layers in a params pytree.

A dense layer is a pytree node with a 2-D ``kernel`` leaf of shape ``(in, out)``
(the Flax layout) and, optionally, a 1-D ``bias`` leaf of shape ``(out,)``: Linen's
``{'Dense_0': {'kernel': ..., 'bias': ...}, ...}``, layers with names of one's own,
``layers_0``, ``layers_1``..., and NNX states of ``nnx.Linear`` attributes or
``nnx.List`` items. Layers are ordered by their key paths, comparing the integer runs
in names as integers, so that ``Dense_2`` comes before ``Dense_10``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax

KeyPath = tuple[str, ...]
LayerSpec = str | Sequence[Any]

_ROUTING_ADVICE = (
  'path_normalize handles the dense layers of a ReLU MLP only. Route other leaves '
  'to another transformation with optax.partition (alias optax.multi_transform), or '
  'exclude them with optax.masked.'
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


def _natural_key(path: KeyPath) -> tuple:
  """Orders ``Dense_2`` before ``Dense_10``: integer runs compare as integers."""
  return tuple(
    tuple(int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name) if part)
    for name in path
  )


def _is_masked(leaf: Any) -> bool:
  return isinstance(leaf, optax.MaskedNode)


def flatten_with_names(tree: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
  """Flattens ``tree`` to ``(names, leaf)`` pairs, keeping ``MaskedNode`` leaves."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  return [(key_path_names(kp), leaf) for kp, leaf in leaves], treedef


def _describe(path: KeyPath, leaf: Any) -> str:
  shape = getattr(leaf, 'shape', None)
  return f'{format_path(path)} {tuple(shape) if shape is not None else type(leaf).__name__}'


def _group_by_parent(named_leaves) -> dict[KeyPath, dict[str, int]]:
  groups: dict[KeyPath, dict[str, int]] = {}
  for index, (path, leaf) in enumerate(named_leaves):
    if not _is_masked(leaf):
      groups.setdefault(path[:-1], {})[path[-1] if path else ''] = index
  return groups


def _check_layer(path: KeyPath, children: dict[str, int], named_leaves) -> DenseLayer:
  """Validates one layer node: a 2-D kernel and an optional matching 1-D bias."""
  kernel = named_leaves[children['kernel']][1]
  if getattr(kernel, 'ndim', None) != 2:
    raise ValueError(
      f'{_describe(path + ("kernel",), kernel)}: a dense kernel must be 2-D, (in, out). '
      + _ROUTING_ADVICE
    )
  bias = children.get('bias')
  if bias is not None:
    bias_leaf = named_leaves[bias][1]
    if tuple(getattr(bias_leaf, 'shape', ())) != (kernel.shape[1],):
      raise ValueError(
        f'{_describe(path + ("bias",), bias_leaf)}: the bias of a dense layer with kernel '
        f'shape {tuple(kernel.shape)} must have shape ({kernel.shape[1]},).'
      )
  return DenseLayer(path, children['kernel'], bias)


def _check_masking(path: KeyPath, named_leaves) -> None:
  masked = [p for p, leaf in named_leaves if _is_masked(leaf) and p[:-1] == path]
  if masked:
    raise ValueError(
      f'Layer {format_path(path)} is partly masked ({", ".join(map(format_path, masked))}): '
      'path scales need every weight and bias of each dense layer. Mask whole layers or '
      'other subtrees, not parts of a layer.'
    )


def _parse_spec(spec: LayerSpec) -> KeyPath:
  if isinstance(spec, str):
    return tuple(part for part in spec.split('/') if part)
  return tuple(_key_name(k) for k in spec)


def _order_layers(groups, layers: Sequence[LayerSpec] | None) -> list[KeyPath]:
  found = [path for path, children in groups.items() if 'kernel' in children]
  if layers is None:
    return sorted(found, key=_natural_key)
  ordered = [_parse_spec(spec) for spec in layers]
  missing = [p for p in ordered if p not in found]
  if missing:
    raise ValueError(
      f'layers= names {", ".join(map(format_path, missing))}, which is not a dense layer '
      f'of params. The dense layers found are: {", ".join(map(format_path, found)) or "none"}.'
    )
  if len(set(ordered)) != len(ordered):
    raise ValueError(f'layers= lists a layer twice: {[format_path(p) for p in ordered]}.')
  return ordered


def _check_coverage(ordered: list[KeyPath], named_leaves) -> None:
  """Every leaf must be the kernel or bias of a layer in the chain."""
  chain = set(ordered)
  stray = [
    _describe(path, leaf)
    for path, leaf in named_leaves
    if not _is_masked(leaf) and not (path[:-1] in chain and path[-1] in ('kernel', 'bias'))
  ]
  if stray:
    raise ValueError(
      'These params leaves are not the kernel or bias of a dense layer in the chain: '
      + '; '.join(stray)
      + '. '
      + _ROUTING_ADVICE
    )


def _check_chain(layers: list[DenseLayer], named_leaves, explicit: bool) -> None:
  shapes = [tuple(named_leaves[layer.kernel][1].shape) for layer in layers]
  fits = all(a[1] == b[0] for a, b in itertools.pairwise(shapes))
  if fits:
    return
  listing = ', '.join(f'{format_path(l.path)} {s}' for l, s in zip(layers, shapes))
  how = (
    'Check the order given in layers=.'
    if explicit
    else 'If these are the right layers in another order, pass the order explicitly, e.g. '
    f'path_normalize(2.0, layers=[{", ".join(repr(format_path(l.path)) for l in layers)}]) '
    'reordered from input to output.'
  )
  raise ValueError(
    f'The dense layers do not form a chain (each kernel must be (in, out) with in equal to '
    f'the previous out). In order: {listing}. {how}'
  )


def find_layers(params: Any, layers: Sequence[LayerSpec] | None = None) -> list[DenseLayer]:
  """Finds the dense layers of ``params``, from input to output.

  Args:
    params: a params pytree (Flax Linen dict, NNX state, nested lists or tuples).
    layers: optional layer key paths from input to output, as ``'a/b'`` strings or
      sequences of keys; by default every layer found, ordered by key path.

  Returns:
    The layers, each with the indices of its leaves in ``flatten_with_names(params)``.

  Raises:
    ValueError: if params has no dense layer, leaves that are not part of a layer in
      the chain, malformed or partly masked layers, or layers that do not chain.
  """
  named_leaves, _ = flatten_with_names(params)
  groups = _group_by_parent(named_leaves)
  ordered = _order_layers(groups, layers)
  if not ordered:
    raise ValueError(
      'params holds no dense layer (a node with a 2-D "kernel" leaf); found: '
      + ('; '.join(_describe(p, leaf) for p, leaf in named_leaves) or 'no leaves')
      + '.'
    )
  _check_coverage(ordered, named_leaves)
  for path in ordered:
    _check_masking(path, named_leaves)
  chain = [_check_layer(path, groups[path], named_leaves) for path in ordered]
  _check_chain(chain, named_leaves, explicit=layers is not None)
  return chain
