"""Image-classification data sets for the Path-SGD experiments.

Every loader returns a :class:`Dataset` of NumPy arrays: images of shape
``(N, H, W, C)`` as ``float32`` scaled to ``[0, 1]`` (no other normalisation)
and labels of shape ``(N,)`` as ``int32``.

Supported names (see :data:`DATASETS`):

* ``digits``: scikit-learn's bundled 8x8 digits, always available offline.
  There is no official split, so a fixed stratified split is used:
  ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``,
  giving 1437 training and 360 test examples.
* ``mnist`` and ``fashion_mnist``: the four IDX files
  (``train-images-idx3-ubyte`` ...), gzipped or not.
* ``cifar10`` and ``cifar100``: the "python version" pickled batches, either
  extracted or as the official ``.tar.gz`` archive (extracted on first use).
* ``svhn``: the cropped-digits ``train_32x32.mat`` and ``test_32x32.mat``.

Files are looked up in ``data_dir/<name>/`` and then directly in ``data_dir``
(for ``fashion_mnist`` also in ``/usr/share/datasets/fashion-mnist/``, where
Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files).
When they are missing and ``download=True`` they are fetched from the official
URLs into ``data_dir/<name>/`` and checked against their published MD5 sums.
If that fails, a :class:`DatasetNotFoundError` (a ``FileNotFoundError``) lists
which files to put in which directory and where to get them.

The CIFAR pickles are read with :mod:`pickle`, which can run arbitrary code:
only use files from a trusted source (downloads are checksum-verified).

Example:
    >>> ds = load_dataset("digits")
    >>> ds.train_images.shape, ds.test_images.shape, ds.num_classes
    ((1437, 8, 8, 1), (360, 8, 8, 1), 10)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import pathlib
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
  'DATASETS',
  'Dataset',
  'DatasetNotFoundError',
  'default_data_dir',
  'load_dataset',
  'read_idx',
]

DATASETS = ('digits', 'fashion_mnist', 'mnist', 'cifar10', 'cifar100', 'svhn')

ENV_VAR = 'OPTAX_PATH_DATA'
"""Environment variable overriding :func:`default_data_dir`."""

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20

# Extra read-only places searched before downloading (Debian's
# ``dataset-fashion-mnist`` installs the four ``*-ubyte.gz`` files here).
_SYSTEM_DIRS: dict[str, tuple[pathlib.Path, ...]] = {
  'fashion_mnist': (pathlib.Path('/usr/share/datasets/fashion-mnist'),),
}

_IDX_STEMS = (
  'train-images-idx3-ubyte',
  'train-labels-idx1-ubyte',
  't10k-images-idx3-ubyte',
  't10k-labels-idx1-ubyte',
)

# IDX element type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {
  0x08: np.dtype('>u1'),
  0x09: np.dtype('>i1'),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}


class Dataset(NamedTuple):
  """An image-classification data set held in memory.

  Attributes:
      name: One of :data:`DATASETS`.
      train_images: ``(N, H, W, C)`` float32 array with values in ``[0, 1]``.
      train_labels: ``(N,)`` int32 array with values in ``[0, num_classes)``.
      test_images: ``(M, H, W, C)`` float32 array with values in ``[0, 1]``.
      test_labels: ``(M,)`` int32 array.
      num_classes: Number of classes.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


class DatasetNotFoundError(FileNotFoundError):
  """The data files are missing and could not be downloaded."""


class _Remote(NamedTuple):
  """A file that can be downloaded: its name, URL and MD5 (None: unchecked)."""

  filename: str
  url: str
  md5: str | None


def _idx_remotes(base: str, md5s: Sequence[str]) -> tuple[_Remote, ...]:
  """Builds the download list for the four gzipped IDX files under ``base``."""
  return tuple(
    _Remote(f'{stem}.gz', f'{base}{stem}.gz', md5) for stem, md5 in zip(_IDX_STEMS, md5s)
  )


