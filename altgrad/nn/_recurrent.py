"""Elman RNN (tanh cell, linear readout of the last state) with a regularized cell inverse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import Activation, get_activation
from altgrad.nn._base import Layer, describe_shape, ridge_solver
from altgrad.nn._dense import Dense
from altgrad.nn._sites import design_rows, site, stacked_matrix

Array = jax.Array


class RNNCell(nnx.Module):
  """The site ``h_t = activation(h_{t-1} W + x_t U + b)`` of a :class:`SimpleRNN`.

  Its ``linear`` takes the pair ``(h_prev, x)`` with any leading axes, so one call covers every
  time step at once: the whole recurrence is one site call.
  """

  is_altgrad_site = True  # its calls are sites (altgrad.nn._sites)

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    activation: str | Callable[[Array], Array] | Activation = "tanh",
    kernel_init: Callable[..., Array] = nnx.initializers.orthogonal(),
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.activation = get_activation(activation)
    self.recurrent_kernel = nnx.Param(
      kernel_init(rngs.params(), (hidden_features, hidden_features), param_dtype)
    )
    self.input_kernel = nnx.Param(kernel_init(rngs.params(), (in_features, hidden_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((hidden_features,), param_dtype))

  def input_drive(self, x: Array) -> Array:
    """``x U + b``: the part of the pre-activation that does not depend on the state."""
    return x @ self.input_kernel[...] + self.bias[...]

  def linear(self, inputs: tuple[Array, Array]) -> Array:
    """The pre-activation ``h_prev W_h + x W_x + b`` of one step, from ``(h_prev, x)``."""
    h_prev, x = inputs
    return h_prev @ self.recurrent_kernel[...] + self.input_drive(x)

  def design(self, inputs: tuple[Array, Array]) -> Array:
    """Rows ``[h_prev, x, 1]``, one per (example, time step): a shared layer stacks its uses."""
    h_prev, x = inputs
    return design_rows(jnp.concatenate([h_prev, x], axis=-1), True)

  def matrix(self) -> Array:
    """``[W_h; W_x; b]`` stacked, ``(hidden + features + 1, hidden)``: the matrix CW and ER update."""
    return stacked_matrix(
      jnp.concatenate([self.recurrent_kernel[...], self.input_kernel[...]], axis=0), self.bias[...]
    )

  def ridge_solver(self, reg: float | Array) -> RidgeSolver:
    """The regularized inverse of ``W`` as one ``(hidden, hidden)`` matrix, formed once per
    training step and applied at every time step (one product each)."""
    return ridge_solver(self.recurrent_kernel[...], reg, explicit=True)

  def inverse(
    self,
    target: Array,
    x: Array,
    *,
    reg: float | Array | None = None,
    solver: RidgeSolver | None = None,
  ) -> Array:
    """``argmin_h ||a^-1(target) - (h W + x U + b)||^2 + reg ||h||^2`` (spec/tp.md 2.2)."""
    solver = ridge_solver(self.recurrent_kernel[...], reg, solver)
    return solver(self.activation.inverse(target) - self.input_drive(x))

  def inverse_linearized(
    self,
    displacement: Array,
    output: Array,
    *,
    reg: float | Array | None = None,
    solver: RidgeSolver | None = None,
  ) -> Array:
    """The inverse's Jacobian at ``output = h_t`` applied to ``displacement``:
    ``(displacement * (a^-1)'(h_t)) W^T (W W^T + reg I)^-1``."""
    solver = ridge_solver(self.recurrent_kernel[...], reg, solver)
    return solver(displacement * self.activation.inverse_derivative(output))


class SimpleRNN(Layer):
  """Elman RNN on inputs shaped ``(batch, time, in_features)``; outputs ``readout(h_T)``.

  ``h_0 = 0``; the time loop is a ``lax.scan``. Two sites: the cell (pre-activations shaped
  ``(batch, time, hidden_features)``) and the linear readout.

  Args:
    in_features: features per time step.
    hidden_features: state width.
    out_features: readout width.
    activation: the cell's activation (tanh by default).
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int,
    *,
    activation: str | Callable[[Array], Array] | Activation = "tanh",
    rngs: nnx.Rngs,
  ):
    if min(in_features, hidden_features, out_features) < 1:
      raise ValueError(
        f"SimpleRNN needs positive sizes, got {in_features}, {hidden_features}, {out_features}"
      )
    self.in_features = in_features
    self.cell = RNNCell(in_features, hidden_features, activation=activation, rngs=rngs)
    self.readout = Dense(
      hidden_features,
      out_features,
      activation="identity",
      kernel_init=nnx.initializers.orthogonal(),
      rngs=rngs,
    )

  def sites(self):
    return (self.cell, self.readout)

  def states(self, x: Array, perturbation: Array | None = None) -> tuple[Array, Array]:
    """The cell's inputs ``h_{t-1}`` and pre-activations ``z_t``, both ``(batch, time, hidden)``."""
    drive = jnp.swapaxes(self.cell.input_drive(x), 0, 1)
    if perturbation is not None:
      drive = drive + jnp.swapaxes(perturbation, 0, 1)
    recurrent_kernel = self.cell.recurrent_kernel[...]
    activation = self.cell.activation

    def step(h, drive_t):
      z = h @ recurrent_kernel + drive_t
      return activation(z), (h, z)

    h0 = jnp.zeros(drive.shape[1:], drive.dtype)
    _, (h_prev, z) = jax.lax.scan(step, h0, drive)
    return jnp.swapaxes(h_prev, 0, 1), jnp.swapaxes(z, 0, 1)

  def __call__(self, x):
    def cell(delta):
      h_prev, z = self.states(x, delta)
      return (h_prev, x), z

    z = site(self.cell, cell)
    return self.readout(self.cell.activation(z[:, -1]))

  def check_input(self, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] != self.in_features or shape[1] < 1:
      raise ValueError(
        f"SimpleRNN expects inputs shaped (batch, time >= 1, {self.in_features}), got {describe_shape(x)}"
      )
