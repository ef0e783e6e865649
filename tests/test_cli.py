"""User errors of the command line and of the general mode: short messages, exit 2.

Kept fast: tiny data, one epoch, small nets.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from test_experiments import small_digits, synthetic_rows

import optax_path
from optax_path.experiments import bench, cli, data, pipeline, report, rundir


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'apply_fn': 'x', 'input_shape': '28'}, 'apply_fn must be'),
    ({'apply_fn': lambda q, x: x, 'input_shape': '28'}, 'input_shape must be'),
    ({'apply_fn': lambda q, x: x, 'input_shape': 28}, 'input_shape must be'),
  ],
)
def test_general_mode_arguments_checked_at_construction(kwargs, match):
  for build in (optax_path.path_normalize, lambda **kw: optax_path.path_sgd(0.1, **kw)):
    with pytest.raises(ValueError, match=match):
      build(**kwargs)


# ------------------------------------------------------------------ the command line

TINY = ['--hidden', '8', '--epochs', '1', '--search-epochs', '1', '--alphas', '1', '--quiet']


def error_of(capsys) -> str:
  """The stderr of a command, checked to be short and without a traceback."""
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  return err


def no_work(*args, **kwargs):
  raise AssertionError('the command should have stopped before any work')


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--lr', 'path-sgd=inf'], "argument --lr: a step size must be a finite number > 0, got 'inf'"),
    (['--lr', 'path-sgd=1e400'], "finite number > 0, got '1e400'"),
    (['--lr', 'path-sgd=nan'], "finite number > 0, got 'nan'"),
    (['--lr', 'path-sgd=0'], "finite number > 0, got '0'"),
    (['--alphas', 'nan'], "argument --alphas: alpha 'nan' gives the step 10^-nan, not a finite"),
    (['--alphas', '400'], "alpha '400' gives the step 10^-400, not a finite number > 0"),
    (['--alphas', '-400'], "alpha '-400' gives the step 10^-(-400), not a finite number > 0"),
    (['--alphas', 'inf'], "alpha 'inf'"),
    (['--alphas', '40', '--dtype', 'float32'], '--alphas 40: the step 1e-40 is outside the range'),
    (['--lr', 'sgd=1e39', '--dtype', 'float32'], '--lr sgd=1e+39: the step 1e+39 is outside'),
    (['--epochs', '0'], "argument --epochs: must be at least 1, got '0'"),
    (['--epochs', '1.5'], "argument --epochs: not an integer: '1.5'"),
    (['--search-epochs', '-1'], 'argument --search-epochs: must be at least 1'),
    (['--batch-size', '0'], 'argument --batch-size: must be at least 1'),
    (['--hidden', '8', '0'], "argument --hidden: must be at least 1, got '0'"),
    (['--train-size', '0'], 'argument --train-size: must be at least 1'),
    (['--unbalanced-units', '0'], 'argument --unbalanced-units: must be at least 1'),
    (['--dropout', '1'], "argument --dropout: must be in [0, 1), got '1'"),
    (['--dropout', 'nan'], 'argument --dropout: must be in [0, 1)'),
    (['--dropout', '-0.1'], 'argument --dropout: must be in [0, 1)'),
    (['--seed', '-1'], "argument --seed: must be from 0 to 4294967295, got '-1'"),
    (['--seed', '4294967296'], 'argument --seed: must be from 0 to 4294967295'),
    (['--seed', '4294967295', '--seeds', '2'], 'goes past the largest seed'),
    (['--seeds', '0'], '--seeds N needs N >= 1'),
    (['--methods', 'path-sgd', '--lr', 'sgd=0.1'], '--lr given for sgd, which is not in'),
    (['--resume', '--overwrite'], '--resume keeps the run in --out and --overwrite replaces it'),
    (['--bogus', '1'], 'unrecognized arguments: --bogus 1'),
  ],
)
def test_bad_numbers_and_options_are_refused_with_the_subcommand_usage(argv, message, capsys):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data, 'load_dataset', no_work)
    with pytest.raises(SystemExit) as exc:
      cli.main(['reproduce', *argv])
  assert exc.value.code == 2
  err = error_of(capsys)
  assert err.startswith('usage: optax-path reproduce ')  # the subcommand's, not the top level's
  assert len(err.splitlines()) == 2  # one line of usage (it was 16), one of error
  assert err.splitlines()[-1] == f'optax-path reproduce: error: {err.splitlines()[-1][29:]}'
  assert message in err.splitlines()[-1]


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--rounds', '0'], "argument --rounds: must be at least 1, got '0'"),
    (['--warmup', '-1'], "argument --warmup: must be at least 0, got '-1'"),
  ],
)
def test_bench_bad_numbers(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(['bench', *argv])
  assert exc.value.code == 2
  err = error_of(capsys)
  assert err.startswith('usage: optax-path bench ') and message in err


def offline(url, dest, md5):
  raise OSError('offline (test)')


def test_missing_data_set_is_one_message_naming_the_flag(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(data, '_download', offline)
  (tmp_path / 'data').mkdir()
  argv = ['reproduce', '--dataset', 'mnist', '--data-dir', str(tmp_path / 'data')]
  argv += ['--out', str(tmp_path / 'out')]
  assert cli.main(argv) == 2
  err = error_of(capsys)
  assert err.startswith("optax-path reproduce: error: Data set 'mnist' not found")
  assert '--data-dir DIR' in err and 'data_dir=' not in err
  assert rundir.run_files(tmp_path / 'out') == []  # nothing written, not even the marker
  with pytest.raises(data.DatasetNotFoundError):
    cli.main([*argv, '--debug'])  # --debug: the traceback


def test_unwritable_out_is_found_before_any_work(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(data, 'load_dataset', no_work)
  monkeypatch.setattr(bench, 'run_bench', no_work)
  (tmp_path / 'file').write_text('x')
  for out, what in ((tmp_path / 'file', 'exists and is not a directory'),
                    (tmp_path / 'file' / 'sub', 'cannot write there')):
    assert cli.main(['reproduce', '--out', str(out)]) == 2
    err = error_of(capsys)
    assert err.startswith(f'optax-path reproduce: error: --out {out}: {what}')
    assert len(err.splitlines()) == 1
    assert cli.main(['bench', '--quick', '--out', str(out)]) == 2
    err = error_of(capsys)
    assert err.startswith(f'optax-path bench: error: --out {out}: {what}')
    assert len(err.splitlines()) == 1


def test_bench_refuses_to_overwrite_and_shows_progress(tmp_path, capsys, monkeypatch):
  (tmp_path / 'bench.json').write_text('{}')
  monkeypatch.setattr(bench, 'bench_config', no_work)
  assert cli.main(['bench', '--quick', '--out', str(tmp_path)]) == 2
  assert '--overwrite' in error_of(capsys)

  def fake_config(config, *, rounds, warmup, dtype):
    method = {'median_ms': 1.0, 'ratio': 1.0, 'round_ratio_quartiles': [1.0] * 3,
              'compile_s': 0.1, 'baseline': 'sgd', 'times_ms': [1.0] * rounds}
    return {'name': config.name, 'hidden': list(config.hidden), 'batch_size': 1,
            'methods': {m: method for m in bench.BASELINES},
            'scales': {'median_ms': 0.5, 'ratio_to_sgd': 0.5, 'compile_s': 0.1},
            'memory': {'peak_mib': 1.0, 'source': 'RSS'}}

  monkeypatch.setattr(bench, 'bench_config', fake_config)
  argv = ['bench', '--quick', '--rounds', '3', '--out', str(tmp_path), '--overwrite']
  assert cli.main(argv) == 0
  captured = capsys.readouterr()
  progress = captured.err.splitlines()
  assert progress[0] == (
    'bench: 2 config(s) (tiny, tiny-deep), float32: each method compiled, 2 warm-up steps, '
    'then 3 interleaved timed rounds.'
  )
  assert progress[1].startswith('bench: [1/2] tiny (784-64-64-10, batch 32): 6 methods')
  assert progress[2].startswith('bench: [1/2] tiny done in ')
  assert progress[3].startswith('bench: [2/2] tiny-deep (784-32-32-32-32-10, batch 32)')
  assert '3 interleaved rounds' in captured.out
  assert sorted(os.listdir(tmp_path)) == ['bench.json', 'bench.md']  # no temporary left


@pytest.mark.slow
def test_plot_says_what_is_wrong_with_a_file(tmp_path, capsys):
  header = ','.join(report.METRIC_COLUMNS)
  rows = synthetic_rows()
  good = tmp_path / 'good'
  good.mkdir()
  report.write_csv(good / 'metrics.csv', report.METRIC_COLUMNS, rows)
  lines = (good / 'metrics.csv').read_text().splitlines()
  cases = {
    'missing': (None, 'no such directory'),
    'no_metrics': ('', 'no metrics.csv'),
    'empty': ('', 'empty file (not even a header)'),
    'header_only': (header + '\n', 'no rows, only a header'),
    'cut_row': (
      '\n'.join(lines[:3]) + '\n' + lines[3][:20] + '\n',
      'line 4: 3 fields where the header has 11',
    ),
    'no_column': (
      '\n'.join(','.join(x.split(',')[:-2]) for x in lines) + '\n',
      'no column test_error in its header',
    ),
    'bad_number': (lines[0] + '\n' + lines[1].replace(',0.', ',x0.', 1) + '\n', 'line 2: column'),
  }
  for name, (text, message) in cases.items():
    run = tmp_path / name
    if text is not None:
      run.mkdir()
      if name != 'no_metrics':
        (run / 'metrics.csv').write_text(text)
    out = tmp_path / 'fig.png'
    assert cli.main(['plot', str(good), str(run), '--out', str(out)]) == 2, name
    err = error_of(capsys)
    assert len(err.splitlines()) == 1 and err.startswith('optax-path plot: error: '), err
    assert message in err, (name, err)
    assert not out.exists()
  # An incomplete run: plotted, with a warning.
  (good / rundir.MARKER).write_text('')
  assert cli.main(['plot', str(good), '--out', str(tmp_path / 'fig.png')]) == 0
  assert f'warning: {good} holds an incomplete run' in capsys.readouterr().err


def reproduce(*argv: str, interrupt_after: int | None = None) -> int:
  """``reproduce`` on a slice of digits; with ``interrupt_after``, Ctrl-C after that many runs."""
  calls = []
  final_run = pipeline.final_run

  def interrupted(*args, **kwargs):
    if len(calls) == interrupt_after:
      raise KeyboardInterrupt
    calls.append(1)
    return final_run(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data, 'load_dataset', lambda name, data_dir=None, **kw: small_digits(120, 40))
    mp.setattr(pipeline, 'final_run', interrupted)
    return cli.main(['reproduce', *argv])


@pytest.mark.slow
def test_interrupted_run_is_marked_resumed_and_not_overwritten_silently(tmp_path, capsys):
  out = tmp_path / 'run'
  argv = [*TINY, '--methods', 'path-sgd', '--lr', 'path-sgd=0.1', '--seeds', '2']
  argv += ['--inits', 'balanced', '--out', str(out)]
  # An older complete run of another data set is replaced only with --overwrite ...
  out.mkdir()
  for name in ('metrics.csv', 'summary.md', 'figure.png', 'figure3.png'):
    (out / name).write_text('old')
  assert reproduce(*argv) == 2
  err = error_of(capsys)
  files = 'metrics.csv, figure.png, figure3.png, summary.md'
  assert f'--out {out} already holds a run ({files})' in err
  assert '--overwrite' in err and '--resume' in err
  assert (out / 'summary.md').read_text() == 'old'
  # ... and Ctrl-C then leaves no file of the old run beside the new one, and a marker.
  assert reproduce(*argv, '--overwrite', interrupt_after=1) == 130
  err = error_of(capsys)
  assert err.strip() == (
    f'optax-path reproduce: interrupted; the runs finished so far are in {out} (go on with '
    '--resume)'
  )
  assert sorted(os.listdir(out)) == [rundir.MARKER, 'metrics.csv']
  assert {r['seed'] for r in report.read_csv(out / 'metrics.csv')} == {0}
  assert reproduce(*argv) == 2
  assert 'already holds an incomplete run' in error_of(capsys)
  # --resume finishes it: the marker goes, every step is said to be fixed by --lr.
  assert reproduce(*argv, '--resume') == 0
  assert sorted(os.listdir(out)) == ['figure.png', 'metrics.csv', 'summary.md']
  summary = (out / 'summary.md').read_text()
  assert 'Step sizes fixed by --lr: path-sgd 0.1 (no step-size search).' in summary
  assert {r['seed'] for r in report.read_csv(out / 'metrics.csv')} == {0, 1}
  assert '10^-alpha' not in summary


def test_summary_names_the_fixed_and_the_searched_steps():
  config = cli.make_config(
    cli.build_parser().parse_args(['reproduce', '--lr', 'sgd=0.1', '--alphas', '1', '2']),
    cli.build_parser(),
  )
  line = pipeline.step_sizes_line(config, 'on the balanced init', 80, 20)
  assert line.startswith('Step sizes of path-sgd, adagrad: 10^-alpha, alpha in {1 2}')
  assert line.endswith('Fixed by --lr: sgd 0.1.')



def ctrl_c_by_default() -> None:
  """In the child: Ctrl-C as a terminal gives it. A job started with `&` by a script (as CI
  may be) inherits Ctrl-C ignored, which the command line rightly leaves ignored."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)

