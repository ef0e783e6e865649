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
flattening, average and max pooling: the paper's ``(B + 1) T`` cost.

Scope. ReLU networks (also leaky ReLU and linear layers: positively homogeneous
activations act as the identity on this pass, so the scales are those of the same
graph) built from dense and convolutional layers with any stride and padding, biases,
residual additions, average, sum or max pooling, flattening, reshapes. Out of scope,
and refused with a ``ValueError`` that names the primitive (``scope.check`` reads the
jaxpr): BatchNorm in training mode, LayerNorm and other normalisations, non-homogeneous
activations (GELU, tanh, sigmoid, swish), softmax or attention inside the network,
products of activations, clips such as ``relu6``, branches chosen by the input
(``lax.cond(jnp.sum(h) > 0, ...)``) or by the parameters' values (``jnp.where(a > 0, h,
0)``, a kernel ``relu(w)``: the pass sees ``|theta|^p``, so it would take another branch),
leaves on no path of the pass (PReLU's learnable slope, like a leaf that ``apply_fn``
does not use), and random numbers drawn in ``apply_fn`` (dropout left on: give it the
model in eval mode).

Fixed linear maps. The weights of maps that are not parameters enter the pass as their
absolute values, not to the power ``p``: an average pool over ``k`` inputs weighs its
paths by ``1/k`` rather than ``(1/k)^p``, an input normalisation ``(x - m) / s`` by
``1/|s|`` (from the input) and ``|m/s|`` (from the bias unit). For ``p = 1``, and for maps of weight 1
(sum pooling, flattening, residual additions, concatenation), this is eq. 5 exactly.
For other ``p`` it is the path regulariser of the same graph with those fixed weights
counted once; it is still invariant to every rescaling, and so is Path-SGD with it. To
count them to the power ``p``, give an ``apply_fn`` that multiplies each average pool
by ``k^(1-p)``. A frozen layer that ``apply_fn`` closes over is such a map too: for
the whole network's scales, pass every leaf and freeze after ``path_normalize``.

Max pooling counts every path. A max pool passes on one member of its window, so the
pass would follow the argmax of the all-ones input, and a weight used only by losing
units would get scale 0 and never be trained. As in Gonon et al.'s path-norm toolkit,
the pass treats a max pool as a unit with an edge of weight 1 from every member of its
window: ``apply_fn`` is traced to a jaxpr and evaluated with ``reduce_window_max`` as
``reduce_window_sum`` (same window, strides and padding; padding is no unit),
``jnp.max`` over axes (global max pooling) as ``jnp.sum``, and an elementwise max of
two activations as their sum; ReLU is the identity (with derivative 1 at 0 too), and
custom derivatives give way to their functions' own. These are the path scales and ``phi_p`` of the
network's graph over all its paths, and they are invariant to channel rescalings (a
window lies in one channel), so Path-SGD stays rescaling invariant (Theorem 4.1).
``argmax``, ``sort``, ``top_k`` and their kin applied to activations have no path form
and raise ``ValueError``, as does a max pool inside ``lax.while_loop`` (see
``positive_pass``). Inside ``lax.scan``, ``lax.cond`` and ``shard_map`` the bodies are
evaluated with the same substitutions (a ``shard_map``'s per shard, its collectives as
they are: a ``psum`` of the pass sums paths as the network sums units).

Compilation. Called outside ``jit`` with a Python float ``p``, the pass traces
``apply_fn`` (no compilation) and looks its jaxpr up in a small cache of compiled
passes, keyed by the jaxpr's structure, with its constants (arrays ``apply_fn``
closes over) passed as arguments: a fresh but equal ``lambda q, x: model.apply(...)``
per call compiles once, and the cache holds no reference to it or its closure.
Inside ``jit`` (or ``grad``), or with a traced ``p``, the pass is traced into the
caller's computation.

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

