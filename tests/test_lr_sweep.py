"""examples/lr_sweep.py (the README's learning-rate table) still runs: one step size per
method, one epoch, and its files are written whole."""

import csv
import importlib.util
import pathlib

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / 'examples' / 'lr_sweep.py'


@pytest.mark.slow
def test_lr_sweep_runs_and_writes_its_table(tmp_path, monkeypatch, capsys):
  spec = importlib.util.spec_from_file_location('lr_sweep', SCRIPT)
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  monkeypatch.setattr(
    sweep, 'METHODS', {name: (make, rates[-3:-2]) for name, (make, rates) in sweep.METHODS.items()}
  )
  sweep.main(['--epochs', '1', '--seeds', '1', '--out', str(tmp_path)])
  table = capsys.readouterr().out
  assert sum(line.startswith('|') for line in table.splitlines()) == 2 + 3  # header, rule, rows
  with open(tmp_path / 'lr_sweep.csv') as f:
    rows = list(csv.DictReader(f))
  assert {(r['method'], r['init']) for r in rows} == {
    (m, i) for m in ('path-sgd', 'path-adam', 'sgd') for i in ('balanced', 'unbalanced')
  }
  by = {(r['method'], r['init']): float(r['train_loss']) for r in rows}
  # Path-SGD and path-adam are rescaling invariant: the same loss from either init.
  for method in ('path-sgd', 'path-adam'):
    np.testing.assert_allclose(by[method, 'balanced'], by[method, 'unbalanced'], rtol=1e-3)
    assert by[method, 'balanced'] < 2.0  # below chance (log 10 = 2.30) after one epoch
  assert '| path-sgd |' in (tmp_path / 'lr_sweep.md').read_text()
  assert not list(tmp_path.glob('.*.tmp'))  # no temporary file left behind
