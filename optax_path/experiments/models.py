"""The networks of the experiments: the paper's fully connected ReLU net (an MLP), and a
small ReLU CNN for the general mode.

Section 5 of the paper trains feed-forward nets with two hidden layers of 4000 ReLU
units, from the *balanced* initialisation: the incoming weights of every unit are
i.i.d. ``N(0, 1/fan_in)`` and the biases are zero. With dropout, every hidden unit is
retained with probability ``1 - dropout_rate`` at each update step.

The MLP's parameters have Flax's dense-layer layout (``Dense_0``, ``Dense_1``, ...;
kernels ``(in, out)``), which :func:`optax_path.path_sgd` reads by itself. The CNN's
path scales come from the general mode (:func:`path_mode`), and its unbalanced
initialisation rescales channels (:func:`unbalance_channels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_path._src.rescaling import UNBALANCE_SCHEMES

#: The paper's balanced init: ``N(0, 1/fan_in)`` (untruncated) incoming weights.
balanced_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')


class MLP(nn.Module):
  """ReLU multilayer perceptron with dropout on the hidden units.

  Attributes:
    hidden: Widths of the hidden layers, from the input side.
    num_classes: Number of outputs (logits).
    dropout_rate: Probability of dropping a hidden unit during training (the
      paper's retain probability is ``1 - dropout_rate``); ``0`` disables dropout.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = MLP(hidden=(8, 8), num_classes=3, dropout_rate=0.0)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    >>> sorted(params), params["Dense_0"]["kernel"].shape
    (['Dense_0', 'Dense_1', 'Dense_2'], (16, 8))
    >>> model.apply({"params": params}, jnp.ones((2, 16))).shape
    (2, 3)
  """

  hidden: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Computes the logits.

    Args:
      x: A batch of inputs, ``(batch, ...)``; flattened to ``(batch, features)``.
      train: Whether to apply dropout (then a ``"dropout"`` RNG is needed).

    Returns:
      The logits, ``(batch, num_classes)``.
    """
    x = jnp.reshape(x, (x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(dense(width)(x))
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.num_classes)(x)


class CNN(nn.Module):
  """ReLU convolutional net: 3x3 convolutions, each followed by 2x2 average pooling.

  Every hidden conv layer is ``Conv(3x3, SAME) -> ReLU -> [dropout] -> avg_pool(2x2)``,
  then a dense layer gives the logits; the init is the balanced one (``N(0, 1/fan_in)``,
  zero biases). Inputs come flattened, as for the MLP, and are reshaped to images.

  Attributes:
    channels: Output channels of the conv layers, from the input side.
    num_classes: Number of outputs (logits).
    image_shape: ``(height, width, channels)`` of one input.
    dropout_rate: Probability of dropping a hidden unit during training.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = CNN(channels=(4, 8), num_classes=3, image_shape=(8, 8, 1))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    >>> sorted(params), params["Conv_1"]["kernel"].shape, params["Dense_0"]["kernel"].shape
    (['Conv_0', 'Conv_1', 'Dense_0'], (3, 3, 4, 8), (32, 3))
  """

  channels: Sequence[int]
  num_classes: int
  image_shape: tuple[int, int, int]
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Computes the logits of a batch ``(batch, features)`` or ``(batch, *image_shape)``."""
    x = jnp.reshape(x, (x.shape[0], *self.image_shape))
    for channels in self.channels:
      conv = nn.Conv(
        channels,
        (3, 3),
        padding='SAME',
        kernel_init=balanced_kernel_init,
        bias_init=nn.initializers.zeros,
      )
      x = nn.relu(conv(x))
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    return dense(self.num_classes)(jnp.reshape(x, (x.shape[0], -1)))


def make_model(
  kind: str, hidden: Sequence[int], num_classes: int, dropout: float, image_shape
) -> nn.Module:
  """The ``--model`` network: ``"mlp"`` (hidden widths) or ``"cnn"`` (conv channels)."""
  if kind == 'mlp':
    return MLP(tuple(hidden), num_classes, dropout)
  return CNN(tuple(hidden), num_classes, tuple(image_shape), dropout)


def path_mode(model: nn.Module, num_features: int) -> dict[str, Any]:
  """Keyword arguments that tell :mod:`optax_path` how to find the path scales.

  None for the MLP (its dense layers are found in its params); the general mode's
  ``apply_fn`` and ``input_shape`` for the CNN.
  """
  if isinstance(model, MLP):
    return {}
  return {
    'apply_fn': lambda params, x: model.apply({'params': params}, x),
    'input_shape': (num_features,),
  }


def unbalance_channels(
  key: jax.Array,
  params: dict,
  num_units: int,
  max_decades: float | None = None,
  scheme: str = 'authors',
) -> dict:
  """The paper's unbalanced init for the CNN: channels instead of units.

  Picks ``num_units`` hidden channels uniformly with replacement over all conv layers
  and rescales each by the factor of :func:`optax_path.unbalance` (``scheme='authors'``:
  ``10 exp(z)``; ``'stress'``: ``10^exp(z)``, ``z ~ N(0, 1)``): its kernel slice and bias
  times the factor, the next layer's input channel (the next conv kernel's, or the dense
  kernel's rows of that channel) divided by it. The function is kept.

  Args:
    key: PRNG key.
    params: CNN params (``Conv_0``, ``Conv_1``, ..., ``Dense_0``).
    num_units: How many channels to pick.
    max_decades: Optional cap on a channel's total ``log10`` factor (keep the weights
      inside the float range, e.g. 30 in float32).
    scheme: ``'authors'`` or ``'stress'``.

  Returns:
    The unbalanced params.
  """
  convs = sorted((k for k in params if k.startswith('Conv_')), key=lambda k: int(k[5:]))
  widths = [params[k]['kernel'].shape[-1] for k in convs]
  pick_key, decade_key = jax.random.split(key)
  picks = jax.random.randint(pick_key, (num_units,), 0, sum(widths))
  log10_factors = UNBALANCE_SCHEMES[scheme](jax.random.normal(decade_key, (num_units,)))
  decades = jax.ops.segment_sum(log10_factors, picks, num_segments=sum(widths))
  if max_decades is not None:
    decades = jnp.minimum(decades, max_decades)
  params = dict(params)
  start = 0
  for l, (name, width) in enumerate(zip(convs, widths)):
    half = (10.0 ** (decades[start : start + width] / 2)).astype(params[name]['kernel'].dtype)
    start += width
    following = convs[l + 1] if l + 1 < len(convs) else 'Dense_0'
    for factor in (half, half):
      params[name] = {
        'kernel': params[name]['kernel'] * factor,
        'bias': params[name]['bias'] * factor,
      }
      params[following] = {
        **params[following],
        'kernel': _divide_input_channels(params[following]['kernel'], factor),
      }
  return params


def _divide_input_channels(kernel: jax.Array, factor: jax.Array) -> jax.Array:
  """Divides a conv kernel's input channels, or a dense kernel's rows of each channel."""
  if kernel.ndim == 4:
    return kernel / factor[:, None]
  positions = kernel.shape[0] // factor.shape[0]
  channel_last = kernel.reshape(positions, factor.shape[0], -1) / factor[:, None]
  return channel_last.reshape(kernel.shape)


def dense(features: int) -> nn.Dense:
  """A dense layer with the balanced initialisation (zero bias).

  Args:
    features: Number of output units.

  Returns:
    The (unbound) Flax layer.
  """
  return nn.Dense(features, kernel_init=balanced_kernel_init, bias_init=nn.initializers.zeros)


def init_params(model: MLP, key: jax.Array, input_shape: Sequence[int]) -> dict:
  """Draws the balanced initial parameters.

  Args:
    model: The network.
    key: PRNG key.
    input_shape: Shape of one example (without the batch axis).

  Returns:
    The ``params`` collection.
  """
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  return jax.jit(model.init)(key, dummy)['params']
