"""Benchmark of a whole Path-SGD training step against the plain optimizers.

``python -m optax_path.experiments bench`` (or ``optax-path bench``) times one training
step of a ReLU MLP (:class:`~optax_path.experiments.models.MLP`, softmax cross-entropy on
fixed random inputs with 784 features and 10 classes, already on the device): forward,
backward, the optimizer's transformation and ``apply_updates``, all in one
``jax.jit(step, donate_argnums=(0, 1))``, as a good training loop would run it (the params
and the optimizer state are donated, so each step updates them in place). The methods are
``sgd``, ``path-sgd``, ``adagrad`` and ``path-adagrad`` (step size 0.01), and ``path-sgd``
refreshing its scales every 10 steps (``path-sgd-refresh10``), and the floor
(``naive-path-sgd``: plain float32 arithmetic, one fused reduction per pass, not robust;
see :func:`naive_path_normalize`), each with its own params and state; plus the transformation alone (``path_normalize(2.0).update``: the warm-started
scales and the division, as in the ``path-sgd`` step).

How it is timed:

* Every computation is compiled ahead of time (``jitted.lower(...).compile()``, whose
  duration is reported as the compile time) and the compiled executable is called.
* After ``warmup`` untimed calls of each, the computations run *interleaved*: in every
  round, one timed call of each (the order rotates from round to round), so drifts of
  the machine (clock, other load) hit all of them alike.
* Each call is timed with :func:`time.perf_counter` around the call and
  :func:`jax.block_until_ready` of its outputs; the report gives the median over the
  rounds and its ratio to the plain optimizer (``path-sgd / sgd``, ``path-adagrad /
  adagrad``; the scales against the ``sgd`` step), and the quartiles of the ratios
  taken round by round, which show how noisy the machine was.
* Peak memory is the device's ``peak_bytes_in_use`` where the device reports memory
  statistics, else the process's peak resident set size. Both are peaks of the whole
  process so far (they are read after each configuration and never reset), so a
  configuration's number also covers the configurations run before it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import optax

import optax_path
from optax_path.experiments.models import MLP, init_params
from optax_path.experiments.training import METHODS, cross_entropy

NUM_FEATURES = 784
NUM_CLASSES = 10
LEARNING_RATE = 0.01
#: The methods timed, each with the plain optimizer its ratio is taken against.
BASELINES = {
  'sgd': 'sgd',
  'path-sgd': 'sgd',
  'adagrad': 'adagrad',
  'path-adagrad': 'adagrad',
  'path-sgd-refresh10': 'sgd',
  'naive-path-sgd': 'sgd',
}
#: Name of the transformation alone (scales and division) in the timings.
SCALES = 'scales'


def naive_path_normalize() -> optax.GradientTransformation:
  """The floor: Algorithm 1 for p = 2 in plain float arithmetic, one fused reduction per
  pass and ``g / (gamma_in[u] gamma_out[v])``. Fast, and wrong (inf, NaN) wherever
  the scales leave the float range, as on the paper's unbalanced nets: a reference for
  the benchmark only. Expects ``Dense_0``, ``Dense_1``, ... with biases.
  """

  def update_fn(updates, state, params):
    names = [f'Dense_{l}' for l in range(len(params))]
    gamma_in = [jnp.ones(params[names[0]]['kernel'].shape[0])]
    for n in names:
      w, b = params[n]['kernel'], params[n]['bias']
      gamma_in.append(jnp.sum(jnp.square(jnp.sqrt(gamma_in[-1])[:, None] * w), 0) + b * b)
    gamma_out = [jnp.ones(params[names[-1]]['kernel'].shape[1])]
    for n in reversed(names):
      w = params[n]['kernel']
      gamma_out.append(jnp.sum(jnp.square(w * jnp.sqrt(gamma_out[-1])[None, :]), 1))
    gamma_out = gamma_out[::-1]
    normalized = {
      n: {
        'kernel': updates[n]['kernel'] / gamma_in[l][:, None] / gamma_out[l + 1][None, :],
        'bias': updates[n]['bias'] / gamma_out[l + 1],
      }
      for l, n in enumerate(names)
    }
    return normalized, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _optimizer(name: str) -> optax.GradientTransformation:
  if name == 'path-sgd-refresh10':
    return optax_path.path_sgd(LEARNING_RATE, refresh_every=10)
  if name == 'naive-path-sgd':
    return optax.chain(naive_path_normalize(), optax.sgd(LEARNING_RATE))
  return METHODS[name].factory(LEARNING_RATE, {})


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class BenchConfig(NamedTuple):
  """A network and batch size to time.

  Attributes:
    name: Name in the report and for ``--configs``.
    hidden: Widths of the hidden layers, from the input side.
    batch_size: Examples per step.
  """

  name: str
  hidden: tuple[int, ...]
  batch_size: int


def _by_name(*configs: BenchConfig) -> dict[str, BenchConfig]:
  return {c.name: c for c in configs}


#: The configurations of ``bench``: the paper's net, smaller, deeper and a larger batch.
CONFIGS = _by_name(
  BenchConfig('paper', (4000, 4000), 100),
  BenchConfig('small', (1000, 1000), 100),
  BenchConfig('deep', (512,) * 16, 128),
  BenchConfig('big-batch', (4000, 4000), 1000),
)
#: The configurations of ``bench --quick``: tiny nets, for a check in seconds.
QUICK_CONFIGS = _by_name(
  BenchConfig('tiny', (64, 64), 32),
  BenchConfig('tiny-deep', (32,) * 4, 32),
)
ALL_CONFIGS = {**CONFIGS, **QUICK_CONFIGS}


def describe_device() -> dict[str, Any]:
  """The default device, the host and the JAX versions, for the report."""
  device = jax.devices()[0]
  info = {
    'device_kind': device.device_kind,
    'platform': device.platform,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'python': platform.python_version(),
  }
  if device.platform == 'cpu':
    info['processor'] = platform.processor() or platform.machine()
    info['cpu_count'] = os.cpu_count()
  return info


def peak_memory() -> dict[str, Any]:
  """The process's peak memory so far: the device's where it reports it, else peak RSS."""
  stats = jax.devices()[0].memory_stats()
  if isinstance(stats, dict) and 'peak_bytes_in_use' in stats:
    return {'peak_mib': stats['peak_bytes_in_use'] / 2**20, 'source': 'device'}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  rss_bytes = rss if sys.platform == 'darwin' else rss * 1024
  return {'peak_mib': rss_bytes / 2**20, 'source': 'RSS'}


def random_batch(key: jax.Array, batch_size: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Fixed random inputs ``(batch_size, 784)`` and labels in ``0..9``, on the device."""
  x_key, y_key = jax.random.split(key)
  x = jax.random.normal(x_key, (batch_size, NUM_FEATURES), jnp.float32).astype(dtype)
  y = jax.random.randint(y_key, (batch_size,), 0, NUM_CLASSES, jnp.int32)
  return x, y