@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path):
  """A real SIGINT to ``python -m optax_path.experiments`` during training."""
  out = tmp_path / 'run'
  argv = [sys.executable, '-m', 'optax_path.experiments', 'reproduce', '--hidden', '8']
  argv += ['--epochs', '1000', '--methods', 'sgd', '--lr', 'sgd=0.01', '--quiet', '--out', str(out)]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
    argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    preexec_fn=ctrl_c_by_default,
  )
  try:
    deadline = time.monotonic() + 120
    while not (out / rundir.MARKER).exists() and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines()[-1].startswith('optax-path reproduce: interrupted')
  assert (out / rundir.MARKER).exists()



@pytest.mark.slow
@pytest.mark.parametrize('delay', [0.5, 0.9, 1.4, 1.9, 2.6])
def test_ctrl_c_during_start_up_ends_with_one_line_and_status_130(tmp_path, delay):
  """SIGINT while JAX is imported, the parser built or the first step compiled.

  Not earlier: in the first ~50 ms Python itself starts, before any code of ours runs.
  """
  argv = [sys.executable, '-m', 'optax_path.experiments', 'reproduce', '--quiet']
  argv += ['--out', str(tmp_path / 'run')]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
    argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    preexec_fn=ctrl_c_by_default,
  )
  try:
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr
  assert 'Traceback' not in stderr and 'ignored' not in stderr, stderr
  assert stderr.strip().splitlines()[-1].startswith('optax-path reproduce: interrupted')