Finite params within scope never give ``nan``, within the range or beyond it. Where
``phi_p = 0`` (a zero-initialised head), ``log_path_norm`` is ``-inf`` and its gradient,
and so that of ``path_norm(...) ** p``, is 0: for ``p > 1`` that is the gradient of
``phi_p^p`` (each of its products holds a zero weight, whose ``|w|^p`` has derivative
0), and for any ``p`` a subgradient at the minimum ``phi_p = 0``.

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

import collections
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import optax

from optax_path._src import layers as layers_lib
from optax_path._src import numerics, positive_pass, scope

ApplyFn = Callable[[Any, jax.Array], Any]

_CACHE_SIZE = 32


def _is_float_array(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and hasattr(leaf, 'shape') and jnp.issubdtype(dtype, jnp.floating)


def pass_dtype(float_leaves: Sequence[Any]) -> jnp.dtype:
  """Float64 where 64-bit types are enabled, else the leaves' dtype, at least float32."""
  widest = jax.dtypes.canonicalize_dtype(jnp.float64)
  return jnp.promote_types(numerics.compute_dtype(jnp.result_type(*float_leaves)), widest)


def check_apply_fn(apply_fn: Any) -> ApplyFn:
  """``apply_fn`` if it is callable; else ``ValueError``."""
  if not callable(apply_fn):
    raise ValueError(
      'apply_fn must be the forward pass apply_fn(params, x) of the network, such as '
      f"lambda q, x: model.apply({{'params': q}}, x); got {apply_fn!r}, which is not callable."
    )
  return apply_fn


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
  """``input_shape`` as a tuple of ints ``>= 0``; else ``ValueError``.

  A string (``'28'`` would read as ``(2, 8)``), a bare int, a float or a bool size is
  rejected.
  """
  message = (
    'input_shape must be the shape of one input without the batch axis, a tuple of '
    f'ints such as (28, 28, 1); got {input_shape!r}.'
  )
  if isinstance(input_shape, (str, bytes)):
    raise ValueError(message)
  try:
    sizes = list(input_shape)
    if any(isinstance(d, bool) for d in sizes):
      raise TypeError
    shape = tuple(operator.index(d) for d in sizes)
  except TypeError:
    raise ValueError(message) from None
  if any(d < 0 for d in shape):
    raise ValueError(f'input_shape must hold sizes >= 0, got {input_shape!r}.')
  return shape


class _Traced(NamedTuple):
  """``apply_fn``'s summed output as a jaxpr of ``(q_1, ..., q_n, x)``."""

  closed_jaxpr: jex_core.ClosedJaxpr  # consts: the arrays apply_fn closes over
  named_leaves: list[tuple[Any, Any]]  # the flattened params, with their key paths
  treedef: Any
  indices: list[int]  # the floating leaves, in the order of the q_i


def _trace(params: Any, apply_fn: ApplyFn, input_shape: tuple[int, ...]) -> _Traced:
  """``sum(apply_fn(params with q_i for the floating leaves, x))`` traced to a jaxpr.

  The ``q_i`` and ``x`` (shape ``(1, *input_shape)``) are in the pass dtype. Raises
  ``ValueError`` if ``params`` has no floating leaf or ``apply_fn`` fails on them.
  """
  named_leaves, treedef = layers_lib.flatten_with_names(params)
  leaves = [leaf for _, leaf in named_leaves]
  indices = [i for i, leaf in enumerate(leaves) if _is_float_array(leaf)]
  if not indices:
    raise ValueError(
      'params has no floating-point leaf; found: '
      + ('; '.join(layers_lib.format_path(path) for path, _ in named_leaves) or 'no leaves')
      + '.'
    )
  dtype = pass_dtype([leaves[i] for i in indices])

  def summed_output(q: list[jax.Array], x: jax.Array) -> jax.Array:
    full = list(leaves)
    for i, q_i in zip(indices, q):
      full[i] = q_i
    try:
      out = apply_fn(jax.tree_util.tree_unflatten(treedef, full), x)
    except Exception as error:
      raise _apply_fn_error(named_leaves, input_shape, error) from error
    outputs = jax.tree.leaves(out)
    if not outputs:
      raise ValueError(f'apply_fn returned no array: {out!r}.')
    return sum(jnp.sum(o.astype(dtype)) for o in outputs)

  q = [_aval(leaves[i], dtype) for i in indices]
  x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  return _Traced(jax.make_jaxpr(summed_output)(q, x), named_leaves, treedef, indices)


def _aval(leaf: jax.Array, dtype) -> jax.ShapeDtypeStruct:
  """The abstract value of ``leaf`` in ``dtype``, with its sharding where it is split over
  explicit mesh axes (the traced pass must then agree with the params' shardings)."""
  if numerics.explicitly_sharded(leaf):
    return jax.ShapeDtypeStruct(jnp.shape(leaf), dtype, sharding=jax.typeof(leaf).sharding)
  return jax.ShapeDtypeStruct(jnp.shape(leaf), dtype)


def _apply_fn_error(named_leaves, input_shape, error: Exception) -> ValueError:
  masked = [path for path, leaf in named_leaves if isinstance(leaf, optax.MaskedNode)]
  if masked:
    return ValueError(
      'apply_fn failed on params in which optax.masked or optax.partition replaced '
      f'{", ".join(map(layers_lib.format_path, masked))} with optax.MaskedNode(). The '
      'general mode evaluates apply_fn on the params it is given: mask only leaves that '
      'the forward pass does not use, or apply path_normalize to the whole params tree.'
    )
  return ValueError(
    f'apply_fn failed on an all-ones input of shape {(1, *input_shape)}: a batch of one '
    f'input of input_shape={input_shape}. {_apply_fn_hint(error)} '
    f'{type(error).__name__}: {error}'
  )


def _apply_fn_hint(error: Exception) -> str:
  """What to do about an ``apply_fn`` that fails on the all-ones batch of one."""
  kind, text = type(error).__name__, str(error)
  if kind == 'ScopeCollectionNotFound':  # model.apply given
    return (
      "apply_fn takes the params tree itself, not Flax's variables: for a Linen module, "
      "apply_fn=lambda q, x: model.apply({'params': q}, x)."
    )
  if kind == 'TraceContextError':  # an NNX module updating its state: training mode
    return (
      'apply_fn updates NNX state (BatchNorm batch statistics, a Dropout RNG counter): '
      'a module in training mode. The scales are those of the network in eval mode: '
      'build apply_fn from an eval-mode copy (m = nnx.clone(model); m.eval(); graphdef, '
      '_, rest = nnx.split(m, nnx.Param, ...)).'
    )
  if 'divisible' in text:  # a shard_map or sharding over the batch axis
    return (
      'A batch of one cannot be split over devices: give path_normalize the apply_fn '
      'without the data-parallel shard_map or batch sharding (the scales do not depend '
      'on the batch).'
    )
  if 'integer' in text.lower():  # nn.Embed: token ids
    return (
      'The general mode feeds apply_fn floats (all ones); it seems to want integers, '
      'such as the token ids of an embedding. An embedding lookup is no layer of a ReLU '
      "network's paths: give path_normalize the network after the embedding (an "
      'apply_fn that takes the embedded vectors) and train the table with another '
      'transformation (optax.partition).'
    )
  return (
    'Check that input_shape is the shape of one input without the batch axis, and that '
    'apply_fn(params, x) runs on it.'
  )


def _used_inputs(jaxpr: jex_core.Jaxpr, used_outputs: list[bool] | None = None) -> list[bool]:
  """Which of the ``invars`` of ``jaxpr`` its (used) outputs depend on."""
  used_outputs = used_outputs or [True] * len(jaxpr.outvars)
  live = {v for v, u in zip(jaxpr.outvars, used_outputs) if u and isinstance(v, jex_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    used = [isinstance(v, jex_core.Var) and v in live for v in eqn.outvars]
    if eqn.effects or any(used):
      reads = _operands_read(eqn, used)
      live.update(v for v, r in zip(eqn.invars, reads) if r and isinstance(v, jex_core.Var))
  return [v in live for v in jaxpr.invars]


def _operands_read(eqn: jex_core.JaxprEqn, used: list[bool]) -> list[bool]:
  """Which operands of ``eqn`` its ``used`` outputs read: a call (``jit``, ``shard_map``)
  or ``cond`` is followed into its bodies, a ``scan`` into its body (its initial carries
  always count as read); any other equation reads all of them."""
  if eqn.effects:
    return [True] * len(eqn.invars)
  body = positive_pass.call_body(eqn)
  if body is not None:
    return _used_inputs(body, used)
  if eqn.primitive.name == 'cond':
    branches = [_used_inputs(b.jaxpr, used) for b in eqn.params['branches']]
    return [True] + [any(reads) for reads in zip(*branches)]
  if eqn.primitive.name == 'scan':  # carries: read in later rounds,
    n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']  # or passed on
    body_used = [True] * n_carry + used[n_carry:]  # when no round runs
    reads = _used_inputs(eqn.params['jaxpr'].jaxpr, body_used)
    return reads[:n_consts] + [True] * n_carry + reads[n_consts + n_carry :]
  return [True] * len(eqn.invars)


def _named(traced: _Traced, indices: Sequence[int]) -> str:
  """``'path (shape); ...'`` of the leaves at ``indices``, for the messages."""
  leaves = [traced.named_leaves[i] for i in indices]
  return '; '.join(f'{layers_lib.format_path(p)} {tuple(jnp.shape(leaf))}' for p, leaf in leaves)


def _check_used(traced: _Traced) -> None:
  used = _used_inputs(traced.closed_jaxpr.jaxpr)
  unused = [i for i, u in zip(traced.indices, used) if not u]
  if unused:
    raise ValueError(
      'apply_fn does not use these params leaves: '
      + _named(traced, unused)
      + '. Their path scale would be 0, so Path-SGD would never update them. Check '
      'apply_fn, or route these leaves to another transformation with optax.partition '
      '(alias optax.multi_transform), or exclude them with optax.masked.'
    )


def _param_names(traced: _Traced) -> list[str]:
  """The key paths of the parameters, in the order of the traced pass's inputs."""
  return [layers_lib.format_path(traced.named_leaves[i][0]) for i in traced.indices]


def _check_on_pass(traced: _Traced, on_pass: frozenset) -> None:
  used = _used_inputs(traced.closed_jaxpr.jaxpr)
  off = [i for j, i in enumerate(traced.indices) if used[j] and j not in on_pass]
  if off:
    raise ValueError(
      'apply_fn uses these params leaves only where the |theta|^p pass counts no path '
      '(on branches it never takes, or times a constant 0): '
      + _named(traced, off)
      + '. They are on no path, so their path scale would be 0 and Path-SGD would never '
      'update them. On the pass every unit is non-negative, so jnp.where(h >= 0, h, a * h) '
      '(PReLU) always passes h: use a fixed slope (jax.nn.leaky_relu, or the slope as a '
      "constant). A lax.cond on a fixed flag takes one branch: leave the other branch's "
      'params out of params, as those multiplied by zeros. Or train this network with '
      'another optimizer.'
    )


def check_network(params: Any, apply_fn: ApplyFn, input_shape: tuple[int, ...]) -> _Traced:
  """``apply_fn`` traced (no compilation), after raising the ``ValueError`` of
  ``log_scale_leaves`` that its network would give (used at ``init``, before any step)."""
  traced = _trace(params, apply_fn, input_shape)
  _check_used(traced)
  checked = scope.check(traced.closed_jaxpr, _param_names(traced))
  _check_on_pass(traced, checked.on_pass)
  if checked.unsure:
    _check_on_some_path(traced)
  return traced


def _check_on_some_path(traced: _Traced) -> None:
  """Where ``scope`` could not compute a constant that decides which params are on the
  pass, the pass itself with every parameter 1 (p = 1: each scale counts the paths
  through the leaf) finds a leaf on no path; not inside a trace."""
  closed = traced.closed_jaxpr
  floats = [traced.named_leaves[i][1] for i in traced.indices]
  if _is_traced(floats) or _is_traced(closed.consts):
    return
  ones = [jnp.ones_like(f, v.aval.dtype) for f, v in zip(floats, closed.jaxpr.invars)]
  compiled = _compiled_pass(_log_scales, closed.jaxpr, positive_pass.structure_key(closed), 1.0)
  log_counts = compiled(list(closed.consts), ones)
  off = [i for i, c in zip(traced.indices, log_counts) if bool(jnp.all(c == -jnp.inf))]
  if off:
    raise ValueError(
      'These params leaves are on no path of the network: '
      + _named(traced, off)
      + '. With every parameter set to 1, the |theta|^p pass counts no path through them: '
      'each meets a constant 0 or a branch the pass does not take, decided by a value the '
      'check could not read in advance (drawn from a PRNG key, an array of over 2^20 '
      'entries, a loop counter). Their path scale would be 0, so Path-SGD would never '
      'update them: leave them out of params, route them to another transformation with '
      'optax.partition, or exclude them with optax.masked.'
    )


def _phi_p_to_the_p(jaxpr, consts, q: list[jax.Array]) -> jax.Array:
  """``sum_j f_q(1)_j``: the pass on ``q``, counting every path through a max."""
  x = jnp.ones(jaxpr.invars[-1].aval.shape, jaxpr.invars[-1].aval.dtype)
  return positive_pass.evaluate(jaxpr, consts, *q, x)[0]


def _powers(jaxpr, p, floats: list[jax.Array]) -> list[jax.Array]:
  """``q_i = |theta_i|^p`` in the pass dtype."""
  return [numerics.abs_pow(f.astype(v.aval.dtype), p) for f, v in zip(floats, jaxpr.invars)]


def _invalid(p, floats) -> jax.Array:
  """Whether a param is non-finite or a traced ``p`` is out of range: then every log
  scale (and the path norm) is NaN, so NaN checks see it, never finite updates."""
  bad = functools.reduce(jnp.logical_or, [~jnp.all(jnp.isfinite(f)) for f in floats])
  return bad if isinstance(p, float) else bad | ~numerics.p_in_range(p)


def _log_scales(jaxpr, consts, p, floats) -> list[jax.Array]:
  """``(2/p) log(d phi_p^p / d q_i)`` per floating leaf; ``+inf`` where untrusted, NaN
  where the params or a traced ``p`` are invalid.

  Differentiable (a gradient through an update, as in meta-learning) where the pass
  stays in the float range. Where any part of it overflows, the infinities it holds
  would turn even a zero cotangent into NaN, so the derivative of every scale is taken
  as 0: the scales are constants there. ``lax.cond`` runs the derivative only where it
  is defined.
  """

  # Everything it may be differentiated by is an argument (a custom_jvp cannot close over
  # it): the params, a traced p, and the floating constants of apply_fn.
  is_float = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]
  float_consts = [c for c, f in zip(consts, is_float) if f]

  def log_scales_of(floats, float_consts, p):
    found = iter(float_consts)
    merged = [next(found) if f else c for c, f in zip(consts, is_float)]
    return _log_scales_in_range(jaxpr, merged, p, floats)

  if isinstance(p, float):  # static: not an argument of the custom_jvp
    return _guarded(lambda q, c: log_scales_of(q, c, p))(floats, float_consts)
  return _guarded(log_scales_of)(floats, float_consts, p)


def _guarded(log_scales_of):
  """``log_scales_of``'s scales, with their derivative 0 where its flag says that the
  pass overflowed (see ``_log_scales``)."""

  @jax.custom_jvp
  def log_scales(*args):
    return log_scales_of(*args)[0]

  @log_scales.defjvp
  def derivative_in_range(primals, tangents):
    out, in_range = log_scales_of(*primals)
    derivative = lambda t: jax.jvp(lambda *a: log_scales_of(*a)[0], primals, t)[1]
    constant = lambda t: [jnp.zeros_like(o) for o in out]
    return out, jax.lax.cond(in_range, derivative, constant, tangents)

  return log_scales


def _log_scales_in_range(jaxpr, consts, p, floats) -> tuple[list[jax.Array], jax.Array]:
  """The log scales, and whether the pass and every derivative of it are finite."""
  phi_p_p, grads = jax.value_and_grad(lambda q: _phi_p_to_the_p(jaxpr, consts, q))(
    _powers(jaxpr, p, floats)
  )
  trusted = jnp.isfinite(phi_p_p)
  invalid = _invalid(p, floats)
  log_scales = []
  for g in grads:
    # g = 0 -> -inf (no path: update 0); g = inf -> inf; g = nan (inf * 0) -> inf. The
    # log of 1 in their place keeps 1/0 out of a gradient through the update.
    positive = g > 0
    log_g = jnp.where(positive, (2 / p) * jnp.log(jnp.where(positive, g, 1.0)), jnp.inf)
    log_g = jnp.where(g == 0, -jnp.inf, log_g)
    log_scales.append(jnp.where(invalid, jnp.nan, jnp.where(trusted, log_g, jnp.inf)))
  in_range = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g)) for g in grads], trusted)
  return log_scales, in_range


