"""Tests for the experiments command (optax_path.experiments): CLI, selection, training, report."""

from __future__ import annotations

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets

from optax_path.experiments import cli, data, report, selection, training
from optax_path.experiments.models import MLP, init_params

NAN = math.nan


def small_digits(num_train: int = 300, num_test: int = 100) -> data.Dataset:
  """A slice of scikit-learn's digits as a Dataset (no dependence on data.py's split)."""
  images, labels = sklearn.datasets.load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  labels = labels.astype(np.int32)
  end = num_train + num_test
  return data.Dataset(
    'digits',
    images[:num_train],
    labels[:num_train],
    images[num_train:end],
    labels[num_train:end],
    10,
  )


def parse(*argv: str) -> cli.Config:
  parser = cli.build_parser()
  return cli.make_config(parser.parse_args(['reproduce', *argv]), parser)


# ----------------------------------------------------------------------------------- CLI


def test_defaults():
  config = parse()
  assert config.dataset == 'digits'
  assert config.methods == ('path-sgd', 'sgd', 'adagrad')
  assert config.inits == ('balanced', 'unbalanced')
  assert config.batch_size == 100 and config.dropout == 0.0
  assert config.unbalanced_units == cli.default_unbalanced_units(config.hidden)
  assert config.learning_rates == {}
  assert config.out.endswith('digits')


def test_lr_option_is_repeatable():
  config = parse('--lr', 'path-sgd=0.1', '--lr', 'sgd=1e-2')
  assert config.learning_rates == {'path-sgd': 0.1, 'sgd': 0.01}


@pytest.mark.parametrize(
  'argv',
  [
    ['--lr', 'nesterov=0.1'],  # unknown method
    ['--lr', 'path-sgd:0.1'],  # no '='
    ['--lr', 'sgd=fast'],  # not a number
    ['--lr', 'sgd=-1'],  # not positive
    ['--methods', 'path-sgd', '--lr', 'sgd=0.1'],  # not among --methods
    ['--methods', 'rmsprop'],
    ['--inits', 'orthogonal'],
    ['--dataset', 'imagenet'],
    ['--dropout', '1.0'],
    ['--epochs', '0'],
  ],
)
def test_bad_options_exit(argv, capsys):
  with pytest.raises(SystemExit) as exc:
    parse(*argv)
  assert exc.value.code == 2
  assert 'error' in capsys.readouterr().err


def test_paper_preset_and_explicit_override():
  config = parse('--paper')
  assert config.hidden == (4000, 4000) and config.epochs == 100
  assert config.alphas == tuple(range(11)) and config.unbalanced_units == 2000
  config = parse('--paper', '--epochs', '3', '--hidden', '10')
  assert config.epochs == 3 and config.hidden == (10,)
  assert config.unbalanced_units == 2000


def test_default_out_separates_dropout_runs():
  assert parse('--dataset', 'mnist').out == 'runs/mnist'
  assert parse('--dataset', 'mnist', '--dropout', '0.5').out == 'runs/mnist-dropout0.5'
  assert parse('--out', 'x').out == 'x'


def test_unbalanced_units_scale_with_the_net():
  assert cli.default_unbalanced_units([4000, 4000]) == 2000
  assert cli.default_unbalanced_units([256, 256]) == 128
  assert cli.default_unbalanced_units([1]) == 1


