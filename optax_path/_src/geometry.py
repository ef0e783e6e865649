"""Any Optax optimizer in the path geometry, rescaling-invariant."""

from __future__ import annotations

from typing import NamedTuple

import optax

from optax_path._src import general, numerics, scale_state, transform
from optax_path._src import layers as layers_lib
from optax_path._src import scales as scales_lib
from optax_path._src.transform import LayerSpecs


class PathGeometryState(NamedTuple):
  """State of ``path_geometry``.

  Attributes:
    inner_state: the wrapped optimizer's state.
    scales: the path scales per unit that warm-start the next update
      (``PathNormalizeState``; ``optax.EmptyState`` in the general mode).
  """

  inner_state: optax.OptState
  scales: optax.OptState


def path_geometry(
  inner: optax.GradientTransformation,
  p: float = 2.0,
  *,
  layers: LayerSpecs = None,
  apply_fn=None,
  input_shape=None,
) -> optax.GradientTransformation:
  """Runs ``inner`` in the path geometry: whitened gradients in, mapped-back steps out.

  Path-SGD is steepest descent in the metric ``diag(gamma)`` of the path scales. In
  the coordinates ``z = sqrt(gamma) * w`` that whiten it, the gradient is

  .. math::

    x_e = g_e / \\sqrt{\\gamma_p(w, e)},

  which a rescaling of the network leaves unchanged (an incoming edge of a unit
  rescaled by ``c`` has ``g / c`` over ``sqrt(gamma) / c``). Any optimizer fed ``x``
  therefore takes the same step ``s`` for rescaling-equivalent networks, and mapping it
  back, ``u_e = s_e / sqrt(gamma_p(w, e))``, scales the step like the weight: the
  whole method is rescaling invariant (Theorem 4.1 of the paper, for any ``inner``).
  With ``inner = optax.sgd(lr)`` this is Path-SGD exactly (with momentum both are
  invariant but not equal: here the whitened gradients are averaged, and the average
  is mapped back with the current scales); with ``optax.adagrad`` it is
  an invariant Path-AdaGrad, unlike the paper's chained ``path_adagrad``, whose
  accumulator divides away the factor ``c`` that the normalised gradients carry.

  The rule: ``inner`` must not read ``params`` (it is called with ``params=None``, so
  one that needs them fails loudly). Decoupled weight decay, for one, acts on the raw
  weights and would break the invariance; add ``path_norm(params) ** p`` to the loss
  instead, which is invariant.

  The scales are computed once per step from ``params`` as in ``path_normalize``
  (warm-started from the state, in the log domain), and both divisions are formed
  without forming the scales.

  Args:
    inner: any ``optax.GradientTransformation`` that does not read ``params``.
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]``.
    layers: optional layer key paths from input to output (MLP mode).
    apply_fn: a ReLU network's forward pass ``apply_fn(params, x)`` (general mode).
    input_shape: the shape of one input, without the batch axis (general mode).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state ``PathGeometryState``; its
    ``update`` requires ``params`` and passes extra keyword arguments (``value=`` for
    ``optax.contrib.reduce_on_plateau``) on to ``inner``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_path
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3))}, 'Dense_1': {'kernel': jnp.ones((3, 1))}}
    >>> tx = optax_path.path_geometry(optax.adagrad(0.1))   # invariant Path-AdaGrad
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep
    Neural Networks <https://arxiv.org/abs/1506.02617>`_, NeurIPS 2015, Section 4.
  """
  return _path_geometry(inner, p, layers, apply_fn, input_shape, eager_config=None)


