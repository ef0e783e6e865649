"""Algorithm 1 in one fused read of each kernel per pass, warm-started from known scales.

The log-domain passes of ``scales`` are right over any range but read each kernel
several times. Between two optimizer steps the path scales barely move, so the
previous step's ``log gamma`` vectors say where every sum of this step lies. Each sum
is then a plain fused reduction of float32 numbers,

.. math::

  \\gamma_v = e^{h_v} \\sum_u \\big(\\alpha_u \\, |W_{uv}| \\, \\sigma_v\\big)^p, \\qquad
  \\alpha_u = e^{\\log x_u / p - c}, \\quad \\sigma_v = e^{c - h_v / p},

where ``h`` is the warm start (the previous ``log gamma``) and ``c`` centres the
per-unit factors ``alpha`` and ``sigma`` inside ``2^(+-60)``. Both are vectors (units,
not parameters), so one read of ``W`` gives each sum, to the float's precision, even
for the paper's unbalanced nets whose scales span far more than the float range.

Whenever the warm start cannot vouch for the result (factors outside the window, a
non-finite sum, or a sum below ``2^-40`` of its warm start, where terms lost to
underflow could matter) the layer is recomputed by the exact log-domain pass, inside a
``lax.cond``: the result never depends on how good the warm start was.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_path._src import numerics
from optax_path._src import scales as scales_lib

WINDOW_BITS = 60
FLOOR_BITS = 40


def supports(p: numerics.Exponent) -> bool:
  """Whether the warm-started passes apply: a concrete ``p >= 1``.

  For ``p < 1`` a term lost to underflow is no longer negligible next to ``2^-40``; a
  traced ``p`` cannot size the window. Both take the log-domain passes.
  """
  return isinstance(p, float) and p >= 1.0


def _center(log_x: jax.Array, log_hint: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The centre ``c`` of the factors' logs, and whether they fit in the window."""
  live = jnp.isfinite(log_x)
  lowest = jnp.minimum(jnp.min(jnp.where(live, log_x, jnp.inf)), jnp.min(log_hint))
  highest = jnp.maximum(jnp.max(jnp.where(live, log_x, -jnp.inf)), jnp.max(log_hint))
  fits = (highest - lowest <= 2 * WINDOW_BITS * numerics.LN2) & jnp.all(jnp.isfinite(log_hint))
  return jnp.where(fits, (highest + lowest) / 2, 0.0), fits


def warm_log_matvec(
  log_x: jax.Array,
  w: jax.Array,
  b: jax.Array | None,
  p: float,
  log_hint: jax.Array,
  axis: int,
) -> tuple[jax.Array, jax.Array]:
  """``log(sum_axis x |w|^p + |b|^p)`` in one fused read of ``w``, and whether it is right.

  Args:
    log_x: logs of the non-negative vector along ``axis`` of ``w`` (``-inf`` for 0).
    w: a kernel ``(in, out)``.
    b: optional vector along the other axis, whose ``|b|^p`` is added.
    p: the exponent, ``>= 1``.
    log_hint: where the result is expected (the previous step's), along the other axis.
    axis: the axis of ``w`` summed over: 0 for the forward pass, 1 for the backward.

  Returns:
    ``(log_sum, accurate)``: ``accurate`` is a scalar bool; where it is false the
    caller must recompute exactly.
  """
  window = WINDOW_BITS * numerics.LN2
  center, fits = _center(log_x / p, log_hint / p)
  alpha = jnp.exp(log_x / p - center)  # 0 where x is 0
  sigma = jnp.exp(jnp.clip(center - log_hint / p, -window, window))
  alpha, sigma = (alpha[:, None], sigma[None, :]) if axis == 0 else (alpha[None, :], sigma[:, None])
  total = jnp.sum(numerics.abs_pow(alpha * w * sigma, p), axis=axis)
  log_sum = jnp.log(total) + log_hint
  if b is not None:
    log_sum = jnp.logaddexp(log_sum, p * jnp.log(jnp.abs(b)))
  accurate = (
    fits
    & jnp.all(jnp.isfinite(total))
    & jnp.all(log_sum - log_hint >= -FLOOR_BITS * numerics.LN2)
  )
  return log_sum, accurate


def _exact_unless_accurate(warm: tuple[jax.Array, jax.Array], exact_fn) -> jax.Array:
  log_sum, accurate = warm
  return jax.lax.cond(accurate, lambda: log_sum, exact_fn)


def warm_log_gammas(
  kernels: Sequence[jax.Array],
  biases: Sequence[jax.Array | None],
  p: float,
  hint_in: Sequence[jax.Array],
  hint_out: Sequence[jax.Array],
) -> tuple[list[jax.Array], list[jax.Array]]:
  """``log gamma_in`` and ``log gamma_out`` of every layer's units (see ``scales``).

  ``hint_in`` and ``hint_out`` are the same lists for nearby weights; the result is
  exact (as ``scales.log_gamma_in`` / ``log_gamma_out``) however far they are.
  """
  log_in = [jnp.zeros(kernels[0].shape[0], kernels[0].dtype)]
  for l, (w, b) in enumerate(zip(kernels, biases)):
    x = log_in[-1]
    warm = warm_log_matvec(x, w, b, p, hint_in[l + 1], axis=0)
    log_in.append(_exact_unless_accurate(warm, lambda: numerics.log_matvec(x, w, b, p)))
  log_out = [jnp.zeros(kernels[-1].shape[1], kernels[-1].dtype)]
  for l in reversed(range(len(kernels))):
    w, y = kernels[l], log_out[-1]
    warm = warm_log_matvec(y, w, None, p, hint_out[l], axis=1)
    log_out.append(_exact_unless_accurate(warm, lambda: numerics.log_matvec(y, w.T, None, p)))
  return log_in, log_out[::-1]


def _check_hints(kernels, hint_in, hint_out) -> None:
  widths = [kernels[0].shape[0]] + [w.shape[1] for w in kernels]
  hinted = [h.shape[0] for h in hint_in], [h.shape[0] for h in hint_out]
  if len(hint_in) != len(widths) or hinted[0] != widths or hinted[1] != widths:
    raise ValueError(
      f'The state holds path scales for layers of widths {hinted[0]}, but params has '
      f'layers of widths {widths}: init the transformation with these params.'
    )


def refreshed_log_gammas(kernels, biases, hint_in, hint_out, p):
  """``(log gamma_in, log gamma_out)`` of the layers, warm-started where it applies."""
  kernels, biases = scales_lib.in_compute_dtype(kernels, biases)
  _check_hints(kernels, hint_in, hint_out)
  if not supports(p):
    return scales_lib.log_gammas(kernels, biases, p)
  return warm_log_gammas(kernels, biases, p, hint_in, hint_out)
