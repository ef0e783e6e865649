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
- a max or min with a constant other than 0 or infinity (a clip such as ``relu6``), a
  comparison with a constant other than 0 (``jnp.where(h > 1, h, 0)``, ``hard_tanh``),
  a step function used as a value (``(h > 0).astype(float)``, ``sign(h)``, a cast to
  an integer), a constant other than 0 put in place of units (``jnp.where(mask, h,
  -1e9)``, an added ``-inf`` mask), an embedding (indices read from the input), a
  ``while_loop`` (the scales need the gradient of the forward pass: use ``lax.scan``);
- a ``lax.cond`` or ``lax.switch`` whose branch is chosen by the input (a hard gate);
- a choice, max, min, mask or integer cast made from the parameters' values
  (``jnp.where(a > 0, h, 0)``, ``lax.cond(a > 0, ...)``, a non-negative kernel
  ``relu(w)``, ``h * (scores > 0)``): on the pass every parameter is ``|theta|^p >= 0``,
  so the pass would take another branch, or count edges that are off, where a
  parameter is negative.

And ``check`` returns the parameters on the pass: those that reach the output along the
branches the pass takes. In ``jnp.where(h >= 0, h, a * h)`` (PReLU) the pass always
takes ``h``, so a learnable slope ``a`` is on no path: its scale would be 0, and the
general mode refuses it as it refuses a leaf that ``apply_fn`` does not use.