# MD5 sums as published (MNIST / Fashion-MNIST: as in torchvision's sources).
_REMOTES: dict[str, tuple[_Remote, ...]] = {
  'mnist': _idx_remotes(
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
    (
      'f68b3c2dcbeaaa9fbdd348bbdeb94873',
      'd53e105ee54ea40749a09fcbcd1e9432',
      '9fb629c4189551a2d022fa330f9573f3',
      'ec29112dd5afa0611ce80d1b7f02629c',
    ),
  ),
  'fashion_mnist': _idx_remotes(
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    (
      '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
      '25c81989df183df01b3e8a0aad5dffbe',
      'bef4ecab320f06d8554ea6380940ec79',
      'bb300cfdad3c16e7a12a480ee83cd310',
    ),
  ),
  'cifar10': (
    _Remote(
      'cifar-10-python.tar.gz',
      'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
      'c58f30108f718f92721af3b95e74349a',
    ),
  ),
  'cifar100': (
    _Remote(
      'cifar-100-python.tar.gz',
      'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
      'eb9058c3a382ffc7106e4002c42a8d85',
    ),
  ),
  'svhn': (
    _Remote(
      'train_32x32.mat',
      'http://ufldl.stanford.edu/housenumbers/train_32x32.mat',
      'e26dedcc434d2e4c54c9b2d4a06d8373',
    ),
    _Remote(
      'test_32x32.mat',
      'http://ufldl.stanford.edu/housenumbers/test_32x32.mat',
      'eb5a983be6a315427106f1b263e5eb2a',
    ),
  ),
}


class _Cifar(NamedTuple):
  """Layout of a CIFAR "python version" archive."""

  folder: str
  archive: str
  train: tuple[str, ...]
  test: tuple[str, ...]
  label_key: str
  num_classes: int


_CIFAR = {
  'cifar10': _Cifar(
    folder='cifar-10-batches-py',
    archive='cifar-10-python.tar.gz',
    train=tuple(f'data_batch_{i}' for i in range(1, 6)),
    test=('test_batch',),
    label_key='labels',
    num_classes=10,
  ),
  'cifar100': _Cifar(
    folder='cifar-100-python',
    archive='cifar-100-python.tar.gz',
    train=('train',),
    test=('test',),
    label_key='fine_labels',
    num_classes=100,
  ),
}

_SVHN_FILES = ('train_32x32.mat', 'test_32x32.mat')


# --------------------------------------------------------------------------- public API


def default_data_dir() -> pathlib.Path:
  """Returns the default data directory.

  Returns:
      ``$OPTAX_PATH_DATA`` if that environment variable is set and non-empty,
      else ``~/.cache/optax_path``.
  """
  env = os.environ.get(ENV_VAR)
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / '.cache' / 'optax_path'


def load_dataset(
  name: str,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  download: bool = True,
) -> Dataset:
  """Loads a data set, downloading it on first use if needed.

  Args:
      name: One of :data:`DATASETS`.
      data_dir: Directory holding the data (files in ``data_dir/<name>/`` or
          directly in ``data_dir``). Defaults to :func:`default_data_dir`.
          Ignored for ``digits``, which ships with scikit-learn.
      download: Whether to fetch missing files from the official URLs into
          ``data_dir/<name>/``.

  Returns:
      The data set, images as float32 in ``[0, 1]`` with shape ``(N, H, W, C)``.

  Raises:
      ValueError: If ``name`` is unknown or a data file is malformed.
      DatasetNotFoundError: If the files are missing and could not be
          downloaded (or ``download`` is False); the message lists which
          files to put where and their URLs.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown data set {name!r}; expected one of {DATASETS}.')
  if name == 'digits':
    return _load_digits()
  root = pathlib.Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
  locate, read = _BACKENDS[name]
  found = locate(name, _search_dirs(name, root))
  if found is None:
    _fetch(name, root, download)
    found = locate(name, [root / name])
    if found is None:
      raise DatasetNotFoundError(_missing_message(name, root, 'downloaded files are incomplete'))
  return read(name, found)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzipped or not.

  The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
  int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
  then each dimension as a big-endian uint32; big-endian data follows.

  Args:
      path: File to read; a ``.gz`` suffix means gzip-compressed.

  Returns:
      The array, in native byte order.

  Raises:
      ValueError: If the header is invalid or the data size does not match
          the dimensions (the message names the file).
  """
  path = pathlib.Path(path)
  try:
    raw = _read_bytes(path)
  except (OSError, EOFError) as exc:
    raise ValueError(f'Cannot read IDX file {path}: {exc}') from exc
  return _parse_idx(raw, path)


