"""Expectation Reflection (ER): multiplicative learning from the ratio of observed to expected
outputs, then a least-squares refit; no loss and no learning rate.

Kim, Soh, Periwal and Jo, "Multiplicative Learning" (v2: "Multiplicative learning from
observation-prediction ratios"), arXiv:2503.10144, building on Expectation Reflection (Hoang,
Song, Periwal and Jo, Phys. Rev. E 99, 023311, 2019). The single-layer rule follows the authors'
public code (danhtaihoang/expectation-reflection and danhtaihoang/multiclass-classification) as
docs/rules/expectation_reflection.rst records. The paper's body was not available: the multilayer rule here is a
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

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _linalg, _mesh
from altgrad._lapack import single_threaded_lapack
from altgrad.nn import GRU, SimpleRNN
from altgrad.nn._base import at_step, check_number, is_concrete
from altgrad.nn._chain import Chain, chain_of, site_inverse
from altgrad.nn._intercept import describe_site, site_modules
from altgrad.nn._matrix_form import kernel_layout, matrix_form
from altgrad.nn._sites import SiteError
from altgrad.rules._common import (
  ApplyFn,
  Common,
  LossFn,
  Rule,
  UnpackFn,
  check_choice,
  check_precision,
  not_a_chain,
)

Array = jax.Array

Expectation = Literal["tanh_half", "tanh"]
Multiclass = Literal["ovr", "softmax"]
HiddenTarget = Literal["diff", "plain", "ratio"]
HiddenField = Literal["ratio", "atanh"]
EXPECTATIONS = get_args(Expectation)
MULTICLASS = get_args(Multiclass)
HIDDEN_TARGETS = get_args(HiddenTarget)
HIDDEN_FIELDS = get_args(HiddenField)
_SMALL = 1e-4  # below this |u|, g(u) = u / tanh(u) is replaced by its Taylor series
#: Below this magnitude of a hidden unit's back-projected prediction, ``hidden_target="ratio"``
#: takes the difference form for that unit (the ratio is undefined at 0).
RATIO_FLOOR = 1e-3
PerBatch = Literal["per_batch"]
PER_BATCH: PerBatch = "per_batch"


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
  field: Array, s: Array, *, expectation: Expectation = "tanh_half", multiclass: Multiclass = "ovr"
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
      _linalg.gram(x.T),
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
    return cls(mean, _linalg.cholesky(covariance + reg * eye))

  def solve(
    self, count: Array, targets: Array, cross: Array, *, center_outputs: bool = False
  ) -> tuple[Array, Array]:
    """``kernel = (C + reg I)^-1 Cov(x, h*)`` and ``bias = mean(h*) - mean(x) kernel`` from the
    sums of ``h*`` and of ``x h*^T``. ``center_outputs`` fixes the softmax gauge."""
    mean_t = targets / count
    kernel = _linalg.cho_solve(self.cholesky, cross / count - jnp.outer(self.mean, mean_t))
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


def _check_model(model: nnx.Module) -> list[tuple[Any, nnx.Module]]:
  """The model's site modules ``(path, module)`` in module order, checked as far as can be
  before a batch (the chain itself is read from the first batch's trace)."""
  sites = site_modules(model)
  if isinstance(model, (SimpleRNN, GRU)) or not sites:
    raise not_a_chain(model, "expectation_reflection", "an altgrad.nn MLP, conv net or another chain of linear layers")
  for path, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.RNN, nnx.RNNCellBase)):
      raise SiteError(
        f"expectation_reflection refits a chain of feed-forward layers, but {describe_site(tuple(path), module)} is a "
        "recurrence: use target_propagation, which inverts it through time, or backprop, consequentialism or "
        "node_perturbation"
      )
  for path, module in sites:
    if kernel_layout(module) is None:
      raise SiteError(
        f"expectation_reflection refits every layer's matrix by least squares on its inputs, but {describe_site(path, module)} "
        "is not one matrix on its input features (a LoRA layer's low-rank factors, a grouped, masked or "
        "input-dilated conv, an Einsum, a transposed conv): use target_propagation, backprop, consequentialism "
        "or node_perturbation on this model"
      )
    if getattr(module, "bias", None) is None:
      raise ValueError(
        f"expectation_reflection refits a bias in every layer, but {describe_site(path, module)} has none: "
        "build its layers with use_bias=True"
      )
  for _, module in sites[:-1]:
    activation = getattr(module, "activation", None)
    if activation is not None and activation.name != "tanh":
      raise ValueError(
        f"multilayer expectation_reflection reflects hidden fields through tanh; got activation {activation.name!r}"
      )
  return sites


