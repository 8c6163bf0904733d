"""The pure ``(graphdef, params)`` view of a model that every rule works on."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad.nn._base import Decorrelation, Layer, Tap, describe_shape

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


class PureModel:
  """A model's structure, fixed at construction, applied to ``params`` given at each call.

  ``params`` is the ``nnx.Param`` state, ``nnx.state(model, nnx.Param)``, with or without its
  Variable wrappers (``nnx.Optimizer`` passes it without); everything returned that is shaped
  like ``params`` has exactly its structure. ``variables`` holds the model's
  :class:`Decorrelation` matrices, which rules carry in their state and advance with
  :meth:`decorrelation_step`; any other variable is frozen at its value at construction.
  """

  def __init__(self, model: Layer):
    if not isinstance(model, Layer):
      raise TypeError(
        "altgrad rules need a model built of altgrad.nn layers (MLP, Sequential of Dense/Conv/"
        f"Flatten, SimpleRNN), got {type(model).__name__}"
      )
    self.graphdef, _, self.variables, self.rest = nnx.split(model, nnx.Param, Decorrelation, ...)

  def with_variables(self, variables: Any) -> PureModel:
    """The same model with other decorrelation matrices (from a rule's state)."""
    view = copy.copy(self)
    view.variables = variables
    return view

  def bind(self, params: Any) -> Layer:
    """The model with ``params`` (traceable: use it inside jitted code)."""
    return nnx.merge(self.graphdef, params, self.variables, self.rest, copy=True)

  def decorrelation_step(self, params: Any, taps: Sequence[Tap]) -> Any:
    """The next decorrelation matrices, each from its site's recorded (clean) input."""
    model = self.bind(params)
    for site, tap in zip(model.sites(), taps, strict=True):
      if getattr(site, "decorrelation", None) is not None:
        site.decorrelation[...] = site.decorrelation_step(tap.inputs)
    return nnx.state(model, Decorrelation)

  def apply(self, params: Any, x: Array) -> Array:
    """The model's outputs for inputs ``x`` with ``params``."""
    return self.bind(params)(x)

  def tapped(
    self, params: Any, x: Array, perturbations: Sequence[Any] | None = None
  ) -> tuple[Array, tuple[Tap, ...]]:
    """Outputs and per-site taps, with ``perturbations[i]`` added to site ``i``'s pre-activation."""
    return self.bind(params).tapped(x, perturbations)

  def zero_perturbations(self, params: Any, x: Array) -> tuple[Array, ...]:
    """Zeros shaped like each site's pre-activation for inputs ``x`` (no computation is run)."""
    _, taps = jax.eval_shape(self.tapped, params, x)
    return tuple(jnp.zeros(t.preact.shape, t.preact.dtype) for t in taps)

  def errors(
    self, params: Any, x: Array, targets: Array, loss_fn: LossFn
  ) -> tuple[Array, Array, tuple[Tap, ...], tuple[Array, ...]]:
    """Backprop's per-site errors ``dL/dz`` of the mean loss, from a zero perturbation.

    Returns ``(loss, outputs, taps, errors)``.
    """

    def mean_loss(perturbations):
      outputs, taps = self.tapped(params, x, perturbations)
      return jnp.mean(loss_fn(outputs, targets)), (outputs, taps)

    (loss, (outputs, taps)), errors = jax.value_and_grad(mean_loss, has_aux=True)(
      self.zero_perturbations(params, x)
    )
    return loss, outputs, taps, errors

  def updates_from_errors(self, params: Any, taps: Sequence[Tap], errors: Sequence[Array]) -> Any:
    """The parameter update of per-site errors: the VJP of each site's linear part at its input.

    For a dense site this is ``inputs^T errors``; for a conv or recurrent site, the VJP of its
    linear map. Errors carry the gradient's sign and scale (backprop's give ``jax.grad``).
    """

    def replay(p):
      sites = self.bind(p).sites()
      return tuple(site.linear(tap.inputs) for site, tap in zip(sites, taps, strict=True))

    _, vjp = jax.vjp(replay, params)
    (updates,) = vjp(tuple(errors))
    return updates

  def updates_from_matrices(self, params: Any, matrices: Sequence[Array]) -> Any:
    """The params-shaped update whose sites read ``matrices[i]`` through ``site.matrix()``.

    ``matrix()`` only stacks and reorders parameters, so the VJP of ``params -> matrices`` is
    its inverse: this places per-site matrix updates (CW, ER) back into the params tree.
    """

    def as_matrices(p):
      return tuple(site.matrix() for site in self.bind(p).sites())

    _, vjp = jax.vjp(as_matrices, params)
    (updates,) = vjp(tuple(matrices))
    return updates

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
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"rule {rule!r}: inputs must be a floating-point array, got {describe_shape(x)}")
    self.bind(params).check_input(x)
    if not hasattr(targets, "shape") or targets.ndim < 1 or targets.shape[0] != x.shape[0]:
      raise ValueError(
        f"rule {rule!r}: targets must have one row per input ({x.shape[0]}), got {describe_shape(targets)}"
      )
    if x.shape[0] == 0:
      raise ValueError(f"rule {rule!r}: the batch is empty")
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f"rule {rule!r}: inputs contain NaN or infinite values")
    return x, targets