Constants computed inside the trace (``jnp.clip``'s bounds, ``jnp.zeros_like``) are
folded to their values first, so a comparison or a max with them is judged by value.

What is allowed: linear and structural primitives (sums, reshapes, slices, pads,
concatenations, gathers with constant indices, dtype casts, sharding annotations), a
product of an activation with a constant or a parameter (a diagonal layer), ReLU
(``max`` with 0, ``h * (h > 0)``), ``jnp.where(h > 0, h, a * h)`` (leaky ReLU), max
pooling (see :mod:`~optax_path._src.positive_pass`), ``abs``, ``lax.scan`` over such
layers, scatters that place activations over a fixed graph (``segment_sum``, and
``segment_max`` as a max pool). A BatchNorm that uses its running averages is a fixed
affine map, and so allowed. Tests for finiteness (``jnp.isfinite``, ``jnp.isnan``,
``h == -jnp.inf``, ``jnp.nan_to_num``) are constants, their value at every finite
activation, except on the ``-inf`` that ``segment_max`` gives a segment without members:
that entry may be passed on, pooled by a max or set to 0 (``jnp.where(jnp.isfinite(s), s,
0)``, a ReLU), and nothing else, since the pass counts such a segment as no unit.

References:
  Neyshabur, Salakhutdinov & Srebro, `Path-SGD <https://arxiv.org/abs/1506.02617>`_,
  NeurIPS 2015, Section 2 and Theorem 4.1. Gonon, Brisebarre, Riccietti & Gribonval,
  `A path-norm toolkit for modern networks <https://arxiv.org/abs/2310.01225>`_, ICLR 2024,
  Definition 2.2 (DAG-ReLU networks).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import sysconfig
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from optax_path._src import positive_pass

#: Structural: moves or copies entries; the output is what its data operands are.
_STRUCTURAL = frozenset(
  {
    'reshape',
    'broadcast_in_dim',
    'transpose',
    'squeeze',
    'expand_dims',
    'split',
    'slice',
    'rev',
    'copy',
    'copy_p',
    'reduce_precision',
    'sharding_constraint',
    'mesh_cast',
    'reshard',
    'device_put',
    'optimization_barrier',
    'neg',
    'abs',
    'stop_gradient',
    'unstack',
    'tile',
    'ppermute',  # collectives inside shard_map move entries between devices
    'all_to_all',
    'pbroadcast',
  }
)
#: Sums of their operands (a step function or a non-finite constant must not enter).
_SUMS = frozenset(
  {
    'add',
    'add_any',
    'sub',
    'concatenate',
    'stack',
    'pad',
    'reduce_sum',
    'reduce_window_sum',
    'cumsum',
    'psum',
    'psum_invariant',
    'reduce_scatter',
    'all_gather',
    'all_gather_invariant',
  }
)
#: Maxima, rewritten as sums on the pass (positive_pass).
_MAXIMA = frozenset({'reduce_window_max', 'reduce_window_min', 'reduce_max', 'reduce_min'})
#: Indexing: which operands are data (the rest are indices, which must not come from the
#: input or the params): the output takes each entry from one data entry, or sums some.
_INDEXING = {'gather': (0,), 'dynamic_slice': (0,), **positive_pass.PLACING}
_COMPARISONS = positive_pass.COMPARISONS
_LOGICAL = frozenset({'and', 'or', 'not', 'xor', 'is_finite', 'reduce_and', 'reduce_or'})
_PRODUCTS = frozenset({'mul', 'dot_general', 'conv_general_dilated'})
_ELEMENTWISE_MAX = frozenset({'max', 'min'})
_POWERS = frozenset({'square', 'integer_pow', 'pow'})
_ROOTS = frozenset({'rsqrt', 'sqrt', 'cbrt'})
_CALL_BODIES = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')
_FOLD_LIMIT = 1 << 20  # entries: larger constants are not folded (judged unknown)


@dataclasses.dataclass(frozen=True)
class _Kind:
  """What a value is: computed from the params or the input (``dep``), from the input
  (``inp``), a step function of the input, of degree 0 (``gate``: a predicate, a
  sign, a mask), and the value of a constant where known."""

  dep: bool = False
  inp: bool = False
  gate: bool = False
  value: Any = None
  ident: Any = None  # an activation: which one (kept by calls and copies)
  source: Any = None  # a gate: the activation it tests
  params: frozenset = frozenset()  # the params (input positions) it has on the pass
  on_pass: bool | None = None  # a gate testing an activation: its value on the pass
  infinities: frozenset = frozenset()  # -inf, inf: taken where a segment_max pools nothing
  at_infinity: tuple | None = None  # a test of such a value: (infinity, its value there)
  infinite_at: Any = None  # where those infinities can be (a bool array), None: anywhere
  finite_as: Any = None  # an abs or neg of such a value: which one (finite where it is)
  random: bool = False  # a constant drawn from a PRNG key in apply_fn

  @property
  def act(self) -> bool:
    return self.inp and not self.gate

  @property
  def of_params(self) -> bool:
    """Computed from the params alone, not from the input."""
    return self.dep and not self.inp

  def join(self, other: _Kind) -> _Kind:
    return _Kind(
      self.dep or other.dep,
      self.inp or other.inp,
      self.gate or other.gate,
      params=self.params | other.params,
      infinities=self.infinities | other.infinities,
      random=self.random or other.random,
    )

  def flow(self) -> tuple:
    """What a scan's carry must agree on between two rounds (a constant whose value
    changes, a counter, is checked again as an unknown constant)."""
    return self.dep, self.inp, self.gate, self.params, self.value is None, self.infinities


_CONST = _Kind()
#: The parameters' names (by input position) for the messages of the current ``check``.
_PARAM_NAMES: contextvars.ContextVar[Sequence[str] | None] = contextvars.ContextVar(
  'param_names', default=None
)
#: Set by the current ``check`` where a constant it cannot compute decides which params
#: are on the pass.
_UNSURE: contextvars.ContextVar[list | None] = contextvars.ContextVar('unsure', default=None)
#: Keep the value as it is: the output is the same activation.
_SAME_VALUE = frozenset(
  {
    'copy',
    'copy_p',
    'convert_element_type',
    'sharding_constraint',
    'mesh_cast',
    'reshard',
    'device_put',
    'optimization_barrier',
    'reduce_precision',
    'layout_constraint',
    'pvary',  # inside shard_map: the value, typed as varying over manual axes
  }
)


#: Primitives that draw random bits: their values change with the key, as dropout's masks.
_RANDOM_DRAWS = frozenset({'random_bits', 'threefry2x32', 'rng_bit_generator', 'rng_uniform'})
_RANDOM_MESSAGE = (
  'apply_fn draws random numbers that reach the activations or the params: dropout, '
  'stochastic depth or noise left on (a training-mode forward pass). The scales would be '
  "those of one random thinned network, fixed by apply_fn's key. Give apply_fn the model "
  'in eval mode: Linen deterministic=True (or train=False), NNX model.eval(). A fixed random '
  'matrix: draw it outside apply_fn and close over the array.'
)


def _activation() -> _Kind:
  return _Kind(dep=True, inp=True, ident=object())


class Checked(NamedTuple):
  """What ``check`` found: the positions of the parameters on the pass, and whether
  that depends on constants it could not compute (drawn from a PRNG key, over
  ``2^20`` entries, a loop counter), which may cut their paths."""

  on_pass: frozenset
  unsure: bool


def check(closed_jaxpr: jex_core.ClosedJaxpr, param_names: Sequence[str] | None = None) -> Checked:
  """Raises ``ValueError`` if the traced ``apply_fn`` is outside Path-SGD's scope.

  Args:
    closed_jaxpr: ``jax.make_jaxpr`` of ``(q, x) -> sum(apply_fn(params(q), x))``: its
      last input is the network's input, the others are parameters.
    param_names: the parameters' names (key paths), for the messages.

  Returns:
    ``Checked``: the positions (among the inputs) of the parameters on the pass, those
    that reach the output along the branches the ``|theta|^p`` pass takes, and whether
    a constant not known here (a branch's predicate, a mask, a factor, indices) decides
    some of them.

  Raises:
    ValueError: naming the first primitive, in the order of the trace, that makes the
      network other than a ReLU network (see the module docstring), the line of
      ``apply_fn`` that applies it, and what to do.
  """
  jaxpr = closed_jaxpr.jaxpr
  n_params = len(jaxpr.invars) - 1
  kinds = [_Kind(dep=True, params=frozenset({i})) for i in range(n_params)] + [_activation()]
  consts = [_Kind(value=c) for c in closed_jaxpr.consts]
  token, unsure = _PARAM_NAMES.set(param_names), _UNSURE.set([])
  try:
    with jax.ensure_compile_time_eval():
      outs = _check(jaxpr, consts, kinds)
    return Checked(_join(outs).params, bool(_UNSURE.get()))
  except _OutOfScope as error:  # a plain ValueError for the user, not this module's class
    raise ValueError(str(error)) from None
  finally:
    _PARAM_NAMES.reset(token)
    _UNSURE.reset(unsure)


def _unsure() -> None:
  found = _UNSURE.get()
  if found is not None:
    found.append(True)


def _check(jaxpr: jex_core.Jaxpr, consts: Sequence[_Kind], kinds: Sequence[_Kind]) -> list[_Kind]:
  """The kinds of ``jaxpr``'s outputs, raising where it leaves the scope."""
  env: dict[Any, _Kind] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, kinds))

  def read(atom):
    if isinstance(atom, jex_core.Literal):
      return _Kind(value=atom.val)
    return env.get(atom, _CONST)

  for eqn in jaxpr.eqns:
    operands = [read(v) for v in eqn.invars]
    try:
      outs = _eqn_kinds(eqn, operands)
    except _OutOfScope:
      raise
    except ValueError as error:
      where = _source_line(eqn)
      if where is None:  # inside a jit or custom_jvp of jax's own: the caller's line says
        raise
      raise _OutOfScope(f'{error} (The line of apply_fn: {where}.)') from None
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


class _OutOfScope(ValueError):
  """A refusal that already names the line of ``apply_fn`` it comes from."""


def _source_line(eqn: jex_core.JaxprEqn) -> str | None:
  """``file:line (function)`` of the code that traced ``eqn``: the innermost frame
  outside the installed libraries (Flax's ``Dense``, ``LayerNorm``) and this package,
  so that a refusal points at the line of the model that called them."""
  try:
    from jax._src import source_info_util  # no public API gives an equation's source

    frames = list(source_info_util.user_frames(eqn.source_info.traceback))
  except Exception:  # noqa: BLE001 (a JAX without it: the message goes without the line)
    return None
  own = [f for f in frames if not f.file_name.startswith(_LIBRARY_DIRS)]
  if not own:  # inside a library's call (Flax's nn.remat): the caller's equation says
    return None
  return f'{own[0].file_name}:{own[0].start_line}, in {own[0].function_name}'


