"""Command line: ``python -m optax_path.experiments reproduce`` (or ``optax-path``).

``reproduce`` runs the experiments of Section 5 of the paper on one data set: the
step-size search on a validation split, then the final runs of every method from the
balanced and the unbalanced initialisation, writing ``metrics.csv``, ``selection.csv``,
``figure.png`` and ``summary.md``. ``plot`` combines several runs into one figure.
``bench`` times a training step of Path-SGD and Path-AdaGrad against SGD and AdaGrad
(see :mod:`optax_path.experiments.bench`).

A user error (an option, a missing data set, an unusable ``--out`` or file) prints one
message and exits with status 2 (``--debug`` shows the traceback); Ctrl-C prints one line
and exits with status 130.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

import numpy as np

from optax_path.experiments import bench, data, report, rundir
from optax_path.experiments.pipeline import Config, reproduce, show
from optax_path.experiments.training import METHODS

INITS = ('balanced', 'unbalanced')
#: Defaults of ``reproduce``: sized so the digits run takes about 2 minutes on 2 cores.
DEFAULTS = {
  'hidden': {'mlp': (512, 512), 'cnn': (16, 32)},
  'epochs': 40,
  'search_epochs': 20,
  'batch_size': 100,
  'alphas': (0, 1, 2, 3, 4),
}
#: ``--paper``: the settings of Section 5 (2x4000 units, 100 epochs, alpha in 0..10).
PAPER = {
  'hidden': (4000, 4000),
  'epochs': 100,
  'search_epochs': 100,
  'batch_size': 100,
  'alphas': tuple(range(11)),
  'unbalanced_units': 2000,
}
#: Defaults of ``bench``, and of ``bench --quick`` (well under a minute on 2 CPU cores).
BENCH_DEFAULTS = {'configs': tuple(bench.CONFIGS), 'rounds': 20, 'warmup': 3}
BENCH_QUICK = {'configs': tuple(bench.QUICK_CONFIGS), 'rounds': 10, 'warmup': 2}
#: The paper rescales 2000 units of its 2x4000 net; smaller nets scale this number.
PAPER_UNBALANCED_FRACTION = 2000 / 8000


def parse_lr(text: str) -> tuple[str, float]:
  """Parses ``--lr METHOD=VALUE``.

  Args:
    text: E.g. ``"path-sgd=0.1"``.

  Returns:
    ``(method, value)``.

  Raises:
    argparse.ArgumentTypeError: For a malformed value or an unknown method.
  """
  method, sep, value = text.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'expected METHOD=VALUE, got {text!r}')
  if method not in METHODS:
    raise argparse.ArgumentTypeError(f'unknown method {method!r}; choose from {", ".join(METHODS)}')
  return method, step_size(value)


#: Exit status of a user error (an option, a missing data set, an unusable file).
USER_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def _number(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None


def step_size(text: str) -> float:
  """A step size: a finite number > 0.

  Example:
    >>> step_size('1e-2')
    0.01
  """
  lr = _number(text)
  if not (math.isfinite(lr) and lr > 0):
    raise argparse.ArgumentTypeError(f'a step size must be a finite number > 0, got {text!r}')
  return lr


def alpha_value(text: str) -> float:
  """An alpha of ``--alphas``: a finite number whose step ``10^-alpha`` is a finite number > 0.

  Example:
    >>> alpha_value('2.5')
    2.5
  """
  value = _number(text)
  try:
    lr = 10.0 ** (-value) if math.isfinite(value) else math.nan
  except OverflowError:
    lr = math.inf
  if not (math.isfinite(lr) and lr > 0):
    power = f'10^-({text})' if text.strip().startswith('-') else f'10^-{text}'
    raise argparse.ArgumentTypeError(
      f'alpha {text!r} gives the step {power}, not a finite number > 0 (float64 holds '
      'alphas from about -308 to 323)'
    )
  return value


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
  """An argparse type: an integer in ``[low, high]``."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'not an integer: {text!r}') from None
    if value < low or (high is not None and value > high):
      bound = f'at least {low}' if high is None else f'from {low} to {high}'
      raise argparse.ArgumentTypeError(f'must be {bound}, got {text!r}')
    return value

  parse.__name__ = 'integer'
  return parse


