"""What every rule shares: the common part of its state, how it reads a batch and calls the
model, and the optax transformation around its step.

A rule module writes ``init_fn(params)`` and ``step_fn(state, params, inputs, targets)``;
:meth:`Rule.transformation` makes them an ``optax.GradientTransformationExtraArgs`` whose
``update(updates, state, params, *, batch)`` ignores ``updates`` (a rule is the source of the
update, as ``jax.grad`` is), checks ``params`` and the batch, and runs the step, in Auto mode
under a mesh with Explicit axes. Inside the step, :meth:`Rule.begin` gives the step's model view,
keys and batch sizes, and :meth:`Rule.finish` the next common state.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _mesh
from altgrad.nn import Layer, PureModel, RNNCell
from altgrad.nn._base import describe_shape, is_concrete
from altgrad.nn._intercept import describe_site, site_modules
from altgrad.nn._pure import ApplyFn, LossFn
from altgrad.nn._signature import model_signature

Array = jax.Array
#: ``unpack(batch) -> (inputs, targets)``: how a rule splits the batch it is given.
UnpackFn = Callable[[Any], tuple[Any, Any]]
#: What a rule that takes ``free_params`` does to params outside every site (the same for every
#: rule): their loss gradient, weight perturbation (or a weight tangent) in a pass of its own, or nothing.
FreeParams = Literal["gradient", "perturb", "frozen"]
FREE_PARAMS = get_args(FreeParams)

__all__ = ["ApplyFn", "Common", "LossFn", "Rule", "Step", "UnpackFn", "check_precision", "not_a_chain"]


class Common(NamedTuple):
  """What every rule's state carries, as ``state.common`` (read it with
  ``optax.tree_utils.tree_get(state, "loss")`` from any chain or wrapper)."""

  step: Array  # int32: updates done; the step count that scheduled hyperparameters read
  key: Array  # PRNG key of the next update: its noise and the model's call-time rngs
  loss: Array  # float32: mean loss of the last update's clean pass, at the params it was given (inf before any)
  model_variables: Any  # the model's other variables: BatchNorm statistics, RNG counts, decorrelation


@dataclasses.dataclass(frozen=True)
class Step:
  """One update as a rule computes it (:meth:`Rule.begin`): the model's view with the state's
  variables and this step's call-time rngs, the batch, keys and sizes."""

  model: PureModel  # with the state's variables and this step's call-time rngs
  inputs: Any
  targets: Any
  keys: Array  # this step's noise keys, independent across shard_map's devices
  shared_keys: Array  # this step's keys of what every device must draw alike (weight noise)
  count: Array  # updates done before this one
  rows: int  # rows of the batch on this device
  batch_size: int  # rows of the whole batch (every device's, inside shard_map)
  next_key: Array


def check_loss_fn(loss_fn: object) -> None:
  if not callable(loss_fn):
    raise TypeError(
      "loss_fn must be a function (outputs, targets) -> per-example losses, such as "
      f"altgrad.losses.softmax_cross_entropy; got {type(loss_fn).__name__}"
    )