SWALLOWED_INTERRUPT = """
import gc, os, signal, sys, threading, time
from optax_path.experiments import __main__ as entry
if sys.argv[1] == 'hook':
  sys.unraisablehook = entry._redeliver_swallowed_interrupt
slept = []
def slow_once(phase, info):  # like JAX's gc callback, but long enough to be hit
  if phase == 'start' and not slept:
    slept.append(1)
    time.sleep(0.3)
gc.callbacks.append(slow_once)
threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
  start = time.monotonic()
  while time.monotonic() - start < 3:
    gc.collect()
  print('ran on')
except KeyboardInterrupt:
  print('interrupted')
"""


@pytest.mark.parametrize('hook, expected', [('none', 'ran on'), ('hook', 'interrupted')])
def test_ctrl_c_inside_a_gc_callback_is_delivered_again(hook, expected):
  """Python swallows a KeyboardInterrupt raised in a gc callback; the command line's hook
  delivers it again (without it, the process runs on)."""
  proc = subprocess.run(
    [sys.executable, '-c', SWALLOWED_INTERRUPT, hook],
    check=False, capture_output=True, text=True, timeout=60, preexec_fn=ctrl_c_by_default,
  )
  assert proc.stdout.strip() == expected, proc.stderr


def test_import_optax_path_does_not_start_jax():
  code = 'import sys, optax_path; print("jax" in sys.modules, sorted(optax_path.__all__) == '
  code += 'sorted(n for n in dir(optax_path) if not n.startswith("_")))'
  proc = subprocess.run(
    [sys.executable, '-c', code], check=False, capture_output=True, text=True, timeout=60
  )
  assert proc.stdout.split() == ['False', 'True'], proc.stderr
  for name in optax_path.__all__:
    assert getattr(optax_path, name).__name__ == name
  with pytest.raises(AttributeError, match="no attribute 'path_sgdd'"):
    _ = optax_path.path_sgdd

