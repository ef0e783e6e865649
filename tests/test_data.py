"""Tests for optax_path.experiments.data, using tiny files in the real formats (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pathlib
import pickle
import shutil
import tarfile
import urllib.error

import numpy as np
import pytest
import scipy.io

from optax_path.experiments import data

DEBIAN_FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')


# --------------------------------------------------------------------------- file writers


def write_idx(path: pathlib.Path, array: np.ndarray, code: int = 0x08) -> pathlib.Path:
  """Writes ``array`` as an IDX file (gzipped if ``path`` ends in .gz)."""
  dtype = {0x08: '>u1', 0x0B: '>i2', 0x0D: '>f4'}[code]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  raw = header + np.asarray(array, dtype).tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(raw) if path.suffix == '.gz' else raw)
  return path


def mnist_arrays(n_train: int = 3, n_test: int = 2) -> dict[str, np.ndarray]:
  """Small uint8 images with a position-dependent pattern, and their labels."""
  rng = np.random.default_rng(0)
  return {
    'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    'train-labels-idx1-ubyte': np.arange(n_train, dtype=np.uint8) % 10,
    't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    't10k-labels-idx1-ubyte': (9 - np.arange(n_test, dtype=np.uint8)) % 10,
  }


def write_mnist(directory: pathlib.Path, gz: bool) -> dict[str, np.ndarray]:
  arrays = mnist_arrays()
  for stem, array in arrays.items():
    write_idx(directory / (stem + ('.gz' if gz else '')), array)
  return arrays


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int, bytes_keys: bool):
  """Returns (pickle-able batch dict, HWC images, labels) for ``n`` rows."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, num_classes, n)]
  rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CHW rows, as in the official files
  batch = {'data': rows, label_key: labels, 'batch_label': 'test'}
  if bytes_keys:  # the official files are Python 2 pickles with byte-string keys
    batch = {k.encode(): v for k, v in batch.items()}
  return batch, images, np.asarray(labels)


def write_cifar(folder: pathlib.Path, name: str) -> tuple[np.ndarray, ...]:
  """Writes all batch files of a tiny CIFAR data set; returns x/y train/test."""
  spec = data._CIFAR[name]
  folder.mkdir(parents=True, exist_ok=True)
  out: dict[str, list] = {'train': [], 'test': []}
  for offset, (split, files) in enumerate((('train', spec.train), ('test', spec.test))):
    for i, filename in enumerate(files):
      n, seed = 2 + i, 100 * offset + i
      batch, x, y = cifar_batch(n, spec.label_key, spec.num_classes, seed, i % 2 == 0)
      (folder / filename).write_bytes(pickle.dumps(batch, protocol=2))
      out[split].append((x, y))
  return tuple(
    np.concatenate([pair[k] for pair in out[split]]) for split in ('train', 'test') for k in (0, 1)
  )


def write_svhn(path: pathlib.Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
  y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 is digit 0
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, {'X': x, 'y': y})
  return x, y


def check_images(images: np.ndarray, shape: tuple[int, ...]) -> None:
  assert images.shape == shape
  assert images.dtype == np.float32
  assert images.flags.c_contiguous
  assert 0.0 <= images.min() and images.max() <= 1.0


@pytest.fixture(autouse=True)
def no_system_dirs(monkeypatch):
  """Hides /usr/share/datasets so tests do not depend on installed packages."""
  monkeypatch.setattr(data, '_SYSTEM_DIRS', {})


@pytest.fixture
def no_network(monkeypatch):
  def fail(url, dest, md5):
    raise urllib.error.URLError('no network in tests')

  monkeypatch.setattr(data, '_download', fail)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize('suffix', ['', '.gz'])