positive = integer(1)
#: Seeds feed ``jax.random.key`` and NumPy's generators: 0 .. 2^32 - 1.
MAX_SEED = 2**32 - 1
seed_value = integer(0, MAX_SEED)


def fraction(text: str) -> float:
  """A dropout rate in ``[0, 1)``."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f'must be in [0, 1), got {text!r}')
  return value


def methods_epilog() -> str:
  """The list of methods shown by ``--help``."""
  width = max(map(len, METHODS))
  lines = ['methods:'] + [f'  {name:<{width}}  {m.description}' for name, m in METHODS.items()]
  return '\n'.join(lines)


def add_reproduce_parser(subparsers: argparse._SubParsersAction) -> None:
  """Declares the ``reproduce`` subcommand."""
  p = subparsers.add_parser(
    'reproduce',
    help="run the paper's comparison on one data set",
    description=textwrap.fill(
      'Train a ReLU MLP with each method from the balanced and the unbalanced init, '
      "after choosing each method's step size 10^-alpha on a validation split (the "
      "paper's rule: the alpha reaching the lowest validation error fastest; searched "
      'on the balanced init unless --search-init each), and write metrics.csv, '
      'selection.csv, figure.png and summary.md.'
    ),
    epilog=methods_epilog(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    '--dataset',
    choices=data.DATASETS,
    default='digits',
    help='data set (default: digits, bundled with scikit-learn)',
  )
  p.add_argument(
    '--data-dir', help='data directory (default: $OPTAX_PATH_DATA or ~/.cache/optax_path)'
  )
  p.add_argument(
    '--model',
    choices=('mlp', 'cnn'),
    default='mlp',
    help="network: the paper's ReLU MLP (default), or a small ReLU CNN (3x3 conv layers "
    'with 2x2 average pooling and a dense head) whose path scales come from the '
    'general mode and whose unbalanced init rescales channels',
  )
  p.add_argument(
    '--hidden',
    type=positive,
    nargs='+',
    metavar='H',
    help=f'hidden layer widths (default: {show(DEFAULTS["hidden"]["mlp"])}; paper: 4000 '
    f'4000), or conv channels with --model cnn (default: {show(DEFAULTS["hidden"]["cnn"])})',
  )
  p.add_argument(
    '--epochs', type=positive, help=f'epochs of the final runs (default: {DEFAULTS["epochs"]})'
  )
  p.add_argument(
    '--search-epochs',
    type=positive,
    help=f'epochs of each step-size search run (default: {DEFAULTS["search_epochs"]})',
  )
  p.add_argument('--batch-size', type=positive, help='mini-batch size (default: 100)')
  p.add_argument(
    '--train-size',
    type=positive,
    metavar='N',
    help='train on a fixed random subset of N training examples (the same for every '
    'seed; the validation split is taken from it; default: all), to size a run to the '
    'machine',
  )
  p.add_argument(
    '--dropout',
    type=fraction,
    default=0.0,
    help='drop probability of hidden units; retain probability is 1-dropout '
    '(default: 0; paper: 0 and 0.5)',
  )
  p.add_argument(
    '--seed',
    type=seed_value,
    default=0,
    help='first seed (init, unbalancing, validation split, batches, dropout; default: 0)',
  )
  p.add_argument(
    '--seeds',
    type=seed_value,
    nargs='+',
    metavar='S',
    help='one number N: train every method and init from N seeds, --seed to --seed+N-1; '
    'several numbers: these seeds (default: 1). The step sizes are searched on the first '
    'seed; the summary gives the mean, std and range over the seeds',
  )
  p.add_argument(
    '--methods',
    nargs='+',
    choices=list(METHODS),
    default=['path-sgd', 'sgd', 'adagrad'],
    metavar='METHOD',
    help='methods to compare (listed below; default: path-sgd sgd adagrad)',
  )
  p.add_argument(
    '--inits',
    nargs='+',
    choices=INITS,
    default=list(INITS),
    help='initialisations (default: both)',
  )
  p.add_argument(
    '--unbalanced-units',
    type=positive,
    metavar='K',
    help='hidden units rescaled by the unbalanced init, drawn with replacement '
    "(default: round(2000 * total hidden / 8000), as the paper's 2000 of 2x4000)",
  )
  p.add_argument(
    '--unbalanced-scheme',
    choices=('authors', 'stress'),
    default='authors',
    help="factor of each rescaled unit, z ~ N(0, 1): 'authors' (default), 10*exp(z) as in "
    "the authors' MATLAB code, the paper's init (factors ~1.4 to 74); 'stress', "
    '10^exp(z), far harsher than the paper (factors to 1e20 and beyond, beyond the float32 '
    'range of |W|^2), a test of the float32-robust path scales',
  )
  p.add_argument(
    '--alphas',
    type=alpha_value,
    nargs='+',
    metavar='ALPHA',
    help=f'step sizes 10^-alpha to search (default: {show(DEFAULTS["alphas"])}; paper: '
    "0..10); when the chosen one is at an end of the grid, the search goes on one step "
    'that way until it is interior or reaches 0 or 10',
  )
  p.add_argument(
    '--lr',
    type=parse_lr,
    action='append',
    default=[],
    metavar='METHOD=VALUE',
    help="fix a method's step size and skip its search (repeatable)",
  )
  p.add_argument(
    '--search-init',
    choices=('balanced', 'each'),
    default='balanced',
    help='search the step size on the balanced init and use it for both '
    '(default), or search separately for each init',
  )
  p.add_argument(
    '--paper',
    action='store_true',
    help="the paper's settings: --hidden 4000 4000 --batch-size 100 --epochs 100 "
    '--search-epochs 100 --alphas 0..10 --unbalanced-units 2000 (explicit '
    'options still win)',
  )
  p.add_argument(
    '--dtype',
    choices=('float64', 'float32'),
    default='float64',
    help='floating-point precision (default: float64, in which the Path-SGD '
    'balanced/unbalanced curves agree to rounding; in float32, training at the chosen '
    'steps can amplify rounding differences between them to ~1e-2)',
  )
  p.add_argument(
    '--out', help='output directory (default: runs/<dataset>, runs/<dataset>-dropout<p>)'
  )
  p.add_argument('--quiet', action='store_true', help='no progress bars')
  p.add_argument(
    '--resume',
    action='store_true',
    help='keep the finished runs and step searches in --out and run only the missing '
    '(method, init, seed) runs (e.g. more --seeds later, or after an interruption)',
  )
  p.add_argument(
    '--overwrite',
    action='store_true',
    help='replace the run already in --out (its files are deleted first); without it '
    '(or --resume), an --out holding a run is refused',
  )


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
  """Declares the ``plot`` subcommand."""
  p = subparsers.add_parser(
    'plot',
    help='combine runs into one figure (a row per data set)',
    description='Combine the metrics.csv of several run directories into one figure.',
  )
  p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='directories with metrics.csv')
  p.add_argument('--out', default='figure.png', help='image file (default: %(default)s)')
  p.add_argument('--summary', help='also write a combined summary.md here')


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
  """Declares the ``bench`` subcommand."""
  configs = '; '.join(
    f'{c.name}: 784-{"-".join(map(str, c.hidden))}-10, batch {c.batch_size}'
    for c in bench.ALL_CONFIGS.values()
  )
  p = subparsers.add_parser(
    'bench',
    help='time a training step of each method (Path-SGD vs SGD, Path-AdaGrad vs AdaGrad)',
    description=textwrap.fill(
      'Time one jitted training step (forward, backward, transformation, apply; params '
      'and optimizer state donated) of a ReLU MLP on fixed random data with sgd, '
      'path-sgd, adagrad and path-adagrad, interleaved round-robin after warm-up, and '
      'report the median step time, its ratio to the plain optimizer (with the quartiles '
      'of the round-by-round ratios), the compile time, '
      'the path scales alone and the peak memory. On a CPU the paper and big-batch '
      'configs take minutes.'
    ),
    epilog=textwrap.fill(f'configs: {configs}.'),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    '--configs',
    nargs='+',
    choices=list(bench.ALL_CONFIGS),
    metavar='CONFIG',
    help=f'configurations to time (listed below; default: {" ".join(BENCH_DEFAULTS["configs"])}; '
    f'with --quick: {" ".join(BENCH_QUICK["configs"])})',
  )
  p.add_argument(
    '--quick',
    action='store_true',
    help=f'a check in seconds: the tiny configs, {BENCH_QUICK["rounds"]} rounds, '
    f'{BENCH_QUICK["warmup"]} warm-up steps (explicit options still win)',
  )
  p.add_argument(
    '--rounds',
    type=positive,
    help=f'timed steps of each method, one per round (default: {BENCH_DEFAULTS["rounds"]})',
  )
  p.add_argument(
    '--warmup',
    type=integer(0),
    help=f'untimed steps of each method first (default: {BENCH_DEFAULTS["warmup"]})',
  )
  p.add_argument(
    '--dtype',
    choices=tuple(bench.DTYPES),
    default='float32',
    help='dtype of the params and inputs (default: %(default)s)',
  )
  p.add_argument(
    '--out',
    help='also write bench.json and bench.md into this directory (checked before the '
    'benchmark starts)',
  )
  p.add_argument(
    '--overwrite', action='store_true', help='replace bench.json and bench.md already in --out'
  )


class _Parser(argparse.ArgumentParser):
  """An option error: a one-line usage and the message (the options are many; --help lists them)."""

  def error(self, message: str):
    usage = self.format_usage()
    if usage.count('\n') > 2:
      usage = f'usage: {self.prog} [options] (all: {self.prog} --help)\n'
    self.exit(USER_ERROR, f'{usage}{self.prog}: error: {message}\n')


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser."""
  parser = _Parser(
    prog='optax-path',
    description='Experiments of Path-SGD (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015).',
  )
  subparsers = parser.add_subparsers(dest='command', required=True)
  add_reproduce_parser(subparsers)
  add_plot_parser(subparsers)
  add_bench_parser(subparsers)
  for sub in subparsers.choices.values():
    sub.add_argument(
      '--debug',
      action='store_true',
      help='show the traceback of an error (by default, one line and exit status 2)',
    )
  return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
  """The parser of subcommand ``name`` (its usage goes with its errors), else ``parser``."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction) and name in action.choices:
      return action.choices[name]
  return parser


def _pick(args: argparse.Namespace, name: str) -> object:
  """An explicit option, else the paper's value under ``--paper``, else the default."""
  value = getattr(args, name)
  if value is not None:
    return value
  return PAPER[name] if args.paper else DEFAULTS[name]


