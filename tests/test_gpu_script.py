"""The prepared GPU check (``scripts/gpu_check.sh``) runs, in its dry mode on the CPU."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_results(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
  result = subprocess.run(
    ['bash', str(ROOT / 'scripts' / 'gpu_check.sh'), '--dry'],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  log = (tmp_path / 'log.txt').read_text()
  for step in ('tests', 'bench-float32', 'reproduce'):
    assert f'== {step}: ok' in log, log
  assert 'backend cpu' in (tmp_path / 'env.txt').read_text()
  assert '| path-sgd |' in (tmp_path / 'bench-float32' / 'bench.md').read_text()
  assert 'path-sgd' in (tmp_path / 'reproduce' / 'summary.md').read_text()