_LIBRARY_DIRS = tuple(
  os.path.join(path, '')  # a folder: optax_path/, not optax_path_experiments/
  for path in {sysconfig.get_paths()[key] for key in ('purelib', 'platlib')}
  | {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
)


def _eqn_kinds(eqn: jex_core.JaxprEqn, ops: list[_Kind]) -> list[_Kind]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  bodies = [b for key in _CALL_BODIES for b in _as_list(eqn.params.get(key))]
  is_call = bodies and name not in ('reduce_window', 'reduce', 'scan')
  if not any(k.dep for k in ops) and not is_call:
    random = name in _RANDOM_DRAWS or any(k.random for k in ops)
    return [_Kind(value=v, random=random) for v in _folded(eqn, ops)]
  if any(k.random for k in ops):
    raise ValueError(_RANDOM_MESSAGE)
  if name == 'scan' and eqn.params['length'] == 0:  # no round: the carries as they came
    n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']
    return ops[n_consts : n_consts + n_carry] + [_zeros_of(v) for v in eqn.outvars[n_carry:]]
  if name == 'scan':
    return _scan_kinds(eqn, ops)
  if name == 'cond':
    if ops[0].inp:
      _refuse(
        name,
        'a branch chosen by testing the input or the activations (a hard gate, such as '
        'lax.cond(jnp.sum(h) > 0, ...) or lax.switch on them): ReLU and leaky ReLU choose per '
        'unit, by the value they pass on. A lax.cond or lax.switch on a Python bool or a '
        'constant is accepted',
      )
    if ops[0].dep:
      _refuse_of_params(name, 'choice', ops[:1])
    branches = eqn.params['branches']
    if ops[0].value is not None and np.size(ops[0].value) == 1:  # a fixed flag: the network
      branches = [branches[int(np.clip(np.asarray(ops[0].value).item(), 0, len(branches) - 1))]]
    else:
      _unsure()  # the branch the pass takes is not known here
    outs = [_check(b.jaxpr, [_Kind(value=c) for c in b.consts], ops[1:]) for b in branches]
    return [_identified(_join(column), object()) for column in zip(*outs)]
  if is_call:  # jit, custom_jvp, checkpoint, ...: its body, with constants folded too
    body = bodies[0]
    jaxpr, body_consts = (body.jaxpr, body.consts) if hasattr(body, 'consts') else (body, ())
    return _check(jaxpr, [_Kind(value=c) for c in body_consts], ops)
  if name in _PRODUCTS and any(not k.dep and _known(k, _zero) for k in ops):
    return [_zeros(eqn)]  # 0 @ w (a zero initial state): no path, whatever w is
  out = _elementary(eqn, name, ops)
  fresh = not any(k.infinities or k.at_infinity is not None for k in ops)  # else: _infinite
  if name in _MAY_CREATE_INFINITIES and fresh and not out.infinities and out.dep:
    out = _tracked(eqn, name, ops, out)  # an empty segment, window, a -inf pad or mask
  if out.act and out.ident is None or (out.act and name not in _SAME_VALUE):
    out = dataclasses.replace(out, ident=object())  # a new activation
  if out.act and n_out > 1:  # split, unstack: each piece is an activation of its own
    return [dataclasses.replace(out, ident=object()) for _ in range(n_out)]
  return [out] * n_out


def _elementary(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind]) -> _Kind:
  joined = _join(ops)

  def refuse(what: str) -> None:
    _refuse(name, what)

  if name in positive_pass.SELECTS_BY_VALUE:
    raise ValueError(positive_pass.unsupported_message(eqn))
  if name in positive_pass.DEBUG_OUTPUT:  # jax.debug.print: no value
    return _CONST
  if any(k.infinities or k.at_infinity is not None for k in ops):
    return _infinite(eqn, name, ops)
  if name == 'scatter-mul':  # h.at[i].multiply(c): h times factors placed into ones
    _check_indices(name, [ops[1]])
    if ops[2].inp:
      refuse('activations multiplied into entries (c.at[i].multiply(h), h.at[i].multiply(h))')
    if ops[2].dep and not eqn.params['unique_indices']:
      raise ValueError(
        'apply_fn multiplies params into entries at indices that may repeat '
        '(h.at[i].multiply(gain)), which JAX cannot differentiate by the params: pass '
        'unique_indices=True if they are unique, or write h * jnp.ones(n).at[i].set(gain).'
      )
    if not ops[2].dep and ops[2].value is None:
      _unsure()  # a factor not known here may be 0
    return _join([ops[0], ops[2]])
  if positive_pass.is_finiteness_test(eqn, [k.dep for k in ops]) and not joined.gate:
    return _finite_value(eqn, ops)
  if name == 'while':
    raise ValueError(
      'apply_fn runs a lax.while_loop over values computed from the params or the input. '
      'The path scales are a gradient of the forward pass, and a while_loop cannot be '
      'differentiated in reverse mode: write the loop with lax.scan (or lax.fori_loop '
      'with fixed bounds).'
    )
  if name in _STRUCTURAL or name in _SAME_VALUE:
    to_floats = name != 'convert_element_type' or jnp.issubdtype(
      eqn.params['new_dtype'], jnp.floating
    )
    if joined.act and not to_floats:
      refuse(
        'a cast of activations to an integer or bool type (indices for an embedding, a '
        'quantisation or a step)'
      )
    if joined.of_params and not joined.gate and not to_floats:
      _refuse_of_params(name, 'index', ops)
    data = [k for k in ops if k.dep]
    return data[0] if len(data) == 1 else joined
  if name in _INDEXING:
    data = [k for i, k in enumerate(ops) if i in _INDEXING[name]]
    _check_indices(name, [k for i, k in enumerate(ops) if i not in _INDEXING[name]])
    if any(k.gate for k in data):
      refuse('a step function of the activations used as a value')
    placed = name in ('scatter', 'dynamic_update_slice')  # sets entries, rather than adds
    if placed and any(k.inp for k in data) and not all(k.dep or _known(k, _zero) for k in data):
      refuse('a constant other than 0 put in place of activations (h.at[i].set(c), a mask)')
    if any(k.inp for k in data) and any(_known_non_finite(k) for k in data):
      refuse('an infinite constant among the activations (a -inf mask before a max)')
    return _join(data)
  if name in _SUMS:
    if any(k.gate and k.of_params for k in ops):
      _refuse_of_params(name, 'step', [k for k in ops if k.gate and k.of_params])
    if any(k.gate for k in ops):
      refuse('a step function of the activations used as a value ((h > 0) or sign(h) added)')
    if name != 'pad' and joined.inp and any(_known_non_finite(k) for k in ops):  # pad: no unit
      refuse('an infinite constant among the activations (a -inf mask before a max)')
    return joined
  if name in _COMPARISONS or name == 'sign':
    tested = [k for k in ops if k.dep]
    others = [k for k in ops if not k.dep]
    if name != 'sign' and joined.inp and not all(_known(k, _zero) for k in others):
      refuse('a comparison of activations with a constant other than 0 (a threshold or clip)')
    source = tested[0].ident if len(tested) == 1 and tested[0].act else None
    on_pass = _compared_on_pass(name, ops) if source is not None else None
    return _Kind(
      dep=True, inp=joined.inp, gate=True, source=source, params=joined.params, on_pass=on_pass
    )
  if name in _LOGICAL:
    sources = {k.source for k in ops if k.gate}
    return _Kind(
      dep=True,
      inp=joined.inp,
      gate=True,
      source=sources.pop() if len(sources) == 1 else None,
      params=joined.params,
      on_pass=_logical_on_pass(name, ops),
    )
  if name == 'select_n':
    predicate, cases = ops[0], ops[1:]
    if not predicate.dep and predicate.value is None:
      _unsure()  # a mask not known here may drop some cases' params
    if not predicate.dep and predicate.value is not None:  # a known choice: isfinite(h)
      cases = [cases[i] for i in np.unique(np.asarray(predicate.value).astype(int))]
      if len(cases) == 1:
        return cases[0]
    if predicate.of_params:
      _refuse_of_params(name, 'choice', [predicate])
    if predicate.gate and not any(k.act for k in cases):  # where(h > 0, 1, 0): a mask
      sources = {predicate.source} | {k.source for k in cases if k.gate}
      if any(k.of_params for k in cases):
        _refuse_of_params(name, 'step', cases)
      taken = cases[int(predicate.on_pass)] if predicate.on_pass is not None else None
      if predicate.inp and not (taken is not None and _known(taken, _positive)):
        refuse(
          'a mask of constants that is not positive where the tested value is (h * jnp.where(h '
          '< 0, 1, 0), h * jnp.where(h > 0, -1, 0)): on the pass every unit is positive, so the '
          'mask would cut or negate its paths. Write jnp.minimum(h, 0) or -jax.nn.relu(h)'
        )
      return _Kind(
        dep=True, inp=predicate.inp, gate=True, source=sources.pop() if len(sources) == 1 else None
      )
    # A fixed mask may put -inf (no unit) in place of units before a max: tracked.
    no_unit = _zero_or_infinite if predicate.value is not None else _zero
    if any(k.gate for k in cases) or not all(k.dep or _known(k, no_unit) for k in cases):
      refuse(
        'a constant other than 0 chosen in place of activations (a clip, or a mask such as -1e9)'
      )
    tested = predicate.source is not None and predicate.source in {k.ident for k in cases if k.act}
    if predicate.inp and not tested:
      refuse(
        'a choice between activations made by testing another value (a hard gate, or a '
        'threshold such as h - 1 > 0): ReLU and leaky ReLU test the value they pass on'
      )
    if predicate.on_pass is not None and len(cases) == 2:  # ReLU-like: the pass takes one case
      taken = cases[int(predicate.on_pass)]
      return dataclasses.replace(_join(cases), params=taken.params)
    return _join(cases)
  if name == 'clamp' and not (ops[0].dep or ops[2].dep):
    if ops[1].gate:
      return ops[1]  # lax.switch's index, kept in range: still a step function
    relu_like = _known(ops[0], _zero_or_minus_inf) and _known(ops[2], _zero_or_inf)
    if ops[1].act and relu_like and not (_known(ops[0], _zero) and _known(ops[2], _zero)):
      return ops[1]  # lax.clamp(0, h, inf): ReLU
  if name in _MAXIMA:
    if joined.gate:
      refuse('a max of a step function')
    if joined.of_params:
      _refuse_of_params(name, 'max', ops)
    return joined
  if name in ('reduce_window', 'reduce'):
    return _reduction(eqn, name, ops)
  if name in _PRODUCTS and any(not k.dep and k.value is None for k in ops):
    _unsure()  # a factor not known here may be 0
  if name == 'mul':
    if sum(k.act for k in ops) > 1:
      refuse('a product of two activations (attention, gating, x * x)')
    acts, gates = [k for k in ops if k.act], [k for k in ops if k.gate and k.inp]
    if acts and gates and (gates[0].source is None or gates[0].source is not acts[0].ident):
      refuse('an activation multiplied by a step function of another value (a hard gate)')
    if any(k.gate and k.of_params for k in ops):
      _refuse_of_params(name, 'step', [k for k in ops if k.gate and k.of_params])
    if acts:  # an activation, masked or scaled; by a gate that is 0 on the pass: no path
      closed = any(k.gate and k.on_pass is False for k in ops)
      return _Kind(dep=True, inp=True, params=frozenset() if closed else joined.params)
    if gates:
      return dataclasses.replace(joined, source=gates[0].source)
    return joined
  if name in _PRODUCTS:
    if sum(k.inp for k in ops) > 1:
      refuse('a product of two activations (attention, gating, x * x)')
    if joined.gate:
      refuse('a step function of the activations used as a value')
    return joined
  if name in _ROOTS | {'div'} and ops[-1].of_params:  # rsqrt(var + eps), h / sqrt(var)
    _refuse_statistics(name, ops[-1])
  if name == 'div':
    if ops[1].dep:
      refuse(
        'a division by an activation or a parameter (a normalisation layer: LayerNorm, '
        'BatchNorm in training mode, RMSNorm, GroupNorm; or weight normalisation)'
      )
    return joined
  if name in _ELEMENTWISE_MAX:
    return _maximum(name, ops, minimum=name == 'min')
  if name in positive_pass.SCATTER_MAXIMA:  # segment_max, .at[i].max: a graph's max pool
    _check_indices(name, [ops[1]])
    return _maximum(name, [ops[0], ops[2]], minimum=name == 'scatter-min')
  if name in _POWERS:
    refuse(
      'a power of activations (the variance of LayerNorm, BatchNorm in training mode, '
      "RMSNorm or GroupNorm; the x**3 of GELU's tanh form)"
    )
  if name in _ROOTS:
    refuse('a root (a normalisation layer, or weight normalisation)')
  refuse(
    'a nonlinearity that is not positively homogeneous (GELU, tanh, sigmoid, swish, softmax, ...)'
  )
  raise AssertionError  # unreachable: refuse raises