def default_unbalanced_units(hidden: Sequence[int]) -> int:
  """The paper's 2000 rescaled units of 2x4000, scaled to the net's size (at least 1).

  Example:
    >>> default_unbalanced_units([4000, 4000]), default_unbalanced_units([256, 256])
    (2000, 128)
  """
  return max(1, round(PAPER_UNBALANCED_FRACTION * sum(hidden)))


def default_out(dataset: str, dropout: float) -> str:
  """The default output directory, e.g. ``runs/mnist`` or ``runs/mnist-dropout0.5``.

  Example:
    >>> default_out("digits", 0.0), default_out("mnist", 0.5)
    ('runs/digits', 'runs/mnist-dropout0.5')
  """
  name = dataset if not dropout else f'{dataset}-dropout{dropout:g}'
  return os.path.join('runs', name)


def seed_list(
  first: int, seeds: Sequence[int] | None, parser: argparse.ArgumentParser
) -> tuple[int, ...]:
  """The seeds of ``--seed`` and ``--seeds``: a count from ``first``, or a list.

  Example:
    >>> p = argparse.ArgumentParser()
    >>> seed_list(0, None, p), seed_list(5, [3], p), seed_list(0, [4, 2], p)
    ((0,), (5, 6, 7), (4, 2))
  """
  if not seeds:
    return (first,)
  if len(seeds) == 1:
    if seeds[0] < 1:
      parser.error(f'--seeds N needs N >= 1, got {seeds[0]}')
    return tuple(range(first, first + seeds[0]))
  if len(set(seeds)) < len(seeds):
    parser.error(f'--seeds lists a seed twice: {" ".join(map(str, seeds))}')
  return tuple(seeds)


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
  """Resolves the ``reproduce`` options (defaults, ``--paper``) and checks them."""
  parser = command_parser(parser, 'reproduce')
  if args.resume and args.overwrite:
    parser.error('--resume keeps the run in --out and --overwrite replaces it: choose one')
  if args.data_dir is not None and not os.path.isdir(os.path.expanduser(args.data_dir)):
    parser.error(
      f'--data-dir {args.data_dir} is not a directory: create it (downloads are saved there) '
      'or leave the option out to use the default'
    )
  if args.paper and args.model != 'mlp':
    parser.error("--paper is the paper's MLP configuration; it does not apply to --model cnn")
  hidden = _pick(args, 'hidden')
  hidden = tuple(hidden[args.model] if isinstance(hidden, dict) else hidden)
  units = args.unbalanced_units
  if units is None:
    units = PAPER['unbalanced_units'] if args.paper else default_unbalanced_units(hidden)
  lrs = dict(args.lr)
  extra = sorted(set(lrs) - set(args.methods))
  if extra:
    parser.error(f'--lr given for {", ".join(extra)}, which is not in --methods')
  config = Config(
    dataset=args.dataset,
    data_dir=args.data_dir,
    model=args.model,
    hidden=hidden,
    epochs=_pick(args, 'epochs'),
    search_epochs=_pick(args, 'search_epochs'),
    batch_size=_pick(args, 'batch_size'),
    dropout=args.dropout,
    seeds=seed_list(args.seed, args.seeds, parser),
    methods=tuple(dict.fromkeys(args.methods)),
    inits=tuple(dict.fromkeys(args.inits)),
    unbalanced_units=units,
    unbalanced_scheme=args.unbalanced_scheme,
    alphas=tuple(_pick(args, 'alphas')),
    learning_rates=lrs,
    search_init=args.search_init,
    dtype=args.dtype,
    out=args.out or default_out(args.dataset, args.dropout),
    quiet=args.quiet,
    resume=args.resume,
    train_size=args.train_size,
    overwrite=args.overwrite,
  )
  check_config(config, parser)
  return config


