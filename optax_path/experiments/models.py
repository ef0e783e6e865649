"""The network of the paper's experiments: a fully connected ReLU net (an MLP).

Section 5 of the paper trains feed-forward nets with two hidden layers of 4000 ReLU
units, from the *balanced* initialisation: the incoming weights of every unit are
i.i.d. ``N(0, 1/fan_in)`` and the biases are zero. With dropout, every hidden unit is
retained with probability ``1 - dropout_rate`` at each update step.

The parameters have Flax's dense-layer layout (``Dense_0``, ``Dense_1``, ...; kernels
``(in, out)``), which is what :func:`optax_path.path_sgd` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

#: The paper's balanced init: ``N(0, 1/fan_in)`` (untruncated) incoming weights.
balanced_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


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
    return jax.jit(model.init)(key, dummy)["params"]
