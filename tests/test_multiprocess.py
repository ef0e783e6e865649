"""examples/multiprocess_train.py: 2 processes on 127.0.0.1 train as one process does.

Two processes with two simulated CPU devices each form a (2 data x 2 model) mesh over
JAX's multi-controller runtime (gloo collectives); the reference is one process with
four devices and the same mesh. Path-SGD (general mode, residual CNN; and MLP mode)
must give the same losses and params.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'examples' / 'multiprocess_train.py'
TIMEOUT = 150


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(args, log):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(
    [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
  )


def run_all(commands, tmp_path):
  """Starts every command at once; waits for all, killing them all on a timeout."""
  paths = [tmp_path / f'log_{i}.txt' for i in range(len(commands))]
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(path, 'w')) for path in paths]
    processes = []
    try:
      processes = [launch(args, log) for args, log in zip(commands, logs)]
      deadline = time.monotonic() + TIMEOUT
      for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for process in processes:
        if process.poll() is None:
          process.kill()
          process.wait()
  return [p.returncode for p in processes], [path.read_text() for path in paths]


def relative_difference(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize('model', ['cnn', 'mlp'])
def test_two_processes_match_one(tmp_path, model):
  common = ['--model', model, '--steps', '8', '--local-devices']
  port = free_port()
  distributed = ['--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--timeout', '60']
  commands = [
    [*common, '2', *distributed, '--process-id', '0', '--out', str(tmp_path / 'multi.npz')],
    [*common, '2', *distributed, '--process-id', '1'],
    [*common, '4', '--out', str(tmp_path / 'single.npz')],
  ]
  codes, outputs = run_all(commands, tmp_path)
  report = '\n'.join(
    f'--- process {i} (exit {c}):\n{o[-3000:]}' for i, (c, o) in enumerate(zip(codes, outputs))
  )
  assert codes == [0, 0, 0], report
  assert 'processes 2, devices 4' in outputs[0], report
  assert 'processes 1, devices 4' in outputs[2], report

  multi, single = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'single.npz')
  assert sorted(multi.files) == sorted(single.files) and len(multi.files) > 4
  assert single['losses'][-1] < single['losses'][0]
  differences = {name: relative_difference(multi[name], single[name]) for name in single.files}
  print(f'{model}: largest relative difference {max(differences.values()):.1e}')
  assert max(differences.values()) < 1e-5, differences
  for name in single.files:
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