def _log_path_norm(jaxpr, consts, p, floats) -> jax.Array:
  """``log(phi_p^p) / p``: ``-inf`` at 0 with gradient 0, ``+inf`` beyond the range."""
  phi_p_p = _phi_p_to_the_p(jaxpr, consts, _powers(jaxpr, p, floats))
  positive = jnp.isfinite(phi_p_p) & (phi_p_p > 0)
  log_norm = jnp.log(jnp.where(positive, phi_p_p, 1.0)) / p  # no 1/0 in the gradient
  elsewhere = jnp.where(phi_p_p == 0, -jnp.inf, jnp.where(phi_p_p < 0, jnp.nan, jnp.inf))
  return jnp.where(_invalid(p, floats), jnp.nan, jnp.where(positive, log_norm, elsewhere))


_compiled: collections.OrderedDict[tuple[Any, ...], Callable[..., Any]] = collections.OrderedDict()


def _compiled_pass(fn, jaxpr: jex_core.Jaxpr, key: bytes, p: float):
  """``jit(fn)`` for this jaxpr structure and ``p``, from a cache of ``_CACHE_SIZE``.

  The cached function holds the first jaxpr of its structure (no values: its constants
  are arguments), not the ``apply_fn`` it was traced from.
  """
  key = (fn.__name__, p, key)
  if key in _compiled:
    _compiled.move_to_end(key)
    return _compiled[key]
  compiled = jax.jit(lambda consts, floats: fn(jaxpr, consts, p, floats))
  _compiled[key] = compiled
  if len(_compiled) > _CACHE_SIZE:
    _compiled.popitem(last=False)
  return compiled


