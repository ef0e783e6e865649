"""Log-domain arithmetic for path scales, accurate over the whole float range.

The path scales of a network initialised like the paper's unbalanced nets span far
more than the float32 range (units rescaled by 1e25 make ``|W|^2`` reach 1e50), even
though the weights and the updates ``grad / scale`` are ordinary float32 numbers. So
the per-unit sums of Algorithm 1 are carried as logarithms, and each matrix-vector
product is done on float mantissas: every row and column of ``|W|`` is shifted by an
exact power of two (``ldexp``) so that the largest term of each sum lies in
``[2^-p/2, 2^p/2]``. The products stay plain matmuls, and each sum is right to a few
ulps of its logarithm wherever the true value lies, representable or not.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Exponent = float | jax.Array

LN2 = math.log(2.0)
_NO_EXPONENT = -(2**30)  # exponent of 0: below every real exponent, yet no int32 overflow


#: The range of ``p`` over which the scales are right (see ``validate_p``).
P_MIN, P_MAX = 0.5, 32.0


def is_real(x: Any) -> bool:
  """Whether ``x`` is a real number or array: a Python, numpy or JAX integer or float of
  any shape; not a bool, complex number or string."""
  dtype = getattr(x, 'dtype', None)
  if isinstance(x, (bool, np.bool_, str, bytes)):
    return False
  if dtype is not None:
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
  return isinstance(x, numbers.Real)


def validate_p(p: Any) -> Exponent:
  """Checks that ``p`` is a real number in ``[P_MIN, P_MAX] = [0.5, 32]``.

  Python numbers, numpy scalars and 0-d numpy or JAX arrays of an integer or floating
  dtype are checked alike; ``bool``, complex, strings and arrays with more than one
  entry are rejected. A concrete ``p`` is returned as a Python float.

  Why this range: the passes carry each sum of ``|w|^p`` terms on float mantissas (see
  ``log_matvec``), whose terms and factors span up to ``2^(1.5 p)`` (large ``p``) or
  lose the terms below the float range, which ``|.|^p`` lifts by ``2^(-126 (1 - p))``
  (small ``p``). Over ``[0.5, 32]`` both cost less than ``2^-60`` relative in float32
  (float32 is the narrowest compute dtype), so every scale is right to the rounding
  of its logarithm; at ``p = 150`` a 1-1 net of weight 1 got scales 0, and at
  ``p = 1e-3`` a bias was lost. ``p = 32`` is within 2% of the max-norm geometry
  ``p = inf`` on layers up to 1000 units wide (``n^(1/p)``).

  A traced ``p`` (``optax.inject_hyperparams`` inside a jitted update) cannot be
  checked here; its dtype and shape are. The passes then check its value: out of the
  range (or NaN) every scale is NaN, so every update is NaN, which ``optax.
  apply_if_finite`` and NaN checks catch (see ``guard_p``). Injected eagerly (no
  ``jit``), ``p`` is concrete and this raises.

  Args:
    p: the exponent of the path geometry.

  Returns:
    ``p`` as a float, or the tracer itself.

  Raises:
    ValueError: ``p`` is not a real scalar, or out of ``[0.5, 32]``.
  """
  if not is_real(p):
    raise ValueError(f'p must be a real number, got {p!r}.')
  if np.ndim(p) != 0:
    raise ValueError(f'p must be a scalar, got an array of shape {np.shape(p)}.')
  if isinstance(p, jax.core.Tracer):
    return p
  value = float(p)
  if not P_MIN <= value <= P_MAX:
    raise ValueError(
      f'p must be a number in [{P_MIN:g}, {P_MAX:g}], got {p!r}: beyond it the passes cannot keep '
      'every path scale right in float32. (p = inf, the max-norm geometry, is not '
      f'supported; p = {P_MAX:g} approximates it.)'
    )
  return value


def p_in_range(p: Exponent) -> jax.Array | bool:
  """Whether ``p`` lies in ``[P_MIN, P_MAX]`` (false for NaN); a bool when concrete."""
  if isinstance(p, float):
    return P_MIN <= p <= P_MAX
  return (p >= P_MIN) & (p <= P_MAX)


def guard_p(p: Exponent) -> Exponent:
  """``p`` itself when concrete (checked by ``validate_p``); a traced ``p`` out of
  ``[P_MIN, P_MAX]`` becomes NaN, which makes every sum of the passes NaN."""
  if isinstance(p, float):
    return p
  return _where(p_in_range(p), p, jnp.nan)


def surface_invalid(vectors: Sequence[jax.Array], p: Exponent) -> list[jax.Array]:
  """``vectors`` (log gammas), or all NaN where the network or ``p`` is invalid.

  The log-domain passes turn a non-finite weight or bias into a NaN or ``+inf`` entry
  of a ``log gamma_in`` vector (``log_matvec`` keeps non-finite weights of dead rows),
  and no finite params give either. So if any entry is NaN or ``+inf``, or a traced
  ``p`` is out of range, every vector becomes NaN: every scale, every update, the
  path norm and the state are then NaN, never finite numbers over a hidden NaN. Per
  unit: no pass over the kernels.
  """
  flat = jnp.concatenate([v.reshape(-1) for v in vectors])
  invalid = jnp.any(jnp.isnan(flat) | (flat == jnp.inf))
  if not isinstance(p, float):
    invalid = invalid | ~p_in_range(p)
  return [_where(invalid, jnp.nan, v) for v in vectors]


def exp_keeping_nan(x: jax.Array) -> jax.Array:
  """``exp(x)``, NaN where ``x`` is NaN.

  Plain ``jnp.exp`` should do this, but XLA:CPU (jaxlib 0.10.2) miscompiles ``exp`` of
  the NaN-selecting vectors of ``surface_invalid`` once fused: it returned the logs
  themselves or uninitialised memory for a net with a NaN weight (``path_scales`` gave
  finite numbers). Selecting NaN after the ``exp`` is compiled right.
  """
  return _where(jnp.isnan(x), jnp.nan, jnp.exp(x))


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype scales are computed in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def abs_pow(x: jax.Array, p: Exponent) -> jax.Array:
  """``|x|^p``, with the common exponents 1 and 2 done without ``pow``.

  For ``p < 1`` the derivative of ``|x|^p`` is unbounded at ``x = 0``; here it is 0
  there (as ReLU's is at 0), so the gradient of the path norm is finite, never the
  ``inf * 0 = NaN`` of the plain power.
  """
  if isinstance(p, float) and p == 1.0:
    return jnp.abs(x)
  if isinstance(p, float) and p == 2.0:
    return jnp.square(x)
  if isinstance(p, float) and p > 1.0:
    return jnp.abs(x) ** p
  zero = x == 0
  return _where(zero, 0, jnp.abs(_where(zero, 1, x)) ** p)


def explicitly_sharded(*arrays) -> bool:
  """Whether any of ``arrays`` is split over a mesh axis of type ``Explicit``.

  Under explicit sharding (``jax.make_mesh``'s default axis types) every operation
  must be given operands whose shardings agree; elsewhere sharding is XLA's business.
  """
  typeof = getattr(jax, 'typeof', None)  # JAX releases before explicit sharding lack it
  for a in arrays:
    sharding = getattr(typeof(a), 'sharding', None) if typeof else None
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      continue
    if any(entry is not None for entry in sharding.spec):
      return True
  return False


def replicated(x: jax.Array) -> jax.Array:
  """``x`` itself, resharded to every device where it is split over explicit axes.

  The path scales' per-unit vectors (a layer's ``log gamma``) are tiny; kept whole on
  every device, they combine with kernels split along either axis, in both passes. A
  kernel split over its output units gives the forward pass's sums split the same way,
  and this gathers them: the only communication the passes need (a vector per layer).
  """
  if not explicitly_sharded(x):
    return x
  return _resharded(x, jax.sharding.PartitionSpec(), like=x)


def replicated_on_mesh_of(x: jax.Array, arrays) -> jax.Array:
  """``x`` whole on every device of the mesh of the first of ``arrays`` split over
  explicit axes (``x`` itself if none is). A vector made without a mesh (``init``
  outside ``jax.set_mesh``) has no sharding in its type, so XLA would pick one for it
  in a jitted step's output, and the next step would receive it split."""
  split = [a for a in arrays if explicitly_sharded(a)]
  return _resharded(x, jax.sharding.PartitionSpec(), like=split[0]) if split else x


def _resharded(x: jax.Array, spec, like: jax.Array) -> jax.Array:
  """``x`` split by ``spec`` over the mesh of ``like`` (no ``jax.set_mesh`` needed)."""
  mesh = jax.typeof(like).sharding.mesh
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))


