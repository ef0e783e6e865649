"""Path-normalisation as an Optax gradient transformation, and the Path-SGD chains."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_path._src import general, numerics, scale_state
from optax_path._src import layers as layers_lib
from optax_path._src import scales as scales_lib

LayerSpecs = Sequence[layers_lib.LayerSpec] | None

NO_PARAMS_MSG = (
  'path_normalize requires the current value of parameters, to compute the path scales: '
  'call update(updates, state, params).'
)


def check_same_structure(updates: Any, params: Any) -> None:
  """Checks that ``updates`` matches ``params`` leaf by leaf: structure, then shapes.

  Raises:
    ValueError: naming the first leaf whose shape differs, or a non-floating update
      leaf; or giving both structures where they differ.
  """
  named_updates, update_def = layers_lib.flatten_with_names(updates)
  named_params, param_def = layers_lib.flatten_with_names(params)
  if update_def != param_def:
    raise ValueError(
      'updates and params must have the same tree structure; got updates '
      f'{update_def} and params {param_def}.'
    )
  for (path, update), (_, param) in zip(named_updates, named_params):
    if isinstance(update, optax.MaskedNode):
      continue
    shape = getattr(param, 'shape', None)
    if shape is not None and getattr(update, 'shape', None) != shape:
      raise ValueError(
        f'The update of {layers_lib.format_path(path)} has shape '
        f'{getattr(update, "shape", type(update).__name__)}, its parameter {tuple(shape)}: '
        'updates must have the shapes of params, leaf by leaf (no broadcasting).'
      )
    dtype = getattr(update, 'dtype', None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f'The update of {layers_lib.format_path(path)} has dtype {dtype}: updates must be '
        'real floating point arrays.'
      )


def split_scales(tree: Any, log_scales: dict[int, scales_lib.LogScale]) -> dict[int, Any]:
  """The log scales of the leaves of ``tree``, split once for ``divide_by_split_scales``
  (see ``numerics.split_leaf_scales``)."""
  leaves = [leaf for _, leaf in layers_lib.flatten_with_names(tree)[0]]
  indices = list(log_scales)
  split = numerics.split_leaf_scales([leaves[i] for i in indices], [log_scales[i] for i in indices])
  return dict(zip(indices, split))


def divide_by_split_scales(tree: Any, split: dict[int, Any]) -> Any:
  """Divides leaf ``i`` of ``tree`` by the scale whose split terms are ``split[i]``."""
  named_leaves, treedef = layers_lib.flatten_with_names(tree)
  divided = [
    numerics.divide_by_split_scale(leaf, split[i]) if i in split else leaf
    for i, (_, leaf) in enumerate(named_leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, divided)


def divide_by_scales(tree: Any, log_scales: dict[int, scales_lib.LogScale]) -> Any:
  """Divides leaf ``i`` of ``tree`` by ``exp(sum(log_scales[i]))``, never forming it."""
  return divide_by_split_scales(tree, split_scales(tree, log_scales))


def _is_traced(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


#: Compiled eager updates by configuration (see ``compiled_when_eager``).
_EAGER_COMPILED: dict[Hashable, Callable[..., Any]] = {}


def compiled_when_eager(update_fn, config: Hashable | None = None, other_args=None):
  """``update_fn`` (an update, or a part of one), run as one compiled computation when
  called outside ``jit``.

  Called eagerly (a notebook, a debugger), the scale passes would dispatch dozens of
  small operations one by one (957 ms per update on the paper's net, 16 s the first
  time); compiled once per shape, a later eager update costs what a jitted one does.
  Inside a trace (``jit``, ``grad``, ``inject_hyperparams`` under ``jit``) it is inlined.

  ``config``: everything ``update_fn`` closes over, when hashable. Transformations of
  equal ``config`` share one compiled function, so that one rebuilt on every update
  (``optax.inject_hyperparams`` does so) compiles once: 1.6 s per eager update of a
  3-layer net before, a few ms after.

  ``other_args``: what runs the update when a keyword argument is not an array
  (L-BFGS's ``value_fn``, a string). Such a value cannot be an argument of a compiled
  function, and compiled in as a constant it would go stale (a ``value_fn`` that reads
  the current batch) and stay alive. By default they are dropped: for an ``update_fn``
  that ignores its extra arguments.
  """
  try:
    hash(config)
  except TypeError:  # an injected hyperparameter (an array, or a tracer under jit)
    config = None
  compiled = _EAGER_COMPILED.get(config) if config is not None else None
  if compiled is None:
    compiled = jax.jit(update_fn)
    if config is not None:
      _EAGER_COMPILED[config] = compiled

  def wrapped(*args, **kwargs):
    if _is_traced((args, kwargs)):
      return update_fn(*args, **kwargs)
    arrays = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
    if len(arrays) < len(kwargs) and other_args is not None:
      return other_args(*args, **kwargs)
    return compiled(*args, **arrays)

  return wrapped


def _is_array_tree(tree: Any) -> bool:
  """Whether every leaf is a number or an array of numbers (what ``jit`` can trace)."""
  leaves = jax.tree.leaves(tree)
  return all(isinstance(x, jax.typing.ArrayLike) for x in leaves) and all(
    jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)
    for x in leaves
    if hasattr(x, 'dtype')
  )


def normalize_updates(updates: Any, params: Any, p, **mode) -> Any:
  """``updates / path_scales(params)``, computed in the log domain (eq. 8).

  ``mode``: ``layers`` (MLP mode) or ``apply_fn`` and ``input_shape`` (general mode).
  """
  check_same_structure(updates, params)
  _, _, log_scales = scales_lib.log_scale_leaves(params, p, **mode)
  return divide_by_scales(updates, log_scales)


def path_normalize(
  p: float = 2.0,
  *,
  refresh_every: int = 1,
  layers: LayerSpecs = None,
  apply_fn=None,
  input_shape=None,
) -> optax.GradientTransformation:
  """Divides every gradient by its path scale: the Path-SGD direction (eq. 8).

  .. math::

    u_e = g_e / \\gamma_p(w, e), \\qquad
    \\gamma_p(w, e) = \\Big(\\sum_{\\text{paths through } e}
    \\prod_{e' \\neq e} |w_{e'}|^p\\Big)^{2/p},

  with the scales computed from ``params`` by one forward and one backward pass of
  ``|W|^p`` matrix-vector products (Algorithm 1). A bias is an edge from a bias unit.
  Chained with ``optax.sgd`` this is Path-SGD, steepest descent in a geometry that is
  invariant to rescaling the units of a ReLU network (Theorem 4.1).

  MLP mode (no ``apply_fn``): ``params`` must be the params of a ReLU MLP: dense
  layers, each a node with a 2-D ``kernel`` ``(in, out)`` and an optional ``bias``
  ``(out,)`` (Flax Linen ``Dense_0``..., names of one's own, ``layers_0``..., NNX
  ``nnx.Linear`` states and ``nnx.List`` items), ordered by key path with numbers
  compared as numbers, or as listed in ``layers``. Route any other leaves elsewhere with
  ``optax.partition`` or ``optax.masked``. (In the general mode ``apply_fn`` needs every
  leaf it reads: mask only leaves it does not use.)

  Speed: the state keeps the scales per unit (``PathNormalizeState``, a few vectors).
  Each update warm-starts from them: one fused read of each kernel per pass, checked,
  with the exact log-domain passes as the fallback in one ``lax.cond``, so the result
  never depends on the state (see the README's performance section). ``init`` computes
  no scale (it compiles nothing); the first update takes the exact passes. With
  ``refresh_every=k`` the scales are recomputed on every k-th update only and reused
  in between; stale scales keep the rescaling invariance (each update divides by the
  scales of an equivalent network).

  Numerics: scales are computed in float32 or wider, as logarithms, so they are right
  for the paper's unbalanced nets and for deep nets whose scales leave the float range;
  the update is formed without forming the scale: per parameter, two products by
  mantissas and two by exact powers of two. A zero scale (a unit with no path to the
  input or the output) gives a zero update, an update beyond the float range the
  largest finite value; non-finite gradients pass through unchanged; updates keep
  their dtype. A non-finite weight or bias makes every update and the
  state NaN (checked at every refresh), so ``optax.apply_if_finite`` placed after
  ``path_normalize`` in the chain skips the step.

  Args:
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]`` (the paper uses 2;
      ``numerics.validate_p`` says why the range). It drives no Python
      control flow, so ``optax.inject_hyperparams`` may inject it; an injected ``p``
      outside the range (or NaN) gives NaN updates, which NaN checks catch.
    refresh_every: recompute the scales on every this many updates (MLP mode), an int
      >= 1; 1 (the default) is exact Path-SGD. ``inject_hyperparams`` may inject it.
    layers: optional layer key paths from input to output, as ``'a/b'`` strings or
      key sequences, when the order cannot be read from the names.
    apply_fn: general mode, for any ReLU network (convolutions, residual additions,
      average pooling): its forward pass ``apply_fn(params, x)``, e.g.
      ``lambda q, x: model.apply({'params': q}, x)``. The scales are then one gradient of
      the network evaluated on ``|theta|^p`` and an all-ones input; see the README for
      its scope and float range.
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``params``
    (extra keyword arguments, such as ``value=`` for ``optax.contrib.reduce_on_plateau``
    later in a chain, are accepted and ignored). Its state is a ``PathNormalizeState``
    in the MLP mode, ``optax.EmptyState`` in the general one.

  Order in a chain: first. ``optax.chain(path_normalize(), optax.sgd(lr))`` divides the
  gradients by their path scales and then steps; ``optax.chain(optax.sgd(lr),
  path_normalize())`` would divide the already scaled step ``-lr * g`` instead, which
  is the same only for plain SGD and wrong for momentum, AdaGrad or Adam, whose
  statistics must see the normalised gradients. It cannot be detected from inside.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_path
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> tx = optax.chain(optax_path.path_normalize(2.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> loss = lambda q: jnp.sum(model.apply({'params': q}, jnp.ones((2, 4))) ** 2)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep
    Neural Networks <https://arxiv.org/abs/1506.02617>`_, NeurIPS 2015.
  """
  p = numerics.validate_p(p)
  scales_lib.check_mode(layers, apply_fn, input_shape)
  layers = layers_lib.normalize_layer_specs(layers)
  refresh_every = scale_state.check_refresh_every(refresh_every, apply_fn)
  if apply_fn is not None:
    return _general_path_normalize(p, apply_fn, input_shape)

  def init_fn(params):
    return scale_state.init_state(params, layers)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    check_same_structure(updates, params)
    log_scales, state = scale_state.refreshed_log_scales(params, p, layers, state, refresh_every)
    return divide_by_scales(updates, log_scales), state

  config = ('path_normalize', p, layers, refresh_every) if isinstance(p, float) else None
  return optax.GradientTransformationExtraArgs(init_fn, compiled_when_eager(update_fn, config))


def _general_path_normalize(p, apply_fn, input_shape) -> optax.GradientTransformation:
  def init_fn(params):
    if not scale_state.is_placeholder(params):
      general.check_network(params, apply_fn, input_shape)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    return normalize_updates(updates, params, p, apply_fn=apply_fn, input_shape=input_shape), state

  return optax.GradientTransformationExtraArgs(init_fn, compiled_when_eager(update_fn))


def path_sgd(
  learning_rate: optax.ScalarOrSchedule,
  p: float = 2.0,
  *,
  momentum: float | None = None,
  nesterov: bool = False,
  refresh_every: int = 1,
  layers: LayerSpecs = None,
  apply_fn=None,
  input_shape=None,
) -> optax.GradientTransformation:
  """Path-SGD: ``optax.chain(path_normalize(p), optax.sgd(...))``.

  .. math::

    w_e \\leftarrow w_e - \\eta \\, \\frac{\\partial L / \\partial w_e}{\\gamma_p(w, e)}

  With momentum, the normalised gradients are averaged; both forms are rescaling
  invariant (Theorem 4.1).

  Args:
    learning_rate: a step size or an optax schedule.
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]``.
    momentum: optional momentum decay, as in ``optax.sgd``.
    nesterov: Nesterov momentum, as in ``optax.sgd``.
    refresh_every: recompute the scales every this many updates (see ``path_normalize``).
    layers: optional layer key paths from input to output.
    apply_fn: general mode: the network's forward pass (see ``path_normalize``).
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_path
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3))}, 'Dense_1': {'kernel': jnp.ones((3, 1))}}
    >>> tx = optax_path.path_sgd(0.1, momentum=0.9)
    >>> updates, _ = tx.update(params, tx.init(params), params)

  References:
    Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015, Algorithm 1.
  """
  layers = layers_lib.normalize_layer_specs(layers)  # once: a generator is read once
  mode = {'layers': layers, 'apply_fn': apply_fn, 'input_shape': input_shape}
  tx = optax.chain(
    path_normalize(p, refresh_every=refresh_every, **mode),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
  settings = (p, learning_rate, momentum, nesterov, refresh_every)
  if apply_fn is not None or not plain_settings(settings):
    return tx  # a schedule, or an injected array: path_normalize alone runs compiled
  config = ('path_sgd', *settings, layers)
  return optax.GradientTransformationExtraArgs(tx.init, compiled_when_eager(tx.update, config))


def plain_settings(settings: Sequence[Any]) -> bool:
  """Whether every setting is a Python number (or None), so that it can key a compiled
  update: not a schedule, nor an array injected by ``optax.inject_hyperparams``."""
  return all(isinstance(v, (int, float, type(None))) for v in settings)


def path_adagrad(
  learning_rate: optax.ScalarOrSchedule,
  p: float = 2.0,
  *,
  initial_accumulator_value: float = 0.1,
  eps: float = 1e-7,
  refresh_every: int = 1,
  layers: LayerSpecs = None,
  apply_fn=None,
  input_shape=None,
) -> optax.GradientTransformation:
  """The paper's Path-AdaGrad: ``optax.chain(path_normalize(p), optax.adagrad(...))``.

  AdaGrad applied to path-normalised gradients, as the paper suggests. It is not
  rescaling invariant: AdaGrad divides away the factor by which a rescaling scales
  the normalised gradients.

  Args:
    learning_rate: a step size or an optax schedule.
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]``.
    initial_accumulator_value: as in ``optax.adagrad``.
    eps: as in ``optax.adagrad``.
    refresh_every: recompute the scales every this many updates (see ``path_normalize``).
    layers: optional layer key paths from input to output.
    apply_fn: general mode: the network's forward pass (see ``path_normalize``).
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

  References:
    Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015, Section 6.
  """
  mode = {'layers': layers, 'apply_fn': apply_fn, 'input_shape': input_shape}
  return optax.chain(
    path_normalize(p, refresh_every=refresh_every, **mode),
    optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps),
  )