@pytest.mark.parametrize(
  ('code', 'dtype'), [(0x08, np.uint8), (0x0B, np.int16), (0x0D, np.float32)]
)
def test_read_idx_round_trip(tmp_path, suffix, code, dtype):
  array = (np.arange(24).reshape(2, 3, 4) * 7 - 20).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 9
  out = data.read_idx(write_idx(tmp_path / f'x-idx3{suffix}', array, code))
  assert out.shape == (2, 3, 4)
  assert out.dtype == np.dtype(dtype) and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
  ('raw', 'match'),
  [
    (b'\x08\x03\x00\x00' + b'\x00' * 12, 'magic'),
    (b'\x00\x00\x07\x01\x00\x00\x00\x01\x00', 'magic'),
    (b'', 'magic'),
    (b'\x00\x00\x08\x03\x00\x00', 'header'),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5]) + b'\x01\x02\x03', 'size mismatch'),
    (bytes([0, 0, 8, 1, 0, 0, 0, 2]) + b'\x01\x02\x03', 'size mismatch'),
  ],
)
def test_corrupt_idx_raises_naming_file(tmp_path, raw, match):
  path = tmp_path / 'bad-idx1-ubyte'
  path.write_bytes(raw)
  with pytest.raises(ValueError, match=match) as info:
    data.read_idx(path)
  assert str(path) in str(info.value)


def test_corrupt_gzip_raises_value_error(tmp_path):
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(b'not a gzip file at all')
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz'):
    data.read_idx(path)


@pytest.mark.parametrize(('gz', 'in_subdir'), [(True, True), (False, True), (False, False)])
def test_mnist_loads(tmp_path, gz, in_subdir):
  arrays = write_mnist(tmp_path / 'mnist' if in_subdir else tmp_path, gz)
  ds = data.load_dataset('mnist', tmp_path, download=False)
  assert ds.name == 'mnist' and ds.num_classes == 10
  check_images(ds.train_images, (3, 28, 28, 1))
  check_images(ds.test_images, (2, 28, 28, 1))
  np.testing.assert_allclose(
    ds.train_images[..., 0] * 255, arrays['train-images-idx3-ubyte'], atol=1e-4
  )
  np.testing.assert_allclose(
    ds.test_images[1, 5, 17, 0], arrays['t10k-images-idx3-ubyte'][1, 5, 17] / 255
  )
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_labels, [0, 1, 2])
  np.testing.assert_array_equal(ds.test_labels, [9, 8])


def test_mnist_full_pixel_range(tmp_path):
  arrays = mnist_arrays()
  arrays['train-images-idx3-ubyte'][0, 0, 0] = 255
  arrays['train-images-idx3-ubyte'][0, 0, 1] = 0
  for stem, array in arrays.items():
    write_idx(tmp_path / stem, array)
  ds = data.load_dataset('mnist', tmp_path, download=False)
  assert ds.train_images[0, 0, 0, 0] == 1.0 and ds.train_images[0, 0, 1, 0] == 0.0


def test_mnist_corrupt_file_raises_value_error(tmp_path):
  write_mnist(tmp_path / 'mnist', gz=False)
  bad = tmp_path / 'mnist' / 't10k-images-idx3-ubyte'
  bad.write_bytes(bad.read_bytes()[:-10])
  with pytest.raises(ValueError, match='t10k-images-idx3-ubyte'):
    data.load_dataset('mnist', tmp_path, download=False)


def test_mnist_label_count_mismatch(tmp_path):
  write_mnist(tmp_path, gz=False)
  write_idx(tmp_path / 'train-labels-idx1-ubyte', np.zeros(5, np.uint8))
  with pytest.raises(ValueError, match='train-labels-idx1-ubyte'):
    data.load_dataset('mnist', tmp_path, download=False)


def test_fashion_mnist_from_system_dir(tmp_path, monkeypatch):
  system = tmp_path / 'usr-share'
  arrays = write_mnist(system, gz=True)
  monkeypatch.setattr(data, '_SYSTEM_DIRS', {'fashion_mnist': (system,)})
  ds = data.load_dataset('fashion_mnist', tmp_path / 'empty', download=False)
  assert ds.name == 'fashion_mnist'
  np.testing.assert_allclose(
    ds.test_images[..., 0] * 255, arrays['t10k-images-idx3-ubyte'], atol=1e-4
  )


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason='dataset-fashion-mnist not installed')
def test_debian_fashion_mnist(tmp_path, monkeypatch):
  monkeypatch.setattr(data, '_SYSTEM_DIRS', {'fashion_mnist': (DEBIAN_FASHION,)})
  ds = data.load_dataset('fashion_mnist', tmp_path, download=False)
  check_images(ds.train_images, (60000, 28, 28, 1))
  check_images(ds.test_images, (10000, 28, 28, 1))
  assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('in_subdir', [True, False])
