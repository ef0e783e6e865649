"""The general mode's ``|theta|^p`` pass: a jaxpr evaluated with every path counted.

On the pass, every parameter is ``q = |theta|^p`` and the input is all ones, so each
unit computes its ``gamma_in``: the sum over the paths into it of the products of their
``q`` (Algorithm 1 of the paper). A max pool does not sum over its window: it passes on
one member, so the paths through the others would be lost, and the weights used only by
losing units would get scale 0. Following Gonon et al. (their path-norm toolkit replaces
a max pool by a depthwise convolution of ones on this pass), a max pool is a unit with
an incoming edge of weight 1 from every member of its window:

.. math::

  \\max_{i \\in W} h_i \\;\\to\\; \\sum_{i \\in W} h_i .

``evaluate`` runs a traced ``apply_fn`` (its jaxpr) with these substitutions, where an
operand depends on the params or the input (an *activation*):

- ``reduce_window_max`` / ``reduce_window_min`` -> ``reduce_window_sum``, with the
  same window, strides, dilations and padding. The max pads with ``-inf`` (no unit);
  the sum pads with 0, which is no unit either. A generic ``reduce_window`` whose
  computation is one ``max`` or ``min`` likewise.
- ``reduce_max`` / ``reduce_min`` (``jnp.max`` over axes: global max pooling) ->
  ``reduce_sum`` over the same axes.
- ``max`` / ``min`` of two activations (an elementwise max of two branches) -> their
  sum; ``scatter-max`` / ``scatter-min`` (``jax.ops.segment_max``, ``.at[i].max``: a
  max pool over the neighbours of a fixed graph) -> ``scatter-add``, its constant
  operand (``-inf``, no unit; or 0) entering as 0. A max or min with a constant
  (``relu(x) = max(x, 0)``, ``min(x, 0) = -relu(-x)``, ``lax.clamp(0, x, inf)``) -> ``x``:
  on this pass every unit is ``>= 0``, ReLU is the identity, and its derivative must be 1
  also at 0 (a unit whose incoming weights are all 0 still passes on the paths into its
  outgoing edges' ``gamma_out``), where ``max`` has 0.5 and ``jax.nn.relu`` 0. For the
  same reason ``abs`` is the identity, and a comparison of an activation with 0 (a ReLU
  written ``jnp.where(h > 0, h, 0)`` or ``h * (h > 0)``) takes 0 as positive.
- A running max from ``-inf`` in a ``scan`` (a max over time): an infinite initial
  carry enters as 0, no unit.
- ``pad`` of an activation with ``-inf`` or ``+inf`` (a max or min pool's explicit
  padding, as in ``jnp.pad(h, ..., constant_values=-jnp.inf)``) -> pad with 0.

- ``stop_gradient`` -> the identity: the scales are a gradient of the pass, and eq. 9
  counts the paths through a weight in every use, also one the loss does not
  differentiate. For the same reason ``custom_jvp`` and ``custom_vjp`` functions are
  evaluated by their bodies, whose derivatives the pass's own are: the derivatives a
  user chose (a gradient reversal layer's ``-g``) are no paths'.
- ``jax.debug.print`` of activations: dropped.
- ``sub`` of activations -> ``add``, ``neg`` -> the identity, and in ``add``,
  ``sub``, ``mul``, ``div``, ``dot_general`` and ``conv_general_dilated`` with an
  activation, a constant operand -> its absolute value: a fixed weight ``c`` (an input
  normalisation ``(x - m) / s``, an average pool's ``1/k``, a negation) enters a path as
  ``|c|``, as a parameter enters as ``|theta|^p``, so no path cancels another and no
  ``gamma_in`` is negative. Likewise ``h.at[i].multiply(c)`` multiplies ``h`` by ``|c|``
  placed into ones.

An overflow of the pass must reach ``phi_p^p`` (which is then untrusted), never be
set to 0 on the way, leaving it finite without the paths it lost. So a test that only
tells finite values from ``inf`` and NaN (``jnp.isfinite(h)``, ``h == -jnp.inf``,
``jnp.isnan``, in ``jnp.nan_to_num``) takes its value at finite activations; another
comparison reads a NaN (``inf * 0``) as ``inf`` (and 0 as positive, above), so that
``jnp.where(h > 0, h, 0)`` passes it on; and ``h * 0`` is 0, as ``scope`` takes it.

Every substitution is linear and keeps each channel within itself, so the pass stays
invariant to the rescalings of Theorem 4.1: a window lies in one channel, scaled by one
``c^p``, and a max of two activations is positively homogeneous only if both scale
alike. Other primitives are bound as traced. Calls (``jit``, ``remat``,
``closed_call``) are inlined where their body holds a substitution, and otherwise bound
as they are; ``custom_jvp_call`` and ``custom_vjp_call`` are always inlined (above).
``cond`` branches and ``scan`` bodies are rewritten (a carry is an activation if its
initial value is, or if the body makes it one in some round), and so is a
``shard_map``'s body, mapped over the same mesh and specs (collectives bound as
they are). Out of scope, raising ``ValueError`` that names the primitive: ``argmax``,
``argmin``, ``sort``, ``top_k``, ``cummax``, ``cummin`` and cross-device maxima of
activations, which select units by value and have no path form; and a substitution
inside ``while``.

References:
  Gonon, Brisebarre, Riccietti & Gribonval, `A path-norm toolkit for modern networks:
  consequences, promises and challenges <https://arxiv.org/abs/2310.01225>`_, ICLR 2024,
  and their code, https://github.com/agonon/pathnorm-pytorch (``pathnorm.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax import lax

_WINDOW_MAX = frozenset({'reduce_window_max', 'reduce_window_min'})
_REDUCE_MAX = frozenset({'reduce_max', 'reduce_min'})
_ELEMENTWISE_MAX = frozenset({'max', 'min'})
SCATTER_MAXIMA = frozenset({'scatter-max', 'scatter-min'})  # segment_max, .at[i].max
COMPARISONS = frozenset({'eq', 'ne', 'gt', 'ge', 'lt', 'le'})
SELECTS_BY_VALUE = frozenset(
  {'argmax', 'argmin', 'sort', 'top_k', 'approx_top_k', 'cummax', 'cummin', 'pmax', 'pmin'}
)
#: Print or call back on the host, returning nothing: dropped from the pass.
DEBUG_OUTPUT = frozenset({'debug_print', 'debug_callback'})
#: Linear in each operand: on the pass, a constant operand enters as its absolute value.
_WEIGHTED = frozenset({'add', 'add_any', 'mul', 'div', 'dot_general', 'conv_general_dilated'})
#: Primitives that place, add or subtract entries: which operands are data (the rest,
#: indices).
PLACING = {
  'scatter': (0, 2),
  'scatter-add': (0, 2),
  'scatter_add': (0, 2),
  'scatter-sub': (0, 2),
  'dynamic_update_slice': (0, 1),
}
#: Scatters, whose ``update_jaxpr`` is the combining op of entries, no body of the network's.
SCATTERS = frozenset({'scatter', 'scatter-add', 'scatter_add', 'scatter-sub', 'scatter-mul'})
_CALLS = {  # call-like primitives: the parameter holding the body, which takes all invars
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'checkpoint': 'jaxpr',
  'custom_jvp_call': 'call_jaxpr',
  'custom_vjp_call': 'call_jaxpr',
  'custom_vjp_call_jaxpr': 'fun_jaxpr',
  'composite': 'jaxpr',
}


def call_body(eqn: jex_core.JaxprEqn) -> jex_core.Jaxpr | None:
  """The body of a call-like equation (``jit``, ``custom_jvp_call``, ``checkpoint``,
  ``shard_map``, ...) whose inputs and outputs are the equation's, else ``None``."""
  name = eqn.primitive.name
  key = 'jaxpr' if name == 'shard_map' else _CALLS.get(name)
  if key not in eqn.params:
    return None
  body, _ = _open(eqn.params[key])
  same = len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars)
  return body if same else None


