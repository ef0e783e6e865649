"""The state of ``path_normalize``: the path scales per unit, and when to refresh them.

Per unit, not per parameter: ``log gamma_in`` and ``log gamma_out`` of every layer
boundary, a few vectors. They warm-start the next update's passes (``warm_scales``) and,
with ``refresh_every > 1``, stand in for the scales between refreshes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_path._src import numerics, warm_scales
from optax_path._src import scales as scales_lib


class PathNormalizeState(NamedTuple):
  """State of ``path_normalize`` (MLP mode): the path scales, per unit.

  Attributes:
    refresh_count: updates so far (int32), which time the refreshes of
      ``refresh_every``; 0: no scale known yet, the update takes the exact passes. Not
      called ``count``, so that ``optax.tree_utils.tree_get(state, 'count')`` finds the
      inner optimizer's step count in a chain.
    log_gamma_in: per layer boundary (input, each layer's outputs), ``log gamma_in``
      of its units (Algorithm 1), as of the last refresh; zeros, not yet known, while
      ``refresh_count`` is 0 (after ``init``). A dead unit's ``log 0`` is held as the
      most negative finite value of the dtype, so that the state stays finite (for
      ``jax_debug_infs``, ``checkify``, and Optax wrappers that mix states, such as
      ``optax.lookahead(reset_state=True)``).
    log_gamma_out: the same for ``log gamma_out``.
  """

  refresh_count: jax.Array
  log_gamma_in: tuple[jax.Array, ...]
  log_gamma_out: tuple[jax.Array, ...]


def check_refresh_every(refresh_every: Any, apply_fn) -> int | jax.Array:
  """``refresh_every`` as an int when concrete (an injected one may be traced)."""
  try:
    value = int(refresh_every)
  except jax.errors.ConcretizationTypeError:
    return refresh_every
  except (TypeError, ValueError):
    value = None
  if value is None or value != refresh_every or value < 1:
    raise ValueError(f'refresh_every must be an int >= 1, got {refresh_every!r}.')
  if value > 1 and apply_fn is not None:
    raise ValueError(
      'refresh_every > 1 keeps the scales of the MLP mode (per unit) in the state; the '
      'general mode (apply_fn=) computes them per parameter on every update.'
    )
  return value


def is_placeholder(params: Any) -> bool:
  """Whether ``params`` is a pytree node without leaves that is no container: what
  ``optax.tree_utils.tree_map_params`` passes to ``init`` to find the params-shaped
  parts of a state. ``init`` then returns a state of the same fields, without shapes."""
  containers = (Mapping, list, tuple, type(None))
  return not isinstance(params, containers) and not jax.tree.leaves(params)


def init_state(params: Any, layers) -> PathNormalizeState:
  """The state for ``params``: their layers' widths, with no scale known yet.

  ``init`` computes no scale: the first update has no warm start to trust and takes the
  exact passes anyway, inside its own compiled step. Computing them here as well compiled
  the exact passes a second time before the first step (1.8 s of the 6.6 s to the first
  step of the deep benchmark net, 0.9 s of 3.4 s for a 784-64-64-10 MLP; see
  ``results/bench/compile``). ``refresh_count == 0`` says that no scale is known (the
  ``log gamma`` vectors hold zeros, finite, so that ``jax_debug_infs``, ``checkify`` and
  gradients through the first update see no inf or NaN).
  """
  if is_placeholder(params):  # per-unit vectors, not params-shaped: each field one leaf
    return PathNormalizeState(jnp.zeros([], jnp.int32), jnp.zeros([]), jnp.zeros([]))
  kernels, _ = scales_lib.layer_arrays(params, layers)  # finds the layers: errors at init
  dtype = numerics.compute_dtype(jnp.result_type(*kernels))
  widths = [kernels[0].shape[0]] + [w.shape[1] for w in kernels]
  unknown = lambda: tuple(jnp.zeros((n,), dtype) for n in widths)
  # Two sets of vectors, not one shared: a donated state must not alias itself.
  return PathNormalizeState(jnp.zeros([], jnp.int32), unknown(), unknown())


def refresh(params: Any, p, layers, state: PathNormalizeState, refresh_every):
  """``((log gamma_in, log gamma_out), next state)`` for an update at ``params``.

  The scales of ``params``, warm-started from ``state``; or, between refreshes (every
  ``refresh_every`` updates), the scales that ``state`` holds.
  """
  kernels, biases = scales_lib.layer_arrays(params, layers)

  held_in, held_out = _read(state.log_gamma_in), _read(state.log_gamma_out)

  def refreshed():
    known = state.refresh_count > 0
    log_in, log_out = _refreshed_log_gammas(kernels, biases, held_in, held_out, known, p=p)
    return tuple(log_in), tuple(log_out)

  def kept():
    return held_in, held_out

  if isinstance(refresh_every, int) and refresh_every == 1:
    gammas = refreshed()
  else:
    gammas = jax.lax.cond(state.refresh_count % refresh_every == 0, refreshed, kept)
  gammas = tuple(tuple(numerics.replicated_on_mesh_of(v, kernels) for v in g) for g in gammas)
  stored = (_stored(g) for g in gammas)
  return gammas, PathNormalizeState(optax.safe_int32_increment(state.refresh_count), *stored)


def _stored(log_gammas: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """``log_gammas`` with ``-inf`` (a dead unit) as the dtype's most negative value."""
  return tuple(jnp.where(v == -jnp.inf, jnp.finfo(v.dtype).min, v) for v in log_gammas)


def _read(log_gammas: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """The inverse of ``_stored``: no ``log gamma`` is that low (``log`` of the
  smallest positive float is about ``-745``)."""
  return tuple(jnp.where(v == jnp.finfo(v.dtype).min, -jnp.inf, v) for v in log_gammas)


_refreshed_log_gammas = scales_lib.compiled_for_concrete_p(warm_scales.refreshed_log_gammas)


def refreshed_log_scales(params: Any, p, layers, state: PathNormalizeState, refresh_every):
  """``(log scales by leaf, next state)`` for an update at ``params`` (see ``refresh``)."""
  gammas, state = refresh(params, p, layers, state, refresh_every)
  return scales_lib.log_scale_leaves(params, p, layers=layers, gammas=gammas)[2], state
