"""Algorithm 1 in one fused read of each kernel per pass, warm-started from known scales.

The log-domain passes of ``scales`` are right over any range but read each kernel
several times. Between two optimizer steps the path scales barely move, so the
previous step's ``log gamma`` vectors say where every sum of this step lies. Each sum
is then a plain fused reduction of floats,

.. math::

  \\gamma_v = e^{h_v} \\sum_u \\big(\\alpha_u \\, |W_{uv}| \\, \\sigma_v\\big)^p, \\qquad
  \\alpha_u = e^{\\log x_u / p - c}, \\quad \\sigma_v = e^{c - h_v / p},

where ``h`` is the warm start (the previous ``log gamma``) and ``c`` centres the
per-unit factors ``alpha`` and ``sigma`` in the float range. Both are vectors (units,
not parameters), so one read of ``W`` gives each sum to the float's precision, even
where the scales span far more than the float range.

The result is checked, not trusted: every sum must lie within ``2^(+-20)`` of its warm
start, and the warm starts of each layer must fit the window the float range leaves.
Then no term that matters can have overflowed or underflowed. Otherwise (a first step
from other params, a jump of the weights) every layer is recomputed by the exact
log-domain passes, in one ``lax.cond``: the result never depends on the warm start.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_path._src import numerics
from optax_path._src import scales as scales_lib

DEVIATION_BITS = 20  # how far (in powers of 2) a sum may lie from its warm start
NEGLIGIBLE_BITS = 64  # 2^-64: a term lost to underflow is below 2^-20 * 2^-24 of the sum


def supports(p: numerics.Exponent) -> bool:
  """Whether the warm-started passes apply: a concrete ``p >= 1``.

  Below 1, ``|x|^p`` lifts terms lost to underflow out of negligibility; a traced
  ``p`` cannot size the window. Both take the log-domain passes.
  """
  return isinstance(p, float) and p >= 1.0


def _window(dtype, p: float) -> float:
  """How far (in nats) the factors' logs may lie from the centre."""
  bits = int(jnp.finfo(dtype).maxexp) - 2 - NEGLIGIBLE_BITS / p
  return bits * numerics.LN2