def make_step(model: MLP, tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The jitted training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

  The params and the optimizer state are donated.
  """

  def step(params, opt_state, x, y):
    loss_fn = lambda q: jnp.mean(cross_entropy(model.apply({'params': q}, x), y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
  """Compiles ``jitted`` for ``args``; returns the executable and the seconds it took."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


class Trainer:
  """One method's compiled step, carrying its own params and optimizer state."""

  def __init__(self, compiled: Any, params: Any, opt_state: Any, batch: tuple[Any, Any]):
    """Starts from ``params`` and ``opt_state`` (donated by the first step)."""
    self._compiled, self._batch = compiled, batch
    self._carry = (params, opt_state)
    self.loss: Any = math.nan  # the last step's loss, left on the device

  def __call__(self) -> None:
    """Runs one step and waits for it."""
    params, opt_state, loss = jax.block_until_ready(self._compiled(*self._carry, *self._batch))
    self._carry, self.loss = (params, opt_state), loss


def time_interleaved(
  runs: Mapping[str, Callable[[], None]], *, rounds: int, warmup: int
) -> dict[str, list[float]]:
  """Times the runs round-robin, after ``warmup`` untimed calls of each.

  Args:
    runs: Callables that each run one blocking computation, by name.
    rounds: Timed calls of each.
    warmup: Untimed calls of each first.

  Returns:
    The seconds of every timed call, by name.
  """
  for _ in range(warmup):
    for run in runs.values():
      run()
  names = list(runs)
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)  # rotate the order: no run always goes first
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
  return times


def setup(config: BenchConfig, dtype: Any) -> tuple[MLP, Any, tuple[jax.Array, jax.Array]]:
  """The network, its balanced initial params and a fixed random batch, in ``dtype``."""
  model = MLP(config.hidden, NUM_CLASSES)
  params_key, data_key = jax.random.split(jax.random.key(0))
  params = init_params(model, params_key, (NUM_FEATURES,))
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  return model, params, random_batch(data_key, config.batch_size, dtype)