def _check_chain(chain: Chain, outputs: Any) -> None:
  """ER reflects the last site's field and carries targets through tanh between sites."""
  if outputs is not chain.taps[-1].preact:
    raise SiteError(
      "expectation_reflection reflects the output layer's field, so the model must return its last linear "
      f"layer's output unchanged (logits), but something follows {chain.describe(len(chain.taps) - 1)}"
    )
  for index, link in enumerate(chain.links):
    if not link.invertible or link.activation.name != "tanh" or link.selects:
      what = link.blocker or ("a selection of units (a slice)" if link.selects else f"activation {link.activation.name!r}")
      raise SiteError(
        f"multilayer expectation_reflection reflects hidden fields through tanh, but between {chain.describe(index)} "
        f"and {chain.describe(index + 1)} lies {what}: use tanh followed at most by reshapes"
      )


def _check_no_free_params(view, params, taps) -> None:
  """ER refits linear layers only: a param outside them would get no update."""
  free = view.free_paths(params, taps)
  if free:
    names = ", ".join("/".join(map(str, p)) for p in free[:3]) + (f" and {len(free) - 3} more" if len(free) > 3 else "")
    raise SiteError(
      "expectation_reflection has no update for params outside linear layers (it refits each layer by least "
      "squares): give the rule the layers' params only, e.g. altgrad.Optimizer(model, tx, "
      "wrt=nnx.All(nnx.Param, nnx.Not(nnx.PathContains('embed')))), or train the others with another rule "
      f"through altgrad.rules.partition. They are {names}"
    )


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


def _check_data_size(data_size: int | PerBatch | None) -> None:
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


def _memory(data_size: int | PerBatch, batch_size: int) -> float:
  """The decay ``1 - B/N`` of the streamed moments (0: the batch alone)."""
  if data_size == PER_BATCH:
    return 0.0
  if is_concrete(data_size) and batch_size > data_size:
    raise ValueError(f"a batch of {batch_size} examples is larger than data_size={data_size}")
  return 1.0 - batch_size / data_size


def _check_options(reg, expectation, multiclass, hidden_target, hidden_field) -> None:
  check_number(reg, "reg", schedule=True)
  check_choice(expectation, "expectation", EXPECTATIONS)
  check_choice(multiclass, "multiclass", MULTICLASS)
  check_choice(hidden_target, "hidden_target", HIDDEN_TARGETS)
  check_choice(hidden_field, "hidden_field", HIDDEN_FIELDS)


