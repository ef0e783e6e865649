"""optax-path: Path-SGD (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015) for Optax.

>>> import optax, optax_path
>>> tx = optax.chain(optax_path.path_normalize(p=2.0), optax.sgd(1e-2))  # Path-SGD

The names below are imported on first use (PEP 562), so that ``import optax_path`` does not
start JAX: the command line (:mod:`optax_path.experiments`) then answers Ctrl-C during JAX's
start-up with one line instead of a traceback from inside an import.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = '0.1.0'

#: Public name -> the module that defines it.
_PUBLIC = {
  'PathGeometryState': 'optax_path._src.geometry',
  'PathNormalizeState': 'optax_path._src.scale_state',
  'layer_order': 'optax_path._src.layer_order',
  'log_path_norm': 'optax_path._src.scales',
  'path_adagrad': 'optax_path._src.transform',
  'path_adam': 'optax_path._src.geometry',
  'path_geometry': 'optax_path._src.geometry',
  'path_norm': 'optax_path._src.scales',
  'path_normalize': 'optax_path._src.transform',
  'path_scales': 'optax_path._src.scales',
  'path_sgd': 'optax_path._src.transform',
  'rebalance': 'optax_path._src.rescaling',
  'rescale': 'optax_path._src.rescaling',
  'unbalance': 'optax_path._src.rescaling',
}

__all__ = tuple(_PUBLIC)


def __getattr__(name: str) -> object:
  if name not in _PUBLIC:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted([*__all__, '__version__'])


if TYPE_CHECKING:  # what type checkers and IDEs read
  from optax_path._src.geometry import PathGeometryState as PathGeometryState
  from optax_path._src.geometry import path_adam as path_adam
  from optax_path._src.geometry import path_geometry as path_geometry
  from optax_path._src.layer_order import layer_order as layer_order
  from optax_path._src.rescaling import rebalance as rebalance
  from optax_path._src.rescaling import rescale as rescale
  from optax_path._src.rescaling import unbalance as unbalance
  from optax_path._src.scale_state import PathNormalizeState as PathNormalizeState
  from optax_path._src.scales import log_path_norm as log_path_norm
  from optax_path._src.scales import path_norm as path_norm
  from optax_path._src.scales import path_scales as path_scales
  from optax_path._src.transform import path_adagrad as path_adagrad
  from optax_path._src.transform import path_normalize as path_normalize
  from optax_path._src.transform import path_sgd as path_sgd
