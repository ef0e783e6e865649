"""Whether a traced ``apply_fn`` is a network that Path-SGD covers (the general mode).

Path scales are defined for networks built from linear maps and positively homogeneous
activations: every unit computes ``sigma(sum_u w_uv h_u + b_v)`` with ``sigma(c z) = c
sigma(z)`` for ``c > 0`` (Section 2 of the paper, and Gonon et al.'s DAG-ReLU networks).
Only then does rescaling a unit's incoming weights by ``c`` and its outgoing ones by
``1/c`` leave the function unchanged (Theorem 4.1), and only then is the ``|theta|^p``
pass a sum over paths. ``check`` reads the jaxpr of ``apply_fn`` and raises a
``ValueError`` that names the first primitive outside that class applied to values that
depend on the params or the input:

- nonlinear maps of such values (``rsqrt``, ``exp``, ``tanh``, ``erf``, ``logistic``,
  ``integer_pow``, ...): normalisation layers (LayerNorm, BatchNorm in training mode,
  RMSNorm, GroupNorm), weight normalisation, GELU, swish, sigmoid, softmax;
- a product (``mul``, ``dot_general``, ``conv_general_dilated``) of two values that both
  depend on the input (attention, gating, ``x * x``), or a division by a value that
  depends on the params or the input;
- a max or min with a constant other than 0 or infinity (a clip such as ``relu6``).

What is allowed: linear and structural primitives (sums, reshapes, slices, pads,
concatenations, gathers with constant indices, dtype casts, sharding annotations), a
product of an activation with a constant or a parameter (a diagonal layer), ReLU
(``max`` with 0), comparisons and ``select_n`` (``jnp.where(x > 0, x, a * x)``), max
pooling (see :mod:`~optax_path._src.positive_pass`), ``abs``. A BatchNorm that uses its
running averages is a fixed affine map, and so allowed.

References:
  Neyshabur, Salakhutdinov & Srebro, `Path-SGD <https://arxiv.org/abs/1506.02617>`_,
  NeurIPS 2015, Section 2 and Theorem 4.1. Gonon, Brisebarre, Riccietti & Gribonval,
  `A path-norm toolkit for modern networks <https://arxiv.org/abs/2310.01225>`_, ICLR 2024,
  Definition 2.2 (DAG-ReLU networks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.extend.core as jex_core
import numpy as np

from optax_path._src import positive_pass

#: Linear or structural in each operand: any operand may be an activation.
_LINEAR = frozenset({
  'add', 'add_any', 'sub', 'neg', 'abs', 'reduce_sum', 'reduce_window_sum', 'cumsum',
  'reshape', 'broadcast_in_dim', 'transpose', 'squeeze', 'expand_dims', 'concatenate',
  'split', 'slice', 'dynamic_slice', 'dynamic_update_slice', 'gather', 'scatter-add',
  'scatter_add', 'pad', 'rev', 'copy', 'copy_p', 'convert_element_type', 'select_n',
  'reduce_precision', 'sharding_constraint', 'mesh_cast', 'reshard', 'device_put',
  'psum', 'all_gather', 'optimization_barrier', 'stop_gradient',
  # maxima, rewritten as sums on the pass (positive_pass)
  'reduce_window_max', 'reduce_window_min', 'reduce_max', 'reduce_min', 'reduce_window',
})
#: Products: at most one operand may depend on the input.
_PRODUCTS = frozenset({'mul', 'dot_general', 'conv_general_dilated'})
#: Outputs that are not activations (a predicate, a sign): they only select.
_PREDICATES = frozenset({
  'gt', 'ge', 'lt', 'le', 'eq', 'ne', 'sign', 'is_finite', 'and', 'or', 'not', 'xor',
})
_ELEMENTWISE_MAX = frozenset({'max', 'min'})
#: Bodies of call-like primitives, checked as inlined.
_CALL_BODIES = ('jaxpr', 'call_jaxpr', 'fun_jaxpr', 'branches')

_POWERS = frozenset({'square', 'integer_pow', 'pow'})
_ROOTS = frozenset({'rsqrt', 'sqrt', 'cbrt'})


class _Flags:
  """Per variable: depends on the params or the input (``dep``), on the input (``inp``)."""

  def __init__(self) -> None:
    self.dep: dict[Any, bool] = {}
    self.inp: dict[Any, bool] = {}

  def of(self, atom: Any) -> tuple[bool, bool]:
    if isinstance(atom, jex_core.Literal):
      return False, False
    return self.dep.get(atom, False), self.inp.get(atom, False)


def check(closed_jaxpr: jex_core.ClosedJaxpr) -> None:
  """Raises ``ValueError`` if the traced ``apply_fn`` is outside Path-SGD's scope.

  Args:
    closed_jaxpr: ``jax.make_jaxpr`` of ``(q, x) -> sum(apply_fn(params(q), x))``: its
      last input is the network's input, the others are parameters.

  Raises:
    ValueError: naming the first primitive, in the order of the trace, that makes the
      network other than a ReLU network (see the module docstring), and what to do.
  """
  jaxpr = closed_jaxpr.jaxpr
  n = len(jaxpr.invars)
  consts = dict(zip(jaxpr.constvars, closed_jaxpr.consts))
  _check(jaxpr, [True] * n, [False] * (n - 1) + [True], consts)


def _check(jaxpr: jex_core.Jaxpr, dep: Sequence[bool], inp: Sequence[bool], consts) -> None:
  flags = _Flags()
  flags.dep.update(zip(jaxpr.invars, dep))
  flags.inp.update(zip(jaxpr.invars, inp))
  for eqn in jaxpr.eqns:
    operands = [flags.of(v) for v in eqn.invars]
    dep_in = [d for d, _ in operands]
    inp_in = [i for _, i in operands]
    if any(dep_in):
      _check_eqn(eqn, dep_in, inp_in, consts)
    predicate = eqn.primitive.name in _PREDICATES
    for v in eqn.outvars:
      flags.dep[v] = any(dep_in) and not predicate
      flags.inp[v] = any(inp_in) and not predicate


def _check_eqn(eqn: jex_core.JaxprEqn, dep: list[bool], inp: list[bool], consts) -> None:
  name = eqn.primitive.name
  bodies = [b for key in _CALL_BODIES for b in _as_list(eqn.params.get(key))]
  if bodies:
    for body in bodies:
      jaxpr, body_consts = (body.jaxpr, body.consts) if hasattr(body, 'consts') else (body, ())
      offset = len(eqn.invars) - len(jaxpr.invars)  # cond: the index operand comes first
      if offset >= 0:
        _check(jaxpr, dep[offset:], inp[offset:], dict(zip(jaxpr.constvars, body_consts)))
    return
  if name in positive_pass.SELECTS_BY_VALUE:
    raise ValueError(positive_pass.unsupported_message(eqn))
  if name in _LINEAR or name in _PREDICATES:
    return
  if name in _PRODUCTS and sum(inp) <= 1:
    return
  if name == 'div' and not dep[1]:
    return
  if name in _ELEMENTWISE_MAX and (all(dep) or _is_zero(eqn.invars[1 - dep.index(True)], consts)):
    return
  if name in ('while', 'scan') or any(_is_jaxpr(v) for v in eqn.params.values()):
    return  # loops: checked by the pass where it must rewrite them
  raise ValueError(_message(name, dep, inp))


def _as_list(value: Any) -> list[Any]:
  if value is None:
    return []
  return list(value) if isinstance(value, (tuple, list)) else [value]


def _is_jaxpr(value: Any) -> bool:
  return isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr))


def _is_zero(atom: Any, consts) -> bool:
  """Whether ``atom`` is known to be 0 or infinite (a literal or a closed-over
  constant): a max with it is ReLU or the identity. A constant computed inside the
  trace is not known and passes."""
  if isinstance(atom, jex_core.Literal):
    value = np.asarray(atom.val)
  elif atom in consts:
    value = np.asarray(consts[atom])
  else:
    return True
  return bool(np.all((value == 0) | np.isinf(value)))


def _message(name: str, dep: list[bool], inp: list[bool]) -> str:
  del inp
  if name in _PRODUCTS:
    what = 'a product of two activations (attention, gating, x * x)'
  elif name == 'div' and dep[1]:
    what = (
      'a division by an activation or a parameter (a normalisation layer: LayerNorm, '
      'BatchNorm in training mode, RMSNorm, GroupNorm; or weight normalisation)'
    )
  elif name in _ELEMENTWISE_MAX:
    what = 'a max or min with a constant other than 0 (a clip, such as relu6 or hard_tanh)'
  elif name in _POWERS:
    what = (
      'a power of activations (the variance of LayerNorm, BatchNorm in training mode, '
      "RMSNorm or GroupNorm; the x**3 of GELU's tanh form)"
    )
  elif name in _ROOTS:
    what = 'a root (a normalisation layer, or weight normalisation)'
  else:
    what = (
      'a nonlinearity that is not positively homogeneous (GELU, tanh, sigmoid, swish, '
      'softmax, ...)'
    )
  return (
    f'apply_fn applies {name} to values computed from the params or the input: {what}. '
    'Path-SGD is defined for ReLU networks (linear maps, ReLU or leaky ReLU, max and '
    'average pooling): only there does rescaling a unit leave the function unchanged '
    '(Theorem 4.1), so that path scales exist. Masking the leaves of such a layer does '
    'not help: the other layers still pass through it. Train this network with another '
    'optimizer, or give path_normalize the apply_fn of a ReLU network.'
  )
