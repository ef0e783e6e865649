"""Outputs of a run: ``metrics.csv``, ``selection.csv``, ``figure.png``, ``summary.md``.

``metrics.csv`` has one row per (method, init, epoch), epoch 0 being the initial net;
``selection.csv`` one row per (method, step size) tried in the step-size search. The
figure follows the paper's Figures 2 and 3: cross-entropy on the training set (log
scale), 0/1 training error and 0/1 test error against epochs, a row per data set, with
a zoom on the final test error; seeds are drawn as bands and divergence is marked.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from optax_path.experiments.rundir import UserError

METRIC_COLUMNS = (
  'dataset',
  'method',
  'init',
  'dropout',
  'seed',
  'learning_rate',
  'epoch',
  'train_loss',
  'train_error',
  'test_error',
  'seconds',
)
SELECTION_COLUMNS = (
  'dataset',
  'method',
  'init',
  'seed',
  'alpha',
  'learning_rate',
  'best_val_error',
  'best_epoch',
  'final_val_error',
  'diverged',
  'extended',
  'chosen',
)
#: Columns of the figure: (metric, title, log-scale y).
PANELS = (
  ('train_loss', 'cross-entropy (training)', True),
  ('train_error', '0/1 training error', False),
  ('test_error', '0/1 test error', False),
)
#: The Path-SGD curves from both inits must agree to this (Theorem 4.1).
AGREEMENT_TOLERANCE = 1e-3
#: Target test error of the summary: this times the best final test error.
TARGET_FACTOR = 1.1
_TEXT_COLUMNS = ('dataset', 'method', 'init')
_INT_COLUMNS = ('epoch', 'best_epoch', 'chosen', 'diverged', 'seed', 'extended')

Row = dict[str, Any]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = 'w', **kwargs: Any):
  """Opens a temporary file beside ``path`` that replaces ``path`` when closed.

  A reader (or a crash) never sees a truncated or half-written file: ``path`` holds
  either its old or its new content.
  """
  directory = os.path.dirname(os.fspath(path)) or '.'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
    os.chmod(tmp, _file_mode(path))  # mkstemp's 0o600 would make every output private
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _file_mode(path: str | os.PathLike[str]) -> int:
  """The mode of the file at ``path``, or that of a new file under the umask."""
  try:
    return os.stat(path).st_mode & 0o7777
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Row]) -> None:
  """Writes rows (dicts) with the given columns, atomically; floats at full precision.

  A column a row lacks is written empty (e.g. ``seed`` in rows from older runs).
  """
  with atomic_open(path, newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    writer.writeheader()
    writer.writerows({k: _format(row.get(k, '')) for k in columns} for row in rows)


def _format(value: Any) -> Any:
  return repr(float(value)) if isinstance(value, (float, np.floating)) else value


#: Columns ``plot`` and ``--resume`` need in each file (older files may lack ``seed``).
REQUIRED_METRIC_COLUMNS = tuple(c for c in METRIC_COLUMNS if c not in ('seed', 'seconds'))
REQUIRED_SELECTION_COLUMNS = tuple(
  c for c in SELECTION_COLUMNS if c not in ('seed', 'final_val_error', 'diverged', 'extended')
)


def read_csv(path: str | os.PathLike[str], required: Sequence[str] = ()) -> list[Row]:
  """Reads a CSV written by :func:`write_csv`, parsing numbers (``nan``/``inf`` too).

  Raises:
    UserError: In one line naming the file (and line): an empty file, a missing
      ``required`` column, a row with too few or too many fields (cut or damaged) or a
      value that does not parse.
  """
  rows = []
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None:
        raise UserError(f'{path}: empty file (not even a header).')
      missing = [c for c in required if c not in reader.fieldnames]
      if missing:
        raise UserError(f'{path}: no column {", ".join(missing)} in its header.')
      for row in reader:
        extra = row.pop(None, [])
        fields = sum(v is not None for v in row.values()) + len(extra)
        if fields != len(reader.fieldnames):
          raise UserError(
            f'{path}, line {reader.line_num}: {fields} fields where the header has '
            f'{len(reader.fieldnames)} (a cut or damaged row).'
          )
        parsed = {}
        for k, v in row.items():
          try:
            parsed[k] = _parse(k, v)
          except ValueError:
            raise UserError(
              f'{path}, line {reader.line_num}: column {k}: {v!r} is not a number.'
            ) from None
        rows.append(parsed)
  except (csv.Error, UnicodeDecodeError) as exc:
    raise UserError(f'{path}: not a readable CSV file ({exc}).') from None
  return rows


def _parse(column: str, value: str) -> Any:
  if column in _TEXT_COLUMNS:
    return value
  if column == 'seed' and value == '':
    return 0  # runs from before the seed column had one seed, 0
  if column in _INT_COLUMNS:
    return int(value)
  return float(value)


def group(rows: Iterable[Row], keys: Sequence[str]) -> dict[tuple, list[Row]]:
  """Groups rows by the values of ``keys`` (missing: ``""``), keeping first-seen order."""
  groups: dict[tuple, list[Row]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k, '') for k in keys), []).append(row)
  return groups


def experiments(rows: Iterable[Row]) -> dict[str, list[Row]]:
  """Splits rows into experiments (a figure row, a summary section each), by title.

  An experiment is a (data set, dropout) pair, and also a run directory when rows carry
  a ``run`` key (as the ``plot`` command adds when combining directories).
  """
  return {
    panel_title(dataset, dropout, run): rows
    for (run, dataset, dropout), rows in group(rows, ('run', 'dataset', 'dropout')).items()
  }


def curve(rows: Sequence[Row], metric: str) -> tuple[np.ndarray, np.ndarray]:
  """``(epochs, values)`` of one run's metric, sorted by epoch."""
  rows = sorted(rows, key=lambda r: r['epoch'])
  return np.array([r['epoch'] for r in rows]), np.array([r[metric] for r in rows], float)


