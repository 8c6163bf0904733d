"""The pure ``(graphdef, params, variables)`` view of any Flax NNX model that every rule works on.

Each step of a rule, from the batch to the update, in order: altgrad/nn/README.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad import _mesh
from altgrad.nn._intercept import make_tappable
from altgrad.nn._matrix_form import linear_map, linear_parts
from altgrad.nn._sites import (
  Backward,
  Nested,
  Reached,
  SiteError,
  Tap,
  collect_nested,
  prepare_nested,
  tapping,
)

Array = jax.Array
LossFn = Callable[[Array, Array], Array]
Path = tuple[Any, ...]


class Forward(NamedTuple):
  """A tapped forward pass: the outputs, one :class:`Tap` per site call, and the model's
  variables after the pass (BatchNorm statistics, RNG counts)."""

  outputs: Array
  taps: tuple[Tap, ...]
  variables: Any


class Errors(NamedTuple):
  """Backprop through a tapped pass: ``errors`` are ``dL/dz`` of the mean loss at every site
  call; ``residual`` is the gradient of the params outside any site (zero for site params
  that are used only inside their site), so ``updates_from_errors(taps, errors) + residual`` is
  ``jax.grad`` of the mean loss."""

  loss: Array
  outputs: Array
  taps: tuple[Tap, ...]
  errors: tuple[Array, ...]
  residual: Any
  variables: Any


def param_path(key_path: Sequence[Any]) -> Path:
  """A JAX tree key path of a params tree as the module path NNX uses (``("layers", 0, "kernel")``)."""
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in key_path)


#: ``apply(model, inputs, rngs) -> outputs``: how a rule calls the model on a batch's inputs;
#: ``rngs`` is an ``nnx.Rngs`` drawn from the rule's state, the same in every pass of a step.
ApplyFn = Callable[[nnx.Module, Any, nnx.Rngs], Any]

_TRAIN_MODE = {"deterministic": False, "use_running_average": False}
_EVAL_MODE = {"deterministic": True, "use_running_average": True}


def _in_mode(model: nnx.Module, mode: dict[str, bool]) -> nnx.Module:
  """``model`` with every module that has these flags set to them (``model.train()``'s flags)."""
  return nnx.view(model, raise_if_not_found=False, **mode)


def _float32_compute(model: nnx.Module) -> None:
  """Sets every module of ``model`` that computes below float32 (``dtype=bfloat16``) to float32."""
  for _, module in nnx.iter_modules(model):
    dtype = getattr(module, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      module.dtype = jnp.float32


def _is_variable(value: Any) -> bool:
  return isinstance(value, nnx.Variable)


def by_path(params: Any) -> dict[Path, Array]:
  """The arrays of a params tree (with or without Variable wrappers) by module path."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
  return {param_path(k): v[...] if _is_variable(v) else v for k, v in leaves}


def map_by_path(fn: Callable[[Path, Array], Array], tree: Any) -> Any:
  """``tree`` (a params tree, with or without Variable wrappers) with each array ``a`` at module
  path ``p`` replaced by ``fn(p, a)``; Variables keep their type."""
  leaves, structure = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
  mapped = [
    v.replace(fn(param_path(k), v[...])) if _is_variable(v) else fn(param_path(k), v) for k, v in leaves
  ]
  return jax.tree.unflatten(structure, mapped)


def given_paths(params: Any) -> frozenset[Path]:
  """The module paths of the params in ``params`` (``("layers", 0, "kernel")``)."""
  return frozenset(by_path(params))


class PureModel:
  """A model's structure, fixed at construction, applied to ``params`` given at each call.

  ``model`` is any ``nnx.Module``: it is cloned (never modified) and its linear layers become
  sites (see ``altgrad.nn._sites``). ``params`` is ``nnx.state(model, nnx.Param)``, with or
  without its Variable wrappers (``nnx.Optimizer`` passes it without); everything returned that
  is shaped like ``params`` has exactly its structure. ``variables`` is every other Variable of
  the model (decorrelation matrices, BatchNorm statistics, RNG counts): rules carry it in their
  state, take its next value from their clean pass and advance decorrelation with
  :meth:`next_variables`; a Variable the model creates while it runs (an ``nnx.Intermediate``,
  a sown value) is an output of that pass, not state, and is left out.

  The rule's passes run the model in training mode (``model.train()``'s flags, whatever mode the
  model was in); :meth:`evaluate` runs it in evaluation mode. ``apply`` says how the model is
  called (default ``model(inputs)``); ``float32`` computes every layer that computes below
  float32 (``dtype=bfloat16``) in float32, for rules whose signals are below bfloat16's
  resolution.
  """

  def __init__(self, model: nnx.Module, *, apply: ApplyFn | None = None, float32: bool = False):
    if apply is not None and not callable(apply):
      raise TypeError(f"apply must be a function (model, inputs, rngs) -> outputs, got {type(apply).__name__}")
    tappable = make_tappable(model)
    if float32:
      _float32_compute(tappable)
    self.apply = apply
    self.call_key: Array | None = None  # the step's key of call-time rngs (see at)
    self.rnn_outputs = False  # whether passes tap nnx.RNN outputs too (see with_rnn_outputs)
    self.graphdef, self._params, self.variables = nnx.split(_in_mode(tappable, _TRAIN_MODE), nnx.Param, ...)
    self.eval_graphdef = nnx.split(_in_mode(tappable, _EVAL_MODE), nnx.Param, ...)[0]
    #: Whether a layer mixes the examples of a batch (BatchNorm in training mode): per-example
    #: credit from loss differences is then biased.
    self.batch_coupled = any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(tappable))
    self._layouts: dict[Any, tuple[Tap, ...]] = {}  # shared by the copies `at` makes

  def variables_for(self, params: Any) -> Any:
    """The variables a rule given ``params`` carries: the model's other variables and, when
    ``params`` is part of the model's params (NNX's ``wrt=`` freezing the rest), the params
    not given, at their values when the rule was built (``altgrad.Optimizer`` refreshes them
    from the model at every step). A tree that is not part of the model's params is an error."""
    given = given_paths(params)
    own = dict(nnx.to_flat_state(self._params))
    stray = sorted("/".join(map(str, p)) for p in given - set(own))
    if stray or not given:
      raise ValueError(
        f"params must be the model's nnx.Param state or a part of it (nnx.state(model, nnx.Param), or "
        f"the wrt= filter's part); {'got none' if not given else 'the model has no ' + ', '.join(stray[:3])}"
      )
    frozen = [(path, value) for path, value in own.items() if path not in given]
    return nnx.from_flat_state([*nnx.to_flat_state(self.variables), *frozen])

  def at(self, variables: Any, call_key: Array | None = None) -> PureModel:
    """The same model with other variables (from a rule's state) and a step's ``call_key``."""
    view = copy.copy(self)
    view.variables, view.call_key = variables, call_key
    return view

  def with_rnn_outputs(self) -> PureModel:
    """The same model whose passes tap each ``nnx.RNN``'s output sequence after its cell's taps
    (``altgrad.nn._sites.tapping``): the states target propagation carries back in time."""
    view = copy.copy(self)
    view.rnn_outputs = True
    return view

  def _call(self, model: nnx.Module, inputs: Any, key: Array | None) -> Any:
    if self.apply is None:
      return model(inputs)
    return self.apply(model, inputs, rngs=nnx.Rngs(jax.random.key(0) if key is None else key))

  def carried(self, model: nnx.Module) -> Any:
    """The variables of ``model`` after a pass that carry to the next step: those it had when
    the rule was built (what the pass created is left out)."""
    after = dict(nnx.to_flat_state(nnx.state(model)))
    return nnx.from_flat_state([(path, after[path]) for path, _ in nnx.to_flat_state(self.variables)])

  def bind(self, params: Any) -> nnx.Module:
    """The model with ``params`` (traceable: use it inside jitted code). Params neither given
    nor among the view's variables (a part of the params given outside a rule's step, where the
    state's variables carry the rest) take their values from when the view was built."""
    held = given_paths(params) | {path for path, _ in nnx.to_flat_state(self.variables)}
    rest = [(path, value) for path, value in nnx.to_flat_state(self._params) if path not in held]
    return nnx.merge(self.graphdef, params, nnx.from_flat_state(rest), self.variables, copy=True)

  def modules(self, params: Any) -> dict[Path, nnx.Module]:
    """The bound model's modules by path: where a tap's ``path`` leads."""
    return self._modules_of(self.bind(params))

  def evaluate(self, params: Any, inputs: Any) -> Any:
    """The outputs in evaluation mode (running BatchNorm statistics, no dropout)."""
    return self._call(nnx.merge(self.eval_graphdef, params, self.variables, copy=True), inputs, None)

  def tapped(
    self,
    params: Any,
    inputs: Any,
    perturbations: Sequence[Any] | None = None,
    *,
    stop_site_params: bool = False,
    backward: Backward | None = None,
  ) -> Forward:
    """A forward pass with ``perturbations[i]`` added to the ``i``-th site call's output; with
    ``backward``, its backward pass crosses each site by ``backward(module, inputs, cotangent)``
    instead of the site's transpose (``altgrad.nn._sites.tapping``). Differentiable in the
    params and perturbations (``jax.grad``, ``jax.vjp``) and in forward mode (``jax.jvp``)."""
    model = self.bind(params)
    if perturbations is not None:
      layout = self._layout(params, inputs)
      if any(t.nested for t in layout):
        prepare_nested(self._modules_of(model), layout, perturbations)
    options = dict(stop_site_params=stop_site_params, rnn_outputs=self.rnn_outputs, backward=backward)
    with tapping(perturbations, **options) as taps:
      outputs = self._call(model, inputs, self.call_key)
    if any(isinstance(t, Nested) for t in taps):
      taps = collect_nested(self._modules_of(model), taps)
    return Forward(outputs, tuple(taps), self.carried(model))

  def between(self, params: Any, inputs: Any, index: int, z: Array) -> Any:
    """The input of site call ``index + 1`` when site call ``index`` outputs ``z``: what lies
    between two consecutive sites as a function of the first one's output. The model runs on
    ``inputs`` up to that call and no further."""
    try:
      with tapping(replaced=(index, z), stop_at=index + 1, rnn_outputs=self.rnn_outputs):
        self._call(self.bind(params), inputs, self.call_key)
    except Reached as reached:
      return reached.inputs
    raise SiteError(f"the model makes no site call after call {index}: there is nothing between it and the output")

  def _layout(self, params: Any, inputs: Any) -> tuple[Tap, ...]:
    """The taps of a pass on inputs shaped like ``inputs`` (shapes only; cached)."""
    leaves, tree = jax.tree.flatten(inputs)
    key = (tree, tuple((tuple(a.shape), str(a.dtype)) for a in leaves), self.rnn_outputs)
    if key not in self._layouts:
      self._layouts[key] = jax.eval_shape(lambda p, x: self.tapped(p, x).taps, params, inputs)
    return self._layouts[key]

  @staticmethod
  def _modules_of(model: nnx.Module) -> dict[Path, nnx.Module]:
    return {tuple(path): module for path, module in nnx.iter_modules(model)}

  def zero_perturbations(self, params: Any, inputs: Any) -> tuple[Array, ...]:
    """Zeros shaped like each site call's pre-activation for ``inputs`` (nothing is run)."""
    return _mesh.per_row(tuple(jnp.zeros(t.preact.shape, t.preact.dtype) for t in self._layout(params, inputs)))

  def mean_loss(self, outputs: Any, targets: Any, loss_fn: LossFn) -> Array:
    """This device's part of the whole batch's mean of ``loss_fn(outputs, targets)``: losses per
    example ``(batch,)`` or per token ``(batch, ...)`` (the mean over everything), or one number
    for the batch (its own mean); inside ``shard_map`` the mean is over every device's rows."""
    losses = jnp.asarray(loss_fn(outputs, targets))
    rows = jax.tree.leaves(outputs)[0].shape[0]
    if losses.ndim == 0:  # a mean over this device's rows already
      return losses * rows / _mesh.batch_count(rows)
    if losses.shape[0] != rows:
      raise ValueError(f"loss_fn must return losses with the batch ({rows}) first, or one number; got shape {losses.shape}")
    return jnp.sum(jnp.mean(losses.reshape(rows, -1), axis=1)) / _mesh.batch_count(rows)

  def errors(
    self,
    params: Any,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    backward: Backward | None = None,
    delivered: Callable[[Any, Sequence[Tap]], Sequence[Array | None]] | None = None,
  ) -> Errors:
    """Per-site errors ``dL/dz`` of the mean loss (:meth:`mean_loss`) and the residual param
    gradient, from one backward pass through a zero perturbation, with site params stopped:
    backprop's, or with ``backward`` crossing each site as it says (feedback alignment; a hook
    returning zeros stops the error at the site). ``delivered(outputs, taps)`` gives errors to
    place at sites' inputs from outside the backward pass (direct feedback alignment; ``None``
    for none), which then cross what lies below them (activations, norms, skips) exactly. Inside
    ``shard_map`` the errors are this device's part of the whole batch's, ``loss`` is the whole
    batch's mean, and the residual this device's part."""

    def forward(perturbations, params):
      tapped = self.tapped(params, inputs, perturbations, stop_site_params=True, backward=backward)
      return (self.mean_loss(tapped.outputs, targets, loss_fn), tuple(t.inputs for t in tapped.taps)), tapped

    (loss, site_inputs), pull_back, tapped = jax.vjp(forward, self.zero_perturbations(params, inputs), params, has_aux=True)
    extra = [None] * len(site_inputs) if delivered is None else list(delivered(tapped.outputs, tapped.taps))
    cotangents = tuple(
      jax.tree.map(jnp.zeros_like, x) if e is None else e.astype(x.dtype) for x, e in zip(site_inputs, extra, strict=True)
    )
    errors, residual = pull_back((jnp.ones_like(loss), cotangents))
    return Errors(_mesh.batch_sum(loss), tapped.outputs, tapped.taps, errors, residual, tapped.variables)

  def updates_from_errors(self, params: Any, taps: Sequence[Tap], errors: Sequence[Array]) -> Any:
    """The parameter update of per-site errors: the VJP of each site's linear map at its
    recorded input (``inputs^T errors`` for a dense site). Taps of one module add up. Errors
    carry the gradient's sign and scale (backprop's give ``jax.grad`` with the residual)."""

    def replay(p):
      modules = self.modules(p)
      return tuple(linear_map(modules[tap.path], tap.inputs, stacked=tap.stacked, steps=tap.steps) for tap in taps)

    replayed, vjp = jax.vjp(replay, params)
    (updates,) = vjp(tuple(e.astype(r.dtype) for e, r in zip(errors, replayed, strict=True)))
    return updates

  def updates_from_matrices(self, params: Any, matrices: dict[tuple[Path, int], Array]) -> Any:
    """The params-shaped update that reads ``matrices[path, k]`` through part ``k`` of the site
    module at ``path`` (``altgrad.nn._matrix_form.linear_parts``: its matrix form, or a LoRA
    layer's parts); other params get zero.

    A matrix form only stacks and reorders parameters, so the VJP of ``params -> matrices`` is
    its inverse: this places per-site matrix updates (CW, ER) back into the params tree.
    """
    keys = tuple(matrices)

    def as_matrices(p):
      modules = self.modules(p)
      return tuple(linear_parts(modules[path])[k].matrix() for path, k in keys)

    current, vjp = jax.vjp(as_matrices, params)
    (updates,) = vjp(tuple(matrices[key].astype(c.dtype) for key, c in zip(keys, current, strict=True)))
    return updates

  def next_variables(self, params: Any, variables: Any, taps: Sequence[Tap]) -> Any:
    """``variables`` with every decorrelation matrix advanced on its site's recorded inputs."""
    model = nnx.merge(self.graphdef, params, variables, copy=True)
    modules = self._modules_of(model)
    for path in dict.fromkeys(tap.path for tap in taps if not tap.stacked):
      module = modules[path]
      if getattr(module, "decorrelation", None) is not None:
        module.decorrelation[...] = module.decorrelation_step([t.inputs for t in taps if t.path == path])
    return self.carried(model)

  def site_paths(self, taps: Sequence[Tap]) -> tuple[Path, ...]:
    """The distinct site modules of ``taps``, in the order of their first call."""
    return tuple(dict.fromkeys(tap.path for tap in taps))

  def free_paths(self, params: Any, taps: Sequence[Tap]) -> tuple[Path, ...]:
    """The paths of the params in ``params`` outside every site module of ``taps``."""
    sites = self.site_paths(taps)
    return tuple(sorted((p for p in given_paths(params) if not any(p[: len(s)] == s for s in sites)), key=str))

  def free_params(self, params: Any, taps: Sequence[Tap]) -> Any:
    """A params-shaped tree of bools: ``True`` for params outside every site module."""
    free = self.free_paths(params, taps)

    def is_free(key_path, _):  # a leaf in a Variable has the Variable's path and one key more
      path = param_path(key_path)
      return any(path[: len(p)] == p for p in free)

    return jax.tree_util.tree_map_with_path(is_free, params)
