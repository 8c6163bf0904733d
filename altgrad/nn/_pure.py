"""The pure ``(graphdef, params, variables)`` view of any Flax NNX model that every rule works on."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad.nn._base import Layer, describe_shape
from altgrad.nn._sites import (
  Nested,
  Tap,
  collect_nested,
  linear_map,
  make_tappable,
  matrix_form,
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


def _is_coupling(module: nnx.Module) -> bool:
  """Whether ``module`` mixes the examples of a batch as it is set (BatchNorm in training mode)."""
  return isinstance(module, nnx.BatchNorm) and not module.use_running_average


class PureModel:
  """A model's structure, fixed at construction, applied to ``params`` given at each call.

  ``model`` is any ``nnx.Module``: it is cloned (never modified) and its linear layers become
  sites (see ``altgrad.nn._sites``). ``params`` is ``nnx.state(model, nnx.Param)``, with or
  without its Variable wrappers (``nnx.Optimizer`` passes it without); everything returned that
  is shaped like ``params`` has exactly its structure. ``variables`` is every other Variable of
  the model (decorrelation matrices, BatchNorm statistics, RNG counts): rules carry it in their
  state, take its next value from their clean pass and advance decorrelation with
  :meth:`next_variables`. The rule runs the model in the mode it is in (NNX modules start in
  training mode); :meth:`evaluate` runs it in evaluation mode.
  """

  def __init__(self, model: nnx.Module):
    tappable = make_tappable(model)
    self.graphdef, _, self.variables = nnx.split(tappable, nnx.Param, ...)
    evaluation = nnx.view(tappable, deterministic=True, use_running_average=True, raise_if_not_found=False)
    self.eval_graphdef = nnx.split(evaluation, nnx.Param, ...)[0]
    #: Whether a layer mixes the examples of a batch (BatchNorm in training mode): per-example
    #: credit from loss differences is then biased.
    self.batch_coupled = any(_is_coupling(m) for _, m in nnx.iter_modules(tappable))
    self._layouts: dict[tuple, tuple[Tap, ...]] = {}  # shared by with_variables' copies

  def with_variables(self, variables: Any) -> PureModel:
    """The same model with other variables (from a rule's state)."""
    view = copy.copy(self)
    view.variables = variables
    return view

  def bind(self, params: Any) -> nnx.Module:
    """The model with ``params`` (traceable: use it inside jitted code)."""
    return nnx.merge(self.graphdef, params, self.variables, copy=True)

  def modules(self, params: Any) -> dict[Path, nnx.Module]:
    """The bound model's modules by path: where a tap's ``path`` leads."""
    return self._modules_of(self.bind(params))

  def evaluate(self, params: Any, x: Array) -> Array:
    """The outputs in evaluation mode (running BatchNorm statistics, no dropout)."""
    return nnx.merge(self.eval_graphdef, params, self.variables, copy=True)(x)

  def tapped(
    self, params: Any, x: Array, perturbations: Sequence[Any] | None = None, *, stop_site_params: bool = False
  ) -> Forward:
    """A forward pass with ``perturbations[i]`` added to the ``i``-th site call's output."""
    model = self.bind(params)
    if perturbations is not None:
      layout = self._layout(params, x)
      if any(t.nested for t in layout):
        prepare_nested(self._modules_of(model), layout, perturbations)
    with tapping(perturbations, stop_site_params=stop_site_params) as taps:
      outputs = model(x)
    if any(isinstance(t, Nested) for t in taps):
      taps = collect_nested(self._modules_of(model), taps)
    return Forward(outputs, tuple(taps), nnx.split(model, nnx.Param, ...)[2])

  def _layout(self, params: Any, x: Array) -> tuple[Tap, ...]:
    """The taps of a pass on inputs shaped like ``x`` (shapes only; cached)."""
    key = (tuple(x.shape), str(x.dtype))
    if key not in self._layouts:
      self._layouts[key] = jax.eval_shape(lambda p, x: self.tapped(p, x).taps, params, x)
    return self._layouts[key]

  @staticmethod
  def _modules_of(model: nnx.Module) -> dict[Path, nnx.Module]:
    return {tuple(path): module for path, module in nnx.iter_modules(model)}

  def zero_perturbations(self, params: Any, x: Array) -> tuple[Array, ...]:
    """Zeros shaped like each site call's pre-activation for inputs ``x`` (nothing is run)."""
    return tuple(jnp.zeros(t.preact.shape, t.preact.dtype) for t in self._layout(params, x))

  def errors(self, params: Any, x: Array, targets: Array, loss_fn: LossFn) -> Errors:
    """Backprop's per-site errors ``dL/dz`` of the mean loss and the residual param gradient,
    from one backward pass through a zero perturbation, with site params stopped."""

    def mean_loss(perturbations, params):
      forward = self.tapped(params, x, perturbations, stop_site_params=True)
      return jnp.mean(loss_fn(forward.outputs, targets)), forward

    (loss, forward), (errors, residual) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
      self.zero_perturbations(params, x), params
    )
    return Errors(loss, forward.outputs, forward.taps, errors, residual, forward.variables)

  def updates_from_errors(self, params: Any, taps: Sequence[Tap], errors: Sequence[Array]) -> Any:
    """The parameter update of per-site errors: the VJP of each site's linear map at its
    recorded input (``inputs^T errors`` for a dense site). Taps of one module add up. Errors
    carry the gradient's sign and scale (backprop's give ``jax.grad`` with the residual)."""

    def replay(p):
      modules = self.modules(p)
      return tuple(linear_map(modules[tap.path], tap.inputs, stacked=tap.stacked) for tap in taps)

    _, vjp = jax.vjp(replay, params)
    (updates,) = vjp(tuple(errors))
    return updates

  def updates_from_matrices(self, params: Any, matrices: dict[Path, Array]) -> Any:
    """The params-shaped update whose site modules (by path) read ``matrices[path]`` through
    their matrix form; params of other modules get zero.

    The matrix form only stacks and reorders parameters, so the VJP of ``params -> matrices`` is
    its inverse: this places per-site matrix updates (CW, ER) back into the params tree.
    """
    paths = tuple(matrices)

    def as_matrices(p):
      modules = self.modules(p)
      return tuple(matrix_form(modules[path])[1]() for path in paths)

    _, vjp = jax.vjp(as_matrices, params)
    (updates,) = vjp(tuple(matrices[path] for path in paths))
    return updates

  def next_variables(self, params: Any, variables: Any, taps: Sequence[Tap]) -> Any:
    """``variables`` with every decorrelation matrix advanced on its site's recorded inputs."""
    model = nnx.merge(self.graphdef, params, variables, copy=True)
    modules = self._modules_of(model)
    for path in dict.fromkeys(tap.path for tap in taps if not tap.stacked):
      module = modules[path]
      if getattr(module, "decorrelation", None) is not None:
        inputs = [t.inputs.reshape(-1, t.inputs.shape[-1]) for t in taps if t.path == path]
        module.decorrelation[...] = module.decorrelation_step(jnp.concatenate(inputs))
    return nnx.split(model, nnx.Param, ...)[2]

  def site_paths(self, taps: Sequence[Tap]) -> tuple[Path, ...]:
    """The distinct site modules of ``taps``, in the order of their first call."""
    return tuple(dict.fromkeys(tap.path for tap in taps))

  def free_params(self, params: Any, taps: Sequence[Tap]) -> Any:
    """A params-shaped tree of bools: ``True`` for params outside every site module."""
    sites = self.site_paths(taps)

    def free(key_path, _):
      path = param_path(key_path)
      return not any(path[: len(s)] == s for s in sites)

    return jax.tree_util.tree_map_with_path(free, params)

  def check_batch(self, params: Any, batch: Any, *, rule: str) -> tuple[Array, Array]:
    """Returns ``(inputs, targets)`` or raises an error naming what is wrong with them."""
    if params is None:
      raise ValueError(f"rule {rule!r} needs params: call tx.update(updates, state, params, batch=...)")
    if batch is None:
      raise ValueError(
        f"rule {rule!r} needs the batch: call tx.update(updates, state, params, batch=(inputs, targets))"
      )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError(f"rule {rule!r}: batch must be a pair (inputs, targets), got {type(batch).__name__}")
    x, targets = batch
    if not hasattr(x, "dtype"):
      raise TypeError(f"rule {rule!r}: inputs must be an array, got {describe_shape(x)}")
    model = self.bind(params)
    if isinstance(model, Layer):
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rule {rule!r}: inputs must be a floating-point array, got {describe_shape(x)}")
      model.check_input(x)
    elif getattr(x, "ndim", 0) < 1:
      raise ValueError(f"rule {rule!r}: inputs need a batch axis, got {describe_shape(x)}")
    if not hasattr(targets, "shape") or targets.ndim < 1 or targets.shape[0] != x.shape[0]:
      raise ValueError(
        f"rule {rule!r}: targets must have one row per input ({x.shape[0]}), got {describe_shape(targets)}"
      )
    if x.shape[0] == 0:
      raise ValueError(f"rule {rule!r}: the batch is empty")
    if (
      not isinstance(x, jax.core.Tracer)
      and jnp.issubdtype(x.dtype, jnp.inexact)
      and not np.all(np.isfinite(np.asarray(x)))
    ):
      raise ValueError(f"rule {rule!r}: inputs contain NaN or infinite values")
    return x, targets
