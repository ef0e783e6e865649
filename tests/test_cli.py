"""User errors of the command line and of the general mode: short messages, exit 2.

Kept fast: tiny data, one epoch, small nets.
"""

from __future__ import annotations

import pytest

import optax_path


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'apply_fn': 'x', 'input_shape': '28'}, 'apply_fn must be'),
    ({'apply_fn': lambda q, x: x, 'input_shape': '28'}, 'input_shape must be'),
    ({'apply_fn': lambda q, x: x, 'input_shape': 28}, 'input_shape must be'),
  ],
)
def test_general_mode_arguments_checked_at_construction(kwargs, match):
  for build in (optax_path.path_normalize, lambda **kw: optax_path.path_sgd(0.1, **kw)):
    with pytest.raises(ValueError, match=match):
      build(**kwargs)
