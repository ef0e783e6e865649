"""Step-size selection, the paper's rule (Section 5).

The step size is ``10**-alpha`` for an integer ``alpha`` (0 to 10 in the paper). For
each method the network is trained on the training set minus a held-out validation
split, once per ``alpha``, and the ``alpha`` "that reaches the minimum error faster" is
picked: the lowest minimum validation error, ties broken by the earliest epoch reaching
it (then by the smaller step). Runs that diverge (a NaN or infinite value) lose to all
runs that do not. The chosen step is then used to train on the whole training set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

#: Size of the paper's validation split ("10000 randomly chosen points").
PAPER_VALIDATION_SIZE = 10_000
#: Fraction held out for small training sets (e.g. the 1437 training digits).
SMALL_VALIDATION_FRACTION = 0.2


class Candidate(NamedTuple):
  """The validation curve of one step size, summarised.

  Attributes:
    alpha: The step size is ``10**-alpha``.
    learning_rate: ``10**-alpha``.
    best_error: Lowest finite validation error (NaN if none).
    best_epoch: First epoch reaching ``best_error`` (-1 if none).
    final_error: Validation error at the last recorded epoch.
    diverged: Whether the run produced a NaN or infinite value.
  """

  alpha: float
  learning_rate: float
  best_error: float
  best_epoch: int
  final_error: float
  diverged: bool


def learning_rate(alpha: float) -> float:
  """The step size ``10**-alpha``."""
  return 10.0 ** (-alpha)


def validation_size(num_train: int) -> int:
  """Held-out examples: the paper's 10,000, or 20% of a smaller training set.

  Args:
    num_train: Training set size.

  Returns:
    ``min(10000, round(0.2 * num_train))``, at least 1.

  Example:
    >>> validation_size(60000), validation_size(1437)
    (10000, 287)
  """
  return max(1, min(PAPER_VALIDATION_SIZE, round(SMALL_VALIDATION_FRACTION * num_train)))


def split_validation(num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Randomly splits the training indices into (search-train, validation).

  Args:
    num_train: Training set size.
    seed: NumPy seed.

  Returns:
    Sorted index arrays ``(train, validation)``.
  """
  perm = np.random.default_rng(seed).permutation(num_train)
  size = validation_size(num_train)
  return np.sort(perm[size:]), np.sort(perm[:size])


def summarize(alpha: float, errors: Sequence[float], diverged: bool = False) -> Candidate:
  """Summarises the validation curve of one step size.

  Args:
    alpha: The step size is ``10**-alpha``.
    errors: Validation error per epoch (epoch 0 first); a run stopped early by
      divergence is shorter.
    diverged: Whether the run diverged (also inferred from non-finite errors).

  Returns:
    The summary.
  """
  values = np.asarray(errors, np.float64)
  finite = np.isfinite(values)
  diverged = bool(diverged or not finite.all())
  if not finite.any():
    return Candidate(alpha, learning_rate(alpha), math.nan, -1, math.nan, True)
  best = float(values[finite].min())
  epoch = int(np.flatnonzero(values == best)[0])
  return Candidate(alpha, learning_rate(alpha), best, epoch, float(values[-1]), diverged)


def rank(candidate: Candidate) -> tuple[bool, float, int, float]:
  """Sort key: non-diverged first, then lowest error, earliest epoch, smaller step."""
  error = candidate.best_error if math.isfinite(candidate.best_error) else math.inf
  return (candidate.diverged, error, candidate.best_epoch, -candidate.alpha)


def choose(candidates: Iterable[Candidate]) -> Candidate:
  """Picks the step size that reaches the minimum validation error fastest.

  Args:
    candidates: One per step size.

  Returns:
    The best candidate by :func:`rank`.

  Raises:
    ValueError: If there are no candidates.

  Example:
    >>> a = summarize(1, [0.9, 0.2, 0.1, 0.1])
    >>> b = summarize(2, [0.9, 0.5, 0.2, 0.1])
    >>> c = summarize(0, [0.9, 0.05, float("nan")])
    >>> choose([a, b, c]).alpha
    1
  """
  candidates = list(candidates)
  if not candidates:
    raise ValueError('No step sizes to choose from.')
  return min(candidates, key=rank)


def search(
  run: Callable[[float], tuple[Sequence[float], bool]], alphas: Iterable[float]
) -> tuple[list[Candidate], Candidate]:
  """Runs the step-size search.

  Args:
    run: Trains with step ``10**-alpha`` and returns ``(validation errors per epoch,
      diverged)``.
    alphas: The exponents to try.

  Returns:
    ``(all candidates, chosen candidate)``.
  """
  candidates = [summarize(alpha, *run(alpha)) for alpha in alphas]
  return candidates, choose(candidates)