# --------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
  """Loads scikit-learn's 8x8 digits with a fixed stratified 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  images = (bunch.images.astype(np.float32) / np.float32(16.0))[..., None]
  labels = bunch.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  return Dataset('digits', x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------- IDX (MNIST)


def _read_bytes(path: pathlib.Path) -> bytes:
  """Returns the (decompressed) content of ``path``."""
  if path.suffix == '.gz':
    with gzip.open(path, 'rb') as f:
      return f.read()
  return path.read_bytes()


def _parse_idx(raw: bytes, path: pathlib.Path) -> np.ndarray:
  """Parses the bytes of an IDX file; ``path`` is only used in messages."""
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(
      f'Bad IDX magic number in {path}: {raw[:4].hex() or "empty file"} '
      '(expected 0000<type><ndim>).'
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'Truncated IDX header in {path}.')
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
      f'IDX size mismatch in {path}: header says shape {shape} '
      f'({expected} data bytes) but the file has {len(raw) - header}.'
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  """Returns ``directory/stem`` or ``directory/stem.gz``, whichever exists."""
  for candidate in (directory / stem, directory / f'{stem}.gz'):
    if candidate.is_file():
      return candidate
  return None


def _locate_idx(name: str, dirs: Sequence[pathlib.Path]) -> list[pathlib.Path] | None:
  """Returns the four IDX files from the first directory holding all of them."""
  del name
  for directory in dirs:
    found = [f for f in (_idx_file(directory, stem) for stem in _IDX_STEMS) if f]
    if len(found) == len(_IDX_STEMS):
      return found
  return None


def _read_idx_pair(
  images_path: pathlib.Path, labels_path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and cross-checks one split's image and label IDX files."""
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3:
    raise ValueError(f'Expected a 3-d image array in {images_path}, got {images.shape}.')
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
      f'Labels in {labels_path} have shape {labels.shape}, '
      f'expected ({images.shape[0]},) to match {images_path}.'
    )
  _check_labels(labels, 10, labels_path)
  return _to_unit(images[..., None]), labels.astype(np.int32)


def _read_mnist(name: str, files: list[pathlib.Path]) -> Dataset:
  """Builds a MNIST-style data set from the four located IDX files."""
  x_tr, y_tr = _read_idx_pair(files[0], files[1])
  x_te, y_te = _read_idx_pair(files[2], files[3])
  return Dataset(name, x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------- CIFAR


def _cifar_complete(folder: pathlib.Path, spec: _Cifar) -> bool:
  """Whether ``folder`` holds every batch file of ``spec``."""
  return all((folder / f).is_file() for f in spec.train + spec.test)


def _locate_cifar(name: str, dirs: Sequence[pathlib.Path]) -> pathlib.Path | None:
  """Returns the extracted batch folder, extracting the archive if needed."""
  spec = _CIFAR[name]
  for directory in dirs:
    if _cifar_complete(directory / spec.folder, spec):
      return directory / spec.folder
  for directory in dirs:
    archive = directory / spec.archive
    if archive.is_file():
      _extract_tar(archive, directory, spec.folder)
      if not _cifar_complete(directory / spec.folder, spec):
        raise ValueError(f'Archive {archive} does not contain the expected batches.')
      return directory / spec.folder
  return None


def _extract_tar(archive: pathlib.Path, directory: pathlib.Path, folder: str) -> None:
  """Extracts the files under ``folder/`` in ``archive`` into ``directory``.

  Members are unpacked into a temporary directory first and then moved into
  place one by one, so an interrupted extraction leaves no partial files.
  """
  with tempfile.TemporaryDirectory(dir=directory, prefix='.extract-') as tmp:
    try:
      with tarfile.open(archive, 'r:*') as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _safe_under(m.name, folder)]
        tar.extractall(tmp, members=members, **_TAR_FILTER)
    except (tarfile.TarError, OSError, EOFError) as exc:
      raise ValueError(f'Cannot extract archive {archive}: {exc}') from exc
    for member in members:
      dest = directory / member.name
      dest.parent.mkdir(parents=True, exist_ok=True)
      os.replace(pathlib.Path(tmp) / member.name, dest)