def sharded_like(term: jax.Array, leaf: jax.Array) -> jax.Array:
  """``term``, which broadcasts to ``leaf``, split as ``leaf`` is along the axes it
  spans, so that what it forms (a leaf's path scales) has the leaf's sharding rather
  than a whole copy on every device. Explicit axes only; elsewhere XLA places it."""
  if not explicitly_sharded(leaf) or jnp.ndim(term) != leaf.ndim:
    return term
  spec = jax.typeof(leaf).sharding.spec
  spec = [axis if size > 1 else None for axis, size in zip(spec, term.shape)]
  return _resharded(term, jax.sharding.PartitionSpec(*spec), like=leaf)


def _where(condition, x, y) -> jax.Array:
  """``jnp.where`` without its nested ``jit``, which costs compile time for every shape."""
  if explicitly_sharded(condition, x, y):  # broadcasts that keep the operands' shardings
    return jnp.where(condition, x, y)
  dtype = jnp.result_type(x, y)
  shape = jnp.broadcast_shapes(jnp.shape(condition), jnp.shape(x), jnp.shape(y))
  condition, x, y = (
    jnp.broadcast_to(a, shape) for a in (condition, jnp.asarray(x, dtype), jnp.asarray(y, dtype))
  )
  return jax.lax.select(condition, x, y)