def _check_indices(name: str, indices: list[_Kind]) -> None:
  if any(not k.dep and k.value is None for k in indices):
    _unsure()  # which units it takes is not known here
  if any(k.inp for k in indices):
    _refuse(name, 'indices read from the input (an embedding lookup)')
  if any(k.dep for k in indices):
    _refuse_of_params(name, 'index', indices)


def _maximum(name: str, ops: list[_Kind], minimum: bool) -> _Kind:
  """A max or min of activations, or of one with 0 or its identity (ReLU, -relu(-h))."""
  joined = _join(ops)
  if joined.gate:
    _refuse(name, 'a max of a step function')
  if joined.of_params:
    _refuse_of_params(name, 'max', ops)
  bound = _zero_or_inf if minimum else _zero_or_minus_inf
  if all(k.dep for k in ops) or all(_known(k, bound) for k in ops if not k.dep):
    return joined
  _refuse(name, 'a max or min with a constant other than 0 (a clip, such as relu6 or hard_tanh)')
  raise AssertionError  # unreachable: _refuse raises


#: Primitives that pass each entry on unchanged, or move it: an infinity stays itself.
_PASSED_ON = (
  (_STRUCTURAL - {'neg', 'abs'})
  | _SAME_VALUE
  | {'concatenate', 'pad', 'gather', 'dynamic_slice', 'scatter', 'dynamic_update_slice'}
)