def check_static_int(value: Any, name: str, *, minimum: int) -> int:
  """A structural integer (how many passes a step runs): a Python int, never an array."""
  if isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(
      f"{name} fixes the shape of the rule's step, so it cannot be an array (got {describe_shape(value)}); "
      f"with optax.inject_hyperparams, name it in static_args=(..., {name!r})"
    )
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return value


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
  """Refuses an option string outside ``choices``, naming the option and the choices."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _seed(key: Any) -> Array:
  """A typed PRNG key from ``key``: an int seed (a Python int or an integer array) or a key."""
  if isinstance(key, (jax.Array, np.ndarray)) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if isinstance(key, bool) or not (
    isinstance(key, int) or (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0)
  ):
    raise TypeError(f"key must be an int seed or a PRNG key (jax.random.key), got {key!r}")
  return jax.random.key(key)


@jax.jit
def _fingerprint(params: Any) -> Array:
  """A uint32 hash of the params' bits: folded into a rule's key at ``init``, so that runs
  initialized from different params (``jax.vmap(tx.init)`` over seeds) draw different noise."""
  total = jnp.uint32(0)
  for leaf in jax.tree.leaves(params):
    if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
      continue
    words = jax.lax.bitcast_convert_type(jnp.ravel(leaf).astype(jnp.float32), jnp.uint32)
    odd = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    total = total * jnp.uint32(0x9E3779B1) + jnp.sum(words * odd, dtype=jnp.uint32)
  return total


def _is_masked(leaf: Any) -> bool:
  return isinstance(leaf, optax.MaskedNode)


# Transformations that would call a rule's init from outside it, with the composition that works.
_WRAPPERS = {
  optax.MultiSteps.init.__code__: (
    "optax.MultiSteps accumulates the updates coming into it, which a rule ignores (each step "
    "would be the last micro-batch's). Put it after the rule: optax.chain(rule, "
    "optax.MultiSteps(optimizer, k)) accumulates the rule's pseudo-gradients over k micro-batches"
  ),
  optax.apply_if_finite(optax.identity(), 0).init.__code__: (
    "optax.apply_if_finite checks the updates coming into it, which a rule ignores. Put it after "
    "the rule, optax.chain(rule, optax.apply_if_finite(optimizer, n)), or guard the rule's state "
    "too with altgrad.rules.finite_guard(optax.chain(rule, optimizer))"
  ),
}
_OPTIMIZER_INIT = inspect.unwrap(nnx.Optimizer.__init__).__code__


class Rule:
  """The machinery every rule is written on, altgrad's own and yours (docs/rules/write_your_own.rst).

  A rule is a factory that builds a ``Rule`` and returns :meth:`transformation` of two functions:

  - ``init_fn(params) -> state``: a ``NamedTuple`` whose field ``common`` is :meth:`common`
    (``fit``, ``fit_seeds``, checkpoints, ``partition``, ``finite_guard``, ``altgrad.Optimizer``
    and ``optax.tree_utils.tree_get(state, "loss")`` read it there), plus whatever else the rule
    carries (feedback weights, moments): arrays, checkpointed and sharded as the state is;
  - ``step_fn(state, params, inputs, targets) -> (updates, state)``: opens with :meth:`begin`
    (the step's :class:`Step`: the model's view, keys, batch sizes), computes a params-shaped
    update with a gradient's sign from the view (``step.model``: ``tapped``, ``errors``,
    ``updates_from_errors``, ``free_params``, ``next_variables``; see ``altgrad.nn.PureModel``)
    and ends with :meth:`finish` (the next common state).

  The transformation checks params and batches (``unpack``, shapes, finiteness: an error that
  names the fix), refuses the wrappers that cannot work around a rule and a plain
  ``nnx.Optimizer`` on a model with state to advance, runs the step in Auto mode under a mesh
  with Explicit axes, and works inside ``shard_map`` (statistics through ``altgrad._mesh``; the
  view's ``errors`` and ``mean_loss`` reduce over every device already). Float hyperparameters
  take schedules of ``step.count`` (``at_step``) and ``optax.inject_hyperparams``.

  Args:
    name: the rule's name, for error messages.
    model: any Flax NNX model (cloned, never modified).
    loss_fn: ``loss_fn(outputs, targets)``: per-example losses of any shape ``(batch, ...)``
      (averaged over all but the batch axis: an example's loss is its mean), or, where the rule
      allows it (``per_example=False``), one number for the batch.
    apply: ``apply(model, inputs, rngs) -> outputs``, how the model is called (default
      ``model(inputs)``); ``rngs`` is an ``nnx.Rngs`` drawn from the rule's state.
    unpack: ``unpack(batch) -> (inputs, targets)`` (default: the batch is that pair).
    key: the seed or PRNG key of the rule's randomness.
    float32: the rule's passes compute in float32 whatever the layers' ``dtype``.
    per_example: the rule needs one loss per example.
  """

  def __init__(
    self,
    name: str,
    model: nnx.Module,
    loss_fn: LossFn | None,
    *,
    apply: ApplyFn | None = None,
    unpack: UnpackFn | None = None,
    key: Any = 0,
    float32: bool = False,
    per_example: bool = False,
  ):
    if loss_fn is not None:
      check_loss_fn(loss_fn)
    if unpack is not None and not callable(unpack):
      raise TypeError(f"unpack must be a function batch -> (inputs, targets), got {type(unpack).__name__}")
    self.name, self.loss_fn, self.unpack, self.per_example = name, loss_fn, unpack, per_example
    self.seed = _seed(key)
    self.pure = PureModel(model, apply=apply, float32=float32)
    #: The structure of the model the rule was built from (``fit`` checks its model against it).
    self.model_signature = model_signature(model)
    self.layer = model if isinstance(model, Layer) else None

  # --- the transformation ---------------------------------------------------------------------

  def transformation(
    self, init_fn: Callable[[Any], Any], step_fn: Callable[[Any, Any, Any, Any], tuple[Any, Any]]
  ) -> optax.GradientTransformationExtraArgs:
    """The rule as an optax transformation: ``init_fn(params)`` and
    ``step_fn(state, params, inputs, targets) -> (updates, state)``."""

    def init(params):
      self._check_params(params)
      self._check_composition()
      return init_fn(params)

    def update(updates, state, params=None, *, batch=None, **extra_args):
      del updates, extra_args  # a rule is the source of the update, as jax.grad is
      self._check_params(params)
      inputs, targets = self.read_batch(batch)
      return _mesh.auto_sharded(step_fn, like=(params, state))(state, params, inputs, targets)

    return optax.GradientTransformationExtraArgs(init, update)

  def common(self, params: Any) -> Common:
    """The common part of the rule's initial state."""
    key = jax.random.fold_in(self.seed, _fingerprint(params))
    return Common(jnp.zeros((), jnp.int32), key, jnp.full((), jnp.inf, jnp.float32), self.pure.variables_for(params))

  def begin(self, common: Common, inputs: Any, targets: Any, *, noise_keys: int = 0) -> Step:
    """The step's model view (the state's variables, call-time rngs), keys and batch sizes, with
    ``noise_keys`` keys of noise of each kind. The key is split once (each split is a hash
    compiled of its own); JAX's partitionable threefry makes the next key and the call key the
    same whatever ``noise_keys`` is, so rules that share a state draw the same call-time rngs."""
    keys = jax.random.split(common.key, 2 + 2 * noise_keys)
    next_key, call_key = keys[0], keys[1]
    device_keys, shared_keys = keys[2 : 2 + noise_keys], keys[2 + noise_keys :]
    index = _mesh.device_index()
    if index is not None:  # inside shard_map: each device draws for its own rows
      call_key = jax.random.fold_in(call_key, index)
      device_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(device_keys, index)
    rows = jax.tree.leaves(inputs)[0].shape[0]
    model = self.pure.at(common.model_variables, call_key)
    return Step(model, inputs, targets, device_keys, shared_keys, common.step, rows, _mesh.batch_count(rows), next_key)

  def finish(self, step: Step, loss: Array, variables: Any) -> Common:
    """The next common state: one more update, the next key, its clean loss and variables."""
    return Common(step.count + 1, step.next_key, jnp.asarray(loss, jnp.float32), variables)

  def losses(self, outputs: Any, targets: Any, rows: int) -> Array:
    """``loss_fn(outputs, targets)`` as one loss per example, ``(rows,)``."""
    values = jnp.asarray(self.loss_fn(outputs, targets))
    if values.ndim == 0:
      if self.per_example:
        raise ValueError(
          f"{self.name} credits each example with its own loss, but loss_fn returned one number for "
          "the batch (a mean over it?): return the per-example losses, shaped (batch,) or (batch, ...); "
          "the rule takes the mean"
        )
      return jnp.broadcast_to(values, (rows,))
    if values.shape[0] != rows:
      raise ValueError(
        f"{self.name}: loss_fn must return losses with the batch ({rows}) first, got shape {tuple(values.shape)}"
      )
    return jnp.mean(values.reshape(rows, -1), axis=1) if values.ndim > 1 else values

  def mean(self, per_example: Array) -> Array:
    """The mean over the whole batch (every device's rows inside ``shard_map``) of ``(rows,)`` values."""
    return _mesh.batch_sum(jnp.sum(per_example)) / _mesh.batch_count(per_example.shape[0])

  # --- checks ----------------------------------------------------------------------------------

  def _check_params(self, params: Any) -> None:
    if params is None:
      raise ValueError(f"rule {self.name!r} needs params: call tx.update(updates, state, params, batch=...)")
    if any(_is_masked(leaf) for leaf in jax.tree.leaves(params, is_leaf=_is_masked)):
      raise ValueError(
        f"rule {self.name!r} was given masked params (optax.masked, optax.partition or "
        "optax.multi_transform around it): a rule runs the whole model, so it needs every param. "
        "For different rules on different params use altgrad.rules.partition(...); to mask the "
        "optimizer, put the mask after the rule: optax.chain(rule, optax.masked(optimizer, mask))"
      )

  def _check_composition(self) -> None:
    """Refuses, at ``init``, a wrapper around the rule that cannot work with it (see _WRAPPERS),
    and a plain ``nnx.Optimizer`` on a model whose other variables the rule advances."""
    frame = sys._getframe(2)
    for _ in range(40):
      if frame is None:
        return
      if frame.f_code in _WRAPPERS:
        raise TypeError(f"{self.name}: {_WRAPPERS[frame.f_code]}")
      if frame.f_code is _OPTIMIZER_INIT:
        owner = frame.f_locals.get("self")
        if not getattr(type(owner), "writes_model_variables", False) and jax.tree.leaves(self.pure.variables):
          paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(self.pure.variables)]
          raise TypeError(
            f"{self.name}: use altgrad.Optimizer(model, tx, wrt=nnx.Param), with the same "
            "update(model, None, batch=...): each step advances this model's variables besides its "
            "params (BatchNorm statistics, RNG counts, decorrelation), which nnx.Optimizer would leave "
            f"stale in the model and altgrad.Optimizer writes back. They are {', '.join(paths[:4])}"
            + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
          )
        return
      frame = frame.f_back

  def read_batch(self, batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of ``batch``, or an error that names what is wrong with them."""
    name = self.name
    if batch is None:
      raise ValueError(f"rule {name!r} needs the batch: call tx.update(updates, state, params, batch=...)")
    if self.unpack is not None:
      pair = self.unpack(batch)
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"rule {name!r}: unpack(batch) must return (inputs, targets), got {type(pair).__name__}")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
      pair = batch
    else:
      raise ValueError(
        f"rule {name!r}: batch must be a pair (inputs, targets), got {type(batch).__name__}; for a batch "
        "such as {'image': ..., 'label': ...} build the rule with "
        "unpack=lambda batch: (batch['image'], batch['label'])"
      )
    inputs, targets = pair
    leaves = jax.tree.leaves(inputs)
    if not leaves or not all(hasattr(a, "dtype") and getattr(a, "ndim", 0) >= 1 for a in leaves):
      raise TypeError(f"rule {name!r}: inputs must be arrays (or a tree of them) with a batch axis, got {describe_shape(inputs)}")
    rows = leaves[0].shape[0]
    if any(a.shape[0] != rows for a in leaves):
      raise ValueError(f"rule {name!r}: the inputs disagree on the batch size: {[tuple(a.shape) for a in leaves]}")
    if self.layer is not None and len(leaves) == 1:
      if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(f"rule {name!r}: inputs must be a floating-point array, got {describe_shape(leaves[0])}")
      self.layer.check_input(leaves[0])
    target_leaves = jax.tree.leaves(targets)
    if any(not hasattr(t, "shape") or t.ndim < 1 or t.shape[0] != rows for t in target_leaves):
      raise ValueError(
        f"rule {name!r}: targets must have one row per input ({rows}), got {describe_shape(targets)}"
      )
    if rows == 0:
      raise ValueError(f"rule {name!r}: the batch is empty")
    for what, values in (("inputs", leaves), ("targets", target_leaves)):
      if any(_not_finite(a) for a in values):
        raise ValueError(f"rule {name!r}: {what} contain NaN or infinite values")
    return inputs, targets


def _not_finite(a: Any) -> bool:
  """Whether a concrete floating array holds a NaN or an infinity (a traced one is not known)."""
  return is_concrete(a) and jnp.issubdtype(a.dtype, jnp.inexact) and not np.all(np.isfinite(np.asarray(a)))


def check_crossable(model: nnx.Module, rule: str) -> None:
  """Refuses a model with a site a backward hook cannot cross step by step: altgrad's SimpleRNN,
  whose whole recurrence is one site."""
  for path, module in site_modules(model):
    if isinstance(module, RNNCell):
      raise TypeError(
        f"{rule} sends errors back through each site, but {describe_site(path, module)} (altgrad's SimpleRNN) "
        "computes a whole recurrence in one site: use nnx.RNN(nnx.SimpleCell(...)), whose cell's layers are "
        "sites at every step, or backprop, consequentialism, node_perturbation or target_propagation"
      )


def free_params_or_frozen(free_params: str | None, model: nnx.Module, rule: str) -> str:
  """``free_params``, checked; ``None`` (the default) is ``"frozen"``, with a warning that says
  which params it leaves unchanged and how to train them (passing ``free_params`` silences it)."""
  if free_params is not None:
    check_choice(free_params, "free_params", FREE_PARAMS)
    return free_params
  sites = [path for path, _ in site_modules(model)]
  free = [
    "/".join(map(str, path))
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    if not any(path[: len(site)] == site for site in sites)
  ]
  if free:
    warnings.warn(
      f"{rule} leaves params outside linear layers unchanged by default (free_params='frozen'): pass "
      "free_params='gradient' to train them by their gradient, or 'perturb' (weight perturbation, which "
      f"needs a smaller learning rate), or 'frozen' to say so. They are {', '.join(free[:4])}"
      + (f" and {len(free) - 4} more" if len(free) > 4 else ""),
      UserWarning,
      stacklevel=3,
    )
  return "frozen"


def check_precision(model: nnx.Module, rule: str, needs: str) -> None:
  """Refuses params below float32 for a rule that ``needs`` it (loss differences, linear solves).

  bfloat16 inputs or compute (``dtype=bfloat16`` with float32 params) are fine: see each rule.
  """
  low = sorted(
    {
      str(a.dtype)
      for a in jax.tree.leaves(nnx.state(model, nnx.Param))
      if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32
    }
  )
  if low:
    raise TypeError(
      f"{rule} {needs}, which {', '.join(low)} params cannot resolve: keep the params float32 "
      "(param_dtype=float32; a bfloat16 compute dtype is fine)"
    )


def not_a_chain(model: nnx.Module, rule: str, chains: str) -> TypeError:
  """The error for a rule that needs layer inverses, naming a layer of ``model`` that has none."""
  culprit = next(
    (
      describe_site(path, m)
      for path, m in site_modules(model)
      if not hasattr(m, "inverse")
    ),
    None,
  )
  detail = f"layer {culprit} has no regularized inverse" if culprit else "its structure is not such a chain"
  return TypeError(
    f"{rule} propagates targets through layer inverses, so it needs {chains}; in "
    f"{type(model).__name__}, {detail}. Use backprop, consequentialism or node_perturbation on this model"
  )