def build_runs(
  model: MLP, params: Any, batch: tuple[jax.Array, jax.Array]
) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
  """Compiles every method's step and the transformation alone.

  Returns:
    ``(runs, compile_seconds)``, both by name (the methods, then :data:`SCALES`).
  """
  runs, seconds = {}, {}
  for name in BASELINES:
    tx = _optimizer(name)
    own = jax.tree.map(jnp.copy, params)  # donated buffers must not be shared
    opt_state = tx.init(own)
    compiled, seconds[name] = compile_timed(make_step(model, tx), own, opt_state, *batch)
    runs[name] = Trainer(compiled, own, opt_state, batch)
  normalize = optax_path.path_normalize(2.0)
  # After one update, as in training: init's state knows no scale (the exact passes).
  _, state = normalize.update(params, normalize.init(params), params)
  scales, seconds[SCALES] = compile_timed(jax.jit(normalize.update), params, state, params)
  runs[SCALES] = lambda: jax.block_until_ready(scales(params, state, params))
  return runs, seconds


def summarize(times: Sequence[float]) -> dict[str, Any]:
  """Median (ms) and all the timings (ms) of one run."""
  ms = [1e3 * t for t in times]
  return {'median_ms': statistics.median(ms), 'times_ms': ms}


def compare(
  timed: Mapping[str, Mapping[str, Any]], seconds: Mapping[str, float], runs: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
  """Each method's timings, with the ratio of its median to its plain optimizer's, and the
  quartiles of the round-by-round ratios (each step over the plain step of its round)."""
  methods = {}
  for name, baseline in BASELINES.items():
    median, base = timed[name]['median_ms'], timed[baseline]['median_ms']
    methods[name] = {
      'median_ms': median,
      'ratio': median / base,
      'round_ratio_quartiles': round_ratio_quartiles(
        timed[name]['times_ms'], timed[baseline]['times_ms']
      ),
      'baseline': baseline,
      'compile_s': seconds[name],
      'last_loss': float(runs[name].loss),
      'times_ms': timed[name]['times_ms'],
    }
  return methods


def round_ratio_quartiles(times: Sequence[float], baseline: Sequence[float]) -> list[float]:
  """The quartiles ``[q1, median, q3]`` of ``times[r] / baseline[r]`` over the rounds ``r``.

  Both were timed in the same round, so a slow drift of the machine cancels out; the
  spread says how far a ratio can be trusted.
  """
  ratios = [t / b for t, b in zip(times, baseline, strict=True)]
  if len(ratios) == 1:
    return ratios * 3
  return statistics.quantiles(ratios, n=4, method='inclusive')


def bench_config(config: BenchConfig, *, rounds: int, warmup: int, dtype: Any) -> dict:
  """Times one configuration: every step, the transformation alone, compile, memory."""
  model, params, batch = setup(config, dtype)
  runs, seconds = build_runs(model, params, batch)
  times = time_interleaved(runs, rounds=rounds, warmup=warmup)
  timed = {name: summarize(t) for name, t in times.items()}
  scales = {**timed[SCALES], 'compile_s': seconds[SCALES]}
  scales['ratio_to_sgd'] = scales['median_ms'] / timed['sgd']['median_ms']
  return {
    'name': config.name,
    'hidden': list(config.hidden),
    'batch_size': config.batch_size,
    'num_params': sum(a.size for a in jax.tree.leaves(params)),
    'methods': compare(timed, seconds, runs),
    'scales': scales,
    'memory': peak_memory(),
  }


def resolve(config: str | BenchConfig) -> BenchConfig:
  """A configuration from its name (see :data:`ALL_CONFIGS`), or itself."""
  return ALL_CONFIGS[config] if isinstance(config, str) else config


def run_bench(
  configs: Sequence[str | BenchConfig],
  *,
  rounds: int = 20,
  warmup: int = 3,
  dtype: str = 'float32',
  progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Runs the benchmark.

  Args:
    configs: Configurations, by name (see :data:`ALL_CONFIGS`) or as :class:`BenchConfig`.
    rounds: Timed steps of each method (interleaved, one per round).
    warmup: Untimed steps of each method first.
    dtype: ``"float32"`` or ``"bfloat16"``: the dtype of the params and the inputs.
    progress: Called with a line before and after each configuration (outside the timing).

  Returns:
    ``{"device", "options", "configs"}``: the device description
    (:func:`describe_device`), the options, and one dict per configuration (``methods``:
    ``median_ms``, ``ratio`` to the ``baseline``, ``round_ratio_quartiles``, ``compile_s``,
    ``times_ms``; ``scales``: ``median_ms``, ``ratio_to_sgd``, ``compile_s``; ``memory``:
    ``peak_mib``, ``source``).
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f'need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}')
  resolved = [resolve(c) for c in configs]
  results = []
  for i, c in enumerate(resolved, 1):
    net = f'784-{"-".join(map(str, c.hidden))}-10, batch {c.batch_size}'
    if progress:
      progress(f'[{i}/{len(resolved)}] {c.name} ({net}): {len(BASELINES)} methods ...')
    start = time.perf_counter()
    results.append(bench_config(c, rounds=rounds, warmup=warmup, dtype=DTYPES[dtype]))
    if progress:
      steps = ', '.join(
        f'{name} {m["median_ms"]:.3g} ms' for name, m in results[-1]['methods'].items()
      )
      seconds = time.perf_counter() - start
      progress(f'[{i}/{len(resolved)}] {c.name} done in {seconds:.0f} s: {steps}')
  return {
    'device': describe_device(),
    'options': {
      'configs': [c.name for c in resolved],
      'rounds': rounds,
      'warmup': warmup,
      'dtype': dtype,
    },
    'configs': results,
  }


def device_line(result: Mapping[str, Any]) -> str:
  """One line naming the device, the JAX versions and the options."""
  d, o = result['device'], result['options']
  where = f'{d["device_kind"]} ({d["platform"]}, {d["device_count"]} device(s)'
  if 'cpu_count' in d:
    where += f', {d["processor"]}, {d["cpu_count"]} CPUs'
  return (
    f'Device: {where}); jax {d["jax"]}, jaxlib {d["jaxlib"]}; {o["dtype"]}, '
    f'{o["rounds"]} interleaved rounds after {o["warmup"]} warm-up steps, medians.'
  )


def _table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
  """Markdown table lines; ``align`` has ``l`` or ``r`` per column."""
  rule = ['---' if a == 'l' else '---:' for a in align]
  return [f'| {" | ".join(r)} |' for r in (header, rule, *rows)]


def step_table(result: Mapping[str, Any]) -> list[str]:
  """The table of step times: a row per configuration and method."""
  rows = [
    [
      c['name'],
      name,
      f'{m["median_ms"]:.3f}',
      f'{m["ratio"]:.2f}',
      '{:.2f} to {:.2f}'.format(*m['round_ratio_quartiles'][::2]),
      f'{m["compile_s"]:.2f}',
    ]
    for c in result['configs']
    for name, m in c['methods'].items()
  ]
  header = [
    'config',
    'method',
    'step median (ms)',
    'ratio to plain',
    'round-by-round ratio, quartiles',
    'compile (s)',
  ]
  return _table(header, 'llrrrr', rows)


def scales_table(result: Mapping[str, Any]) -> list[str]:
  """The table of the transformation alone and the memory: a row per configuration."""
  rows = [
    [
      c['name'],
      f'{c["scales"]["median_ms"]:.3f}',
      f'{c["scales"]["ratio_to_sgd"]:.2f}',
      f'{c["memory"]["peak_mib"]:.0f} ({c["memory"]["source"]})',
    ]
    for c in result['configs']
  ]
  header = ['config', 'path_normalize alone (ms)', 'its / sgd step', 'peak memory (MiB)']
  return _table(header, 'lrrr', rows)


def format_markdown(result: Mapping[str, Any]) -> str:
  """The report: a line naming the device and versions, then the two tables."""
  note = (
    'Peak memory is the process peak so far (device peak_bytes_in_use, or peak RSS), '
    'read after each config.'
  )
  lines = [device_line(result), '', *step_table(result), '', *scales_table(result), '', note]
  return '\n'.join(lines) + '\n'


#: The files :func:`write_outputs` writes.
OUTPUT_FILES = ('bench.json', 'bench.md')


def write_outputs(result: Mapping[str, Any], out: str) -> None:
  """Writes ``out/bench.json`` (all numbers) and ``out/bench.md`` (the report), atomically."""
  from optax_path.experiments.report import atomic_open

  os.makedirs(out, exist_ok=True)
  with atomic_open(os.path.join(out, 'bench.json')) as f:
    json.dump(result, f, indent=2)
  with atomic_open(os.path.join(out, 'bench.md')) as f:
    f.write(format_markdown(result))
