"""Outputs of a run: ``metrics.csv``, ``selection.csv``, ``figure.png``, ``summary.md``.

``metrics.csv`` has one row per (method, init, epoch), epoch 0 being the initial net;
``selection.csv`` one row per (method, step size) tried in the step-size search. The
figure follows the paper's Figures 2 and 3: cross-entropy on the training set (log
scale), 0/1 training error and 0/1 test error against epochs, a row per data set.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

METRIC_COLUMNS = (
  'dataset',
  'method',
  'init',
  'dropout',
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
  'alpha',
  'learning_rate',
  'best_val_error',
  'best_epoch',
  'final_val_error',
  'diverged',
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
_INT_COLUMNS = ('epoch', 'best_epoch', 'chosen', 'diverged')

Row = dict[str, Any]


def write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Row]) -> None:
  """Writes rows (dicts) with the given columns; floats at full precision."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    writer.writeheader()
    writer.writerows({k: _format(row[k]) for k in columns} for row in rows)


def _format(value: Any) -> Any:
  return repr(float(value)) if isinstance(value, (float, np.floating)) else value


def read_csv(path: str | os.PathLike[str]) -> list[Row]:
  """Reads a CSV written by :func:`write_csv`, parsing numbers (``nan``/``inf`` too)."""
  with open(path, newline='') as f:
    return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(column: str, value: str) -> Any:
  if column in _TEXT_COLUMNS:
    return value
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
  return {m: f'C{i % 10}' for i, m in enumerate(order)}


def plot(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
  """Draws the paper-style figure: a row per (data set, dropout), three metrics.

  Same colour per method, solid for the balanced and dashed for the unbalanced init.
  The axes are fitted to the balanced-init curves (the error axes after epoch 0), so
  that, as in the paper, very poor unbalanced runs may leave the plot.

  Args:
    rows: Rows of ``metrics.csv`` (possibly of several runs).
    path: Output image file.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  datasets = experiments(rows)
  colors = method_colors(r['method'] for r in rows)
  fig = Figure(figsize=(17, 3.4 * len(datasets)), layout='constrained')
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend.
  axes = fig.subplots(len(datasets), 3, squeeze=False)
  for ax_row, (title, drows) in zip(axes, datasets.items()):
    for (method, init), run in group(drows, ('method', 'init')).items():
      style = _line_style(colors[method], init)
      for ax, (metric, _, _) in zip(ax_row, PANELS):
        epochs, values = curve(run, metric)
        values[~np.isfinite(values)] = np.nan
        ax.plot(epochs, values, label=f'{method} ({init})', **style)
    _style_row(ax_row, drows, title)
  fig.legend(*axes[0, -1].get_legend_handles_labels(), loc='outside right center', fontsize='small')
  fig.savefig(path, dpi=110)


def _line_style(color: str, init: str) -> dict[str, Any]:
  """Solid (wide, so that a coinciding dashed curve shows) or dashed."""
  if init == 'balanced':
    return {'color': color, 'ls': '-', 'lw': 2.4, 'alpha': 0.55}
  return {'color': color, 'ls': '--', 'lw': 1.3}


def _style_row(ax_row: Sequence[Any], rows: Sequence[Row], title: str) -> None:
  for ax, (metric, label, log) in zip(ax_row, PANELS):
    ax.set_title(label)
    ax.set_xlabel('epoch')
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    values = _balanced_values(rows, metric, first_epoch=0 if log else 1)
    if log:
      ax.set_yscale('log')
      if values.size and values.min() > 0:
        ax.set_ylim(0.5 * values.min(), 2.0 * values.max())
    elif values.size:
      ax.set_ylim(0, min(1.0, 1.1 * values.max()) or 1.0)
  ax_row[0].set_ylabel(title)


def _balanced_values(rows: Sequence[Row], metric: str, first_epoch: int) -> np.ndarray:
  """Finite values of the balanced-init runs from ``first_epoch`` on (the axis range)."""
  values = np.array(
    [r[metric] for r in rows if r['init'] == 'balanced' and r['epoch'] >= first_epoch],
    float,
  )
  return values[np.isfinite(values)]


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
  """Max difference between the balanced and unbalanced runs of ``method``.

  Returns:
    ``{metric: difference}`` for the metrics of :data:`PANELS`, or None if one of the
    two runs is missing.
  """
  runs = group((r for r in rows if r['method'] == method), ('init',))
  if ('balanced',) not in runs or ('unbalanced',) not in runs:
    return None
  metrics = [m for m, _, _ in PANELS]
  return max_abs_difference(runs[('balanced',)], runs[('unbalanced',)], metrics)


def _fmt(value: float, spec: str = '.4f') -> str:
  return format(value, spec) if math.isfinite(value) else str(value)


def run_table(rows: Sequence[Row]) -> tuple[list[str], float]:
  """The summary table of one data set (markdown lines) and its target test error."""
  runs = group(rows, ('method', 'init'))
  finals = [max(r, key=lambda x: x['epoch'])['test_error'] for r in runs.values()]
  finite = [e for e in finals if math.isfinite(e)]
  target = TARGET_FACTOR * min(finite) if finite else math.nan
  lines = [
    (
      '| method | init | step size | final train loss | final train error '
      '| final test error | best test error (epoch) | epochs to target |'
    ),
    '|---|---|---|---|---|---|---|---|',
  ]
  for (method, init), run in runs.items():
    lines.append(_table_line(method, init, sorted(run, key=lambda x: x['epoch']), target))
  return lines, target


def _table_line(method: str, init: str, run: Sequence[Row], target: float) -> str:
  last = run[-1]
  errors = np.array([r['test_error'] for r in run], float)
  ok = np.isfinite(errors)
  best = (
    f'{errors[ok].min():.4f} ({int(np.flatnonzero(errors == errors[ok].min())[0])})'
    if ok.any()
    else 'nan'
  )
  reached = np.flatnonzero(ok & (errors <= target))
  to_target = str(int(run[reached[0]]['epoch'])) if reached.size else 'not reached'
  final_test = _fmt(last['test_error'])
  if not math.isfinite(last['train_loss']):
    final_test += f' (diverged, epoch {last["epoch"]})'
  return (
    f'| {method} | {init} | {last["learning_rate"]:.0e} | {_fmt(last["train_loss"], ".4g")} '
    f'| {_fmt(last["train_error"])} | {final_test} | {best} | {to_target} |'
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
    f'absolute difference over epochs: {parts}: {verdict}.'
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
      f'Epochs to target: first epoch with test error <= {_fmt(target)} '
      f'({TARGET_FACTOR:g} x the best final test error of all runs above). '
      'Best test error: lowest over epochs (first epoch reaching it).'
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
    lines.append(
      f'- {where}, {r["method"]} ({r["init"]} init): step {r["learning_rate"]:.0e} '
      f'(alpha {r["alpha"]:g}), '
      f'validation error {_fmt(r["best_val_error"])} first reached at epoch '
      f'{r["best_epoch"]}'
    )
  return lines


def write_summary(
  path: str | os.PathLike[str],
  rows: Sequence[Row],
  selection: Sequence[Row] = (),
  preamble: Sequence[str] = (),
) -> None:
  """Writes ``summary.md`` (see :func:`summary_markdown`)."""
  with open(path, 'w') as f:
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
  """Reads ``metrics.csv`` and (if present) ``selection.csv`` of a run directory."""
  metrics = read_csv(os.path.join(run_dir, 'metrics.csv'))
  selection_path = os.path.join(run_dir, 'selection.csv')
  selection = read_csv(selection_path) if os.path.exists(selection_path) else []
  return metrics, selection
