"""A model as a chain of sites, and its layers' regularized inverses: what target propagation and
Expectation Reflection invert, on any Flax NNX model that is such a chain.

A model is a *chain* when its site calls ``s_1 .. s_L`` run once each, in order, and the input of
each ``s_{l+1}`` is a function ``g_l`` of ``s_l``'s output alone. That is read from a trace:
``PureModel.between`` runs the model from ``s_l``'s output to ``s_{l+1}``'s input, and
``jax.make_jaxpr`` of it must show that input depending on ``z_l`` and on nothing of the model's
input but through it (a skip or residual connection, attention's three projections of one input, a
second branch are not chains; the error names the site).

The trace also says what ``g_l`` is. When it is a known invertible elementwise activation (tanh,
sigmoid, altgrad's leaky_relu; or none) followed only by structural operations (reshape,
transpose, squeeze, expand_dims, a dtype cast) or slices, the link is *invertible*: ``g_l =
S(a(z))`` with ``S`` a permutation of elements, inverted exactly (``S^T``), or a selection of
some (an RNN's last state, ``h[:, -1]``), inverted by its least-norm inverse ``S^T``, and by the
activation's guarded inverse. Otherwise (relu, pooling, normalization, dropout, ...) it is not, and a layer ``x_l ->
g_l(s_l(x_l))`` is inverted, linearized, by the regularized least squares of its Jacobian ``J``:
``(J^T J + r I)^-1 J^T d`` [reconstruction: the spec's generic fallback, not the paper's inverse].

A site's own regularized inverse ``argmin_x ||s(x) - v||^2 + r ||x||^2`` is closed form where the
site is a dense product of its input (``nnx.Linear``, ``LinearGeneral``, altgrad's ``Dense``; the
matrix read from the site's JVP on the identity), and matrix-free conjugate gradients on the
normal equations otherwise (a convolution, strided, padded or dilated): one JVP and one transpose
per iteration, stopped at a relative residual of :data:`CG_TOLERANCE` or after ``iterations``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from altgrad import _mesh
from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import Activation, get_activation
from altgrad.nn._intercept import describe_site, is_site_module, user_class
from altgrad.nn._matrix_form import kernel_layout, linear_map
from altgrad.nn._sites import SiteError, Tap

Array = jax.Array

#: Operations that only move elements (or cast them): a link made of them is inverted exactly.
STRUCTURAL = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "convert_element_type", "copy", "copy_p"})
#: Operations that keep some elements (``h[:, -1]``): inverted by their transpose, the
#: least-norm inverse, which puts nothing on the elements dropped.
SELECTING = frozenset({"slice"})
#: The traced operations recognized as invertible activations, by primitive or jitted function name.
_ACTIVATIONS = {"tanh": "tanh", "logistic": "sigmoid", "altgrad_leaky_relu": "leaky_relu"}
#: Conjugate gradients stop once every example's residual is below this fraction of its right side.
CG_TOLERANCE = 1e-6
CG_ITERATIONS = 50


def transpose_at(fn: Callable[[Array], Array], at: Array) -> Callable[[Array], Array]:
  """``y -> J_fn(at)^T y``, the transpose of an affine ``fn``'s linear part, from a VJP at ``at``
  (unlike ``jax.linear_transpose``, it keeps the axis types of a batch sharded by ``shard_map``)."""
  out, pull_back = jax.vjp(fn, at)
  return lambda y: pull_back(y.astype(out.dtype))[0].astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class Link:
  """What lies between one site's output ``z`` and the next site's input: ``apply(z)``.

  ``activation`` and ``structure`` are set when the link is ``structure(activation(z))`` (an
  invertible link); ``blocker`` otherwise names the first operation that is not of that form.
  ``selects``: ``structure`` keeps only some elements (a slice), so its inverse, the transpose,
  is a least-norm one: right for displacements, not for targets.
  """

  apply: Callable[[Array], Array]
  activation: Activation | None
  structure: Callable[[Array], Array] | None
  blocker: str | None
  selects: bool = False

  @property
  def invertible(self) -> bool:
    return self.activation is not None

  def unstructure(self, y: Array, like: Array) -> Array:
    """``S^-1 y`` in the shape of ``like`` (the pre-activation): ``S`` only permutes elements, so
    its transpose (a VJP at ``like``, which keeps a sharded batch's axis types) inverts it."""
    return transpose_at(self.structure, like)(y)

  def vjp(self, at: Array, cotangent: Array) -> Array:
    """``J_g(at)^T cotangent``: the gradient at the site's output of ``<g(z), cotangent>``."""
    _, pull_back = jax.vjp(self.apply, at)
    return pull_back(cotangent.astype(at.dtype))[0]


@dataclasses.dataclass(frozen=True)
class Chain:
  """A model's site calls as a chain: ``modules[l]`` was called on ``taps[l].inputs``, and
  ``links[l]`` takes its output to ``taps[l + 1].inputs``. ``coupled``: a layer mixes the
  examples of a batch (BatchNorm in training mode), so solves run over the whole batch."""

  modules: tuple[Any, ...]
  taps: tuple[Tap, ...]
  links: tuple[Link, ...]
  coupled: bool

  def describe(self, index: int) -> str:
    return describe_site(self.taps[index].path, self.modules[index])


def chain_of(
  view: Any, params: Any, inputs: Any, taps: Sequence[Tap], rule: str, *, minimum: int = 2, start: int = 0
) -> Chain:
  """The chain of ``view``'s model at ``params`` on ``inputs`` (``taps``: a pass's, the chain
  being those from ``start`` on), or a :class:`SiteError` naming where it is not one;
  ``minimum``: the fewest sites it may have."""
  modules = view.modules(params)
  offset, taps = start, taps[start:]
  if len(taps) < minimum:
    raise SiteError(f"{rule} needs at least one hidden layer: a linear layer below the output layer")
  for tap in taps:
    if tap.nested:
      raise SiteError(
        f"{rule} inverts the model site by site in call order, but {describe_site(tap.path, modules[tap.path])} "
        "runs inside an NNX transform (nnx.scan, nnx.vmap, nnx.remat): call the layers one after another"
      )
  paths = [tap.path for tap in taps]
  for i, path in enumerate(paths):
    if path in paths[:i]:
      raise SiteError(
        f"{rule} inverts each layer of a chain once, but {describe_site(path, modules[path])} is called more than "
        "once: give each call its own layer (shared weights), or scan a recurrent cell with nnx.RNN(cell), "
        "which target_propagation inverts through time"
      )
  links = tuple(_read_link(view, params, inputs, taps, i, modules, rule, offset) for i in range(len(taps) - 1))
  return Chain(tuple(modules[p] for p in paths), tuple(taps), links, view.batch_coupled)


def _read_link(view, params, inputs, taps, index, modules, rule, offset) -> Link:
  """The link after site call ``index`` (``offset + index`` in the pass), checked to be a
  chain's and classified from its trace."""
  z, call = taps[index].preact, offset + index
  jaxpr = jax.make_jaxpr(lambda x, z: view.between(params, x, call, z))(inputs, z)
  jaxpr = jaxpr.jaxpr
  x_vars = jaxpr.invars[:-1]
  from_x, from_z = _dependents(jaxpr, x_vars), _dependents(jaxpr, jaxpr.invars[-1:])
  (out,) = jaxpr.outvars
  if isinstance(out, Literal) or out not in from_z or out in from_x:
    here = describe_site(taps[index + 1].path, modules[taps[index + 1].path])
    below = describe_site(taps[index].path, modules[taps[index].path])
    raise SiteError(
      f"{rule} needs a chain of layers, but the input of {here} is not a function of {below}'s output alone "
      "(a skip or residual connection, or a branch): use backprop, consequentialism or node_perturbation on "
      "this model. Chains are nnx.Sequential, or a module whose __call__ applies linear layers one after "
      "another with elementwise activations, pooling and reshapes between them"
    )
  needed = _needed(jaxpr)
  eqns = [e for e in jaxpr.eqns if _uses(e, from_z) and any(v in needed for v in e.outvars)]
  activation, structure, blocker = _classify(eqns, jaxpr.invars[-1], _layers_by_class(modules))
  selects = any(e.primitive.name in SELECTING for e in eqns)
  return Link(lambda z: view.between(params, inputs, call, z), activation, structure, blocker, selects)


def _uses(eqn, variables: set) -> bool:
  return any(not isinstance(v, Literal) and v in variables for v in eqn.invars)


def _dependents(jaxpr, sources) -> set:
  """The variables of ``jaxpr`` that depend on ``sources`` (through any operation)."""
  found = set(sources)
  for eqn in jaxpr.eqns:
    if _uses(eqn, found):
      found.update(eqn.outvars)
  return found


def _needed(jaxpr) -> set:
  """The variables of ``jaxpr`` that its outputs depend on (the next site's own call is not)."""
  found = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in found for v in eqn.outvars):
      found.update(v for v in eqn.invars if not isinstance(v, Literal))
  return found