_MAY_CREATE_INFINITIES = frozenset(
  {'pad', 'gather', 'select_n', 'reduce_window', 'reduce_window_max', 'reduce_window_min'}
  | positive_pass.SCATTER_MAXIMA
)


def _tracked(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind], out: _Kind) -> _Kind:
  """``out`` with the infinities it takes for finite params and input, and where."""
  infinities, where = _infinities_of(eqn, name, ops)
  if not infinities or (where is not None and not np.any(where)):
    return dataclasses.replace(out, infinities=frozenset(), infinite_at=None)
  return dataclasses.replace(out, infinities=frozenset(infinities), infinite_at=where)


def _where_infinite(kind: _Kind, var: Any) -> np.ndarray | None:
  """Where ``kind``, the value of ``var``, can be infinite: a bool array, or None."""
  shape = var.aval.shape
  if kind.dep:
    if not kind.infinities:
      return np.zeros(shape, bool)
    where = kind.infinite_at
  elif kind.value is None:
    return None
  else:
    where = np.isinf(np.asarray(kind.value, float))
  try:
    return None if where is None else np.broadcast_to(where, shape)
  except ValueError:  # a scan's xs, which the body sees a slice of: not known here
    return None


def _infinities_of(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind]) -> tuple[set, Any]:
  """The infinities of an operation that passes entries on, pools them by a max, or pads,
  and where they are (found by applying the operation to where its operands' are)."""
  infinities = set().union(*(k.infinities for k in ops))
  absorbed = -np.inf if name in _MAXIMA_OF_MAX or _body_op(eqn) == 'max' else np.inf
  try:
    masks = [_where_infinite(k, v) for k, v in zip(ops, eqn.invars)]
    if name in _SAME_VALUE:
      return infinities, masks[0]
    if name in ('neg', 'abs'):
      return {-v if name == 'neg' else abs(v) for v in infinities}, masks[0]
    if name == 'pad':
      padding = np.asarray(ops[1].value if not ops[1].dep else 0.0, float)
      infinities |= {float(padding)} if np.isinf(padding) else set()
      return infinities, np.asarray(
        jax.lax.pad(masks[0], np.isinf(padding), eqn.params['padding_config'])
      )
    shape = eqn.outvars[0].aval.shape
    finite_member = any(m is not None and not m.any() for m in masks)
    if name in _ELEMENTWISE_MAX and finite_member and -absorbed not in infinities:
      return infinities, np.zeros(shape, bool)  # max(s, 0) is never -inf
    data = (0, 2) if name in positive_pass.SCATTER_MAXIMA else _INDEXING.get(name, range(len(ops)))
    if any(masks[i] is None for i in data) or -absorbed in infinities and name in _ALL_MAXIMA:
      return infinities, None  # not known here, or an infinity that a max lets through
    if name in _ELEMENTWISE_MAX:
      where = np.logical_and.reduce([np.broadcast_to(m, shape) for m in masks])
      return infinities | {absorbed}, where
    if name in ('reduce_max', 'reduce_min'):
      return infinities, np.all(masks[0], axis=tuple(eqn.params['axes']))
    if name in ('reduce_window_max', 'reduce_window_min', 'reduce_window'):
      if name == 'reduce_window':  # jax.lax.reduce_window(h, -inf, jnp.maximum, ...)
        if len(ops) != 2 or _body_op(eqn) not in ('max', 'min') or ops[1].value is None:
          return infinities, None
        absorbed = float(ops[1].value) if np.isinf(ops[1].value) else None
      window = {k: eqn.params[k] for k in _WINDOW_PARAMS}
      members = jax.lax.reduce_window_sum_p.bind((~masks[0]).astype(np.int32), **window)
      empty = np.asarray(members) == 0  # no finite member: the init value, or the infinity
      if absorbed is None:  # a finite init: never infinite
        return infinities, np.zeros(empty.shape, bool)
      return infinities | {absorbed}, empty
    if name == 'gather':
      fill = eqn.params.get('fill_value')
      filled = fill is not None and np.isinf(fill) and 'FILL' in str(eqn.params['mode'])
      params = {**eqn.params, 'fill_value': bool(filled)}
      where = jax.lax.gather_p.bind(masks[0], ops[1].value, **params)
      return infinities | ({float(fill)} if filled else set()), np.asarray(where)
    if name == 'select_n':  # a choice known here (where(counts > 0, s, 0)): case by case
      if ops[0].dep or ops[0].value is None:
        return infinities, None
      for k in ops[1:]:  # a fixed mask's -inf (jnp.max(h, where=mask))
        value = np.asarray(k.value if not k.dep else 0.0, float)
        infinities |= set(np.unique(value[np.isinf(value)]).tolist())
      return infinities, np.asarray(jax.lax.select_n(ops[0].value, *masks[1:]))
    if name in positive_pass.SCATTER_MAXIMA:
      if ops[1].value is None:
        return infinities | ({absorbed} if masks[0].any() else set()), None
      members = jax.lax.scatter_add(
        np.zeros(masks[0].shape, np.int32),
        ops[1].value,
        (~masks[2]).astype(np.int32),
        eqn.params['dimension_numbers'],
        mode=eqn.params['mode'],
      )
      infinities |= {absorbed} if masks[0].any() else set()
      return infinities, masks[0] & (np.asarray(members) == 0)
    args = [masks[i] if i in data else ops[i].value for i in range(len(ops))]
    if len(eqn.outvars) != 1 or any(a is None for a in args):
      return infinities, None
    return infinities, np.asarray(_bind_here(eqn, args))
  except Exception:  # noqa: BLE001  (an operation that cannot run on masks: anywhere)
    return infinities, None