# ``filter="data"`` (Python >= 3.12, backported to 3.10.12 / 3.11.4) also refuses
# unsafe members; older versions rely on ``_safe_under`` and regular files only.
_TAR_FILTER: dict[str, Any] = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}


def _safe_under(member: str, folder: str) -> bool:
  """Whether a tar member name is a relative path inside ``folder``."""
  path = pathlib.PurePosixPath(member)
  return (
    not path.is_absolute()
    and '..' not in path.parts
    and len(path.parts) > 1
    and path.parts[0] == folder
  )


def _load_pickle(path: pathlib.Path) -> dict[str, Any]:
  """Unpickles a CIFAR batch, with keys as ``str`` (Python 2 pickles use bytes)."""
  try:
    with path.open('rb') as f:
      batch = pickle.load(f, encoding='latin1')
  except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
    raise ValueError(f'Cannot unpickle CIFAR batch {path}: {exc}') from exc
  if not isinstance(batch, dict):
    return {}  # reported as missing keys by the caller
  return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_cifar_batches(
  folder: pathlib.Path, files: Sequence[str], spec: _Cifar
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and concatenates CIFAR batches as HWC images and int32 labels."""
  images, labels = [], []
  for filename in files:
    path = folder / filename
    batch = _load_pickle(path)
    if 'data' not in batch or spec.label_key not in batch:
      raise ValueError(f"CIFAR batch {path} lacks 'data' or {spec.label_key!r}.")
    data = np.asarray(batch['data'], dtype=np.uint8)
    y = np.asarray(batch[spec.label_key]).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != y.shape[0]:
      raise ValueError(
        f'CIFAR batch {path}: data shape {data.shape} and {y.shape[0]} labels; '
        'expected (N, 3072) with N labels.'
      )
    _check_labels(y, spec.num_classes, path)
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(y.astype(np.int32))
  return _to_unit(np.concatenate(images)), np.concatenate(labels)


def _read_cifar(name: str, folder: pathlib.Path) -> Dataset:
  """Builds a CIFAR data set from its extracted batch folder."""
  spec = _CIFAR[name]
  x_tr, y_tr = _read_cifar_batches(folder, spec.train, spec)
  x_te, y_te = _read_cifar_batches(folder, spec.test, spec)
  return Dataset(name, x_tr, y_tr, x_te, y_te, spec.num_classes)


# --------------------------------------------------------------------------- SVHN


def _locate_svhn(name: str, dirs: Sequence[pathlib.Path]) -> list[pathlib.Path] | None:
  """Returns the two SVHN ``.mat`` files from the first directory holding both."""
  del name
  for directory in dirs:
    files = [directory / f for f in _SVHN_FILES]
    if all(f.is_file() for f in files):
      return files
  return None


def _read_svhn_mat(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads one SVHN ``.mat`` file; label 10 (digit 0) becomes 0."""
  import scipy.io

  try:
    mat = scipy.io.loadmat(path)
  except (ValueError, OSError, TypeError, NotImplementedError) as exc:
    raise ValueError(f'Cannot read SVHN file {path}: {exc}') from exc
  if 'X' not in mat or 'y' not in mat:
    raise ValueError(f"SVHN file {path} lacks the 'X' or 'y' variable.")
  x, y = np.asarray(mat['X']), np.asarray(mat['y']).reshape(-1)
  if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
    raise ValueError(
      f'SVHN file {path}: X shape {x.shape} with {y.shape[0]} labels; '
      'expected (32, 32, 3, N) with N labels.'
    )
  if y.size and (y.min() < 1 or y.max() > 10):
    raise ValueError(f'SVHN labels in {path} outside 1..10.')
  y = np.where(y == 10, 0, y).astype(np.int32)
  return _to_unit(np.moveaxis(x, 3, 0)), y


def _read_svhn(name: str, files: list[pathlib.Path]) -> Dataset:
  """Builds the SVHN data set from the train and test ``.mat`` files."""
  x_tr, y_tr = _read_svhn_mat(files[0])
  x_te, y_te = _read_svhn_mat(files[1])
  return Dataset(name, x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------- shared helpers


def _to_unit(images: np.ndarray) -> np.ndarray:
  """Converts uint8 pixels to contiguous float32 in ``[0, 1]``."""
  out = np.ascontiguousarray(images, dtype=np.float32)
  out /= np.float32(255.0)
  return out


def _check_labels(labels: np.ndarray, num_classes: int, path: pathlib.Path) -> None:
  """Raises ValueError naming ``path`` if a label is outside ``[0, num_classes)``."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f'Labels in {path} outside [0, {num_classes}): min {labels.min()}, max {labels.max()}.'
    )


def _search_dirs(name: str, root: pathlib.Path) -> list[pathlib.Path]:
  """Directories searched for ``name``, in order of preference."""
  return [root / name, root, *_SYSTEM_DIRS.get(name, ())]


_BACKENDS: dict[str, tuple[Callable[..., Any], Callable[..., Dataset]]] = {
  'mnist': (_locate_idx, _read_mnist),
  'fashion_mnist': (_locate_idx, _read_mnist),
  'cifar10': (_locate_cifar, _read_cifar),
  'cifar100': (_locate_cifar, _read_cifar),
  'svhn': (_locate_svhn, _read_svhn),
}


# --------------------------------------------------------------------------- download


def _fetch(name: str, root: pathlib.Path, download: bool) -> None:
  """Downloads the missing files of ``name`` into ``root/name``.

  Raises:
      DatasetNotFoundError: If ``download`` is False or any download fails.
  """
  if not download:
    raise DatasetNotFoundError(_missing_message(name, root, 'download=False'))
  target = root / name
  for remote in _REMOTES[name]:
    dest = target / remote.filename
    if dest.is_file() or (dest.suffix == '.gz' and dest.with_suffix('').is_file()):
      continue
    try:
      target.mkdir(parents=True, exist_ok=True)
      _download(remote.url, dest, remote.md5)
    except (OSError, ValueError, http.client.HTTPException) as exc:
      reason = f'downloading {remote.url} failed: {exc}'
      raise DatasetNotFoundError(_missing_message(name, root, reason)) from exc


def _download(url: str, dest: pathlib.Path, md5: str | None) -> None:
  """Downloads ``url`` to ``dest`` through a temp file, verifying the MD5.

  Raises:
      OSError: On network or file-system errors.
      ValueError: If the checksum does not match (nothing is left behind).
  """
  digest = hashlib.md5(usedforsecurity=False)
  fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
  tmp = pathlib.Path(tmp_name)
  try:
    with (
      os.fdopen(fd, 'wb') as out,
      urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
    ):
      for chunk in iter(lambda: response.read(_CHUNK), b''):
        digest.update(chunk)
        out.write(chunk)
    if md5 is not None and digest.hexdigest() != md5:
      raise ValueError(f'MD5 mismatch for {url}: got {digest.hexdigest()}, expected {md5}.')
    os.replace(tmp, dest)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()


def _missing_message(name: str, root: pathlib.Path, reason: str) -> str:
  """Explains which files to put where for data set ``name``."""
  target = root / name
  lines = [
    f'Data set {name!r} not found and not downloaded ({reason}).',
    f'Put these files in {target} (or directly in {root}):',
  ]
  lines += [f'  {r.filename}  from  {r.url}' for r in _REMOTES[name]]
  if name in ('mnist', 'fashion_mnist'):
    lines.append('The .gz files may also be stored decompressed (same names without .gz).')
  if name in _CIFAR:
    lines.append(f'The archive may also be stored extracted, as the folder {_CIFAR[name].folder}/.')
  if name == 'fashion_mnist':
    lines.append(
      'On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` provides them in '
      '/usr/share/datasets/fashion-mnist/.'
    )
  lines.append(f'Choose another directory with data_dir=... or the {ENV_VAR} variable.')
  return '\n'.join(lines)
