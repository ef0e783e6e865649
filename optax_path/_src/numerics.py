"""Log-domain arithmetic for path scales, exact over the whole float range.

The path scales of a network initialised like the paper's unbalanced nets span far
more than the float32 range (units rescaled by 1e25 make ``|W|^2`` reach 1e50), even
though the weights and the updates ``grad / scale`` are ordinary float32 numbers. So
the per-unit sums of Algorithm 1 are carried as logarithms, and each matrix-vector
product is done on float mantissas: every row and column of ``|W|`` is shifted by an
exact power of two (``ldexp``) so that the largest term of each sum lies in
``[2^-p/2, 2^p/2]``. The products stay plain matmuls, and the result is right to a few
ulps wherever the true value lies, representable or not.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Exponent = float | jax.Array

LN2 = math.log(2.0)
_NO_EXPONENT = -(2**30)  # exponent of 0: below every real exponent, yet no int32 overflow


def validate_p(p: Any) -> Exponent:
  """Checks that ``p`` is a finite number > 0; returns it as a float when concrete.

  A traced ``p`` (as ``optax.inject_hyperparams`` makes it inside a jitted update) is
  returned as it is: it was checked when the transformation was built.
  """
  try:
    value = float(p)
  except jax.errors.ConcretizationTypeError:
    return p
  except (TypeError, ValueError):
    raise ValueError(f'p must be a number > 0, got {p!r}.') from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(
      f'p must be a finite number > 0, got {p!r}. (p = inf, the max-norm geometry, is '
      'not supported; a large finite p such as 20 approximates it.)'
    )
  return value


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype scales are computed in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def abs_pow(x: jax.Array, p: Exponent) -> jax.Array:
  """``|x|^p``, with the common exponents 1 and 2 done without ``pow``."""
  if isinstance(p, float) and p == 1.0:
    return jnp.abs(x)
  if isinstance(p, float) and p == 2.0:
    return jnp.square(x)
  return jnp.abs(x) ** p


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
  k = jnp.clip(k, 2 * low, 2 * high)
  half = k // 2
  return x * _pow2(half, x.dtype) * _pow2(k - half, x.dtype)


def exponent(x: jax.Array) -> jax.Array:
  """The integer ``e`` with ``|x| < 2^e <= 2|x|``, and a very negative sentinel for 0."""
  _, e = jnp.frexp(x)
  return jnp.where(x != 0, e, _NO_EXPONENT)


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
  # Split exp(log_x) = x_mantissa * 2^(p * k), with x_mantissa in [2^-p/2, 2^p/2].
  k = jnp.where(alive, jnp.round(jax.lax.stop_gradient(log_x) / (p * LN2)), 0).astype(jnp.int32)
  x_mantissa = jnp.exp(jnp.where(alive, log_x - p * LN2 * k, -jnp.inf))
  w = jnp.where(alive[:, None], w, 0)
  # Column exponents: the largest 2^k_u |w_uv| of each column lies in [1/2, 1).
  column = jnp.max(exponent(w) + k[:, None], axis=0)
  if b is not None:
    column = jnp.maximum(column, exponent(b))
  nonzero = column > _NO_EXPONENT // 2
  column = jnp.where(nonzero, column, 0)
  terms = abs_pow(ldexp(w, k[:, None] - column[None, :]), p)
  # HIGHEST: no TF32 or bfloat16 passes on GPU and TPU, whose error would show in scales.
  total = jnp.matmul(x_mantissa, terms, precision=jax.lax.Precision.HIGHEST)
  if b is not None:
    total = total + abs_pow(ldexp(b, -column), p)
  log_total = jnp.log(jnp.where(nonzero, total, 1.0)) + p * LN2 * column
  return jnp.where(nonzero, log_total, -jnp.inf)


def divide_by_scale(update: jax.Array, log_scale: jax.Array) -> jax.Array:
  """``update / exp(log_scale)``, right wherever the quotient is representable.

  A zero scale (``log_scale == -inf``) gives 0, a quotient beyond the range of the
  update's dtype gives its largest finite value (with the sign of ``update``), and
  non-finite entries of ``update`` pass through unchanged. The result has
  ``update``'s dtype.
  """
  dtype = compute_dtype(update.dtype)
  g = update.astype(dtype)
  largest = jnp.asarray(jnp.finfo(update.dtype).max, dtype)
  log_quotient = jnp.where(
    jnp.isneginf(log_scale), -jnp.inf, jnp.log(jnp.abs(g)) - log_scale.astype(dtype)
  )
  quotient = jnp.sign(g) * jnp.minimum(jnp.exp(log_quotient), largest)
  return jnp.where(jnp.isfinite(g), quotient, g).astype(update.dtype)