def _pow2(k: jax.Array, dtype) -> jax.Array:
  """Exactly ``2^k`` for integer ``k`` in the normal exponent range of ``dtype``."""
  info = jnp.finfo(dtype)
  int_dtype = jnp.int64 if jnp.dtype(dtype).itemsize == 8 else jnp.int32
  biased = k.astype(int_dtype) + (int(info.maxexp) - 1)
  return jax.lax.bitcast_convert_type(biased << int(info.nmant), dtype)


def ldexp(x: jax.Array, k: jax.Array) -> jax.Array:
  """``x * 2^k`` for ``|k|`` up to twice the exponent range, exact unless it underflows.

  ``jnp.ldexp`` builds ``2^k`` with a ``pow`` that is not exact on every backend; this
  multiplies by two exact powers of two instead. Larger ``|k|`` are clipped, which only
  matters for results that underflow to (near) zero anyway.
  """
  info = jnp.finfo(x.dtype)
  low, high = int(info.minexp), int(info.maxexp) - 1
  k = jnp.minimum(jnp.maximum(k, 2 * low), 2 * high)
  half = k >> 1
  return x * _pow2(half, x.dtype) * _pow2(k - half, x.dtype)


def exponent(x: jax.Array) -> jax.Array:
  """An integer ``e`` with ``|x| < 2^e <= 2|x|`` (``frexp``'s), a very negative one for 0.

  Read from the bits (``jnp.frexp`` is many more ops); subnormals get the smallest
  normal exponent, an upper bound, which is all the normalisation needs.
  """
  info = jnp.finfo(x.dtype)
  int_dtype = jnp.int64 if jnp.dtype(x.dtype).itemsize == 8 else jnp.int32
  bits = jax.lax.bitcast_convert_type(x, int_dtype)
  biased = (bits >> int(info.nmant)) & (2 ** int(info.nexp) - 1)
  e = (jnp.maximum(biased, 1) - (int(info.maxexp) - 2)).astype(jnp.int32)
  return _where(x != 0, e, _NO_EXPONENT)


def _matvec(x: jax.Array, m: jax.Array) -> jax.Array:
  """``x @ m`` for a vector ``x``, at full float precision, on ``m`` split any way.

  HIGHEST: no TF32 or bfloat16 passes on GPU and TPU, whose error would show in scales.
  Under explicit sharding ``x`` is split like the rows of ``m``: each device sums its
  own rows and the partial sums are added across devices (an all-reduce of a vector),
  rather than gathering ``m`` (a kernel) onto every device.
  """
  if not explicitly_sharded(m):
    return jnp.matmul(x, m, precision=jax.lax.Precision.HIGHEST)
  sharding = jax.typeof(m).sharding
  rows, columns = sharding.spec
  x = _resharded(x, jax.sharding.PartitionSpec(rows), like=m)
  return jnp.matmul(
    x,
    m,
    precision=jax.lax.Precision.HIGHEST,
    out_sharding=jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(columns)),
  )