def test_help_lists_the_methods(capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(['reproduce', '--help'])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  for name, method in training.METHODS.items():
    assert name in out and method.description in out


# ----------------------------------------------------------------------------- selection


def test_selection_prefers_lowest_error():
  a = selection.summarize(1, [0.9, 0.3, 0.2, 0.25])
  b = selection.summarize(2, [0.9, 0.5, 0.1, 0.1])
  assert (b.best_error, b.best_epoch, b.final_error) == (0.1, 2, 0.1)
  assert selection.choose([a, b]).alpha == 2


def test_selection_breaks_ties_by_earliest_epoch():
  slow = selection.summarize(3, [0.9, 0.5, 0.3, 0.1])
  fast = selection.summarize(1, [0.9, 0.1, 0.2, 0.2])
  assert selection.choose([slow, fast]).alpha == 1
  same_a = selection.summarize(1, [0.9, 0.1])
  same_b = selection.summarize(2, [0.9, 0.1])
  assert selection.choose([same_a, same_b]).alpha == 2  # then the smaller step


def test_diverged_runs_lose():
  nan_run = selection.summarize(0, [0.9, 0.01, NAN])  # best before it blew up
  inf_flag = selection.summarize(4, [0.9, 0.02], diverged=True)
  ok = selection.summarize(1, [0.9, 0.5, 0.4])
  assert nan_run.diverged and nan_run.best_error == 0.01 and math.isnan(nan_run.final_error)
  assert selection.choose([nan_run, inf_flag, ok]).alpha == 1
  all_nan = selection.summarize(2, [NAN, NAN])
  assert all_nan.diverged and all_nan.best_epoch == -1
  assert selection.choose([all_nan, nan_run]).alpha == 0  # all diverged: still a choice
  with pytest.raises(ValueError):
    selection.choose([])


def test_search_runs_every_alpha():
  curves = {0: ([0.9, NAN], True), 1: ([0.9, 0.2, 0.1], False), 2: ([0.9, 0.4, 0.3], False)}
  candidates, chosen = selection.search(lambda alpha: curves[alpha], [0, 1, 2])
  assert [c.alpha for c in candidates] == [0, 1, 2]
  assert chosen.alpha == 1 and chosen.learning_rate == pytest.approx(0.1)


def test_validation_split():
  assert selection.validation_size(60000) == 10000
  assert selection.validation_size(1437) == 287
  fit, val = selection.split_validation(1437, seed=0)
  assert len(val) == 287 and len(fit) == 1150
  assert len(np.union1d(fit, val)) == 1437


# ------------------------------------------------------------------------ model, training


@pytest.mark.slow
def test_balanced_init_and_dropout():
  model = MLP(hidden=(200, 100), num_classes=10, dropout_rate=0.5)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  assert list(params) == ['Dense_0', 'Dense_1', 'Dense_2']
  for layer in params.values():
    kernel = layer['kernel']
    assert float(jnp.std(kernel)) == pytest.approx(1 / math.sqrt(kernel.shape[0]), rel=0.1)
    assert not jnp.any(layer['bias'])
  apply = jax.jit(
    lambda x, train, key: model.apply({'params': params}, x, train=train, rngs={'dropout': key}),
    static_argnums=1,
  )
  x, key = jnp.ones((4, 8, 8, 1)), jax.random.key(1)
  assert jnp.array_equal(apply(x, False, key), apply(x, False, jax.random.key(2)))
  assert not jnp.allclose(apply(x, True, key), apply(x, False, key))


def test_epoch_batches_cover_every_example_once():
  examples = np.arange(1000, 1250)
  indices, mask = training.epoch_batches(np.random.default_rng(0), examples, 100)
  assert indices.shape == mask.shape == (3, 100)
  assert sorted(indices[mask == 1].tolist()) == examples.tolist()
  assert mask.sum() == 250


@pytest.fixture(scope='module')
def tiny():
  """A small net, its parameters and 200 training digits on the device."""
  ds = small_digits(200, 10)
  model = MLP((8,), 10)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  return model, params, training.to_device(ds.train_images, ds.train_labels)


@pytest.mark.slow
def test_evaluate_matches_a_direct_computation(tiny):
  model, params, data_ = tiny
  subset = np.arange(3, 140, 2)
  loss, error = training.make_evaluate(model, chunk=32)(params, data_, subset)
  logits = model.apply({'params': params}, data_.images[subset])
  labels = data_.labels[subset]
  assert loss == pytest.approx(float(training.cross_entropy(logits, labels).mean()), rel=1e-5)
  assert error == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) != labels)))


def test_diverging_run_stops_without_crashing(tiny):
  model, params, data_ = tiny
  tx = training.make_optimizer('sgd')
  train = np.arange(200)
  spec = training.RunSpec(
    training.make_train_epoch(model, tx),
    training.make_evaluate(model),
    data_,
    train,
    {'train': train},
    epochs=5,
    batch_size=50,
    seed=0,
  )
  history = training.train(spec, params, training.init_optimizer(tx, params, 1e30), progress=False)
  assert len(history) < 6
  assert training.is_diverged({k: history[-1][k] for k in ('train_loss', 'train_error')})
  assert math.isfinite(history[0]['train_loss'])