def _layers_by_class(modules: dict) -> dict[str, list[str]]:
  """The model's modules that are not sites, by class name: where a traced operation comes from."""
  layers: dict[str, list[str]] = {}
  for path, module in modules.items():
    if path and not is_site_module(module):
      cls = user_class(module)
      layers.setdefault(cls.__qualname__, []).append(describe_site(path, module))
  return layers


def _operation(eqn, layers: dict[str, list[str]]) -> str:
  """How an error names a traced operation: the layer of the model it runs in (``norm
  (flax.LayerNorm)``), found from the frames that traced it, else ``primitive (function name)``."""
  for frame in eqn.source_info.traceback.frames if eqn.source_info.traceback is not None else ():
    owner, _, method = frame.function_name.rpartition(".")
    if method == "__call__" and owner in layers:
      return " or ".join(layers[owner])
  name, inner = eqn.params.get("name"), eqn.params.get("call_jaxpr")
  if name is None and inner is not None and getattr(inner, "jaxpr", inner).eqns:
    name = getattr(inner, "jaxpr", inner).eqns[0].params.get("name")
  return eqn.primitive.name if name is None else f"{eqn.primitive.name} ({name})"


def _classify(eqns, z_var, layers: dict[str, list[str]]) -> tuple[Activation | None, Callable | None, str | None]:
  """``(activation, structure, None)`` when ``eqns`` (those that depend on ``z``) are one known
  invertible activation of ``z`` (or none) followed by structural operations, each of the one
  before's output; else ``(None, None, the first other operation)``."""
  current, start = z_var, 0
  activation = get_activation("identity")
  if eqns:
    first = eqns[0]
    name = _ACTIVATIONS.get(first.primitive.name) or _ACTIVATIONS.get(str(first.params.get("name")))
    if name is not None and list(first.invars) == [z_var]:
      activation, current, start = get_activation(name), first.outvars[0], 1
  tail = eqns[start:]
  for eqn in tail:
    if eqn.primitive.name not in STRUCTURAL | SELECTING or list(eqn.invars) != [current]:
      return None, None, _operation(eqn, layers)
    current = eqn.outvars[0]

  def structure(w):
    for eqn in tail:
      (w,) = jax.tree.leaves(eqn.primitive.bind(w, **eqn.params))
    return w

  return activation, structure, None


