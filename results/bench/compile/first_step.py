"""Time to the first training step: ``init``, then the first jitted step (compile and run).

Run from the repository root: ``python results/bench/compile/first_step.py [--src DIR]``.
Each (config, optimizer) runs in a fresh process, as a user's first step does, twice; the
faster of the two is reported. ``--src`` runs another checkout of optax-path (e.g. a
``git worktree`` of an older commit) for a before/after. Prints a markdown table.

A step is the benchmark's (``optax_path.experiments.bench``): forward, backward,
transformation and ``apply_updates``, params and state donated. ``compile`` is
``lower`` plus ``compile`` of that step, on its own.
"""

import argparse
import json
import os
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
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(*args.child)))
    return
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(args.src)}
  rows = []
  for config in CONFIGS:
    for optimizer in OPTIMIZERS:
      runs = []
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
      rows.append((config, optimizer, best))
      print(config, optimizer, best, file=sys.stderr, flush=True)
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