def test_cifar_extracted_folder(tmp_path, name, in_subdir):
  spec = data._CIFAR[name]
  base = tmp_path / name if in_subdir else tmp_path
  x_tr, y_tr, x_te, y_te = write_cifar(base / spec.folder, name)
  ds = data.load_dataset(name, tmp_path, download=False)
  assert ds.num_classes == spec.num_classes
  check_images(ds.train_images, x_tr.shape)
  check_images(ds.test_images, x_te.shape)
  np.testing.assert_allclose(ds.train_images * 255, x_tr, atol=1e-4)
  np.testing.assert_allclose(ds.test_images * 255, x_te, atol=1e-4)
  np.testing.assert_array_equal(ds.train_labels, y_tr)
  np.testing.assert_array_equal(ds.test_labels, y_te)
  assert ds.train_labels.dtype == np.int32


def test_cifar_chw_to_hwc_known_pattern(tmp_path):
  """Channel c, row r, column k of the CHW row must land at [r, k, c]."""
  c, r, k = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing='ij')
  row = (c * 80 + r * 2 + k % 2).astype(np.uint8).reshape(1, 3072)  # CHW order
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  for filename in data._CIFAR['cifar10'].train + data._CIFAR['cifar10'].test:
    (folder / filename).write_bytes(pickle.dumps({b'data': row, b'labels': [3]}, protocol=2))
  ds = data.load_dataset('cifar10', tmp_path, download=False)
  img = ds.test_images[0] * 255
  assert img.shape == (32, 32, 3)
  for ch, rr, kk in [(0, 0, 0), (1, 0, 1), (2, 31, 30), (1, 17, 5)]:
    assert round(float(img[rr, kk, ch])) == ch * 80 + rr * 2 + kk % 2
  assert ds.test_labels.tolist() == [3]


def test_cifar_archive_is_extracted(tmp_path):
  source = tmp_path / 'source'
  x_tr, y_tr, x_te, y_te = write_cifar(source / 'cifar-100-python', 'cifar100')
  (source / 'cifar-100-python' / 'meta').write_bytes(b'ignored')
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  with tarfile.open(data_dir / 'cifar-100-python.tar.gz', 'w:gz') as tar:
    tar.add(source / 'cifar-100-python', arcname='cifar-100-python')
    evil = tarfile.TarInfo('../escaped.txt')
    evil.size = 3
    tar.addfile(evil, io.BytesIO(b'bad'))
  ds = data.load_dataset('cifar100', data_dir, download=False)
  assert (data_dir / 'cifar-100-python' / 'train').is_file()
  assert not (tmp_path / 'escaped.txt').exists()
  assert not list(data_dir.glob('.extract-*'))
  np.testing.assert_allclose(ds.train_images * 255, x_tr, atol=1e-4)
  np.testing.assert_allclose(ds.test_images * 255, x_te, atol=1e-4)
  np.testing.assert_array_equal(ds.train_labels, y_tr)
  np.testing.assert_array_equal(ds.test_labels, y_te)