def log_matvec(log_x: jax.Array, w: jax.Array, b: jax.Array | None, p: Exponent) -> jax.Array:
  """``log(exp(log_x) @ |w|^p + |b|^p)``, exact over any range of ``log_x`` and ``w``.

  Args:
    log_x: ``(n,)`` logs of a non-negative vector; ``-inf`` marks a zero.
    w: ``(n, m)`` matrix.
    b: optional ``(m,)`` vector whose ``|b|^p`` is added (a bias unit with value 1).
    p: the exponent.

  Returns:
    ``(m,)`` logs, ``-inf`` where the sum is exactly zero.
  """
  alive = jnp.isfinite(log_x)
  b = None if b is None else replicated(b)  # its exponents join the columns' (FSDP: b split)
  # Split exp(log_x) = x_mantissa * 2^(p * k), with x_mantissa in [2^-p/2, 2^p/2].
  nearest = jnp.floor(jax.lax.stop_gradient(log_x) / (p * LN2) + 0.5)
  k = _where(alive, nearest, 0).astype(jnp.int32)
  x_mantissa = jnp.exp(_where(alive, log_x - p * LN2 * k, -jnp.inf))
  # Dead rows (x = 0) are zeroed, so that their weights do not set the column
  # exponents; a non-finite weight is kept, so that 0 * NaN shows it (surface_invalid).
  w = _where(alive[:, None] | ~jnp.isfinite(w), w, 0)
  # Column exponents: the largest 2^k_u |w_uv| of each column lies in [1/2, 1).
  column = jnp.max(exponent(w) + k[:, None], axis=0)
  if b is not None:
    column = jnp.maximum(column, exponent(b))
  nonzero = column > _NO_EXPONENT // 2
  column = _where(nonzero, column, 0)
  terms = abs_pow(ldexp(w, k[:, None] - column[None, :]), p)
  total = _matvec(x_mantissa, terms)
  if b is not None:
    total = total + abs_pow(ldexp(b, -column), p)
  log_total = jnp.log(_where(nonzero, total, 1.0)) + p * LN2 * column
  return replicated(_where(nonzero, log_total, -jnp.inf))


# ln 2 in two parts: ``k * LN2_HIGH`` is exact for |k| < 2^12 (Cody and Waite). The
# low part is ``ln 2 - LN2_HIGH`` from the digits of ln 2, not from the rounded ``LN2``,
# whose error (4e-17) times k = 2^11 would cost float64 quotients 30 ulps.
_LN2_HIGH = 0.693359375
_LN2_LOW = -2.12194440054690582767878542e-4
_MAX_LOG2 = 2**14  # far beyond any float exponent, and sums of a few stay int32