_WINDOW_PARAMS = (
  'window_dimensions',
  'window_strides',
  'padding',
  'base_dilation',
  'window_dilation',
)
_ALL_MAXIMA = _MAXIMA | _ELEMENTWISE_MAX | positive_pass.SCATTER_MAXIMA
_MAXIMA_OF_MAX = frozenset({'max', 'reduce_max', 'reduce_window_max', 'scatter-max'})


def _body_op(eqn: jex_core.JaxprEqn) -> str | None:
  """The one operation of a generic ``reduce_window``'s computation, if one."""
  body = eqn.params.get('jaxpr')
  jaxpr = getattr(body, 'jaxpr', body)
  eqns = getattr(jaxpr, 'eqns', [])
  return eqns[0].primitive.name if len(eqns) == 1 else None


def _infinite(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind]) -> _Kind:
  """An operation on a value that is ``-inf`` (``inf``) where a ``segment_max``
  (``segment_min``) pools no member, or on a test of such a value.

  On the pass such a segment is 0, no unit, so the network is the pass's only where
  those entries are passed on, pooled by a max, or set to 0 (ReLU, ``jnp.maximum(s,
  0)``, ``jnp.where(jnp.isfinite(s), s, 0)``, ``jnp.nan_to_num(s, neginf=0)``). Anything
  else (a sum, a product, a 0 replaced by another value) is refused.
  """
  plain = [
    dataclasses.replace(k, infinities=frozenset(), at_infinity=None, infinite_at=None) for k in ops
  ]
  infinities = frozenset().union(*(k.infinities for k in ops))
  moved_test = any(k.at_infinity is not None for k in ops) and name not in ('not', 'select_n')
  pools = name in _ALL_MAXIMA or (name == 'reduce_window' and _body_op(eqn) in ('max', 'min'))
  if not moved_test and pools and _lets_through(eqn, name, ops):
    _refuse(
      name,
      'a max or min that passes on the -inf of an empty segment or window of another of its '
      'members (jnp.minimum(s, h), a min over nodes): on the pass it sums them, counting the '
      "other's paths where the network has the -inf. Set it to 0 first",
    )
  if not moved_test and (name in _PASSED_ON or pools or name in ('neg', 'abs')):
    out = _tracked(eqn, name, ops, _elementary(eqn, name, plain))
    if name in ('neg', 'abs') or name in _SAME_VALUE:  # jnp.isinf(s) tests abs(s)
      out = dataclasses.replace(out, finite_as=ops[0].finite_as or ops[0].ident)
    return out
  if name in _COMPARISONS or name == 'is_finite':
    return _tested_at_infinity(eqn, name, ops, plain)
  if name == 'not' and ops[0].at_infinity is not None:
    test = ops[0]
    return dataclasses.replace(
      _elementary(eqn, name, plain),
      at_infinity=tuple((v, not taken) for v, taken in test.at_infinity),
      value=None if test.value is None else np.logical_not(test.value),
    )
  if name == 'select_n' and ops[0].at_infinity is not None:
    if not any(k.at_infinity is not None for k in ops[1:]):
      return _guarded(eqn, ops, plain)
  elif name == 'select_n' and not any(k.at_infinity is not None for k in ops[1:]):
    return _tracked(eqn, name, ops, _elementary(eqn, name, plain))
  signs = ' or '.join(sorted('inf' if v > 0 else '-inf' for v in infinities)) or '-inf'
  _refuse(
    name,
    f'a value that is {signs} where a segment_max or segment_min pools no member (a graph '
    'node without neighbours; also a max pool of padding alone, a -inf pad, a fixed mask '
    'of -inf), or a test of one: on the pass such a node is no unit, so the '
    'pass would count paths that the network does not have. Set those entries to 0 first, '
    'with jnp.maximum(s, 0), jnp.where(jnp.isfinite(s), s, 0) or jnp.nan_to_num(s, '
    'neginf=0), or pool into zeros: jnp.zeros(...).at[ids].max(h)',
  )
  raise AssertionError  # unreachable: _refuse raises


def _lets_through(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind]) -> bool:
  """Whether a max (min) of several members can pass on a ``-inf`` (``inf``) of one,
  which is not its identity, while the pass sums the members."""
  through = np.inf if name in _MAXIMA_OF_MAX or _body_op(eqn) == 'max' else -np.inf
  if name in _ELEMENTWISE_MAX:
    return any(through in k.infinities for k in ops) and sum(k.dep for k in ops) > 1
  return through in ops[0].infinities or (
    name in positive_pass.SCATTER_MAXIMA and through in ops[2].infinities
  )


def _tested_at_infinity(eqn: jex_core.JaxprEqn, name: str, ops, plain) -> _Kind:
  """A comparison or ``is_finite`` of a value with infinities: a gate that also knows
  its value at each of them (and, if it only tells finite values from the others, its
  one value at every finite one)."""
  tested = [k for k in ops if k.infinities]
  same = len(ops) == 2 and eqn.invars[0] is eqn.invars[1]  # h != h: jnp.isnan
  if not same and (len(tested) != 1 or any(k.dep for k in ops if not k.infinities)):
    _refuse(name, 'a comparison of two activations, one of them -inf where a segment is empty')
  if any(not k.infinities and k.value is None for k in ops):
    _refuse(name, 'a comparison with a constant not known here')

  def at(v):
    scalars = [
      np.asarray(v, x.aval.dtype) if k.infinities else k.value for x, k in zip(eqn.invars, ops)
    ]
    taken = np.asarray(positive_pass.finite_value(eqn, [False] * len(ops), scalars))
    if taken.min() != taken.max():
      _refuse(name, 'a comparison with constants that differ from entry to entry')
    return bool(taken.flat[0])

  at_infinity = tuple((v, at(v)) for v in sorted(tested[0].infinities))
  if positive_pass.is_finiteness_test(eqn, [k.dep for k in ops]):
    value = _finite_value(eqn, plain).value
    return _Kind(
      dep=True,
      inp=tested[0].inp,
      gate=True,
      source=_root(tested[0]),
      params=tested[0].params,
      on_pass=bool(value.flat[0]),
      value=value,
      at_infinity=at_infinity,
    )
  return dataclasses.replace(_elementary(eqn, name, plain), at_infinity=at_infinity)


