"""Step-size selection, the paper's rule (Section 5).

The step size is ``10**-alpha`` for an integer ``alpha`` (0 to 10 in the paper). For
each method the network is trained on the training set minus a held-out validation
split, once per ``alpha``, and the ``alpha`` "that reaches the minimum error faster" is
picked: the lowest minimum validation error, ties broken by the earliest epoch reaching
it (then by the smaller step). Runs that diverge (a NaN or infinite value) lose to all
runs that do not. When the chosen ``alpha`` is at an end of the searched grid, the grid
is extended one step that way (the grid's spacing) until the choice is interior or the
paper's range 0..10 is reached (:func:`search`). The chosen step is then used to train
on the whole training set.
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
#: The paper's range of ``alpha`` (step sizes ``10^0`` to ``10^-10``).
PAPER_ALPHA_RANGE = (0.0, 10.0)


class Candidate(NamedTuple):
  """The validation curve of one step size, summarised.

  Attributes:
    alpha: The step size is ``10**-alpha``.
    learning_rate: ``10**-alpha``.
    best_error: Lowest finite validation error (NaN if none).
    best_epoch: First epoch reaching ``best_error`` (-1 if none).
    final_error: Validation error at the last recorded epoch.
    diverged: Whether the run produced a NaN or infinite value.
    extended: Whether ``alpha`` was added beyond the given grid (see :func:`search`).
  """

  alpha: float
  learning_rate: float
  best_error: float
  best_epoch: int
  final_error: float
  diverged: bool
  extended: bool = False


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


def grid_spacing(alphas: Sequence[float]) -> float:
  """The step of the grid extension: the smallest gap between the alphas, else 1.

  Example:
    >>> grid_spacing([0, 1, 2, 3]), grid_spacing([2, 2.5, 4]), grid_spacing([3])
    (1, 0.5, 1.0)
  """
  values = sorted(set(alphas))
  gaps = [b - a for a, b in zip(values, values[1:])]
  return min(gaps) if gaps else 1.0


def next_alpha(
  candidates: Sequence[Candidate], spacing: float, limits: tuple[float, float]
) -> float | None:
  """The alpha to try next, or None when the chosen one is interior or at a limit.

  Args:
    candidates: The alphas tried so far.
    spacing: Step of the extension (:func:`grid_spacing`).
    limits: The lowest and highest alpha allowed (the paper's 0 and 10).

  Returns:
    ``min - spacing`` when the chosen alpha is the smallest tried (so the largest
    step won), ``max + spacing`` when it is the largest, each only if within
    ``limits``; else None.

  Example:
    >>> a = [summarize(1, [0.9, 0.2]), summarize(2, [0.9, 0.5])]
    >>> next_alpha(a, 1, (0, 10)), next_alpha(a, 1, (1, 10))
    (0, None)
  """
  chosen = choose(candidates).alpha
  alphas = [c.alpha for c in candidates]
  low, high = min(alphas), max(alphas)
  tolerance = 1e-9 * max(1.0, spacing)
  if chosen == low and low - spacing >= limits[0] - tolerance:
    return low - spacing
  if chosen == high and high + spacing <= limits[1] + tolerance:
    return high + spacing
  return None


def search(
  run: Callable[[float], tuple[Sequence[float], bool]],
  alphas: Iterable[float],
  limits: tuple[float, float] | None = PAPER_ALPHA_RANGE,
) -> tuple[list[Candidate], Candidate]:
  """Runs the step-size search, extending the grid while the choice is at an end.

  Every alpha of the grid is tried; then, while the chosen alpha is the smallest
  (largest) tried, the next smaller (larger) one, one grid spacing away, is tried too,
  unless it would leave ``limits``. So the chosen alpha ends interior to what was tried,
  or at a limit.

  Args:
    run: Trains with step ``10**-alpha`` and returns ``(validation errors per epoch,
      diverged)``.
    alphas: The exponents of the grid (at least one).
    limits: The range the extension stays in (default: the paper's 0..10); None
      disables the extension.

  Returns:
    ``(all candidates sorted by alpha, chosen candidate)``; the candidates added by
    the extension have ``extended=True``.

  Raises:
    ValueError: If ``alphas`` is empty.
  """
  grid = sorted(set(alphas))
  if not grid:
    raise ValueError('No step sizes to choose from.')
  candidates = [summarize(alpha, *run(alpha)) for alpha in grid]
  spacing = grid_spacing(grid)
  while limits is not None:
    alpha = next_alpha(candidates, spacing, limits)
    if alpha is None:
      break
    candidates.append(summarize(alpha, *run(alpha))._replace(extended=True))
  candidates.sort(key=lambda c: c.alpha)
  return candidates, choose(candidates)
