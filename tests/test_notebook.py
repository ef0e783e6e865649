"""The notebook runs top to bottom, and shows what it says it shows."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / 'notebooks' / 'path_sgd.ipynb'


@pytest.mark.slow
def test_notebook_runs_and_path_sgd_curves_coincide(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    notebook, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  ).execute()
  text = '\n'.join(
    output.get('text', '')
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for output in cell.get('outputs', [])
  )
  gap_line = next(line for line in text.splitlines() if 'largest output difference' in line)
  assert float(gap_line.split(':')[-1]) < 1e-3
  path_sgd = [
    line for line in text.splitlines() if 'Path-SGD' in line and 'test error' in line
  ]
  assert len(path_sgd) == 3 and len({line.split()[-1] for line in path_sgd}) == 1
  # what the notebook says of the stress start: SGD and AdaGrad fail there (nan: diverged)
  for name in ('SGD', 'AdaGrad'):
    line = next(l for l in text.splitlines() if l.split()[:2] == [name, 'stress:'])
    final = float(line.split()[-1])
    assert not final < 0.5, line