def test_readme_documents_every_bench_config_and_the_rounds():
  readme = ' '.join((pathlib.Path(__file__).parents[1] / 'README.md').read_text().split())
  for name in bench.ALL_CONFIGS:
    assert f'`{name}`' in readme, name
  for chosen in (cli.BENCH_DEFAULTS, cli.BENCH_QUICK):
    assert f'{chosen["rounds"]} rounds after {chosen["warmup"]} warm-up steps' in readme


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
  umask = os.umask(0o022)
  try:
    report.write_csv(tmp_path / 'new.csv', report.METRIC_COLUMNS, synthetic_rows())
    assert (tmp_path / 'new.csv').stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    (tmp_path / 'new.csv').chmod(0o640)
    report.write_csv(tmp_path / 'new.csv', report.METRIC_COLUMNS, synthetic_rows())
    assert (tmp_path / 'new.csv').stat().st_mode & 0o777 == 0o640  # an existing file's kept
  finally:
    os.umask(umask)


def readme_commands() -> list[list[str]]:
  """The ``python -m optax_path.experiments`` commands of the README's bash blocks."""
  text = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.DOTALL):
    for line in block.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      if words[:3] == ['python', '-m', 'optax_path.experiments']:
        commands.append(words[3:])
  return commands


def test_every_readme_command_line_is_accepted_by_the_parser():
  """The bash blocks are not run (minutes to hours); their options must still exist."""
  commands = readme_commands()
  assert len(commands) >= 10
  parser = cli.build_parser()
  for argv in commands:
    args = parser.parse_args(argv)
    if args.command == 'reproduce':
      cli.make_config(args, parser)


def test_a_data_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, capsys):
  """Before, --data-dir /nonexistent fell back to the system copy of Fashion-MNIST (or
  created /nonexistent/mnist) without a word."""
  missing = tmp_path / 'nowhere'
  with pytest.raises(SystemExit) as raised:
    cli.main(['reproduce', '--dataset', 'fashion_mnist', '--data-dir', str(missing), *TINY])
  assert raised.value.code == 2
  assert f'--data-dir {missing} is not a directory' in capsys.readouterr().err
  assert not missing.exists()
