"""Both modes on 8 simulated CPU devices, in a subprocess: sharded params and batches.

The device count of a JAX process is fixed when its backend starts, so the checks in
``multidevice_checks.py`` run in a fresh ``python -m pytest`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; this session is unaffected.
"""

import os
import pathlib
import subprocess
import sys

import pytest

CHECKS = pathlib.Path(__file__).with_name('multidevice_checks.py')


@pytest.mark.slow
def test_sharded_path_normalize_on_8_simulated_devices():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  try:
    result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rs', str(CHECKS)],
      cwd=CHECKS.parent.parent,
      env=env,
      capture_output=True,
      text=True,
      timeout=540,
      check=False,
    )
  except subprocess.TimeoutExpired as error:
    pytest.fail(f'the 8-device checks timed out after {error.timeout} s:\n{error.stdout}')
  output = result.stdout + result.stderr
  assert result.returncode == 0, output
  assert 'skipped' not in result.stdout, output
  assert '15 passed' in result.stdout, output