def _is_traced(values: Sequence[Any]) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


def _run(fn, traced: _Traced, p: numerics.Exponent):
  """``fn`` on the traced pass: compiled and cached when called eagerly.

  A traced ``p`` (from ``optax.inject_hyperparams``) or traced params (inside ``jit``
  or ``grad``) run ``fn`` inline, in the caller's trace.
  """
  closed = traced.closed_jaxpr
  leaves = [leaf for _, leaf in traced.named_leaves]
  floats = [leaves[i] for i in traced.indices]
  if isinstance(p, float) and not _is_traced(floats):
    compiled = _compiled_pass(fn, closed.jaxpr, positive_pass.structure_key(closed), p)
    return compiled(list(closed.consts), floats)
  return fn(closed.jaxpr, closed.consts, p, floats)


def log_scale_leaves(
  params: Any, p: numerics.Exponent, apply_fn: ApplyFn, input_shape: Sequence[int]
) -> tuple[list[Any], Any, dict[int, jax.Array]]:
  """The log path scale of every floating leaf, from one gradient of the ``|theta|^p`` pass.

  .. math::

    \\log \\gamma_p(w, e) = \\frac{2}{p} \\log \\frac{\\partial}{\\partial q_e}
    \\sum_j f_q(\\mathbf{1})_j \\Big|_{q = |\\theta|^p},

  which for a parameter shared by several edges (a conv kernel entry) is the sum over
  those edges of ``gamma_in(u) gamma_out(v)``, to the power ``2/p``; every path through
  a max pool counts. See the module docstring for the scope, max pooling, the float
  range and what happens beyond it.

  Args:
    params: the params pytree that ``apply_fn`` takes (a Linen ``params`` dict, an NNX
      ``State``, possibly with ``optax.MaskedNode`` leaves).
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]`` (may be traced).
    apply_fn: ``apply_fn(params, x)``, the network's forward pass on a batch ``x``:
      ``lambda q, x: model.apply({'params': q}, x)`` for Linen,
      ``lambda s, x: nnx.merge(graphdef, s)(x)`` for NNX.
    input_shape: the shape of one input, without the batch axis: a tuple of ints.

  Returns:
    ``(leaves, treedef, log_scales)``: the flattened params (``MaskedNode`` kept as
    leaves), their treedef, and a map from the index of each floating leaf to its log
    scale, an array shaped like the leaf in float32 or wider: ``-inf`` where the scale
    is exactly 0, ``+inf`` where it overflows or the pass did.

  Raises:
    ValueError: if ``apply_fn`` is not callable, ``input_shape`` is no shape,
      ``params`` has no floating leaf, ``apply_fn`` fails on the all-ones input of that
      shape (or on masked params), does not use one of the floating leaves, is not a
      ReLU network (a normalisation layer, GELU or tanh, a product of activations: see
      ``scope``), or applies ``argmax``, ``sort`` and their kin to activations.

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
    Algorithm 1; Gonon et al., ICLR 2024 (max pooling; see ``positive_pass``).
  """
  traced = check_network(params, check_apply_fn(apply_fn), check_input_shape(input_shape))
  log_scales = _run(_log_scales, traced, p)
  leaves = [leaf for _, leaf in traced.named_leaves]
  return leaves, traced.treedef, dict(zip(traced.indices, log_scales))


