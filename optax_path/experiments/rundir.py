"""The output directory of a run: checked before any work, marked while incomplete.

``reproduce`` checks ``--out`` before it loads any data (a directory it can write, and
not one that already holds a run unless ``--resume`` or ``--overwrite`` says what to do
with it), then writes the :data:`MARKER` file first and removes it last: a directory
holding the marker is an unfinished run (still running, interrupted or failed), whose
``metrics.csv`` and ``selection.csv`` hold the runs finished so far. ``plot`` warns
about such a directory. Every file is written atomically (``report.atomic_open``).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

#: Written first and removed last by ``reproduce``: the run in this directory is incomplete.
MARKER = 'INCOMPLETE'
#: The files of a ``reproduce`` run (``figure3.png``: written by earlier versions).
RUN_FILES = ('metrics.csv', 'selection.csv', 'figure.png', 'figure3.png', 'summary.md')
#: The files written at the end of a run, from the CSV files.
DERIVED_FILES = ('figure.png', 'figure3.png', 'summary.md')


class UserError(ValueError):
  """A mistake in an option or an input file: the command line prints it in one line, exit 2."""


def check_writable(directory: str | os.PathLike[str], option: str = '--out') -> None:
  """Creates ``directory`` (with its parents) and checks that a file can be written in it.

  Raises:
    UserError: Naming ``option``, if it is a file or cannot be created or written.
  """
  path = pathlib.Path(directory)
  if path.exists() and not path.is_dir():
    raise UserError(f'{option} {directory}: exists and is not a directory.')
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.tmp-probe-')
    os.close(fd)
    os.unlink(probe)
  except OSError as exc:
    raise UserError(f'{option} {directory}: cannot write there ({exc.strerror or exc}).') from None


def run_files(directory: str | os.PathLike[str]) -> list[str]:
  """The files of a run (and the marker) present in ``directory``."""
  return [n for n in (MARKER, *RUN_FILES) if os.path.exists(os.path.join(directory, n))]


def check_out(directory: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> None:
  """Checks ``--out`` before any work: writable, and holding no run unless told what to do.

  Raises:
    UserError: If it cannot be written, or holds a run and neither ``resume`` nor
      ``overwrite`` is set.
  """
  check_writable(directory)
  present = run_files(directory)
  if present and not (resume or overwrite):
    what = 'an incomplete run' if MARKER in present else 'a run'
    raise UserError(
      f'--out {directory} already holds {what} ({", ".join(present)}); pass --resume to add '
      'the missing runs to it, --overwrite to replace it, or choose another --out.'
    )


def begin(directory: str | os.PathLike[str], *, overwrite: bool) -> None:
  """Marks ``directory`` as holding an incomplete run, then clears what would be stale.

  With ``overwrite``, every file of an earlier run goes; otherwise (a resumed run) the
  CSV files stay and the figure and summary, rewritten at the end, go.
  """
  from optax_path.experiments.report import atomic_open

  with atomic_open(os.path.join(directory, MARKER)) as f:
    f.write(
      f'Incomplete run: started {time.strftime("%Y-%m-%d %H:%M:%S %Z")} (process '
      f'{os.getpid()}) and not finished: still running, interrupted or failed. '
      'metrics.csv and selection.csv hold the runs finished so far; figure.png and '
      'summary.md are written at the end, and this file removed. Finish it with the '
      'same command and --resume.\n'
    )
  for name in RUN_FILES if overwrite else DERIVED_FILES:
    try:
      os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
      pass


def finish(directory: str | os.PathLike[str]) -> None:
  """Marks the run in ``directory`` as complete (removes the marker)."""
  try:
    os.unlink(os.path.join(directory, MARKER))
  except FileNotFoundError:
    pass


def check_run_dir(directory: str | os.PathLike[str]) -> str | None:
  """Checks a directory given to ``plot``.

  Returns:
    A warning if the run is incomplete, else None.

  Raises:
    UserError: If it is not a directory or has no ``metrics.csv``.
  """
  if not os.path.isdir(directory):
    what = 'not a directory' if os.path.exists(directory) else 'no such directory'
    raise UserError(f'{directory}: {what}.')
  if not os.path.exists(os.path.join(directory, 'metrics.csv')):
    raise UserError(f'{directory}: no metrics.csv (not an output directory of reproduce?).')
  if os.path.exists(os.path.join(directory, MARKER)):
    return (
      f'{directory} holds an incomplete run (its {MARKER} file: still running, interrupted '
      'or failed); plotting the runs finished so far.'
    )
  return None
