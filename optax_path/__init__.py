"""optax-path: Path-SGD (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015) for Optax.

>>> import optax, optax_path
>>> tx = optax.chain(optax_path.path_normalize(p=2.0), optax.sgd(1e-2))  # Path-SGD
"""

from optax_path._src.layer_order import layer_order
from optax_path._src.geometry import PathGeometryState, path_adam, path_geometry
from optax_path._src.rescaling import rebalance, rescale, unbalance
from optax_path._src.scale_state import PathNormalizeState
from optax_path._src.scales import log_path_norm, path_norm, path_scales
from optax_path._src.transform import path_adagrad, path_normalize, path_sgd

__version__ = '0.1.0'

__all__ = (
  'PathGeometryState',
  'PathNormalizeState',
  'layer_order',
  'log_path_norm',
  'path_adagrad',
  'path_adam',
  'path_geometry',
  'path_norm',
  'path_normalize',
  'path_scales',
  'path_sgd',
  'rebalance',
  'rescale',
  'unbalance',
)