def check_config(config: Config, parser: argparse.ArgumentParser) -> None:
  """Rejects settings that cannot run."""
  positive = {
    'epochs': config.epochs,
    'batch_size': config.batch_size,
    'unbalanced_units': config.unbalanced_units,
    'search_epochs': config.search_epochs,
  }
  for name, value in positive.items():
    if value < 1:
      parser.error(f'--{name.replace("_", "-")} must be at least 1')
  if min(config.hidden) < 1:
    parser.error('--hidden widths must be at least 1')
  if not 0 <= config.dropout < 1:
    parser.error('--dropout must be in [0, 1)')
  if config.seeds and max(config.seeds) > MAX_SEED:
    parser.error(f'--seed + --seeds goes past the largest seed, {MAX_SEED}')
  # A step in the run's dtype must be a normal number: 10^-alpha of the grid (and of its
  # extension to 0..10) and the --lr values.
  info = np.finfo(config.dtype)
  tiny, largest = float(info.tiny), float(info.max)
  steps = {f'--lr {m}={v:g}': v for m, v in config.learning_rates.items()}
  steps.update({f'--alphas {a:g}': 10.0 ** (-a) for a in config.alphas})
  for name, lr in steps.items():
    if not tiny <= lr <= largest:
      parser.error(
        f'{name}: the step {lr:g} is outside the range of {config.dtype} '
        f'({tiny:g} to {largest:g})'
      )