def expectation_reflection(
  model: nnx.Module,
  *,
  data_size: int | PerBatch | None = None,
  reg: float = 0.01,
  expectation: Expectation = "tanh_half",
  multiclass: Multiclass = "ovr",
  hidden_target: HiddenTarget = "diff",
  hidden_field: HiddenField = "ratio",
  loss_fn: LossFn | None = None,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Expectation Reflection as a rule: its pseudo-gradient is ``params - refit``, so
  ``optax.sgd(1.0)`` after it lands exactly on ER's least-squares solution; a smaller step or
  momentum gives a relaxed ER. Labels are integer classes (``batch=(x, labels)``).

  One output layer (``MLP((n, classes))``): the field ``h = x W + b`` is reflected by the ratio
  of observed to expected output (:func:`reflect`) and ``W, b`` are refit by ridge least squares
  on ``x`` (docs/rules/expectation_reflection.rst). With one output the labels are binary {0, 1}.

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

  Any chain of linear layers with biases takes ER (altgrad's MLP and conv net, an
  ``nnx.Sequential`` or a module calling ``nnx.Linear``/``nnx.Conv`` one after another, read
  from the first batch's trace as target propagation reads it), with tanh (followed at most by
  reshapes) between layers and the last layer's output returned unchanged. A convolution is
  refit on its input patches (one row per output position), its targets carried down through
  its matrix-free ridge inverse [reconstruction on convolutions: the paper has dense layers].

  Args:
    model: a chain as above: linear layers with biases, tanh between them, logits out.
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
    apply, unpack, key: see :func:`altgrad.rules.backprop`.

  ``reg`` (and ``data_size``) may be arrays, and ``reg`` an optax schedule of the step count.

  The state records the batch's discrepancy ``mean((E[s] - s)^2 / 4)`` at the incoming params:
  the reference stops when it no longer falls (``altgrad.train.fit(..., stop_on_discrepancy=True)``).
  """
  rule = Rule("expectation_reflection", model, loss_fn, apply=apply, unpack=unpack, key=key, float32=True)
  paths = [path for path, _ in _check_model(model)]
  check_precision(model, "expectation_reflection", "solves a least-squares refit per layer")
  _check_data_size(data_size)
  _check_options(reg, expectation, multiclass, hidden_target, hidden_field)
  if len(paths) > 1 and is_concrete(at_step(reg, 0)) and at_step(reg, 0) == 0:
    raise ValueError(
      "multilayer expectation_reflection needs reg > 0: hidden targets use ridge pseudo-inverses"
    )
  single_threaded_lapack()

  def init_fn(params):
    dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
    modules = rule.pure.modules(params)
    shapes = [matrix_form(modules[path])[1]().shape for path in paths]
    moments = tuple(Moments.zeros(rows - 1, columns, dtype) for rows, columns in shapes)
    return ExpectationReflectionState(rule.common(params), jnp.asarray(jnp.inf, jnp.float32), moments)

  def step_fn(state, params, x, labels):
    step = rule.begin(state.common, x, labels)
    view, ridge = step.model, at_step(reg, step.count)
    clean = view.tapped(params, x)
    chain = chain_of(view, params, x, clean.taps, "expectation_reflection", minimum=1)
    _check_chain(chain, clean.outputs)
    _check_no_free_params(view, params, clean.taps)
    outputs = clean.taps[-1].preact.shape[-1]
    if multiclass == "softmax" and outputs < 2:
      raise ValueError("multiclass='softmax' needs at least two outputs")
    _check_labels(labels, outputs)
    field_target, discrepancy = reflect(
      clean.taps[-1].preact, spins(labels, outputs), expectation=expectation, multiclass=multiclass
    )
    field_targets = _hidden_field_targets(chain, field_target, ridge, hidden_target, hidden_field)
    order = [paths.index(tap.path) for tap in chain.taps]
    old = [state.moments[i] for i in order]
    matrices, streamed = _refit(chain, field_targets, discrepancy, old, ridge, _memory(data_size, step.batch_size), multiclass)
    updates = view.updates_from_matrices(params, matrices)
    moments = list(state.moments)
    for i, new in zip(order, streamed, strict=True):
      moments[i] = new
    mean_discrepancy = rule.mean(discrepancy).astype(jnp.float32)
    logged = mean_discrepancy if loss_fn is None else rule.mean(rule.losses(clean.outputs, labels, step.rows))
    variables = view.next_variables(params, view.variables, clean.taps)
    common = rule.finish(step, logged, variables)
    return updates, ExpectationReflectionState(common, mean_discrepancy, tuple(moments))

  return rule.transformation(init_fn, step_fn)


def _refit(chain: Chain, field_targets, discrepancy, old, ridge, memory, multiclass):
  """Every site refit bottom-up, each on the inputs the already refit sites below now give: the
  pseudo-gradients ``matrix - refit`` by path and the streamed moments, in call order."""
  matrices, streamed, inputs = {}, [], chain.taps[0].inputs
  last = len(chain.taps) - 1
  for i, (module, tap, target, previous) in enumerate(zip(chain.modules, chain.taps, field_targets, old, strict=True)):
    design, matrix = matrix_form(module)
    features = design(inputs)[:, :-1]  # the ones column of the bias: the refit centres instead
    batch_moments = _mesh.batch_sum(Moments.of(features, target.reshape(features.shape[0], -1), discrepancy))
    moments = previous.scaled(memory) + Moments(*(m.astype(previous.count.dtype) for m in batch_moments))
    kernel, bias = refit(moments, ridge, center_outputs=multiclass == "softmax" and i == last)
    current = matrix()
    matrices[tap.path, 0] = current - jnp.concatenate([kernel, bias[None]]).astype(current.dtype)
    streamed.append(moments)
    if i < last:
      inputs = chain.links[i].apply((features @ kernel + bias).reshape(tap.preact.shape).astype(tap.preact.dtype))
  return matrices, streamed


def _hidden_field_targets(chain: Chain, field_target, reg, hidden_target, hidden_field) -> list[Array]:
  """Every site's field target, the output's ``field_target`` carried down through each site's
  ridge inverse and the tanh below it (see :func:`expectation_reflection` for the forms)."""
  field_targets = [field_target]
  for index in range(len(chain.taps) - 1, 0, -1):
    tap, below = chain.taps[index], chain.taps[index - 1]
    inverse = site_inverse(chain.modules[index], tap.inputs, reg, coupled=chain.coupled)
    z_target = field_targets[0]
    if hidden_target == "plain":
      a_target = inverse.target(z_target)
    elif hidden_target == "diff":
      a_target = tap.inputs + inverse.displacement(z_target - tap.preact)
    else:
      a_target = ratio_target(tap.inputs, inverse.target(z_target), inverse.target(tap.preact))
    a_target = chain.links[index - 1].unstructure(a_target, below.preact)
    if hidden_field == "ratio":
      field_targets.insert(0, a_target * secant_ratio(below.preact))
    else:
      field_targets.insert(0, chain.links[index - 1].activation.inverse(a_target))
  return field_targets


def ratio_target(activity: Array, observed: Array, predicted: Array) -> Array:
  """``activity * observed / predicted`` per unit where that lies in tanh's range (-1, 1) and
  ``|predicted| >=`` :data:`RATIO_FLOOR`; elsewhere the difference form
  ``activity + observed - predicted`` (safe under autodiff)."""
  small = jnp.abs(predicted) < RATIO_FLOOR
  ratio = activity * observed / jnp.where(small, 1.0, predicted)
  difference = activity + observed - predicted
  return jnp.where(small | (jnp.abs(ratio) >= 1.0), difference, ratio)


def _single_layer(model: nnx.Module) -> Any:
  """The path of a single-layer model's one site."""
  sites = _check_model(model)
  if len(sites) != 1:
    raise ValueError(f"the streaming ER API refits one layer; this model has {len(sites)}")
  return sites[0][0]


def reflection_moments(
  model: nnx.Module, params: Any, batch, *, expectation: Expectation = "tanh_half", multiclass: Multiclass = "ovr"
) -> Moments:
  """The sufficient statistics of one ER refit of a single-layer model on ``batch``.

  Moments add (``a + b``), so a sweep over a data set larger than memory, or spread over devices,
  accumulates them batch by batch (or reduces them across devices) and solves once with
  :func:`reflection_solution`: exactly the refit of all the data in one batch.
  """
  _single_layer(model)
  _check_options(0.0, expectation, multiclass, "diff", "ratio")
  rule = Rule("reflection_moments", model, None)
  x, labels = rule.read_batch(batch)
  (tap,) = rule.pure.tapped(params, x).taps
  outputs = tap.preact.shape[-1]
  _check_labels(labels, outputs)
  design, _ = matrix_form(rule.pure.modules(params)[tap.path])
  features = design(tap.inputs)[:, :-1]
  target, discrepancy = reflect(tap.preact, spins(labels, outputs), expectation=expectation, multiclass=multiclass)
  return Moments.of(features, target.reshape(features.shape[0], -1), discrepancy)


def reflection_solution(
  model: nnx.Module, params: Any, moments: Moments, *, reg: float = 0.01, multiclass: Multiclass = "ovr"
) -> Any:
  """The refit params (shaped like ``params``) of a single-layer model from accumulated moments."""
  path = _single_layer(model)
  _check_options(reg, "tanh_half", multiclass, "diff", "ratio")
  kernel, bias = refit(moments, reg, center_outputs=multiclass == "softmax")
  view = Rule("reflection_solution", model, None).pure
  current = matrix_form(view.modules(params)[path])[1]()
  return view.updates_from_matrices(params, {(path, 0): jnp.concatenate([kernel, bias[None]]).astype(current.dtype)})