def panel_title(dataset: str, dropout: float, run: str = '') -> str:
  """Row label of the figure and heading of the summary."""
  title = dataset if not dropout else f'{dataset}, dropout {dropout:g}'
  return f'{title} ({run})' if run else title


def method_colors(methods: Iterable[str]) -> dict[str, str]:
  """A fixed colour per method: registry order first, others after."""
  from optax_path.experiments.training import METHODS

  order = list(METHODS) + [m for m in dict.fromkeys(methods) if m not in METHODS]
  return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(order)}


#: Matplotlib's default colours without its grey (C7), which the legend uses for the inits.
_PALETTE = tuple(f'C{i}' for i in range(10) if i != 7)


def plot_figures(rows: Sequence[Row], out_dir: str | os.PathLike[str]) -> list[str]:
  """Draws ``figure.png`` of a run directory (see :func:`plot`); returns its path."""
  path = os.path.join(out_dir, 'figure.png')
  plot(rows, path)
  return [path]


def plot(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
  """Draws the paper-style figure: a row per experiment (data set, dropout, run).

  Columns: training cross-entropy (log scale), 0/1 training error and 0/1 test error
  over all epochs with y-ranges that hold every finite value (so failed runs show, as
  in the paper), and a zoom on the test error of the last half of the epochs, fitted to
  the runs that end within about twice the best final error (the others are listed
  under the panel as off scale). Same colour per method; solid for the balanced and dashed for
  the unbalanced init. With several seeds, a line is the mean over the seeds that have
  not diverged by that epoch and the band their min..max. A run whose metrics became
  NaN or infinite is marked with an ``x`` at the top of each panel at that epoch.
  Each row is headed by its experiment (data set; dropout and Figure 3 for dropout
  runs). Written atomically.

  Args:
    rows: Rows of ``metrics.csv`` (possibly of several runs).
    path: Output image file (its format from the suffix).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  datasets = experiments(rows)
  colors = method_colors(r['method'] for r in rows)
  fig = Figure(figsize=(19, 3.9 * len(datasets) + 0.8), layout='constrained')
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend.
  subfigs = np.atleast_1d(fig.subfigures(len(datasets), 1))
  for subfig, (title, drows) in zip(subfigs, datasets.items()):
    axes = subfig.subplots(1, len(PANELS) + 1)
    runs = group(drows, ('method', 'init'))
    shown = _zoom(axes[-1], runs)
    for (method, init), run in runs.items():
      for ax, (metric, _, _) in zip(axes, PANELS):
        _draw_run(ax, run, metric, colors[method], init)
      if (method, init) in shown:
        _draw_run(axes[-1], run, 'test_error', colors[method], init)
    _style_row(axes, drows)
    subfig.suptitle(_row_heading(title, drows), fontsize='x-large', fontweight='bold')
  fig.legend(
    handles=_legend_handles(colors, rows), loc='outside lower center', ncols=8, fontsize='medium'
  )
  suffix = os.path.splitext(os.fspath(path))[1] or '.png'
  with atomic_open(path, 'wb') as f:
    fig.savefig(f, dpi=100, format=suffix[1:])


def _row_heading(title: str, rows: Sequence[Row]) -> str:
  """``Fashion-MNIST ...`` with the seeds, and the paper's figure the row corresponds to."""
  seeds = len({r.get('seed', 0) for r in rows})
  dropout = any(r['dropout'] for r in rows)
  figure = 'like the paper\'s Figure 3 (dropout)' if dropout else "like the paper's Figure 2"
  return f'{title}: {seeds} seed{"s" * (seeds > 1)}, {figure}'


def seed_curves(run: Sequence[Row], metric: str) -> tuple[np.ndarray, np.ndarray]:
  """``(epochs, values)`` of a metric for every seed of one (method, init).

  Returns:
    ``epochs`` ``(E,)`` (all epochs of the longest seed) and ``values`` ``(seeds, E)``,
    NaN where a seed has no finite value (after it diverged).
  """
  seeds = group(run, ('seed',))
  epochs = np.unique([r['epoch'] for r in run])
  values = np.full((len(seeds), len(epochs)), np.nan)
  for i, seed_rows in enumerate(seeds.values()):
    e, v = curve(seed_rows, metric)
    values[i, np.searchsorted(epochs, e)] = np.where(np.isfinite(v), v, np.nan)
  return epochs, values


def _draw_run(ax: Any, run: Sequence[Row], metric: str, color: str, init: str) -> None:
  """One (method, init): mean line, min..max band over seeds, x where a seed diverged."""
  epochs, values = seed_curves(run, metric)
  ok = np.isfinite(values)
  mean = np.where(ok.any(0), np.nansum(values, 0) / np.maximum(ok.sum(0), 1), np.nan)
  ax.plot(epochs, mean, **_line_style(color, init))
  if len(values) > 1:
    low = np.where(ok.any(0), np.nanmin(np.where(ok, values, np.inf), 0), np.nan)
    high = np.where(ok.any(0), np.nanmax(np.where(ok, values, -np.inf), 0), np.nan)
    ax.fill_between(epochs, low, high, color=color, alpha=0.15, lw=0)
  for seed_rows in group(run, ('seed',)).values():
    stats = run_stats(seed_rows)
    if stats.diverged_at is not None:
      ax.plot(
        stats.diverged_at,
        0.96,
        marker='x',
        ms=11,
        mew=2.5,
        color=color,
        transform=ax.get_xaxis_transform(),
      )


def _line_style(color: str, init: str) -> dict[str, Any]:
  """Solid (wide, so that a coinciding dashed curve shows) or dashed."""
  if init == 'balanced':
    return {'color': color, 'ls': '-', 'lw': 2.6, 'alpha': 0.6}
  return {'color': color, 'ls': '--', 'lw': 1.4}


def _legend_handles(colors: dict[str, str], rows: Sequence[Row]) -> list[Any]:
  """Methods (colours) of every run, then inits (line styles), band and divergence."""
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  methods = dict.fromkeys(r['method'] for r in rows)
  inits = dict.fromkeys(r['init'] for r in rows)
  handles = [Line2D([], [], color=colors[m], lw=3, label=m) for m in methods]
  handles += [Line2D([], [], **_line_style('0.45', i), label=f'{i} init') for i in inits]
  if len({r.get('seed', 0) for r in rows}) > 1:
    handles.append(Patch(color='0.3', alpha=0.15, label='min..max over seeds (line: mean)'))
  handles.append(
    Line2D([], [], ls='', marker='x', ms=9, mew=2.5, color='0.3', label='diverged (NaN) here')
  )
  return handles


def _style_row(axes: Sequence[Any], rows: Sequence[Row]) -> None:
  """Titles, labels and y-ranges that hold every finite value."""
  for ax, (metric, label, log) in zip(axes, PANELS):
    ax.set_title(label)
    values = np.array([r[metric] for r in rows], float)
    values = values[np.isfinite(values)]
    if log:
      ax.set_yscale('log')
      positive = values[values > 0]
      if positive.size:
        ax.set_ylim(0.7 * positive.min(), 1.5 * positive.max())
    else:
      top = min(1.0, values.max()) if values.size else 1.0
      ax.set_ylim(0, 1.08 * top)
  for ax in axes:
    if not ax.get_xlabel():
      ax.set_xlabel('epoch')
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def _zoom(ax: Any, runs: dict[tuple, list[Row]]) -> set[tuple]:
  """Fits the last panel to the last half of the epochs of the runs that end well.

  A (method, init) is in range when its mean final test error (over the seeds that
  did not diverge) is at most ``2 * best + 0.02`` (``best``: the lowest one); the
  others, and the diverged seeds, are listed under the panel.

  Returns:
    The ``(method, init)`` keys to draw in the panel.
  """
  finals, diverged, last = {}, {}, 0
  for key, run in runs.items():
    stats = [run_stats(r) for r in group(run, ('seed',)).values()]
    values = [s.final_test_error for s in stats if s.diverged_at is None]
    finals[key] = float(np.mean(values)) if values else math.nan
    if len(values) < len(stats):
      diverged[key] = f'{len(stats) - len(values)}/{len(stats)} seeds diverged'
    last = max(last, max(int(r['epoch']) for r in run))
  good = [v for v in finals.values() if math.isfinite(v)]
  if not good:
    return set()
  limit = 2 * min(good) + 0.02
  shown = [k for k, v in finals.items() if math.isfinite(v) and v <= limit]
  first = last // 2
  values = np.array(
    [
      v
      for k in shown
      for r in runs[k]
      if r['epoch'] >= first and math.isfinite(v := r['test_error'])
    ]
  )
  if values.size:
    pad = 0.1 * max(values.max() - values.min(), 1e-3)
    ax.set_ylim(values.min() - pad, values.max() + pad)
  ax.set_xlim(first, last + 0.3)
  ax.set_title(f'0/1 test error, zoom on epochs {first}..{last}')
  off = [f'{m} ({i}): {v:.1%}' for (m, i), v in finals.items() if math.isfinite(v) and v > limit]
  off += [f'{m} ({i}): {text}' for (m, i), text in diverged.items()]
  if off:
    text = textwrap.fill('not in this zoom (mean final): ' + '; '.join(off), 60)
    ax.set_xlabel('epoch\n' + text, fontsize='small')
  return set(shown)


def max_abs_difference(a: Sequence[Row], b: Sequence[Row], metrics: Sequence[str]) -> dict:
  """Largest absolute difference between two runs' curves, per metric.

  Args:
    a: One run's rows.
    b: The other run's rows.
    metrics: Columns to compare.

  Returns:
    ``{metric: max |a - b|}`` over common epochs; ``inf`` if the runs have different
    lengths or one is NaN where the other is not; NaN-NaN and inf-inf count as equal.
  """
  out = {}
  for metric in metrics:
    (ea, va), (eb, vb) = curve(a, metric), curve(b, metric)
    if len(ea) != len(eb) or not np.array_equal(ea, eb):
      out[metric] = math.inf
      continue
    same = (va == vb) | (np.isnan(va) & np.isnan(vb))
    diff = np.where(same, 0.0, np.abs(va - vb))
    out[metric] = float(np.nan_to_num(diff, nan=math.inf).max(initial=0.0))
  return out


def path_sgd_agreement(rows: Sequence[Row], method: str = 'path-sgd') -> dict | None:
  """Max difference between the balanced and unbalanced runs of ``method``, over seeds.

  Returns:
    ``{metric: largest difference over the seeds}`` for the metrics of :data:`PANELS`,
    or None if no seed has both runs.
  """
  out = None
  for (_,), seed_rows in group((r for r in rows if r['method'] == method), ('seed',)).items():
    runs = group(seed_rows, ('init',))
    if ('balanced',) not in runs or ('unbalanced',) not in runs:
      continue
    metrics = [m for m, _, _ in PANELS]
    diff = max_abs_difference(runs[('balanced',)], runs[('unbalanced',)], metrics)
    out = diff if out is None else {m: max(out[m], diff[m]) for m in metrics}
  return out


def _fmt(value: float, spec: str = '.4f') -> str:
  return format(value, spec) if math.isfinite(value) else str(value)


class RunStats(NamedTuple):
  """The summary numbers of one seed's run (one method, one init).

  Attributes:
    final_test_error: Test error at the last epoch (NaN if it diverged).
    best_test_error: Lowest finite test error over the epochs (NaN if none).
    final_train_loss: Training cross-entropy at the last epoch.
    diverged_at: The epoch whose metrics became NaN or infinite, or None.
    errors: ``(epochs, test errors)`` of the run.
  """

  final_test_error: float
  best_test_error: float
  final_train_loss: float
  diverged_at: int | None
  errors: tuple[np.ndarray, np.ndarray]


def run_stats(run: Sequence[Row]) -> RunStats:
  """The summary numbers of one run (the rows of one method, init and seed)."""
  run = sorted(run, key=lambda r: r['epoch'])
  last = run[-1]
  epochs, errors = curve(run, 'test_error')
  finite = np.isfinite(errors)
  metrics = [m for m, _, _ in PANELS]
  diverged = not all(math.isfinite(last[m]) for m in metrics)
  return RunStats(
    last['test_error'],
    float(errors[finite].min()) if finite.any() else math.nan,
    last['train_loss'],
    int(last['epoch']) if diverged else None,
    (epochs, errors),
  )


def epochs_to(stats: RunStats, target: float) -> int | None:
  """First epoch with test error <= ``target``, or None."""
  epochs, errors = stats.errors
  reached = np.flatnonzero(np.isfinite(errors) & (errors <= target))
  return int(epochs[reached[0]]) if reached.size else None


def spread(values: Sequence[float], spec: str = '.2%') -> str:
  """``mean ± std (min..max)`` of the finite values; just the value for one.

  The std is the sample standard deviation (``ddof=1``). Non-finite values are left
  out (the caller reports them, e.g. as diverged runs).

  Example:
    >>> spread([0.1, 0.2, 0.3])
    '20.00% ± 10.00 (10.00..30.00)'
    >>> spread([0.25]), spread([float("nan")])
    ('25.00%', 'n/a')
  """
  x = np.array([v for v in values if math.isfinite(v)], float)
  if not x.size:
    return 'n/a'
  percent = spec.endswith('%')
  scale, plain = (100.0, spec[:-1] + 'f') if percent else (1.0, spec)
  if x.size == 1:
    return format(x[0], spec)
  mean, std = format(x.mean(), spec), format(scale * x.std(ddof=1), plain)
  return f'{mean} ± {std} ({format(scale * x.min(), plain)}..{format(scale * x.max(), plain)})'


def run_table(rows: Sequence[Row]) -> tuple[list[str], float]:
  """The summary table of one experiment (markdown lines) and its target test error.

  One line per (method, init), over its seeds that did not diverge: the mean, sample
  std and range of the final and best test error, the final training loss and the
  epochs to the target (the seeds that reach it); then the seeds that diverged. The target is
  :data:`TARGET_FACTOR` times the lowest mean final test error of the lines.
  """
  runs = {
    key: [run_stats(r) for r in group(g, ('seed',)).values()]
    for key, g in group(rows, ('method', 'init')).items()
  }
  means = [
    float(np.mean(finals)) for s in runs.values()
    if (finals := [x.final_test_error for x in s if math.isfinite(x.final_test_error)])
  ]
  target = TARGET_FACTOR * min(means) if means else math.nan
  lines = [
    (
      '| method | init | step size | seeds | final test error | best test error '
      '| final train loss | epochs to target | diverged |'
    ),
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for (method, init), stats in runs.items():
    step = max(r['learning_rate'] for r in rows if r['method'] == method and r['init'] == init)
    lines.append(_table_line(method, init, step, stats, target))
  return lines, target


def _table_line(method: str, init: str, step: float, stats: list[RunStats], target: float) -> str:
  n = len(stats)
  diverged = [s.diverged_at for s in stats if s.diverged_at is not None]
  ok = [s for s in stats if s.diverged_at is None]
  reached = [e for e in (epochs_to(s, target) for s in ok) if e is not None]
  to_target = (
    f'{spread(reached, ".3g")} ({len(reached)}/{n} seeds)' if reached else f'not reached (0/{n})'
  )
  where = f'{len(diverged)}/{n} (epoch {", ".join(map(str, diverged))})' if diverged else f'0/{n}'
  return (
    f'| {method} | {init} | {step:.0e} | {n} '
    f'| {spread([s.final_test_error for s in ok])} '
    f'| {spread([s.best_test_error for s in ok])} '
    f'| {spread([s.final_train_loss for s in ok], ".4f")} | {to_target} | {where} |'
  )


def agreement_line(rows: Sequence[Row]) -> str | None:
  """The summary sentence on the Path-SGD balanced/unbalanced check, if both ran."""
  diff = path_sgd_agreement(rows)
  if diff is None:
    return None
  worst = max(diff.values())
  verdict = (
    f'agree (all < {AGREEMENT_TOLERANCE:g})'
    if worst < AGREEMENT_TOLERANCE
    else f'DIFFER (tolerance {AGREEMENT_TOLERANCE:g})'
  )
  parts = ', '.join(f'{m} {v:.2e}' for m, v in diff.items())
  return (
    'Path-SGD balanced vs unbalanced init (Theorem 4.1: identical curves), largest '
    f'absolute difference over epochs and seeds: {parts}: {verdict}.'
  )


def summary_markdown(
  rows: Sequence[Row], selection: Sequence[Row] = (), preamble: Sequence[str] = ()
) -> str:
  """The text of ``summary.md``.

  Args:
    rows: Rows of ``metrics.csv``.
    selection: Rows of ``selection.csv`` (may be empty).
    preamble: Lines put first (the settings of the run).

  Returns:
    Markdown: per (data set, dropout), a table of the runs, the target test error
    and the Path-SGD agreement check; then the chosen step sizes.
  """
  methods = ' vs '.join(dict.fromkeys(row['method'] for row in rows))
  lines = [f'# {methods} (paper Section 5)', '', *preamble]
  for title, drows in experiments(rows).items():
    table, target = run_table(drows)
    lines += ['', f'## {title}', '', *table, '']
    lines.append(
      'Each cell: mean ± sample std (min..max) over the seeds; a diverged run (NaN or '
      'infinite metrics) is left out of every cell but the last, which counts them. '
      f'Epochs to target: first epoch with test error <= {_fmt(target)} '
      f'({TARGET_FACTOR:g} x the lowest mean final test error above), over the seeds '
      'that reach it. Best test error: the lowest over the epochs of each run.'
    )
    agreement = agreement_line(drows)
    if agreement:
      lines += ['', agreement]
  lines += selection_lines(selection)
  return '\n'.join(lines) + '\n'


def selection_lines(selection: Sequence[Row]) -> list[str]:
  """Markdown lines listing the chosen step sizes of the search."""
  chosen = [r for r in selection if r['chosen']]
  if not chosen:
    return []
  lines = ['', '## Step-size search', '']
  for r in chosen:
    where = f'{r["dataset"]} ({r["run"]})' if r.get('run') else r['dataset']
    tried = [
      s for s in selection
      if all(s.get(k) == r.get(k) for k in ('dataset', 'run', 'method', 'init'))
    ]
    grid = ' '.join(f'{s["alpha"]:g}' + ('+' if s.get('extended') else '') for s in tried)
    lines.append(
      f'- {where}, {r["method"]} ({r["init"]} init): step {r["learning_rate"]:.0e} '
      f'(alpha {r["alpha"]:g} of {grid}), '
      f'validation error {_fmt(r["best_val_error"])} first reached at epoch '
      f'{r["best_epoch"]}'
    )
  lines += ['', 'An alpha marked + was added by the extension of the grid.']
  return lines


def write_summary(
  path: str | os.PathLike[str],
  rows: Sequence[Row],
  selection: Sequence[Row] = (),
  preamble: Sequence[str] = (),
) -> None:
  """Writes ``summary.md`` (see :func:`summary_markdown`)."""
  with atomic_open(path) as f:
    f.write(summary_markdown(rows, selection, preamble))


def combine_runs(runs: dict[str, tuple[list[Row], list[Row]]]) -> tuple[list[Row], list[Row]]:
  """Concatenates the rows of several run directories.

  Args:
    runs: ``{run directory: (metrics rows, selection rows)}``.

  Returns:
    ``(metrics rows, selection rows)``; the rows of a run whose (data set, dropout)
    another run shares get a ``run`` key, so that they stay apart.
  """
  counts: dict[tuple, int] = {}
  for metrics, _ in runs.values():
    for key in group(metrics, ('dataset', 'dropout')):
      counts[key] = counts.get(key, 0) + 1
  all_metrics, all_selection = [], []
  for run, (metrics, selection) in runs.items():
    shared = any(counts[key] > 1 for key in group(metrics, ('dataset', 'dropout')))
    tag = {'run': run} if shared else {}
    all_metrics += [{**row, **tag} for row in metrics]
    all_selection += [{**row, **tag} for row in selection]
  return all_metrics, all_selection


def load_run(run_dir: str | os.PathLike[str]) -> tuple[list[Row], list[Row]]:
  """Reads ``metrics.csv`` and (if present) ``selection.csv`` of a run directory.

  Raises:
    UserError: If a file is damaged (see :func:`read_csv`) or ``metrics.csv`` has no rows.
  """
  path = os.path.join(run_dir, 'metrics.csv')
  metrics = read_csv(path, REQUIRED_METRIC_COLUMNS)
  if not metrics:
    raise UserError(f'{path}: no rows, only a header (no run finished).')
  selection_path = os.path.join(run_dir, 'selection.csv')
  selection = (
    read_csv(selection_path, REQUIRED_SELECTION_COLUMNS) if os.path.exists(selection_path) else []
  )
  return metrics, selection