def _root(kind: _Kind) -> Any:
  """The activation whose infinite entries ``kind`` shares (itself, or the value it is
  an ``abs`` or ``neg`` of)."""
  return kind.finite_as or kind.ident


def _guarded(eqn: jex_core.JaxprEqn, ops: list[_Kind], plain: list[_Kind]) -> _Kind:
  """``select_n`` by a test of a value ``s`` with infinities: where ``s`` is infinite,
  the case taken must be 0 or ``s`` itself (its infinity then tracked further), and a
  finiteness test must take ``s`` where it is finite: on the pass, where ``s`` is
  finite everywhere and its infinite entries are no unit, the select is ``s``."""
  test, cases = ops[0], ops[1:]
  kept = set()
  for v, taken in test.at_infinity:
    case = cases[int(taken)]
    if test.source is not None and test.source in (case.ident, _root(case)):
      kept.add(v)
    elif case.dep or not _known(case, _zero):
      _refuse(
        'select_n',
        f'a value other than 0 put where a segment_max or segment_min pools no member (the '
        f'{v} of an empty segment; jnp.where(jnp.isfinite(s), s, c), or jnp.nan_to_num with '
        'another neginf): on the pass such a segment is no unit. Put 0 there',
      )
  if test.value is not None:  # a finiteness test: one case for every finite value
    out = cases[int(test.value.flat[0])]
    if _root(out) is None or _root(out) is not test.source:
      _refuse(
        'select_n',
        'a choice made by testing whether a segment_max has members (jnp.where(jnp.isfinite('
        's), h, 0) for another h): the pass, where every segment is finite, would always take '
        'h. Only jnp.where(jnp.isfinite(s), s, 0) and its spellings set the empty ones to 0',
      )
  else:
    out = _elementary(eqn, 'select_n', plain)
  where = out.infinite_at if kept else None
  return dataclasses.replace(out, infinities=frozenset(kept), at_infinity=None, infinite_at=where)


