"""Expectation Reflection (ER): multiplicative learning from the ratio of observed to expected
outputs, then a least-squares refit; no loss and no learning rate.

Kim, Soh, Periwal and Jo, "Multiplicative Learning" (v2: "Multiplicative learning from
observation-prediction ratios"), arXiv:2503.10144, building on Expectation Reflection (Hoang,
Song, Periwal and Jo, Phys. Rev. E 99, 023311, 2019). The single-layer rule follows the authors'
public code (danhtaihoang/expectation-reflection and danhtaihoang/multiclass-classification) as
spec/er.md records. The paper's body was not available: the multilayer rule here is a
reconstruction from its abstract ("modified gradient descent incorporating the inverse mapping of
target propagation"), not the paper's algorithm.

Minibatches: a refit from one minibatch alone has more unknowns per unit than the batch has rows,
so it interpolates the batch and erases the weights outside the batch's span. The rule therefore
refits from sufficient statistics streamed over the data set, ``M <- (1 - B/N) M + moments(batch)``
(``N = data_size``): with ``B = N`` it is exactly the full-batch rule, with ``B < N`` every refit
sees statistics of about the whole data set, the newest batches weighted most. No step size is
involved. This streaming is altgrad's, not the paper's (which states no minibatch rule).

Ridge convention: the refit solves ``(C + reg I) w = Cov(x, h*)`` with ``C`` the population
covariance of the inputs (the bias is not penalized), i.e. ``reg`` is added to the covariance as
the oldest reference file does (the 2019 package adds ``reg I / (2L)`` instead).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax
from flax import nnx

from altgrad import _mesh
from altgrad._lapack import single_threaded_lapack
from altgrad.nn import Dense, Sequential
from altgrad.nn._base import at_step, check_number, is_concrete
from altgrad.nn._sites import site_path
from altgrad.rules._common import Common, LossFn, Rule, UnpackFn, check_precision, not_a_chain

Array = jax.Array

EXPECTATIONS = ("tanh_half", "tanh")
MULTICLASS = ("ovr", "softmax")
HIDDEN_TARGETS = ("diff", "plain", "ratio")
HIDDEN_FIELDS = ("ratio", "atanh")
_SMALL = 1e-4  # below this |u|, g(u) = u / tanh(u) is replaced by its Taylor series
#: Below this magnitude of a hidden unit's back-projected prediction, ``hidden_target="ratio"``
#: takes the difference form for that unit (the ratio is undefined at 0).
RATIO_FLOOR = 1e-3
PER_BATCH = "per_batch"


def secant_ratio(u: Array) -> Array:
  """``g(u) = u / tanh(u)`` (even, >= max(1, |u|), ``g(0) = 1``), safe at 0 and under autodiff."""
  small = jnp.abs(u) < _SMALL
  safe = jnp.where(small, 1.0, u)
  return jnp.where(small, 1.0 + u * u / 3.0, safe / jnp.tanh(safe))


def spins(labels: Array, outputs: int) -> Array:
  """``s`` in {-1, +1}: one column ``2y - 1`` for one output, else ``2 onehot(y) - 1``."""
  if outputs == 1:
    return (2 * labels - 1).astype(jnp.float32)[:, None]
  return 2.0 * jax.nn.one_hot(labels, outputs) - 1.0


def reflect(
  field: Array, s: Array, *, expectation: str = "tanh_half", multiclass: str = "ovr"
) -> tuple[Array, Array]:
  """The reflected field ``h*`` and the discrepancy ``((E[s] - s) / 2)^2`` per example.

  ``"tanh_half"``: ``E[s] = tanh(h/2)`` (h is the logit of p(y=1)), ``h* = h s / tanh(h/2) =
  2 s g(h/2)``; ``"tanh"``: ``E[s] = tanh(h)``, ``h* = s g(h)``. A correct example keeps its sign
  with magnitude at least ``max(1, |h|)``; a wrong one is reflected. ``multiclass="softmax"`` is
  the joint variant: ``z_a = h_a - logsumexp_{b != a} h_b``, ``h*_a = log(1 - p_a) + 2 s_a g(z_a/2)``.
  """
  if multiclass == "softmax":
    others = _logsumexp_others(field)
    z = field - others
    log_not = others - jax.nn.logsumexp(field, axis=-1, keepdims=True)  # log(1 - p_a), never log(1 - p)
    target, logit = log_not + 2.0 * s * secant_ratio(z / 2), z
  elif expectation == "tanh_half":
    target, logit = 2.0 * s * secant_ratio(field / 2), field
  else:
    target, logit = s * secant_ratio(field), 2.0 * field
  # ((tanh(u/2) - s) / 2)^2 = sigmoid(-s u)^2 for s = +-1, without the cancellation of
  # 1 - tanh at confident fields (in float32 it left the stopping rule comparing rounding noise)
  discrepancy = jnp.mean(jax.nn.sigmoid(-s * logit) ** 2, axis=-1)
  return target, discrepancy


def rises(cost: Array, best: Array) -> Array:
  """Whether ``cost`` exceeds ``best`` by more than rounding: by a relative 16 ulps of its dtype.

  The reference stops when the discrepancy no longer falls. Near convergence it falls by about
  1e-7 of itself per refit, which float32 cannot resolve: an exact comparison there stopped on
  rounding noise where the reference (float64) goes on. A rise within rounding is not a rise.
  """
  cost = jnp.asarray(cost)
  return cost > best * (1 + 16 * jnp.finfo(cost.dtype).eps)


def _logsumexp_others(field: Array) -> Array:
  """``logsumexp_{b != a} field_b`` for every ``a``, stably."""
  n = field.shape[-1]
  mask = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, 0.0)
  return jax.nn.logsumexp(field[..., None, :] + mask, axis=-1)


class Moments(NamedTuple):
  """Sufficient statistics of one refit: sums over examples, so batches and devices add them.

  ``count``, ``inputs`` (sum x), ``outer`` (sum x x^T), ``targets`` (sum h*), ``cross``
  (sum x h*^T) and ``discrepancy_sum`` (sum of the per-example discrepancy).
  """

  count: Array
  inputs: Array
  outer: Array
  targets: Array
  cross: Array
  discrepancy_sum: Array

  def __add__(self, other: Moments) -> Moments:  # type: ignore[override]
    return Moments(*jax.tree.map(jnp.add, tuple(self), tuple(other)))

  def scaled(self, factor: float | Array) -> Moments:
    """Every sum times ``factor`` (a memory's decay)."""
    return Moments(*(factor * m for m in self))

  @classmethod
  def zeros(cls, features: int, outputs: int, dtype) -> Moments:
    """The moments of no examples."""
    z = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    return cls(z(), z(features), z(features, features), z(outputs), z(features, outputs), z())

  @classmethod
  def of(cls, x: Array, target: Array, discrepancy: Array) -> Moments:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    target = target.astype(x.dtype)
    return cls(
      jnp.asarray(x.shape[0], x.dtype),
      jnp.sum(x, axis=0),
      x.T @ x,
      jnp.sum(target, axis=0),
      x.T @ target,
      jnp.sum(discrepancy),
    )


class InputFactor(NamedTuple):
  """The inputs' mean and the Cholesky factor of their ridge covariance ``C + reg I``: fixed while
  the inputs are, so one factor serves every refit of a single layer."""

  mean: Array
  cholesky: Array

  @classmethod
  def of(cls, count: Array, inputs: Array, outer: Array, reg: float | Array) -> InputFactor:
    """From the sums of ``x`` and ``x x^T`` over ``count`` examples."""
    mean = inputs / count
    covariance = outer / count - jnp.outer(mean, mean)
    eye = jnp.eye(covariance.shape[0], dtype=covariance.dtype)
    return cls(mean, jnp.linalg.cholesky(covariance + reg * eye))

  def solve(
    self, count: Array, targets: Array, cross: Array, *, center_outputs: bool = False
  ) -> tuple[Array, Array]:
    """``kernel = (C + reg I)^-1 Cov(x, h*)`` and ``bias = mean(h*) - mean(x) kernel`` from the
    sums of ``h*`` and of ``x h*^T``. ``center_outputs`` fixes the softmax gauge."""
    mean_t = targets / count
    kernel = jsl.cho_solve((self.cholesky, True), cross / count - jnp.outer(self.mean, mean_t))
    bias = mean_t - self.mean @ kernel
    if center_outputs:
      kernel = kernel - jnp.mean(kernel, axis=1, keepdims=True)
      bias = bias - jnp.mean(bias)
    return kernel, bias


def refit(moments: Moments, reg: float | Array, *, center_outputs: bool = False) -> tuple[Array, Array]:
  """Ridge least squares of the targets on the inputs from their moments: ``(kernel, bias)``."""
  factor = InputFactor.of(moments.count, moments.inputs, moments.outer, reg)
  return factor.solve(moments.count, moments.targets, moments.cross, center_outputs=center_outputs)


class ExpectationReflectionState(NamedTuple):
  """The state of :func:`expectation_reflection`."""

  common: Common
  discrepancy: Array  # mean discrepancy of the batch at the params the update was computed from
  moments: tuple[Moments, ...]  # per layer, streamed over the data set (see the module docstring)


def _check_model(model: nnx.Module) -> list[Dense]:
  if not (isinstance(model, Sequential) and all(isinstance(layer, Dense) for layer in model.layers)):
    raise not_a_chain(model, "expectation_reflection", "an altgrad.nn MLP (a Sequential of Dense layers)")
  for layer in model.layers:
    if layer.bias is None:
      raise ValueError(
        "expectation_reflection refits a bias in every layer: build the Dense layers with use_bias=True"
      )
  for layer in model.layers[:-1]:
    if layer.activation.name != "tanh":
      raise ValueError(
        f"multilayer expectation_reflection reflects hidden fields through tanh; got activation {layer.activation.name!r}"
      )
  return list(model.layers)


def _check_labels(labels: Array, outputs: int) -> None:
  """Integer labels in range (checked on concrete labels; under jit only the dtype can be)."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"expectation_reflection needs integer class labels, got dtype {labels.dtype}")
  classes = 2 if outputs == 1 else outputs
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= classes):
      raise ValueError(
        f"labels must lie in [0, {classes}) for this model, got values from {values.min()} to {values.max()}"
      )


def _check_data_size(data_size: int | str | None) -> None:
  if data_size is None:
    raise ValueError(
      "expectation_reflection needs data_size: the number of training examples, over which its "
      "refits stream statistics (data_size = batch size is the full-batch rule). "
      f"data_size={PER_BATCH!r} refits on each batch alone, which interpolates every minibatch "
      "and forgets the rest of the data set"
    )
  if data_size == PER_BATCH:
    return
  if isinstance(data_size, (jax.Array, np.ndarray)) and jnp.issubdtype(data_size.dtype, jnp.integer):
    if not is_concrete(data_size):
      return  # traced (optax.inject_hyperparams): checked where it has a value
    data_size = data_size.item()
  if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
    raise ValueError(f"data_size must be a positive int or {PER_BATCH!r}, got {data_size!r}")


def _memory(data_size: int | str, batch_size: int) -> float:
  """The decay ``1 - B/N`` of the streamed moments (0: the batch alone)."""
  if data_size == PER_BATCH:
    return 0.0
  if is_concrete(data_size) and batch_size > data_size:
    raise ValueError(f"a batch of {batch_size} examples is larger than data_size={data_size}")
  return 1.0 - batch_size / data_size


def _check_options(reg, expectation, multiclass, hidden_target, hidden_field) -> None:
  check_number(reg, "reg", schedule=True)
  for name, value, allowed in (
    ("expectation", expectation, EXPECTATIONS),
    ("multiclass", multiclass, MULTICLASS),
    ("hidden_target", hidden_target, HIDDEN_TARGETS),
    ("hidden_field", hidden_field, HIDDEN_FIELDS),
  ):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def expectation_reflection(
  model: nnx.Module,
  *,
  data_size: int | str | None = None,
  reg: float = 0.01,
  expectation: str = "tanh_half",
  multiclass: str = "ovr",
  hidden_target: str = "diff",
  hidden_field: str = "ratio",
  loss_fn: LossFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Expectation Reflection as a rule: its pseudo-gradient is ``params - refit``, so
  ``optax.sgd(1.0)`` after it lands exactly on ER's least-squares solution; a smaller step or
  momentum gives a relaxed ER. Labels are integer classes (``batch=(x, labels)``).

  One output layer (``MLP((n, classes))``): the field ``h = x W + b`` is reflected by the ratio
  of observed to expected output (:func:`reflect`) and ``W, b`` are refit by ridge least squares
  on ``x`` (spec/er.md 2.1). With one output the labels are binary {0, 1}.

  Hidden layers [reconstruction, not the paper's algorithm]: the output field is reflected, then
  targets travel down through each layer's ridge inverse ``P(v) = v W^+``, as in target
  propagation. The activity target ``a*`` is ``hidden_target="diff"`` (default)
  ``a + P(z* - z)``, ``"plain"`` ``P(z* - b)`` (loses the part of ``a`` outside ``W``'s row
  space), or ``"ratio"`` ``a P(z* - b) / P(z - b)``: the unit's activity times the ratio of
  back-projected target to back-projected prediction (the difference form where
  ``|P(z - b)| <`` :data:`RATIO_FLOOR` or where the ratio target leaves tanh's range; unguarded,
  the ratio diverged within three minibatches on digits). The field target is then ``z* = a* g(z) = z a*/a``
  (``hidden_field="ratio"``, default: the output layer's reflection ``h* = h s/E[s]`` applied to a
  hidden unit) or ``atanh(a*)`` (``"atanh"``). Layers are refit bottom-up, each on the inputs the
  already refit layers below now give.

  Args:
    model: an MLP of Dense layers with biases (tanh hidden layers) and identity output.
    data_size: the number of training examples. Each layer's refit uses moments streamed as
      ``M <- (1 - B/data_size) M + moments(batch)``, so full-batch training (``B = data_size``)
      is the reference rule and minibatches see the whole data set's statistics. Required:
      ``"per_batch"`` refits on each batch alone (it interpolates every minibatch).
    reg: the ridge added to the input covariance (and of the pseudo-inverse of hidden targets).
    expectation: ``"tanh_half"`` (labels' logits, the reference default) or ``"tanh"``.
    multiclass: ``"ovr"`` (one-vs-rest, independent outputs) or ``"softmax"`` (joint).
    hidden_target, hidden_field: the multilayer options above.
    loss_fn: the loss the state logs (``state.common.loss``) of each update's clean pass, e.g.
      ``altgrad.losses.softmax_cross_entropy``; by default the discrepancy. ER itself uses no loss.
    unpack, key: see :func:`altgrad.rules.backprop` (ER calls the model as ``model(inputs)``).

  ``reg`` (and ``data_size``) may be arrays, and ``reg`` an optax schedule of the step count.

  The state records the batch's discrepancy ``mean((E[s] - s)^2 / 4)`` at the incoming params:
  the reference stops when it no longer falls (``altgrad.train.fit(..., stop_on_discrepancy=True)``).
  """
  rule = Rule("expectation_reflection", model, loss_fn, unpack=unpack, key=key, float32=True)
  layers = _check_model(model)
  check_precision(model, "expectation_reflection", "solves a least-squares refit per layer")
  _check_data_size(data_size)
  _check_options(reg, expectation, multiclass, hidden_target, hidden_field)
  outputs = layers[-1].out_features
  if multiclass == "softmax" and outputs < 2:
    raise ValueError("multiclass='softmax' needs at least two outputs")
  if len(layers) > 1 and is_concrete(at_step(reg, 0)) and at_step(reg, 0) == 0:
    raise ValueError(
      "multilayer expectation_reflection needs reg > 0: hidden targets use ridge pseudo-inverses"
    )
  single_threaded_lapack()

  def init_fn(params):
    dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
    moments = tuple(Moments.zeros(layer.in_features, layer.out_features, dtype) for layer in layers)
    return ExpectationReflectionState(rule.common(params), jnp.asarray(jnp.inf, jnp.float32), moments)

  def step_fn(state, params, x, labels):
    _check_labels(labels, outputs)
    step = rule.begin(state.common, x, labels)
    view, ridge = step.model, at_step(reg, step.count)
    memory = _memory(data_size, step.batch_size)
    sites = view.bind(params).sites()
    clean = view.tapped(params, x)
    taps = clean.taps
    field_target, discrepancy = reflect(
      taps[-1].preact, spins(labels, outputs), expectation=expectation, multiclass=multiclass
    )
    field_targets = _hidden_field_targets(sites, taps, field_target, ridge, hidden_target, hidden_field)
    matrices, streamed, inputs = {}, [], x
    for i, (site, tap, target, old) in enumerate(zip(sites, taps, field_targets, state.moments, strict=True)):
      features = site.decorrelated(inputs)
      batch_moments = _mesh.batch_sum(Moments.of(features, target, discrepancy))
      moments = old.scaled(memory) + Moments(*(m.astype(old.count.dtype) for m in batch_moments))
      kernel, bias = refit(moments, ridge, center_outputs=multiclass == "softmax" and i == len(sites) - 1)
      matrices[tap.path] = site.matrix() - jnp.concatenate([kernel, bias[None]]).astype(site.matrix().dtype)
      streamed.append(moments)
      inputs = site.activation(features @ kernel + bias)
    updates = view.updates_from_matrices(params, matrices)
    mean_discrepancy = rule.mean(discrepancy).astype(jnp.float32)
    logged = mean_discrepancy if loss_fn is None else rule.mean(rule.losses(clean.outputs, labels, step.rows))
    variables = view.next_variables(params, view.variables, taps)
    common = rule.finish(step, logged, variables)
    return updates, ExpectationReflectionState(common, mean_discrepancy, tuple(streamed))

  return rule.transformation(init_fn, step_fn)


def _hidden_field_targets(sites, taps, field_target, reg, hidden_target, hidden_field) -> list[Array]:
  """Every layer's field target, the output's ``field_target`` carried down through each layer's
  ridge inverse (see :func:`expectation_reflection` for the forms)."""
  field_targets = [field_target]
  for layer, tap, below, below_tap in zip(sites[:0:-1], taps[:0:-1], sites[-2::-1], taps[-2::-1], strict=True):
    solve = layer.ridge_solver(reg)
    z_target = field_targets[0]
    if hidden_target == "plain":
      a_target = solve(z_target - layer.bias[...])
    elif hidden_target == "diff":
      a_target = tap.inputs + solve(z_target - tap.preact)
    else:
      a_target = ratio_target(tap.inputs, solve(z_target - layer.bias[...]), solve(tap.preact - layer.bias[...]))
    if hidden_field == "ratio":
      field_targets.insert(0, a_target * secant_ratio(below_tap.preact))
    else:
      field_targets.insert(0, below.activation.inverse(a_target))
  return field_targets


def ratio_target(activity: Array, observed: Array, predicted: Array) -> Array:
  """``activity * observed / predicted`` per unit where that lies in tanh's range (-1, 1) and
  ``|predicted| >=`` :data:`RATIO_FLOOR`; elsewhere the difference form
  ``activity + observed - predicted`` (safe under autodiff)."""
  small = jnp.abs(predicted) < RATIO_FLOOR
  ratio = activity * observed / jnp.where(small, 1.0, predicted)
  difference = activity + observed - predicted
  return jnp.where(small | (jnp.abs(ratio) >= 1.0), difference, ratio)


def _single_layer(model: nnx.Module) -> Dense:
  layers = _check_model(model)
  if len(layers) != 1:
    raise ValueError(f"the streaming ER API refits one layer; this model has {len(layers)}")
  return layers[0]


def reflection_moments(
  model: nnx.Module, params: Any, batch, *, expectation: str = "tanh_half", multiclass: str = "ovr"
) -> Moments:
  """The sufficient statistics of one ER refit of a single-layer model on ``batch``.

  Moments add (``a + b``), so a sweep over a data set larger than memory, or spread over devices,
  accumulates them batch by batch (or reduces them across devices) and solves once with
  :func:`reflection_solution`: exactly the refit of all the data in one batch.
  """
  layer = _single_layer(model)
  _check_options(0.0, expectation, multiclass, "diff", "ratio")
  rule = Rule("reflection_moments", model, None)
  x, labels = rule.read_batch(batch)
  _check_labels(labels, layer.out_features)
  bound = rule.pure.bind(params)
  features = bound.sites()[0].decorrelated(x)
  target, discrepancy = reflect(
    bound.sites()[0].linear(x),
    spins(labels, layer.out_features),
    expectation=expectation,
    multiclass=multiclass,
  )
  return Moments.of(features, target, discrepancy)


def reflection_solution(
  model: nnx.Module, params: Any, moments: Moments, *, reg: float = 0.01, multiclass: str = "ovr"
) -> Any:
  """The refit params (shaped like ``params``) of a single-layer model from accumulated moments."""
  _single_layer(model)
  _check_options(reg, "tanh_half", multiclass, "diff", "ratio")
  kernel, bias = refit(moments, reg, center_outputs=multiclass == "softmax")
  view = Rule("reflection_solution", model, None).pure
  site = view.bind(params).sites()[0]
  return view.updates_from_matrices(
    params, {site_path(site): jnp.concatenate([kernel, bias[None]]).astype(site.matrix().dtype)}
  )