def log_path_norm(
  params: Any, p: numerics.Exponent, apply_fn: ApplyFn, input_shape: Sequence[int]
) -> jax.Array:
  """``log phi_p(w) = log(sum(f_{|theta|^p}(1))) / p``, differentiable.

  Every path through a max pool counts (see the module docstring).

  Args:
    params: the params pytree that ``apply_fn`` takes.
    p: a number in ``[0.5, 32]``.
    apply_fn: ``apply_fn(params, x)``, the network's forward pass.
    input_shape: the shape of one input, without the batch axis: a tuple of ints.

  Returns:
    A scalar in float32 or wider (float64 where 64-bit types are enabled); ``+inf``
    where ``phi_p^p`` overflows that dtype (see the module docstring), ``-inf`` where
    there is no path, with gradient 0 there.

  Raises:
    ValueError: as ``log_scale_leaves``, except that unused leaves are allowed.

  Example:
    >>> import jax, jax.numpy as jnp, optax_path
    >>> params = {'w': jnp.array([[1., 2.]]), 'v': jnp.array([[3.], [4.]])}
    >>> apply_fn = lambda q, x: jax.nn.relu(x @ q['w']) @ q['v']
    >>> round(float(optax_path.path_norm(params, p=1.0, apply_fn=apply_fn, input_shape=(1,))), 5)
    11.0
  """
  traced = _trace(params, check_apply_fn(apply_fn), check_input_shape(input_shape))
  scope.check(traced.closed_jaxpr, _param_names(traced))
  return _run(_log_path_norm, traced, p)