def split_exp(log_x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``exp(log_x)`` as ``(mantissa, k)``: ``mantissa * 2^k``, mantissa in ``[0.7, 1.42]``.

  Exact to an ulp of the mantissa over any range of ``log_x``. An infinite ``log_x``
  gives ``(0, 0)`` (a scale of 0 or inf saturates the division), a NaN ``(NaN, 0)``.
  """
  finite = jnp.isfinite(log_x)
  safe = jnp.minimum(jnp.maximum(_where(finite, log_x, 0), -_MAX_LOG2 * LN2), _MAX_LOG2 * LN2)
  k = jnp.round(safe / LN2)
  mantissa = jnp.exp((safe - k * _LN2_HIGH) - k * _LN2_LOW)
  mantissa = _where(finite, mantissa, _where(jnp.isnan(log_x), jnp.nan, 0.0))
  return mantissa, k.astype(jnp.int32)


def computed_once(k: jax.Array) -> jax.Array:
  """The integer array ``k`` itself (``|k| < 2^29``), computed once, not per consumer element.

  XLA fuses cheap elementwise producers into their consumers: the few operations that
  split a unit's log scale would run again for every parameter of the unit's row or
  column. An integer division is not cheap to XLA, so it is never duplicated, and
  everything before it is computed once, per unit. (``lax.optimization_barrier`` would
  say this better, but XLA:CPU drops it before fusion.)
  """
  return jax.lax.div(k * 3, jnp.asarray(3, k.dtype))


class SplitScale(NamedTuple):
  """``exp(-log_scale)`` of one log-scale term as ``mantissa * 2^power``.

  The ``power`` of one term of each leaf (the *biased* one) also carries twice the
  exponent bias of the dtype, so that summing the powers of a leaf's terms gives the
  biased exponent of both powers of two of ``divide_by_split_scale`` directly.
  """

  mantissa: jax.Array
  power: jax.Array


def split_leaf_scales(
  leaves: Sequence[jax.Array], log_scales: Sequence[Sequence[jax.Array]]
) -> list[list[SplitScale]]:
  """The terms of each leaf's log scale, split for ``divide_by_split_scale``.

  Terms smaller than their leaf (per unit: a layer's rows and columns) are split for all
  leaves in one computation per compute dtype, so a deep net's few hundred vectors cost
  a handful of operations rather than a few each. Terms as large as their leaf (the
  general mode) are split per parameter, inside the division's fusion.
  """
  split = [[] for _ in leaves]
  per_unit = {}  # compute dtype -> indices of the leaves whose terms are per unit
  for i, (leaf, terms) in enumerate(zip(leaves, log_scales)):
    dtype = compute_dtype(leaf.dtype)
    if all(jnp.size(t) < jnp.size(leaf) for t in terms):
      per_unit.setdefault(dtype, []).append(i)
    else:
      split[i] = [_split(t.astype(dtype), k == 0) for k, t in enumerate(terms)]
  for dtype, group in per_unit.items():
    terms = [t for i in group for t in log_scales[i]]
    biased = [k == 0 for i in group for k in range(len(log_scales[i]))]
    parts = iter(_split_together(terms, biased, dtype))
    for i in group:
      split[i] = [next(parts) for _ in log_scales[i]]
  return split


def _split_together(
  log_scales: Sequence[jax.Array], biased: Sequence[bool], dtype
) -> list[SplitScale]:
  """``exp(-t)`` of every term ``t`` as a ``SplitScale``, all in one computation."""
  flat = -jnp.concatenate([t.astype(dtype).reshape(-1) for t in log_scales])
  offsets = jnp.concatenate(
    [
      jnp.full(t.size, _two_biases(dtype) if b else 0, jnp.int32)
      for t, b in zip(log_scales, biased)
    ]
  )
  mantissa, power = split_exp(flat)
  power = computed_once(power + offsets)  # per unit, not per parameter
  ends = np.cumsum([t.size for t in log_scales])[:-1].tolist()
  return [
    SplitScale(m.reshape(t.shape), k.reshape(t.shape))
    for t, m, k in zip(log_scales, jnp.split(mantissa, ends), jnp.split(power, ends))
  ]


def _split(log_scale: jax.Array, biased: bool) -> SplitScale:
  mantissa, power = split_exp(-log_scale)
  return SplitScale(mantissa, power + (_two_biases(log_scale.dtype) if biased else 0))


def _two_biases(dtype) -> int:
  """Twice the exponent bias of ``dtype`` (127 for float32)."""
  return 2 * (int(jnp.finfo(dtype).maxexp) - 1)


def divide_by_scale(update: jax.Array, *log_scale: jax.Array) -> jax.Array:
  """``update / exp(sum(log_scale))``, right wherever the quotient is a normal number.

  ``log_scale`` is one or more terms that broadcast against ``update`` (e.g. a row and a
  column vector, so that the scales of a layer are never formed); see
  ``divide_by_split_scale``.
  """
  return divide_by_split_scale(update, split_leaf_scales([update], [log_scale])[0])


def divide_by_split_scale(update: jax.Array, terms: Sequence[SplitScale]) -> jax.Array:
  """``update`` divided by the scale whose terms (one of them biased) are ``terms``.

  Each term is split into a mantissa and an exponent of two once, per unit
  (``split_leaf_scales``); per parameter this costs a few integer operations on the bits
  of ``g`` and of the summed exponents, and products by the mantissas and by three exact
  powers of two, with no transcendental function, so it fuses into the optimizer's
  update:

  .. math::

    g / s = r \\, m \\, 2^{E}, \\qquad r = g \\, 2^{-e_g}, \\quad
    m = \\prod_t m_t \\in [0.49, 2.02], \\quad E = e_g + \\sum_t k_t,

  where ``2^e_g`` is ``g``'s power of two with the low ``nexp - 2`` bits of its
  exponent field cleared (one ``and``), so that ``|r|`` lies in ``[1, 2^64)`` in float32
  (``[1, 2^512)`` in float64) for every normal ``g``, and ``2^-e_g`` is a normal number.
  ``r m`` is then a normal number, and ``2^E`` is applied as two powers of two of the
  same direction, so the running product moves monotonically from ``r m`` to the
  quotient: it leaves the float range only where the quotient does. (Multiplying ``g``
  by ``m`` first, as before, overflowed for ``|g|`` near the largest finite value and
  ``m > 1``, and a single clip of ``E`` could not cover the exponents of both the
  largest and the smallest ``g``.)

  Saturation: a zero scale (a term ``-inf``) or an infinite one gives 0; a quotient
  beyond the range of ``update``'s dtype gives its largest finite value (with the sign
  of ``update``); one below the normal range is within the smallest normal number of
  it (0 where the backend flushes subnormals; a subnormal ``g`` counts as 0 there too).
  A NaN term (a NaN log scale: non-finite params, an invalid traced ``p``) gives NaN,
  and non-finite entries of ``update`` pass through unchanged. The result has
  ``update``'s dtype. Right wherever the quotient is a normal number of ``update``'s
  dtype: to a few ulps of the compute dtype (float32 for float16 and bfloat16).

  Args:
    update: any shape, a floating dtype.
    terms: ``SplitScale`` terms that broadcast against ``update``, the first biased.

  Returns:
    ``update / scale``, shape and dtype of ``update``.
  """
  dtype = compute_dtype(update.dtype)
  g = update.astype(dtype)
  info = jnp.finfo(dtype)
  nmant, bias = int(info.nmant), int(info.maxexp) - 1
  int_dtype = jnp.int64 if jnp.dtype(dtype).itemsize == 8 else jnp.int32
  mantissa, biased = terms[0]
  for term in terms[1:]:
    mantissa, biased = mantissa * term.mantissa, biased + term.power
  # g's exponent field, its low nexp - 2 bits cleared: e_g + bias in {0, Q, 2Q, 3Q}.
  coarse = jax.lax.bitcast_convert_type(g, int_dtype) & _coarse_exponent_mask(dtype)
  r = g * jax.lax.bitcast_convert_type(jnp.asarray((2 * bias) << nmant, int_dtype) - coarse, dtype)
  # The biased exponent E + 2 bias, clipped to [1, 4 bias]: as two exact powers of two
  # 2^floor(E/2) and 2^ceil(E/2), both normal, both of the sign of E. At the lower clip
  # 2^floor(E/2) is 0 (the exponent field 0): the quotient is below 2^-187 there, and
  # at the upper one it is beyond 2^189: both saturate.
  biased = biased + ((coarse >> nmant) - bias).astype(biased.dtype)
  biased = jnp.minimum(jnp.maximum(biased, 1), 4 * bias).astype(int_dtype)
  half = biased >> 1
  first = jax.lax.bitcast_convert_type(half << nmant, dtype)
  second = jax.lax.bitcast_convert_type((biased - half) << nmant, dtype)
  quotient = r * mantissa * first * second
  largest = jnp.asarray(jnp.finfo(update.dtype).max, dtype)
  quotient = jnp.minimum(jnp.maximum(quotient, -largest), largest)
  return _where(jnp.isfinite(g), quotient, g).astype(update.dtype)


def _coarse_exponent_mask(dtype) -> int:
  """The top two bits of the exponent field of ``dtype``, in place."""
  info = jnp.finfo(dtype)
  nexp, nmant = int(info.nexp), int(info.nmant)
  return (2**nexp - 2 ** (nexp - 2)) << nmant