def test_cifar_bad_batch_shape(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  write_cifar(folder, 'cifar10')
  bad = {'data': np.zeros((2, 3000), np.uint8), 'labels': [0, 1]}
  (folder / 'data_batch_3').write_bytes(pickle.dumps(bad))
  with pytest.raises(ValueError, match='data_batch_3'):
    data.load_dataset('cifar10', tmp_path, download=False)


# --------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize('in_subdir', [True, False])
def test_svhn(tmp_path, in_subdir):
  base = tmp_path / 'svhn' if in_subdir else tmp_path
  x_tr, y_tr = write_svhn(base / 'train_32x32.mat', 12, seed=1)
  x_te, _ = write_svhn(base / 'test_32x32.mat', 3, seed=2)
  ds = data.load_dataset('svhn', tmp_path, download=False)
  check_images(ds.train_images, (12, 32, 32, 3))
  check_images(ds.test_images, (3, 32, 32, 3))
  # X[r, c, ch, n] lands at images[n, r, c, ch].
  np.testing.assert_allclose(ds.train_images * 255, x_tr.transpose(3, 0, 1, 2), atol=1e-4)
  assert round(float(ds.test_images[2, 4, 30, 1] * 255)) == x_te[4, 30, 1, 2]
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_labels, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
  assert y_tr[9, 0] == 10 and ds.train_labels[9] == 0
  np.testing.assert_array_equal(ds.test_labels, [1, 2, 3])


# --------------------------------------------------------------------------- digits


def test_digits():
  ds = data.load_dataset('digits')
  assert ds.name == 'digits' and ds.num_classes == 10
  check_images(ds.train_images, (1437, 8, 8, 1))
  check_images(ds.test_images, (360, 8, 8, 1))
  assert ds.train_images.max() == 1.0
  assert ds.train_labels.dtype == np.int32
  assert set(ds.train_labels.tolist()) == set(range(10))
  counts = np.bincount(ds.test_labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified
  again = data.load_dataset('digits', '/nonexistent', download=False)
  for a, b in zip(ds[1:5], again[1:5]):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- missing files / download


@pytest.mark.parametrize('name', [n for n in data.DATASETS if n != 'digits'])
def test_download_false_error_lists_files(tmp_path, name):
  with pytest.raises(FileNotFoundError) as info:
    data.load_dataset(name, tmp_path, download=False)
  assert isinstance(info.value, data.DatasetNotFoundError)
  message = str(info.value)
  assert str(tmp_path / name) in message and 'download=False' in message
  for remote in data._REMOTES[name]:
    assert remote.filename in message and remote.url in message
  assert not (tmp_path / name).exists()


def test_offline_error_lists_files(tmp_path, no_network):
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_dataset('fashion_mnist', tmp_path)
  message = str(info.value)
  assert 'no network in tests' in message
  assert str(tmp_path / 'fashion_mnist') in message
  for stem in data._IDX_STEMS:
    assert f'{stem}.gz' in message
  assert 'fashion-mnist.s3-website.eu-central-1.amazonaws.com' in message
  assert 'dataset-fashion-mnist' in message
  assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_fetches_only_missing_files(tmp_path, monkeypatch):
  source = tmp_path / 'source'
  arrays = write_mnist(source, gz=True)
  write_idx(tmp_path / 'data' / 'mnist' / 't10k-labels-idx1-ubyte', arrays[data._IDX_STEMS[3]])
  calls = []

  def fake_download(url, dest, md5):
    calls.append((url, dest, md5))
    shutil.copy(source / dest.name, dest)

  monkeypatch.setattr(data, '_download', fake_download)
  ds = data.load_dataset('mnist', tmp_path / 'data')
  assert [c[1].name for c in calls] == [f'{s}.gz' for s in data._IDX_STEMS[:3]]
  for url, dest, md5 in calls:
    assert url == f'https://ossci-datasets.s3.amazonaws.com/mnist/{dest.name}'
    assert dest.parent == tmp_path / 'data' / 'mnist'
    assert md5 is not None and len(md5) == 32
  np.testing.assert_array_equal(ds.test_labels, [9, 8])


def test_download_verifies_md5(tmp_path):
  payload = b'some bytes' * 1000
  source = tmp_path / 'remote.bin'
  source.write_bytes(payload)
  dest_dir = tmp_path / 'dest'
  dest_dir.mkdir()
  good = hashlib.md5(payload).hexdigest()
  data._download(source.as_uri(), dest_dir / 'ok.bin', good)
  assert (dest_dir / 'ok.bin').read_bytes() == payload
  with pytest.raises(ValueError, match='MD5 mismatch'):
    data._download(source.as_uri(), dest_dir / 'bad.bin', '0' * 32)
  assert sorted(p.name for p in dest_dir.iterdir()) == ['ok.bin']  # no partial files


# --------------------------------------------------------------------------- misc


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('OPTAX_PATH_DATA', str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv('OPTAX_PATH_DATA')
  assert data.default_data_dir() == pathlib.Path.home() / '.cache' / 'optax_path'


def test_data_dir_defaults_to_env(monkeypatch, tmp_path):
  write_mnist(tmp_path / 'mnist', gz=True)
  monkeypatch.setenv('OPTAX_PATH_DATA', str(tmp_path))
  assert data.load_dataset('mnist', download=False).train_images.shape == (3, 28, 28, 1)


def test_unknown_name():
  with pytest.raises(ValueError, match='Unknown data set'):
    data.load_dataset('imagenet')