# ------------------------------------------------------------------------- end to end


def reproduce_on_small_digits(*argv: str) -> int:
  """``reproduce`` with ``argv``, on a small slice of digits instead of the loaded set."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data, 'load_dataset', lambda name, data_dir=None, **kw: small_digits())
    return cli.main(['reproduce', *argv])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('run')
  status = reproduce_on_small_digits(
    '--dataset',
    'digits',
    '--hidden',
    '16',
    '--epochs',
    '2',
    '--search-epochs',
    '2',
    '--alphas',
    '1',
    '2',
    '--seeds',
    '2',
    '--out',
    str(out),
    '--quiet',
    '--lr',
    'adagrad=0.05',
  )
  assert status == 0
  return out


def read_rows(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


@pytest.mark.slow
def test_end_to_end_writes_the_four_files(run_dir):
  for name in ('metrics.csv', 'selection.csv', 'figure.png', 'summary.md'):
    assert (run_dir / name).stat().st_size > 0


@pytest.mark.slow
def test_metrics_csv(run_dir):
  header, *rows = read_rows(run_dir / 'metrics.csv')
  assert header == [
    'dataset',
    'method',
    'init',
    'dropout',
    'seed',
    'learning_rate',
    'epoch',
    'train_loss',
    'train_error',
    'test_error',
    'seconds',
  ]
  assert len(rows) == 2 * 3 * 2 * 3  # seeds x methods x inits x epochs 0..2
  metrics = report.read_csv(run_dir / 'metrics.csv')
  assert {r['seed'] for r in metrics} == {0, 1}
  assert {r['method'] for r in metrics} == {'path-sgd', 'sgd', 'adagrad'}
  assert {r['init'] for r in metrics} == {'balanced', 'unbalanced'}
  assert sorted({r['epoch'] for r in metrics}) == [0, 1, 2]
  for rows in report.group(metrics, ('method',)).values():
    assert len({r['learning_rate'] for r in rows}) == 1  # chosen on balanced, used for both
  assert {r['learning_rate'] for r in metrics if r['method'] == 'adagrad'} == {0.05}


@pytest.mark.slow
def test_selection_csv(run_dir):
  rows = report.read_csv(run_dir / 'selection.csv')
  assert {r['method'] for r in rows} == {'path-sgd', 'sgd'}  # adagrad's step: --lr
  assert {r['seed'] for r in rows} == {0}  # searched on the first seed
  for method_rows in report.group(rows, ('method',)).values():
    assert sum(r['chosen'] for r in method_rows) == 1
    alphas = sorted(r['alpha'] for r in method_rows)
    assert {1, 2} <= set(alphas) and alphas == list(range(int(alphas[0]), int(alphas[-1]) + 1))
    assert all(r['extended'] == (r['alpha'] not in (1, 2)) for r in method_rows)
    chosen = next(r['alpha'] for r in method_rows if r['chosen'])
    assert alphas[0] < chosen < alphas[-1] or chosen == 0  # interior, or the paper's limit


@pytest.mark.slow
def test_seeds_draw_their_own_init_and_batches(run_dir):
  metrics = report.read_csv(run_dir / 'metrics.csv')
  runs = report.group(metrics, ('method', 'init', 'seed'))
  for method in ('path-sgd', 'sgd'):
    a = [r['train_loss'] for r in runs[(method, 'balanced', 0)]]
    b = [r['train_loss'] for r in runs[(method, 'balanced', 1)]]
    assert a[0] != b[0] and a[-1] != b[-1]  # different init, different training


@pytest.mark.slow
def test_path_sgd_curves_agree_across_inits(run_dir):
  diff = report.path_sgd_agreement(report.read_csv(run_dir / 'metrics.csv'))
  assert max(diff.values()) < report.AGREEMENT_TOLERANCE
  assert 'agree' in (run_dir / 'summary.md').read_text()


# --------------------------------------------------------------------------- report


def synthetic_rows(dataset='digits', dropout=0.0, diverge=False, seed=0):
  rows = []
  for method, init in [
    ('path-sgd', 'balanced'),
    ('path-sgd', 'unbalanced'),
    ('sgd', 'balanced'),
    ('sgd', 'unbalanced'),
  ]:
    for epoch in range(4):
      bad = diverge and method == 'sgd' and init == 'unbalanced' and epoch == 3
      err = 0.5 / (epoch + 1)
      rows.append(
        {
          'dataset': dataset,
          'method': method,
          'init': init,
          'dropout': dropout,
          'seed': seed,
          'learning_rate': 0.1,
          'epoch': epoch,
          'train_loss': NAN if bad else 2 * err,
          'train_error': NAN if bad else err,
          'test_error': NAN if bad else err + 0.01,
          'seconds': float(epoch),
        }
      )
  return rows


def test_max_abs_difference_handles_nan_and_length():
  a = [{'epoch': 0, 'x': 1.0}, {'epoch': 1, 'x': NAN}]
  assert report.max_abs_difference(a, a, ['x']) == {'x': 0.0}
  b = [{'epoch': 0, 'x': 1.5}, {'epoch': 1, 'x': 2.0}]
  assert report.max_abs_difference(a, b, ['x']) == {'x': math.inf}
  assert report.max_abs_difference(a, a[:1], ['x']) == {'x': math.inf}


def test_summary_marks_divergence_and_target():
  text = report.summary_markdown(synthetic_rows(diverge=True))
  assert '| sgd | unbalanced |' in text and '| 1/1 (epoch 3) |' in text
  assert '1.1 x the lowest mean final test error' in text
  assert 'agree' in text


def test_plot_command_combines_runs(tmp_path):
  for name, dataset, dropout in [('a', 'digits', 0.0), ('b', 'mnist', 0.5)]:
    (tmp_path / name).mkdir()
    report.write_csv(
      tmp_path / name / 'metrics.csv',
      report.METRIC_COLUMNS,
      synthetic_rows(dataset, dropout, diverge=True),
    )
  out, summary = tmp_path / 'fig.png', tmp_path / 'all.md'
  assert (
    cli.main(
      [
        'plot',
        str(tmp_path / 'a'),
        str(tmp_path / 'b'),
        '--out',
        str(out),
        '--summary',
        str(summary),
      ]
    )
    == 0
  )
  assert out.stat().st_size > 0
  text = summary.read_text()
  assert '## digits' in text and '## mnist, dropout 0.5' in text


def test_csv_round_trip_keeps_nan_and_precision(tmp_path):
  rows = synthetic_rows(diverge=True)
  report.write_csv(tmp_path / 'm.csv', report.METRIC_COLUMNS, rows)
  back = report.read_csv(tmp_path / 'm.csv')
  assert len(back) == len(rows)
  for r, b in zip(rows, back):
    for k in report.METRIC_COLUMNS:
      assert r[k] == b[k] or (isinstance(r[k], float) and math.isnan(r[k]) and math.isnan(b[k]))


# ------------------------------------------------------------------ the CNN (general mode)


@pytest.mark.slow
def test_unbalance_channels_keeps_the_function_and_the_path_norm():
  import optax_path
  from optax_path.experiments.models import CNN, path_mode, unbalance_channels

  model = CNN((4, 8), 10, (8, 8, 1))
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))['params']
  unbalanced = unbalance_channels(jax.random.key(1), params, 6)
  x = jax.random.normal(jax.random.key(2), (5, 64))
  a, b = model.apply({'params': params}, x), model.apply({'params': unbalanced}, x)
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 1e-5

  def largest_factor(skewed):
    ratios = [jnp.abs(skewed[k]['kernel'] / params[k]['kernel']) for k in ('Conv_0', 'Conv_1')]
    return max(float(jnp.max(r)) for r in ratios)

  assert 1.5 < largest_factor(unbalanced) < 1e4  # the authors' 10 exp(z), picked a few times
  stressed = unbalance_channels(jax.random.key(1), params, 6, scheme='stress')
  assert largest_factor(stressed) > 10 * largest_factor(unbalanced)
  mode = path_mode(model, 64)
  np.testing.assert_allclose(
    optax_path.log_path_norm(unbalanced, **mode),
    optax_path.log_path_norm(params, **mode),
    rtol=1e-5,
  )
  capped = unbalance_channels(jax.random.key(1), params, 200, max_decades=2.0)
  assert float(jnp.max(jnp.abs(capped['Conv_0']['bias']))) == 0.0  # zero biases stay zero
  assert float(
    jnp.max(jnp.abs(capped['Conv_0']['kernel']) / jnp.abs(params['Conv_0']['kernel']))
  ) <= 100.0 * (1 + 1e-5)


@pytest.mark.slow
def test_cnn_end_to_end_path_sgd_curves_agree(tmp_path):
  status = reproduce_on_small_digits(
    '--model',
    'cnn',
    '--hidden',
    '4',
    '8',
    '--epochs',
    '2',
    '--search-epochs',
    '1',
    '--alphas',
    '1',
    '--methods',
    'path-sgd',
    'path-adam',
    'sgd',
    '--out',
    str(tmp_path),
    '--quiet',
  )
  assert status == 0
  for name in ('metrics.csv', 'selection.csv', 'figure.png', 'summary.md'):
    assert (tmp_path / name).stat().st_size > 0
  metrics = report.read_csv(tmp_path / 'metrics.csv')
  assert len(metrics) == 3 * 2 * 3
  for method in ('path-sgd', 'path-adam'):
    by_init = {
      init: [r['train_loss'] for r in metrics if r['method'] == method and r['init'] == init]
      for init in ('balanced', 'unbalanced')
    }
    np.testing.assert_allclose(by_init['balanced'], by_init['unbalanced'], rtol=1e-6)
  assert 'ReLU CNN' in (tmp_path / 'summary.md').read_text()


# ------------------------------------------------------------------------ seeds, spreads


def test_seeds_option():
  assert parse().seeds == (0,)
  assert parse('--seeds', '3').seeds == (0, 1, 2)
  assert parse('--seeds', '3', '--seed', '10').seeds == (10, 11, 12)
  assert parse('--seeds', '4', '7').seeds == (4, 7)


@pytest.mark.parametrize('argv', [['--seeds', '0'], ['--seeds', '1', '1']])
def test_bad_seeds_exit(argv, capsys):
  with pytest.raises(SystemExit):
    parse(*argv)
  assert '--seeds' in capsys.readouterr().err


def test_spread_matches_the_statistics_module():
  import statistics

  values = [0.031, 0.027, 0.035, NAN]
  finite = values[:3]
  mean, std = statistics.mean(finite), statistics.stdev(finite)
  expected = f'{mean:.2%} ± {100 * std:.2f} ({100 * min(finite):.2f}..{100 * max(finite):.2f})'
  assert report.spread(values) == expected


def test_summary_over_seeds():
  rows = []
  for seed, shift in enumerate([0.0, 0.02, 0.04]):
    for r in synthetic_rows(diverge=seed == 2, seed=seed):
      rows.append({**r, 'test_error': r['test_error'] + shift})
  lines, target = report.run_table(rows)
  by_key = {tuple(line.split(' | ')[:2]): line for line in lines[2:]}
  finals = [0.125 + 0.01 + s for s in (0.0, 0.02, 0.04)]  # epoch 3: 0.5 / 4 + 0.01
  assert by_key[('| sgd', 'balanced')].split(' | ')[4] == report.spread(finals)
  # sgd unbalanced: seed 2 diverged at epoch 3; left out of the means, counted.
  line = by_key[('| sgd', 'unbalanced')]
  assert line.split(' | ')[4] == report.spread(finals[:2])
  assert line.split(' | ')[5] == report.spread([0.125 + 0.01 + s for s in (0.0, 0.02)])
  assert line.endswith('| 1/3 (epoch 3) |')
  assert target == pytest.approx(1.1 * np.mean(finals[:2]))


def test_seed_curves_and_divergence():
  rows = synthetic_rows(diverge=True) + synthetic_rows(seed=1)
  run = [r for r in rows if r['method'] == 'sgd' and r['init'] == 'unbalanced']
  epochs, values = report.seed_curves(run, 'test_error')
  assert epochs.tolist() == [0, 1, 2, 3] and values.shape == (2, 4)
  assert np.isnan(values[0, 3]) and np.isfinite(values[1]).all()
  diverged = [report.run_stats(r).diverged_at for r in report.group(run, ('seed',)).values()]
  assert diverged == [3, None]


def test_grid_extension_goes_to_an_interior_choice_or_the_limit():
  # Validation error falls with the step size up to 10^-5, then rises.
  def run(alpha):
    return [0.9, 0.1 + 0.01 * abs(alpha - 5)], False

  candidates, chosen = selection.search(run, [1, 2, 3])
  assert [c.alpha for c in candidates] == [1, 2, 3, 4, 5, 6] and chosen.alpha == 5
  assert [c.extended for c in candidates] == [False] * 3 + [True] * 3
  # The best step is larger than the grid's: extends down to the paper's limit 0.
  candidates, chosen = selection.search(lambda a: ([0.9, 0.1 + 0.01 * a], False), [2, 3])
  assert [c.alpha for c in candidates] == [0, 1, 2, 3] and chosen.alpha == 0
  # Interior: nothing added; and no extension with limits=None.
  assert len(selection.search(run, [4, 5, 6])[0]) == 3
  assert len(selection.search(run, [1, 2, 3], limits=None)[0]) == 3
  # Half steps extend by the grid's spacing.
  assert selection.search(run, [4, 4.5])[1].alpha == 5


def test_writes_are_atomic(tmp_path):
  path = tmp_path / 'm.csv'
  report.write_csv(path, report.METRIC_COLUMNS, synthetic_rows())
  before = path.read_text()
  def failing_rows():
    yield from synthetic_rows()[:3]
    raise RuntimeError('interrupted')

  with pytest.raises(RuntimeError):
    report.write_csv(path, report.METRIC_COLUMNS, failing_rows())
  assert path.read_text() == before  # the failed write left the old file
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m.csv']  # no temporary left


def test_plot_labels_every_method_of_every_run(tmp_path, capsys):
  a = synthetic_rows(diverge=True)
  b = [{**r, 'method': 'adagrad', 'dataset': 'mnist'} for r in synthetic_rows(seed=1)]
  for name, rows in (('a', a), ('b', b)):
    (tmp_path / name).mkdir()
    report.write_csv(tmp_path / name / 'metrics.csv', report.METRIC_COLUMNS, rows)
  out = tmp_path / 'fig.png'
  assert cli.main(['plot', str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', str(out)]) == 0
  assert f'Wrote {out}' in capsys.readouterr().out
  colors = report.method_colors(['path-sgd', 'sgd', 'adagrad'])
  labels = [h.get_label() for h in report._legend_handles(colors, a + b)]
  assert {'path-sgd', 'sgd', 'adagrad', 'diverged (NaN) here'} <= set(labels)


@pytest.mark.slow
def test_resume_runs_only_the_missing_seeds(tmp_path):
  common = ['--hidden', '8', '--epochs', '1', '--search-epochs', '1', '--alphas', '1', '--quiet']
  common += ['--methods', 'path-sgd', '--lr', 'path-sgd=0.1', '--out', str(tmp_path)]
  assert reproduce_on_small_digits(*common, '--seeds', '1') == 0
  first = report.read_csv(tmp_path / 'metrics.csv')
  assert reproduce_on_small_digits(*common, '--seeds', '2', '--resume') == 0
  both = report.read_csv(tmp_path / 'metrics.csv')
  assert both[: len(first)] == first  # seed 0 kept as it was (seconds included)
  assert sorted({r['seed'] for r in both}) == [0, 1] and len(both) == 2 * len(first)
  fresh = tmp_path / 'fresh'
  assert reproduce_on_small_digits(*common[:-1], str(fresh), '--seeds', '2') == 0
  again = report.read_csv(fresh / 'metrics.csv')
  for a, b in zip(again, both):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-12)  # same as one go
  assert reproduce_on_small_digits(*common, '--dropout', '0.5', '--resume') == 2  # other runs
  with pytest.raises(ValueError, match='resume'):
    reproduce_on_small_digits(*common, '--dropout', '0.5', '--resume', '--debug')


def test_train_size_takes_a_fixed_subset():
  from optax_path.experiments.pipeline import subsample_train

  ds = small_digits()
  a, b = subsample_train(ds, 50), subsample_train(ds, 50)
  assert a.train_images.shape == (50, 8, 8, 1) and np.array_equal(a.train_labels, b.train_labels)
  assert a.test_images.shape == ds.test_images.shape
  rows = {img.tobytes() for img in ds.train_images}
  assert all(img.tobytes() in rows for img in a.train_images)  # drawn from the training set
  assert subsample_train(ds, None) is ds
  with pytest.raises(ValueError, match='train-size'):
    subsample_train(ds, 301)
