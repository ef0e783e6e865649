"""Time to the first training step: ``init``, then the first jitted step (compile and run).

Run from the repository root: ``python results/bench/compile/first_step.py [--src DIR]``.
Each (config, optimizer) runs in a fresh process, as a user's first step does, twice; the
faster of the two is reported. ``--src`` runs another checkout of optax-path (e.g. a
``git worktree`` of an older commit) for a before/after. Prints a markdown table.

``--cache DIR`` turns on JAX's persistent compilation cache in ``DIR`` (emptied first) and
reports the first run (the cache empty: it compiles and writes) and the second (a new
process that reads the compiled step back), as a notebook restarted or a script run again
would see them.

A step is the benchmark's (``optax_path.experiments.bench``): forward, backward,
transformation and ``apply_updates``, params and state donated. ``compile`` is
``lower`` plus ``compile`` of that step, on its own.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

CONFIGS = ('tiny', 'small', 'deep', 'paper')
OPTIMIZERS = ('sgd', 'path_sgd')


def measure(config: str, optimizer: str) -> dict:
  """One fresh process's timings (seconds)."""
  import jax
  import jax.numpy as jnp
  import optax

  import optax_path
  from optax_path.experiments import bench

  model, params, batch = bench.setup(bench.ALL_CONFIGS[config], jnp.float32)
  jax.block_until_ready((params, batch))
  tx = optax.sgd(0.1) if optimizer == 'sgd' else optax_path.path_sgd(0.1)
  start = time.perf_counter()
  state = jax.block_until_ready(tx.init(params))
  init = time.perf_counter() - start
  step = bench.make_step(model, tx)
  start = time.perf_counter()
  jax.block_until_ready(step(jax.tree.map(jnp.copy, params), state, *batch))
  first = time.perf_counter() - start
  state = tx.init(params)
  _, compile_s = bench.compile_timed(bench.make_step(model, tx), params, state, *batch)
  return {'init': init, 'first_step': first, 'compile': compile_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--src', default='.', help='checkout whose optax_path to time')
  parser.add_argument('--cache', help="JAX's persistent compilation cache in this folder")
  parser.add_argument('--configs', nargs='+', default=CONFIGS, choices=CONFIGS)
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(*args.child)))
    return
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(args.src)}
  rows = []
  for config in args.configs:
    for optimizer in OPTIMIZERS:
      runs = []
      if args.cache:
        cache = os.path.join(os.path.abspath(args.cache), f'{config}-{optimizer}')
        shutil.rmtree(cache, ignore_errors=True)
        env.update(
          JAX_COMPILATION_CACHE_DIR=cache,
          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
        )
      for _ in range(2):
        out = subprocess.run(
          [sys.executable, __file__, '--child', config, optimizer],
          env=env,
          capture_output=True,
          text=True,
          check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      best = {k: min(r[k] for r in runs) for k in runs[0]}
      rows.append((config, optimizer, runs if args.cache else best))
      print(config, optimizer, runs, file=sys.stderr, flush=True)
  if args.cache:
    print(
      '| config | optimizer | init + first step, cache empty (s) | the same, cache filled (s) |'
    )
    print('|---|---|---:|---:|')
    for config, optimizer, (cold, warm) in rows:
      print(
        f'| {config} | {optimizer} | {cold["init"] + cold["first_step"]:.2f} '
        f'| {warm["init"] + warm["first_step"]:.2f} |'
      )
    return
  print(
    '| config | optimizer | init (s) | first step (s) | init + first step (s) | step compile (s) |'
  )
  print('|---|---|---:|---:|---:|---:|')
  for config, optimizer, t in rows:
    total = t['init'] + t['first_step']
    print(
      f'| {config} | {optimizer} | {t["init"]:.2f} | {t["first_step"]:.2f} | {total:.2f} '
      f'| {t["compile"]:.2f} |'
    )


if __name__ == '__main__':
  main()