def _path_geometry(inner, p, layers, apply_fn, input_shape, eager_config, eager_split=False):
  """``path_geometry``. Called eagerly, its update runs as one compiled computation
  (shared by equal ``eager_config``s); with ``eager_split``, its two divisions run
  compiled and ``inner`` as it runs alone, for an ``inner`` rebuilt with new arrays on
  every update (``optax.inject_hyperparams(path_adam)``), which would otherwise
  compile every update."""
  p = numerics.validate_p(p)
  scales_lib.check_mode(layers, apply_fn, input_shape)
  layers = layers_lib.normalize_layer_specs(layers)
  inner = optax.with_extra_args_support(inner)
  mode = {'layers': layers, 'apply_fn': apply_fn, 'input_shape': input_shape}

  def init_fn(params):
    if apply_fn is None:
      return PathGeometryState(inner.init(params), scale_state.init_state(params, layers))
    if not scale_state.is_placeholder(params):  # out of scope: refused at init
      general.check_network(params, apply_fn, input_shape)
    return PathGeometryState(inner.init(params), optax.EmptyState())

  def log_scale_leaves(params, scales):
    if apply_fn is not None:
      return scales_lib.log_scale_leaves(params, p, **mode)[2], scales
    return scale_state.refreshed_log_scales(params, p, layers, scales, refresh_every=1)

  def whiten(updates, params, scales):
    log_scales, scales = log_scale_leaves(params, scales)
    log_sqrt_scales = {i: tuple(t / 2 for t in terms) for i, terms in log_scales.items()}
    sqrt_scales = transform.split_scales(updates, log_sqrt_scales)  # once, for both divisions
    return transform.divide_by_split_scales(updates, sqrt_scales), sqrt_scales, scales

  def make_update(whiten, map_back):
    def update_fn(updates, state, params=None, **extra_args):
      if params is None:
        raise ValueError(
          'path_geometry requires the current value of parameters, to compute the path '
          'scales: call update(updates, state, params).'
        )
      transform.check_same_structure(updates, params)
      whitened, sqrt_scales, scales = whiten(updates, params, state.scales)
      step, inner_state = _inner_update(inner, whitened, state.inner_state, extra_args)
      return map_back(step, sqrt_scales), PathGeometryState(inner_state, scales)

    return update_fn

  config = ('path_geometry', p, layers) if apply_fn is None and isinstance(p, float) else None
  split_update = make_update(  # the divisions compiled, inner as it runs alone
    transform.compiled_when_eager(whiten, config),
    transform.compiled_when_eager(transform.divide_by_split_scales, 'map_back'),
  )
  if eager_split:
    return optax.GradientTransformationExtraArgs(init_fn, split_update)
  whole = make_update(whiten, transform.divide_by_split_scales)
  return optax.GradientTransformationExtraArgs(
    init_fn, transform.compiled_when_eager(whole, eager_config, other_args=split_update)
  )


INNER_READS_PARAMS_MSG = (
  'path_geometry calls inner.update with params=None, by design, and inner needs params. '
  "One that reads their values (optax.adamw's and add_decayed_weights' weight decay, "
  'lookahead, L-BFGS, ...) acts on the raw weights and breaks the rescaling invariance that '
  'path_geometry exists for. Use an inner that does not read params (optax.adam rather '
  'than optax.adamw) and regularise with lam * optax_path.path_norm(params) ** p in the '
  'loss, which is invariant; or chain the weight decay outside: optax.chain('
  'path_geometry(optax.adam(lr)), optax.add_decayed_weights(wd), ...) with its decay '
  'scaled by hand, accepting that it is not invariant. (One that reads only their shapes, '
  "as optax.adafactor's factored moments do, would keep the invariance, but cannot be told "
  'apart from the others.)'
)


def _inner_update(inner, whitened, inner_state, extra_args):
  """``inner.update`` without params; an inner that needs them is named for what it is."""
  try:
    return inner.update(whitened, inner_state, None, **extra_args)
  except ValueError as error:  # optax's own words, or a tree operation on params=None
    reads_none = 'pytree structure' in str(error) and 'NoneType' in str(error)
    if 'not passing `params`' not in str(error) and not reads_none:
      raise
    raise ValueError(INNER_READS_PARAMS_MSG) from error


def path_adam(
  learning_rate: optax.ScalarOrSchedule,
  p: float = 2.0,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  layers: LayerSpecs = None,
  apply_fn=None,
  input_shape=None,
) -> optax.GradientTransformation:
  """Path-Adam: ``path_geometry(optax.adam(...))``, Adam that is rescaling invariant.

  Adam's moments are taken of the whitened gradients ``g / sqrt(gamma)`` and its step
  is mapped back by ``1 / sqrt(gamma)``; see ``path_geometry``.

  Args:
    learning_rate: a step size or an optax schedule.
    p: the ``l_p`` path geometry, a number in ``[0.5, 32]``.
    b1: as in ``optax.adam``.
    b2: as in ``optax.adam``.
    eps: as in ``optax.adam``.
    layers: optional layer key paths from input to output.
    apply_fn: general mode: the network's forward pass (see ``path_normalize``).
    input_shape: general mode: the shape of one input, without the batch axis.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax_path
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3))}, 'Dense_1': {'kernel': jnp.ones((3, 1))}}
    >>> tx = optax_path.path_adam(1e-3)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015; Neyshabur et al., NeurIPS 2015.
  """
  inner = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  layers = layers_lib.normalize_layer_specs(layers)  # once: a generator is read once
  settings = (p, learning_rate, b1, b2, eps)
  if not transform.plain_settings(settings):  # a schedule, or injected
    return _path_geometry(inner, p, layers, apply_fn, input_shape, None, eager_split=True)
  config = None if apply_fn else ('path_adam', *settings, layers)
  return _path_geometry(inner, p, layers, apply_fn, input_shape, eager_config=config)