def _reduction(eqn: jex_core.JaxprEqn, name: str, ops: list[_Kind]) -> _Kind:
  body = eqn.params.get('jaxpr') or eqn.params.get('computation')
  jaxpr = body.jaxpr if hasattr(body, 'jaxpr') else body
  inner = [e.primitive.name for e in getattr(jaxpr, 'eqns', [])]
  if len(inner) != 1 or inner[0] not in ('add', 'max', 'min'):
    _refuse(
      name,
      f'a reduction whose computation is {" and ".join(inner) or "unknown"}, not a sum or a max',
    )
  if any(k.gate for k in ops):
    _refuse(name, 'a reduction of a step function')
  data = _join(ops[: len(ops) // 2])
  if data.of_params and inner[0] != 'add':
    _refuse_of_params(name, 'max', ops)
  start = {'add': _zero, 'max': _zero_or_minus_inf, 'min': _zero_or_inf}[inner[0]]
  if data.inp and not all(_known(k, start) for k in ops[len(ops) // 2 :]):
    _refuse(name, f'a {inner[0]} over windows that starts from a constant other than 0 (a clip)')
  return data


def _scan_kinds(eqn: jex_core.JaxprEqn, ops: list[_Kind]) -> list[_Kind]:
  """A scan's body, checked until the kinds of its carry stop growing: they only grow
  (joins), so this ends, after as many rounds as a value takes to pass through the carry
  (a pipeline of depth ``d`` takes ``d``)."""
  body = eqn.params['jaxpr']
  n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']
  kinds = list(ops)
  idents = [object() for _ in range(n_carry)]  # each carry is its own activation
  while True:
    outs = _check(body.jaxpr, [_Kind(value=c) for c in body.consts], kinds)
    carry = [_carried(a, b) for a, b in zip(kinds[n_consts : n_consts + n_carry], outs[:n_carry])]
    carry = [_identified(k, i) for k, i in zip(carry, idents)]
    if [k.flow() for k in carry] == [k.flow() for k in kinds[n_consts : n_consts + n_carry]]:
      return outs
    kinds[n_consts : n_consts + n_carry] = carry


def _identified(kind: _Kind, ident: Any) -> _Kind:
  """``kind``, named ``ident`` if it is an activation that a join left unnamed."""
  return dataclasses.replace(kind, ident=ident) if kind.act and kind.ident is None else kind


def _carried(before: _Kind, after: _Kind) -> _Kind:
  """A carry's kind over two rounds: a constant that the body keeps (a zero state that
  stays zero until a value reaches it) keeps its value."""
  kept = (
    not (before.dep or after.dep)
    and before.value is not None
    and after.value is not None
    and np.shape(before.value) == np.shape(after.value)
    and np.array_equal(before.value, after.value)
  )
  return before if kept else before.join(after)


def _folded(eqn: jex_core.JaxprEqn, ops: list[_Kind]) -> list[Any]:
  """The outputs of an equation on constants, where they can be computed here."""
  n_out = len(eqn.outvars)
  values = [k.value for k in ops]
  small = all(v is not None and np.size(v) <= _FOLD_LIMIT for v in values)
  small = small and not any(
    jax.dtypes.issubdtype(getattr(v, 'dtype', None), jax.dtypes.prng_key)
    for v in values
    if hasattr(v, 'dtype')
  )
  scatter = eqn.primitive.name in positive_pass.SCATTERS or eqn.primitive.name in _ALL_MAXIMA
  if not small or (any(_is_jaxpr(v) for v in eqn.params.values()) and not scatter):
    return [None] * n_out  # a scatter's update_jaxpr is no body of ours: counts fold
  if eqn.primitive.name in _SHARDING_CASTS:  # the value as it is, on any devices
    return values
  try:
    out = _bind_here(eqn, values)
  except Exception:  # noqa: BLE001  (a primitive that cannot run here: the value is unknown)
    return [None] * n_out
  return list(out) if eqn.primitive.multiple_results else [out]


#: Change only where a value lives, or its type inside shard_map (pvary): folded as the
#: value itself, since they cannot always be bound outside the trace's mesh.
_SHARDING_CASTS = frozenset({'pvary', 'reshard', 'mesh_cast', 'sharding_constraint'})


def _bind_here(eqn: jex_core.JaxprEqn, args: Sequence[Any]) -> Any:
  """``eqn``'s primitive applied to concrete ``args``, under an empty abstract mesh and
  without the sharding it was traced with (a shard_map's manual axes, which the user's
  ``jax.set_mesh`` around the call would contradict)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  params = {k: None if k in ('sharding', 'out_sharding') else v for k, v in params.items()}
  empty = jax.sharding.AbstractMesh((), ())
  with jax.sharding.use_abstract_mesh(empty):
    return eqn.primitive.bind(*args, **params)


def _finite_value(eqn: jex_core.JaxprEqn, ops: list[_Kind]) -> _Kind:
  """A test that tells finite activations from ``inf`` and NaN (``jnp.isfinite(h)``,
  ``h == -jnp.inf``): a constant, its value at every finite activation, which is what
  the pass computes too (``positive_pass.finite_value``)."""
  dependent = [k.dep for k in ops]
  scalars = [
    np.zeros((), v.aval.dtype) if d else k.value for v, k, d in zip(eqn.invars, ops, dependent)
  ]
  value = np.asarray(positive_pass.finite_value(eqn, dependent, scalars))
  return _Kind(value=np.broadcast_to(value, eqn.outvars[0].aval.shape))


def _zeros(eqn: jex_core.JaxprEqn) -> _Kind:
  return _zeros_of(eqn.outvars[0])


def _zeros_of(var: Any) -> _Kind:
  aval = var.aval
  small = np.prod(aval.shape, dtype=int) <= _FOLD_LIMIT
  return _Kind(value=np.zeros(aval.shape, aval.dtype) if small else None)


def _join(kinds: Sequence[_Kind]) -> _Kind:
  out = _CONST
  for k in kinds:
    out = out.join(k)
  return out


def _known(kind: _Kind, test) -> bool:
  if kind.value is None:
    return False
  try:
    return bool(test(np.asarray(kind.value)))
  except TypeError:  # a PRNG key
    return False


def _zero(value: np.ndarray) -> bool:
  return np.all(value == 0)


def _zero_or_infinite(value: np.ndarray) -> bool:
  return np.all((value == 0) | np.isinf(value))


def _positive(value: np.ndarray) -> bool:
  return np.all(value > 0)


def _zero_or_minus_inf(value: np.ndarray) -> bool:
  return np.all((value == 0) | (value == -np.inf))


def _zero_or_inf(value: np.ndarray) -> bool:
  return np.all((value == 0) | (value == np.inf))


def _known_non_finite(kind: _Kind) -> bool:
  return not kind.dep and _known(kind, lambda v: not np.all(np.isfinite(v)))


def _as_list(value: Any) -> list[Any]:
  if value is None:
    return []
  return list(value) if isinstance(value, (tuple, list)) else [value]


def _is_jaxpr(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return any(_is_jaxpr(v) for v in value)
  return isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr))


#: A comparison of an activation with 0 on the pass, where every activation is >= 0:
#: its value with the activation on the left, and on the right.
_ON_PASS = {
  'gt': (True, False),
  'ge': (True, False),
  'ne': (True, True),
  'lt': (False, True),
  'le': (False, True),
  'eq': (False, False),
}


def _compared_on_pass(name: str, ops: list[_Kind]) -> bool | None:
  """The value on the pass of ``h op 0`` or ``0 op h`` (a zero ``h`` passes nothing
  either way, so it counts as positive)."""
  if name not in _ON_PASS:
    return None
  return _ON_PASS[name][0 if ops[0].dep else 1]


def _logical_on_pass(name: str, ops: list[_Kind]) -> bool | None:
  values = [k.on_pass for k in ops]
  if any(v is None for v in values):
    return None
  if name == 'not':
    return not values[0]
  combine = {'and': all, 'or': any, 'xor': lambda v: sum(v) % 2 == 1}.get(name)
  return None if combine is None else bool(combine(values))


#: What ``_refuse_of_params`` says was made from the parameters' values.
_OF_PARAMS = {
  'choice': 'a branch chosen by testing them (jnp.where(a > 0, h, 0), lax.cond(a > 0, ...))',
  'max': (
    'a max or min of them (a non-negative kernel relu(w), a clip of the weights; softplus '
    'and logaddexp compute one inside)'
  ),
  'step': 'a step function of them (a learned mask such as h * (scores > 0))',
  'index': 'integers or indices computed from them',
}


def _refuse_of_params(name: str, what: str, kinds: Sequence[_Kind]) -> None:
  names = _PARAM_NAMES.get()
  involved = sorted(set().union(*(k.params for k in kinds)))
  which = ', '.join(names[i] for i in involved) if names and involved else 'the parameters'
  raise ValueError(
    f'apply_fn applies {name} to values of {which}: {_OF_PARAMS[what]}. On the |theta|^p '
    'pass every parameter is non-negative, so where one is negative the pass would take '
    'another branch, count edges that are off or read other indices, and the path '
    'scales would be those of another network. Make the choice outside apply_fn (a Python '
    'bool or a constant), or keep the constraint out of the forward pass: for a '
    "non-negative kernel, apply it to that leaf after each step (params['w'] = "
    "optax.projections.projection_non_negative(params['w']) after optax.apply_updates) "
    'rather than relu(w) inside apply_fn.'
  )


def _refuse_statistics(name: str, kind: _Kind) -> None:
  names = _PARAM_NAMES.get()
  which = ', '.join(names[i] for i in sorted(kind.params)) if names and kind.params else None
  _refuse(
    name,
    f'a root or division by {which or "the parameters"} alone: the variance of a '
    "normalisation, or weight normalisation. If these are BatchNorm's running statistics "
    '(use_running_average=True: a fixed affine map, in scope), they are not parameters: give '
    "path_normalize only the 'params' collection and close over 'batch_stats' in apply_fn "
    "(lambda q, x: model.apply({'params': q, 'batch_stats': stats}, x))",
  )


def _refuse(name: str, what: str) -> None:
  raise ValueError(
    f'apply_fn applies {name} to values computed from the params or the input: {what}. '
    'Path-SGD is defined for ReLU networks (linear maps, ReLU or leaky ReLU, max and '
    'average pooling): only there does rescaling a unit leave the function unchanged '
    '(Theorem 4.1), so that path scales exist. Masking the leaves of such a layer does '
    'not help: the other layers still pass through it. Train this network with another '
    'optimizer, or give path_normalize the apply_fn of a ReLU network.'
  )
