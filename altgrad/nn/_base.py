"""The altgrad layer protocol: chains of sites with a known structure.

A *site* is a place where a layer computes a pre-activation ``z = linear(inputs)`` from its own
parameters; it is tapped like any NNX linear layer (``altgrad.nn._sites``). An altgrad site is
affine in its parameters: ``linear(inputs).reshape(-1, out) == design(inputs) @ matrix()``, which
is what rules that solve least-squares problems per site (CW, ER) work with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import Activation
from altgrad.nn._sites import site

Array = jax.Array


def describe_shape(x: Any) -> str:
  """``shape (a, b)`` for an array, ``a <type>`` for anything else: for error messages."""
  shape = getattr(x, "shape", None)
  return f"a {type(x).__name__}" if shape is None else f"shape {tuple(shape)}"


def is_concrete(value: Any) -> bool:
  """Whether ``value`` has a value now: not a tracer (under ``jit``, ``vmap`` or
  ``optax.inject_hyperparams``' update), whose checks are left to the compiled step."""
  return not isinstance(value, jax.core.Tracer)


def check_number(value: Any, name: str, *, positive: bool = False, schedule: bool = False) -> None:
  """Rejects a hyperparameter that is not a finite number ``>= 0`` (``> 0`` with ``positive``).

  A JAX or NumPy scalar counts as a number (``optax.inject_hyperparams`` passes arrays); a traced
  one passes unchecked, as its value is not known yet (a non-finite value then gives a
  non-finite update, which :func:`altgrad.rules.finite_guard` skips). With ``schedule``, a
  function of the step count (an optax schedule) is accepted and checked at step 0.
  """
  if schedule and callable(value):
    check_number(value(0), f"{name} (a schedule) at step 0", positive=positive)
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(value, bool):
    if getattr(value, "ndim", 0) == 0 and jnp.issubdtype(value.dtype, jnp.number):
      if not is_concrete(value):
        return
      value = value.item()
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (number and (value > 0 if positive else value >= 0) and value < float("inf")):
    kind = "a finite number" + (" or a schedule of the step count" if schedule else "")
    raise ValueError(f"{name} must be {kind} {'>' if positive else '>='} 0, got {value!r}")


def computed_in(dtype: Any, *arrays: Array) -> tuple[Array, ...]:
  """``arrays`` in a layer's compute ``dtype`` (Flax's ``dtype=``; ``None``: as they are, promoted
  as JAX promotes them): ``param_dtype=float32, dtype=bfloat16`` computes in bfloat16."""
  return arrays if dtype is None else tuple(None if a is None else a.astype(dtype) for a in arrays)


def at_step(value: Any, step: Any) -> Any:
  """A hyperparameter's value at ``step``: a schedule's value, or the value itself."""
  return value(step) if callable(value) else value


class Layer(nnx.Module):
  """Base of every altgrad layer and model: a chain of sites with known structure.

  Rules tap any NNX model through the same site mechanism (``altgrad.nn._sites``); an altgrad
  layer adds what target propagation and Expectation Reflection need: its sites in forward
  order, activations with inverses and regularized layer inverses.
  """

  def sites(self) -> tuple[Any, ...]:
    """The site modules of this layer in forward order; each has ``linear(inputs)`` and ``activation``."""
    raise NotImplementedError

  def check_input(self, x: Any) -> None:
    """Raises ``ValueError`` naming the problem when ``x`` cannot be this layer's input."""
    raise NotImplementedError


class SingleSite(Layer):
  """A layer that is one site: ``activation(linear(x))``.

  Subclasses set ``activation`` and implement ``linear``, ``design``, ``matrix`` and ``check_input``.
  """

  activation: Activation
  is_altgrad_site = True  # its calls are sites (altgrad.nn._sites)

  def linear(self, x: Array) -> Array:
    """The pre-activation, a function of this layer's parameters and its input only."""
    raise NotImplementedError

  def design(self, x: Array) -> Array:
    """The input as rows ``X`` with ``linear(x).reshape(-1, out) == X @ matrix()``."""
    raise NotImplementedError

  def matrix(self) -> Array:
    """The parameters as one ``(features, out)`` matrix (kernel rows, then the bias row)."""
    raise NotImplementedError

  def sites(self) -> tuple[SingleSite]:
    return (self,)

  def __call__(self, x: Array) -> Array:
    z = site(self, lambda delta: (x, self.linear(x) if delta is None else self.linear(x) + delta))
    return self.activation(z)


def ridge_solver(
  kernel: Array, reg: Any = None, solver: RidgeSolver | None = None, *, explicit: bool = False
) -> RidgeSolver:
  """The solver a layer's inverse uses: ``solver`` if given, else one factored from ``reg``
  (``explicit``: see :class:`RidgeSolver`)."""
  if (reg is None) == (solver is None):
    raise ValueError("give exactly one of reg (the ridge) or solver (from layer.ridge_solver(reg))")
  if solver is not None:
    return solver
  check_number(reg, "reg")
  return RidgeSolver.create(kernel, reg, explicit=explicit)