def evaluate(jaxpr: jex_core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
  """``jaxpr`` applied to ``consts`` and ``args``, with every path through a max counted.

  Args:
    jaxpr: a traced function (``jax.make_jaxpr(f)(...).jaxpr``); its inputs, not its
      constants, are the activations' sources (the params and the input of the pass).
    consts: values for its ``constvars``, concrete or traced.
    *args: values for its ``invars``, concrete or traced (the pass may be
      differentiated and jitted).

  Returns:
    The outputs, as ``jax.core.eval_jaxpr`` would give them with the substitutions of
    the module docstring.

  Raises:
    ValueError: for a primitive that selects activations by value (``argmax``,
      ``sort``, ...), or a substitution inside ``while`` or another
      primitive whose body is not rewritten; the message names the primitive.
  """
  return _eval(jaxpr, consts, args, [True] * len(jaxpr.invars))


def structure_key(closed_jaxpr: jex_core.ClosedJaxpr) -> bytes:
  """A digest equal for jaxprs that compute the same function of (consts, args).

  Two traces of equal ``apply_fn``s (a fresh ``lambda q, x: model.apply(...)`` per
  call) print alike: variables are named in order, literals and parameters are
  printed, constants are inputs (``constvars``) whose avals are printed. Constants of
  nested jaxprs are part of the body, so their values are hashed. Custom derivative
  rules appear by name only: two ``custom_jvp`` functions of equal name and body with
  different rules would share a key.
  """
  digest = hashlib.sha256(str(closed_jaxpr.jaxpr).encode())
  for c in closed_jaxpr.consts:
    digest.update(str(jax.typeof(c)).encode())
  for jaxpr in _nested_closed_jaxprs(closed_jaxpr.jaxpr):
    for c in jaxpr.consts:
      digest.update(str(jax.typeof(c)).encode())
      digest.update(np.asarray(c).tobytes())
  return digest.digest()


def _nested_closed_jaxprs(jaxpr: jex_core.Jaxpr):
  for eqn in jaxpr.eqns:
    for sub in _params_jaxprs(eqn.params):
      if isinstance(sub, jex_core.ClosedJaxpr):
        yield sub
        yield from _nested_closed_jaxprs(sub.jaxpr)
      else:
        yield from _nested_closed_jaxprs(sub)


def _params_jaxprs(params: dict[str, Any]):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
        yield item


def _open(body: Any) -> tuple[jex_core.Jaxpr, Sequence[Any]]:
  if isinstance(body, jex_core.ClosedJaxpr):
    return body.jaxpr, body.consts
  return body, ()


def _is_max_computation(jaxpr: jex_core.Jaxpr) -> bool:
  return len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name in _ELEMENTWISE_MAX


def _rule(eqn: jex_core.JaxprEqn, dependent: list[bool], soft: bool = True) -> str | None:
  """What ``_eval`` does with ``eqn``: ``None`` binds it as traced. Without ``soft``,
  only what the pass cannot do without (not the reading of a NaN as ``inf``)."""
  name = eqn.primitive.name
  if not any(dependent):
    return None
  if name in DEBUG_OUTPUT:
    return 'drop'
  if name in _WINDOW_MAX or name in _REDUCE_MAX:
    return 'sum'
  if name in _ELEMENTWISE_MAX:  # with a constant (scope: 0 or the identity): relu(h), -relu(-h)
    return 'add' if all(dependent) else 'pass_on'
  if name == 'clamp':
    return 'pass_on' if dependent == [False, True, False] else None
  if name in SCATTER_MAXIMA and (dependent[0] or dependent[2]):
    return 'scatter_sum'
  if name == 'sub':
    return 'add_magnitudes'
  if name in ('neg', 'abs', 'stop_gradient'):
    return 'identity'
  if name in _WEIGHTED and not all(dependent):
    return 'constant_magnitudes'
  if name == 'reduce_window':
    body = eqn.params['jaxpr']
    body = body.jaxpr if isinstance(body, jex_core.ClosedJaxpr) else body
    return 'window_sum' if _is_max_computation(body) else _nested_rule(eqn, dependent, soft)
  if name == 'pad':
    return 'pad_finite' if dependent[0] and not dependent[1] else None
  if name == 'select_n' and not dependent[0] and not all(dependent[1:]):
    return 'select_finite'  # a fixed mask's -inf in place of units (scope: 0 or +-inf)
  if name == 'scatter-mul' and not dependent[1]:
    return 'scatter_scale'  # h.at[i].multiply(c), h.at[i].multiply(gain): a weight
  if name == 'scatter-sub' and (dependent[0] or dependent[2]):
    return 'scatter_sum'  # h.at[i].subtract(g): the paths of both, as for h - g
  if name in PLACING and any(dependent[i] for i in PLACING[name]):
    return 'constant_magnitudes' if not all(dependent[i] for i in PLACING[name]) else None
  if name == 'gather' and dependent[0] and 'FILL' in str(eqn.params['mode']):
    return 'gather_fill_zero'  # an index out of range is no unit
  if is_finiteness_test(eqn, dependent):
    return 'finite_value'
  if name in COMPARISONS:
    return 'compare_as_positive' if soft else None
  if name in SELECTS_BY_VALUE:
    return 'unsupported'
  return _nested_rule(eqn, dependent, soft)


def is_finiteness_test(eqn: jex_core.JaxprEqn, dependent: list[bool]) -> bool:
  """Whether ``eqn`` tests activations only for being finite, so that its value is
  the same for every finite activation: ``is_finite(h)``, ``h != h`` (``jnp.isnan``),
  or ``h`` compared with a literal ``inf`` or ``-inf`` (``jnp.isinf``, ``isneginf``,
  ``nan_to_num``, the guard after a ``segment_max`` of an empty segment)."""
  name = eqn.primitive.name
  if not any(dependent):
    return False
  if name == 'is_finite':
    return True
  if name not in COMPARISONS:
    return False
  a, b = eqn.invars
  if all(dependent):
    return a is b
  other = b if dependent[0] else a
  return isinstance(other, jex_core.Literal) and bool(np.all(np.isinf(other.val)))


def finite_value(eqn: jex_core.JaxprEqn, dependent: list[bool], values: list[Any]) -> Any:
  """The value of a finiteness test (``is_finiteness_test``) at every finite
  activation: the test of 0 (a scalar, or shaped as ``values``)."""
  zeros = [jnp.zeros_like(v) if d else v for v, d in zip(values, dependent)]
  return eqn.primitive.bind(*zeros, **eqn.primitive.get_bind_params(eqn.params))


def _nested_rule(eqn: jex_core.JaxprEqn, dependent: list[bool], soft: bool) -> str | None:
  name = eqn.primitive.name
  if name in _CALLS and _CALLS[name] in eqn.params:
    body, _ = _open(eqn.params[_CALLS[name]])
    custom = name.startswith('custom_')  # its own derivative is no path's: the body's is
    return 'inline' if custom or _rewrites(body, dependent, soft) else None
  if name == 'cond':
    branches = eqn.params['branches']
    return 'cond' if any(_rewrites(b.jaxpr, dependent[1:], soft) for b in branches) else None
  if name == 'scan':  # rewritten, also where a constant initial carry must enter as |c|
    inner = _scan_body_flags(eqn, dependent)
    constant_init = any(i and not d for i, d in zip(inner, dependent))
    return 'scan' if constant_init or _rewrites(eqn.params['jaxpr'].jaxpr, inner, soft) else None
  if name == 'shard_map':  # per shard, as in the network; collectives bound as they are
    return 'shard_map' if _rewrites(eqn.params['jaxpr'], dependent, soft) else None
  for body in _params_jaxprs(eqn.params):
    jaxpr, _ = _open(body)
    if len(jaxpr.invars) == len(dependent):
      inner = dependent
    else:  # a body whose inputs are not the eqn's: count them all as activations
      inner = [True] * len(jaxpr.invars)
    if _rewrites(jaxpr, inner, soft=False):  # inside while: comparisons as they are
      return 'unsupported'
  return None


def _rewrites(jaxpr: jex_core.Jaxpr, dependent_invars: list[bool], soft: bool = True) -> bool:
  """Whether evaluating ``jaxpr`` needs a substitution (see ``_rule`` for ``soft``)."""
  dependent = dict(zip(jaxpr.invars, dependent_invars))
  for eqn in jaxpr.eqns:
    flags = [_is_dependent(v, dependent) for v in eqn.invars]
    if _rule(eqn, flags, soft) is not None:
      return True
    for v in eqn.outvars:
      dependent[v] = any(flags)
  return False


def _dependent_outputs(jaxpr: jex_core.Jaxpr, dependent_invars: list[bool]) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on its dependent inputs (as ``_eval`` marks them)."""
  dependent = dict(zip(jaxpr.invars, dependent_invars))
  for eqn in jaxpr.eqns:
    flag = any(_is_dependent(v, dependent) for v in eqn.invars)
    dependent.update((v, flag) for v in eqn.outvars)
  return [_is_dependent(v, dependent) for v in jaxpr.outvars]


def _scan_body_flags(eqn: jex_core.JaxprEqn, flags: list[bool]) -> list[bool]:
  """Which inputs of a scan's body are activations: a carry is one if its initial value
  is, or if the body makes it one in any round (a fixed point, reached in at most one
  round per carry)."""
  body = eqn.params['jaxpr'].jaxpr
  n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']
  inner = list(flags)
  for _ in range(n_carry + 1):
    carried = _dependent_outputs(body, inner)[:n_carry]
    carry = [a or b for a, b in zip(inner[n_consts : n_consts + n_carry], carried)]
    if carry == inner[n_consts : n_consts + n_carry]:
      break
    inner[n_consts : n_consts + n_carry] = carry
  return inner


def _is_dependent(atom: Any, dependent: dict[Any, bool]) -> bool:
  return not isinstance(atom, jex_core.Literal) and dependent.get(atom, False)


def _eval(
  jaxpr: jex_core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], dependent_invars: list[bool]
) -> list[Any]:
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  dependent = dict(zip(jaxpr.invars, dependent_invars))

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  zeros: set[Any] = set()  # constants known to be 0 here (a literal, broadcast or cast)
  for eqn in jaxpr.eqns:
    flags = [_is_dependent(v, dependent) for v in eqn.invars]
    values = [read(v) for v in eqn.invars]
    with eqn.ctx.manager:
      outs = _apply(eqn, _rule(eqn, flags), values, flags)
    zero = _zero_result(eqn, flags, zeros)
    if zero:
      zeros.update(eqn.outvars)
      if any(flags):  # h * 0, 0 @ w: the constant 0 (as scope takes it), even where h is inf
        outs = [jnp.zeros_like(out) for out in outs]
    for v, out in zip(eqn.outvars, outs):
      env[v] = out
      dependent[v] = any(flags) and not zero
  return [read(v) for v in jaxpr.outvars]


_KEEPS_ZERO = frozenset({'broadcast_in_dim', 'convert_element_type', 'reshape', 'pvary'})


def _zero_result(eqn: jex_core.JaxprEqn, flags: list[bool], zeros: set[Any]) -> bool:
  """Whether ``eqn`` gives a constant 0: a product with a known 0 factor, or a known 0
  broadcast, cast or reshaped. Then it is no activation, and a comparison of it (``h * 0
  == 0``) is not one of a unit, which the pass takes as positive."""
  name = eqn.primitive.name

  def is_zero(atom):
    if isinstance(atom, jex_core.Literal):
      return bool(np.all(np.asarray(atom.val) == 0))
    return atom in zeros

  if name in _KEEPS_ZERO and not any(flags):
    return is_zero(eqn.invars[0])
  products = ('mul', 'dot_general', 'conv_general_dilated')
  return name in products and any(not f and is_zero(v) for v, f in zip(eqn.invars, flags))


def _apply(eqn: jex_core.JaxprEqn, rule: str | None, values: list[Any], flags: list[bool]):
  """The outputs of ``eqn`` (always a list) under ``rule``."""
  name, params = eqn.primitive.name, eqn.params
  if rule is None:
    out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))
    return out if eqn.primitive.multiple_results else [out]
  if rule == 'sum' and name in _WINDOW_MAX:
    return [lax.reduce_window_sum_p.bind(values[0], **params)]
  if rule == 'sum':
    return [lax.reduce_sum_p.bind(values[0], axes=params['axes'], out_sharding=None)]
  if rule == 'add':
    return [lax.add(values[0], values[1])]
  if rule == 'identity':
    return [values[0]]
  if rule == 'drop':
    return []
  if rule == 'gather_fill_zero':
    zero = {**eqn.primitive.get_bind_params(params), 'fill_value': 0}
    return [eqn.primitive.bind(*values, **zero)]
  if rule == 'finite_value':  # overflow on the pass stays inf, never dropped by a guard
    return [finite_value(eqn, flags, values)]
  if rule == 'pass_on':
    return [jnp.broadcast_to(values[flags.index(True)], eqn.outvars[0].aval.shape)]
  if rule == 'add_magnitudes':
    a, b = _constant_magnitudes(values, flags)
    return [lax.add(a, b)]
  if rule == 'constant_magnitudes':
    bind_params = eqn.primitive.get_bind_params(params)
    data = PLACING.get(name, range(len(values)))  # not the indices of a scatter
    magnitudes = [
      jnp.abs(v) if i in data and not f else v for i, (v, f) in enumerate(zip(values, flags))
    ]
    out = eqn.primitive.bind(*magnitudes, **bind_params)
    if name == 'mul':  # h * 0 is 0 (as scope takes it), even where h overflowed to inf
      zero = jnp.zeros_like(out)
      constant_is_zero = zero + (magnitudes[flags.index(False)] == 0)  # sharded as out
      out = jnp.where(constant_is_zero != 0, zero, out)
    return out if eqn.primitive.multiple_results else [out]
  if rule == 'compare_as_positive':  # 0 and NaN (an overflow: inf * 0) as positive units
    compared = [
      jnp.where(jnp.isnan(v) | (v == 0), jnp.inf, v) if f else v for v, f in zip(values, flags)
    ]
    return [eqn.primitive.bind(*compared, **eqn.primitive.get_bind_params(params))]
  if rule == 'scatter_scale':  # h times the factors' magnitudes placed into ones; h * 0 is 0
    operand, indices, factors = (v if f else jnp.abs(v) for v, f in zip(values, flags))
    bind_params = eqn.primitive.get_bind_params(params)
    scale = eqn.primitive.bind(jnp.ones_like(operand), indices, factors, **bind_params)
    return [jnp.where(scale == 0, jnp.zeros_like(operand), operand * scale)]
  if rule == 'scatter_sum':  # a max's constant is 0 or its identity (scope): no unit
    constant = jnp.zeros_like if name in SCATTER_MAXIMA else jnp.abs
    operand, indices, updates = (
      v if f or i == 1 else constant(v) for i, (v, f) in enumerate(zip(values, flags))
    )
    sorted_, unique = params['indices_are_sorted'], params['unique_indices']
    return [
      lax.scatter_add(
        operand,
        indices,
        updates,
        params['dimension_numbers'],
        indices_are_sorted=sorted_,
        unique_indices=unique,
        mode=params['mode'],
      )
    ]
  if rule == 'window_sum':
    if len(values) != 2:
      raise ValueError(
        f'The general mode cannot count the paths of a {name} over {len(values) // 2} '
        'operands at once; reduce each with its own max pool.'
      )
    names = ('window_dimensions', 'window_strides', 'padding', 'base_dilation', 'window_dilation')
    window = {k: params[k] for k in names}
    return [lax.reduce_window_sum_p.bind(values[0], **window)]
  if rule == 'select_finite':
    predicate, *cases = values
    cases = [_no_unit_if_infinite(v) if not f else v for v, f in zip(cases, flags[1:])]
    return [lax.select_n(predicate, *cases)]
  if rule == 'pad_finite':
    value = _no_unit_if_infinite(jnp.asarray(values[1], jnp.result_type(values[0])))
    return [lax.pad(values[0], value, params['padding_config'])]
  if rule == 'inline':
    body, consts = _open(params[_CALLS[name]])
    return _eval(body, consts, values, flags)
  if rule == 'cond':
    return _cond(eqn, values, flags)
  if rule == 'scan':
    return _scan(eqn, values, flags)
  if rule == 'shard_map':
    return _shard_map(eqn, values, flags)
  raise ValueError(unsupported_message(eqn))


def _constant_magnitudes(values: list[Any], flags: list[bool]) -> list[Any]:
  return [v if dependent else jnp.abs(v) for v, dependent in zip(values, flags)]


def _no_unit_if_infinite(value: Any) -> Any:
  return jnp.where(jnp.isinf(value), jnp.zeros_like(value), jnp.abs(value))


def _cond(eqn: jex_core.JaxprEqn, values: list[Any], flags: list[bool]) -> list[Any]:
  """``cond`` with each branch evaluated with the substitutions; on a fixed index (a
  Python bool), only the branch it takes, as the network does."""
  if not isinstance(values[0], jax.core.Tracer):
    branches = eqn.params['branches']
    taken = branches[int(np.clip(np.asarray(values[0]).item(), 0, len(branches) - 1))]
    return _eval(taken.jaxpr, taken.consts, values[1:], flags[1:])
  avals = [jax.typeof(v) for v in values[1:]]
  branches = tuple(
    jax.make_jaxpr(lambda *xs, b=b: _eval(b.jaxpr, b.consts, xs, flags[1:]))(*avals)
    for b in eqn.params['branches']
  )
  params = dict(eqn.params, branches=branches)
  return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))


def _scan(eqn: jex_core.JaxprEqn, values: list[Any], flags: list[bool]) -> list[Any]:
  """``scan`` with its body evaluated with the substitutions, in every round."""
  body = eqn.params['jaxpr']
  inner = _scan_body_flags(eqn, flags)
  # a constant initial carry that the body turns into an activation enters as |c|, an
  # infinite one (a running max from -inf: the max's identity, scope) as 0: no unit
  values = [_no_unit_if_infinite(v) if i and not f else v for v, f, i in zip(values, flags, inner)]
  avals = [v.aval for v in body.jaxpr.invars]
  rewritten = jax.make_jaxpr(lambda *xs: _eval(body.jaxpr, body.consts, xs, inner))(*avals)
  params = dict(eqn.params, jaxpr=rewritten)
  return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))


def _shard_map(eqn: jex_core.JaxprEqn, values: list[Any], flags: list[bool]) -> list[Any]:
  """``shard_map`` with its body evaluated with the substitutions, over the same mesh,
  specs and manual axes: each shard's units are the network's, and a ``psum`` or
  ``all_gather`` of the pass sums or gathers paths as in the network."""
  params = eqn.params
  body = jex_core.ClosedJaxpr(params['jaxpr'], ())
  mapped = jax.shard_map(
    lambda *xs: tuple(_eval(body.jaxpr, body.consts, xs, flags)),
    mesh=params['mesh'],
    in_specs=params['in_specs'],
    out_specs=params['out_specs'],
    axis_names=params['newly_manual_axes'],
    check_vma=params['check_vma'],
  )
  return list(mapped(*values))


def unsupported_message(eqn: jex_core.JaxprEqn) -> str:
  name = eqn.primitive.name
  if name in SELECTS_BY_VALUE:
    return (
      f'apply_fn applies {name} to activations. The general mode counts every path '
      'through a max (a max pool sums over its window on the |theta|^p pass), but a '
      f'unit chosen by {name} has no path form. Give an apply_fn without it (the loss '
      'may keep it), or use the MLP mode.'
    )
  return (
    f'apply_fn has, inside {name}, a max or max pool of activations, a difference or '
    'negation of them, or a fixed weight (a constant factor or offset). The general mode '
    'counts every path by rewriting these (a max as a sum, a constant c as |c|), which it '
    'can do inside jit, custom_jvp, custom_vjp, checkpoint, cond, scan and shard_map, but '
    f'not inside {name}, where the pass would lose paths. Move them out of {name}.'
  )
