"""Tests for ``optax-path bench``: one quick run, checked for complete, consistent outputs.

No timing is asserted beyond being positive and finite: machines are noisy.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics

import pytest

from optax_path.experiments import bench
from optax_path.experiments.cli import main


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  """The outputs of one ``bench --quick --out DIR``: ``(json, markdown, stdout)``."""
  out = tmp_path_factory.mktemp('bench')
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert main(['bench', '--quick', '--out', str(out)]) == 0
  result = json.loads((out / 'bench.json').read_text())
  return result, (out / 'bench.md').read_text(), stdout.getvalue()


@pytest.mark.slow
def test_every_method_of_every_quick_config(quick_run):
  result, _, _ = quick_run
  assert [c['name'] for c in result['configs']] == list(bench.QUICK_CONFIGS)
  for config in result['configs']:
    assert set(config['methods']) == set(bench.BASELINES)


@pytest.mark.slow
def test_medians_positive_finite_and_ratios_consistent(quick_run):
  result, _, _ = quick_run
  rounds = result['options']['rounds']
  for config in result['configs']:
    methods = config['methods']
    for m in methods.values():
      assert 0 < m['median_ms'] < math.inf and len(m['times_ms']) == rounds
      assert m['compile_s'] > 0
      base = methods[m['baseline']]['median_ms']
      assert m['ratio'] == pytest.approx(m['median_ms'] / base, rel=1e-12)
      rounds_ratios = [t / b for t, b in zip(m['times_ms'], methods[m['baseline']]['times_ms'])]
      q1, q2, q3 = m['round_ratio_quartiles']
      assert q1 <= q2 <= q3 and q2 == pytest.approx(statistics.median(rounds_ratios), rel=1e-12)
      assert min(rounds_ratios) <= q1 and q3 <= max(rounds_ratios)
    assert methods['sgd']['ratio'] == methods['adagrad']['ratio'] == 1.0
    scales = config['scales']
    assert 0 < scales['median_ms'] < math.inf
    sgd = methods['sgd']['median_ms']
    assert scales['ratio_to_sgd'] == pytest.approx(scales['median_ms'] / sgd, rel=1e-12)
    assert config['memory']['peak_mib'] > 0 and config['memory']['source'] in ('device', 'RSS')


@pytest.mark.slow
def test_device_and_options_recorded(quick_run):
  result, _, _ = quick_run
  assert {'device_kind', 'platform', 'device_count', 'jax', 'jaxlib'} <= set(result['device'])
  assert result['options']['dtype'] == 'float32'
  assert result['options']['command']['quick'] is True


@pytest.mark.slow
def test_markdown_written_and_printed(quick_run):
  result, markdown, printed = quick_run
  assert printed == markdown == bench.format_markdown(result)
  assert markdown.startswith('Device: ') and result['device']['jax'] in markdown
  for name in (*bench.BASELINES, *bench.QUICK_CONFIGS):
    assert f'| {name} |' in markdown