# --- A site's regularized inverse --------------------------------------------------------------


def _trailing(x: Array, width: int) -> tuple[int, ...]:
  """The last axes of ``x`` whose sizes multiply to ``width`` (a dense site's input features)."""
  for k in range(1, x.ndim + 1):
    if math.prod(x.shape[-k:]) == width:
      return tuple(x.shape[-k:])
  raise ValueError(f"no trailing axes of {x.shape} hold {width} features")


@dataclasses.dataclass(frozen=True)
class SiteInverse:
  """``argmin_x ||s(x) - v||^2 + reg ||x||^2`` of one site ``s`` called on inputs like ``like``.

  :meth:`displacement` solves for a change of output (the bias cancels), :meth:`target` for an
  output. Closed form for a dense product (``dense``: a :class:`RidgeSolver` of the site's
  matrix), conjugate gradients on ``J^T J + reg I`` otherwise.
  """

  linear: Callable[[Array], Array]  # the site's linear part
  transpose: Callable[[Array], Array]  # its transpose
  offset: Callable[[], Array]  # s(0)
  like: Array
  reg: Any
  dense: RidgeSolver | None
  coupled: bool
  iterations: int

  def displacement(self, dz: Array) -> Array:
    if self.dense is not None:
      return self.dense(dz.reshape(-1, self.dense.kernel.shape[1])).reshape(self.like.shape)
    return regularized_least_squares(
      self.linear, self.transpose, dz, self.reg, coupled=self.coupled, iterations=self.iterations
    )

  def target(self, v: Array) -> Array:
    return self.displacement(v - self.offset())