def plot_command(args: argparse.Namespace) -> None:
  """Combines run directories into one figure (and optionally one summary)."""
  for path, option in ((args.out, '--out'), (args.summary, '--summary')):
    if path:
      rundir.check_writable(os.path.dirname(path) or '.', option)
  for run_dir in args.run_dirs:
    warning = rundir.check_run_dir(run_dir)
    if warning:
      print(f'optax-path plot: warning: {warning}', file=sys.stderr)
  metrics, chosen = report.combine_runs({d: report.load_run(d) for d in args.run_dirs})
  report.plot(metrics, args.out)
  written = [args.out]
  if args.summary:
    report.write_summary(args.summary, metrics, chosen, [f'Runs: {", ".join(args.run_dirs)}.'])
    written.append(args.summary)
  print('Wrote ' + ', '.join(written))


def bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Runs the benchmark, prints its tables and writes them under ``--out``.

  ``--out`` is checked before the benchmark starts, so that its results are not lost.
  """
  parser = command_parser(parser, 'bench')
  chosen = BENCH_QUICK if args.quick else BENCH_DEFAULTS
  rounds, warmup = _or(args.rounds, chosen['rounds']), _or(args.warmup, chosen['warmup'])
  if rounds < 1 or warmup < 0:
    parser.error('--rounds must be at least 1 and --warmup at least 0')
  if args.out:
    rundir.check_writable(args.out)
    present = [n for n in bench.OUTPUT_FILES if os.path.exists(os.path.join(args.out, n))]
    if present and not args.overwrite:
      raise rundir.UserError(
        f'--out {args.out} already holds {", ".join(present)}; pass --overwrite to replace '
        'them, or choose another --out.'
      )
  configs = tuple(dict.fromkeys(_or(args.configs, chosen['configs'])))
  print(
    f'bench: {len(configs)} config(s) ({", ".join(configs)}), {args.dtype}: each method '
    f'compiled, {warmup} warm-up steps, then {rounds} interleaved timed rounds.',
    file=sys.stderr,
  )
  result = bench.run_bench(
    configs, rounds=rounds, warmup=warmup, dtype=args.dtype, progress=_progress
  )
  result['options']['command'] = {
    k: v for k, v in vars(args).items() if k not in ('command', 'debug')
  }
  print(bench.format_markdown(result), end='')
  if args.out:
    bench.write_outputs(result, args.out)


def _or(value: object, default: object) -> object:
  """``value`` unless it is None."""
  return default if value is None else value


def _progress(line: str) -> None:
  """Prints a progress line of ``bench`` (to stderr: stdout holds the report)."""
  print(f'bench: {line}', file=sys.stderr, flush=True)


def user_message(exc: BaseException) -> str:
  """The text of a user error for the command line (options named as flags)."""
  text = str(exc)
  if isinstance(exc, data.DatasetNotFoundError):
    text = text.replace('data_dir=...', '--data-dir DIR')
  return text


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m optax_path.experiments`` and ``optax-path``.

  A user error (an option, a missing data set, an unusable file or directory) prints a
  short message (the traceback with ``--debug``) and returns 2; Ctrl-C prints one line
  and returns 130 (from the command line, ``argv`` None, it ends the process at once with
  ``os._exit``: the interpreter's teardown with JAX's threads mid-work could crash).

  Args:
    argv: Arguments (default: ``sys.argv[1:]``).

  Returns:
    The exit status.
  """
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra:  # reported with the subcommand's usage, not the top level's
    command_parser(parser, args.command).error(f'unrecognized arguments: {" ".join(extra)}')
  prog = f'{parser.prog} {args.command}'
  try:
    if args.command == 'reproduce':
      reproduce(make_config(args, parser))
    elif args.command == 'bench':
      bench_command(args, parser)
    else:
      plot_command(args)
  except KeyboardInterrupt:
    if args.debug:
      raise
    where = ''
    if args.command == 'reproduce':
      out = args.out or default_out(args.dataset, args.dropout)
      if os.path.exists(os.path.join(out, 'metrics.csv')) and os.path.exists(
        os.path.join(out, rundir.MARKER)
      ):
        where = f'; the runs finished so far are in {out} (go on with --resume)'
      elif os.path.exists(os.path.join(out, rundir.MARKER)):
        where = f'; no run had finished, {out} is marked incomplete (start again with --resume)'
    print(f'\n{prog}: interrupted{where}', file=sys.stderr)
    if argv is None:  # the command line: end now, without the interpreter's teardown
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(INTERRUPTED)
    return INTERRUPTED
  except (rundir.UserError, data.DatasetNotFoundError) as exc:
    if args.debug:
      raise
    print(f'{prog}: error: {user_message(exc)}', file=sys.stderr)
    return USER_ERROR
  return 0