def _ranges(vectors: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The smallest and largest entry of each vector other than ``-inf`` (a dead unit),
  in one reduction for them all; ``(inf, -inf)`` for a vector of dead units only."""
  width = max(v.shape[0] for v in vectors)
  padded = jnp.stack(  # each vector whole, padded with -inf (ignored): one reduction
    [jnp.pad(v, (0, width - v.shape[0]), constant_values=-jnp.inf) for v in vectors]
  )
  lowest = jnp.min(jnp.where(padded == -jnp.inf, jnp.inf, padded), axis=1)
  return lowest, jnp.max(padded, axis=1)


def centers(log_hints: Sequence[jax.Array], p: float) -> tuple[jax.Array, jax.Array]:
  """For the pass between warm starts ``l`` and ``l + 1``: the centre ``c``, and
  whether every factor fits the window around it.

  The sums along ``x`` are checked to lie within ``2^20`` of their warm starts, so the
  warm starts alone bound every factor. A warm start of ``-inf`` (a dead unit, whose
  factor is 0) bounds nothing; a NaN or ``+inf`` one does not fit.
  """
  lowest, highest = _ranges(log_hints)
  lowest = jnp.minimum(lowest[:-1], lowest[1:]) / p
  highest = jnp.maximum(highest[:-1], highest[1:]) / p
  dead = lowest > highest  # both layers' units are all dead
  reach = (highest - lowest) / 2 + DEVIATION_BITS * numerics.LN2 / p
  fits = dead | (reach <= _window(log_hints[0].dtype, p))
  return jnp.where(fits & ~dead, (highest + lowest) / 2, 0.0), fits


def warm_log_matvec(log_x, w, b, p: float, center, log_hint, axis: int) -> jax.Array:
  """``log(sum_axis x |w|^p + |b|^p)`` in one fused read of ``w``.

  Args:
    log_x: logs of the non-negative vector along ``axis`` of ``w`` (``-inf`` for 0),
      within ``2^20`` of its warm start.
    w: a kernel ``(in, out)``.
    b: optional vector along the other axis, whose ``|b|^p`` is added.
    p: the exponent, ``>= 1``.
    center: the centre of the factors (see ``centers``).
    log_hint: the warm start of the result, along the other axis.
    axis: the axis of ``w`` summed over: 0 for the forward pass, 1 for the backward.

  Returns:
    The logs of the sums: right where they lie within ``2^20`` of ``log_hint`` and the
    centre's window fits (``warm_passes`` checks both). Where ``log_hint`` is ``-inf``
    (a dead unit): ``-inf`` if the sum is still 0, NaN (not near) if it is not.
  """
  dead = log_hint == -jnp.inf
  hint = jnp.where(dead, 0.0, log_hint)
  alpha = jnp.exp(log_x / p - center)  # 0 where x is 0
  sigma = jnp.exp(center - hint / p)
  alpha, sigma = (alpha[:, None], sigma[None, :]) if axis == 0 else (alpha[None, :], sigma[:, None])
  total = jnp.sum(numerics.abs_pow(alpha * w * sigma, p), axis=axis)
  if b is not None:  # |b|^p relative to the warm start; inf where far above it (checked)
    total = numerics.replicated(total) + jnp.exp(
      p * jnp.log(jnp.abs(numerics.replicated(b))) - hint
    )
  log_total = jnp.where(dead & (total > 0), jnp.nan, jnp.log(total) + hint)
  return numerics.replicated(log_total)


def warm_passes(kernels, biases, p: float, hint_in, hint_out):
  """``(log gamma_in, log gamma_out, accurate)`` by the warm-started passes alone."""
  center_in, fits_in = centers(hint_in, p)
  center_out, fits_out = centers(hint_out, p)
  log_in = [jnp.zeros(kernels[0].shape[0], kernels[0].dtype)]
  for l, (w, b) in enumerate(zip(kernels, biases)):
    log_in.append(warm_log_matvec(log_in[-1], w, b, p, center_in[l], hint_in[l + 1], axis=0))
  log_out = [jnp.zeros(kernels[-1].shape[1], kernels[-1].dtype)]
  for l in reversed(range(len(kernels))):
    y = log_out[-1]
    log_out.append(warm_log_matvec(y, kernels[l], None, p, center_out[l], hint_out[l], axis=1))
  log_out = log_out[::-1]
  sums = jnp.concatenate(log_in[1:] + log_out[:-1])
  hints = jnp.concatenate(list(hint_in[1:]) + list(hint_out[:-1]))
  near = (sums == hints) | (jnp.abs(sums - hints) <= DEVIATION_BITS * numerics.LN2)  # NaN: no
  accurate = jnp.all(fits_in) & jnp.all(fits_out) & jnp.all(near)
  return log_in, log_out, accurate


def warm_log_gammas(
  kernels: Sequence[jax.Array],
  biases: Sequence[jax.Array | None],
  p: float,
  hint_in: Sequence[jax.Array],
  hint_out: Sequence[jax.Array],
  known: jax.Array | bool = True,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """``log gamma_in`` and ``log gamma_out`` of every layer's units (see ``scales``).

  ``hint_in`` and ``hint_out`` are the same lists for nearby weights; the result is
  exact (as ``scales.log_gammas``) however far they are. Where ``known`` is false (no
  hint yet: the first update), the warm-started passes do not run at all, so that
  nothing computed from meaningless hints (an overflow, a NaN, its derivative) reaches
  ``checkify``, NaN checks or a gradient through the update.
  """

  def unknown():
    dtype = kernels[0].dtype
    return [h.astype(dtype) for h in hint_in], [h.astype(dtype) for h in hint_out], False

  def warm():
    return warm_passes(kernels, biases, p, hint_in, hint_out)

  log_in, log_out, accurate = jax.lax.cond(known, warm, unknown)
  return jax.lax.cond(
    accurate, lambda: (log_in, log_out), lambda: scales_lib.log_gammas(kernels, biases, p)
  )


def _check_hints(kernels, hint_in, hint_out) -> None:
  widths = [kernels[0].shape[0]] + [w.shape[1] for w in kernels]
  hinted = [h.shape[0] for h in hint_in], [h.shape[0] for h in hint_out]
  if len(hint_in) != len(widths) or hinted[0] != widths or hinted[1] != widths:
    raise ValueError(
      f'The state holds path scales for layers of widths {hinted[0]}, but params has '
      f'layers of widths {widths}: init the transformation with these params.'
    )


def refreshed_log_gammas(kernels, biases, hint_in, hint_out, known, p):
  """``(log gamma_in, log gamma_out)`` of the layers, warm-started where it applies
  (``known``: whether the hints are the scales of an earlier update)."""
  kernels, biases = scales_lib.in_compute_dtype(kernels, biases)
  _check_hints(kernels, hint_in, hint_out)
  if not supports(p):
    return scales_lib.log_gammas(kernels, biases, p)
  return warm_log_gammas(kernels, biases, p, hint_in, hint_out, known)