def site_inverse(module: Any, like: Array, reg: Any, *, coupled: bool, iterations: int = CG_ITERATIONS) -> SiteInverse:
  """The :class:`SiteInverse` of ``module`` on inputs shaped like ``like``."""
  like = jnp.asarray(like)
  _, linear = jax.linearize(lambda x: linear_map(module, x), like)
  transpose = transpose_at(lambda x: linear_map(module, x), like)
  layout = kernel_layout(module)
  dense = None
  if layout is not None and not layout.fused:
    width = layout.features(like).shape[-1]
    eye = jnp.eye(width, dtype=like.dtype).reshape(width, *_trailing(like, width))
    basis = jax.jvp(lambda x: linear_map(module, x), (jnp.zeros_like(eye),), (eye,))[1]
    dense = RidgeSolver.create(basis.reshape(width, -1), reg)
  offset = lambda: linear_map(module, jnp.zeros_like(like))  # noqa: E731
  return SiteInverse(linear, transpose, offset, like, reg, dense, coupled, iterations)


def regularized_least_squares(
  forward: Callable[[Array], Array],
  transpose: Callable[[Array], Array],
  d: Array,
  reg: Any,
  *,
  coupled: bool,
  iterations: int = CG_ITERATIONS,
) -> Array:
  """``(J^T J + reg I)^-1 J^T d`` for a linear ``J`` given as ``forward`` and ``transpose``, by
  conjugate gradients from zero on every example at once: each example's own system unless
  ``coupled`` (a map that mixes examples), then one system over the whole batch."""
  rhs = transpose(d)
  normal = lambda p: transpose(forward(p)) + reg * p  # noqa: E731

  def dot(a, b):
    if coupled:
      return _mesh.batch_sum(jnp.sum(a * b))
    return jnp.sum(a * b, axis=tuple(range(1, a.ndim)), keepdims=True)

  x, r = jnp.zeros_like(rhs), rhs  # the residual of x = 0 is the right side
  bound = (CG_TOLERANCE**2) * dot(rhs, rhs)

  def step(carry):
    k, x, r, p, rs = carry
    q = normal(p)
    curvature = dot(p, q)
    alpha = jnp.where(curvature > 0, rs / jnp.where(curvature > 0, curvature, 1.0), 0.0)
    x, r = x + alpha * p, r - alpha * q
    new = dot(r, r)
    beta = jnp.where(rs > 0, new / jnp.where(rs > 0, rs, 1.0), 0.0)
    return k + 1, x, r, r + beta * p, new

  def going(carry):
    return (carry[0] < iterations) & jnp.any(carry[4] > bound)

  rs = dot(r, r)
  return jax.lax.while_loop(going, step, (0, x, r, r, rs))[1]
