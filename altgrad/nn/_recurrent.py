"""Elman RNN (tanh cell, linear readout of the last state) with a regularized cell inverse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import Activation, get_activation
from altgrad.nn._base import Layer, computed_in, describe_shape, ridge_solver
from altgrad.nn._dense import Dense
from altgrad.nn._matrix_form import design_rows, stacked_matrix
from altgrad.nn._sites import site

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
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.activation = get_activation(activation)
    self.dtype = dtype
    self.recurrent_kernel = nnx.Param(
      kernel_init(rngs.params(), (hidden_features, hidden_features), param_dtype)
    )
    self.input_kernel = nnx.Param(kernel_init(rngs.params(), (in_features, hidden_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((hidden_features,), param_dtype))

  def input_drive(self, x: Array) -> Array:
    """``x U + b``: the part of the pre-activation that does not depend on the state."""
    x, kernel, bias = computed_in(self.dtype, x, self.input_kernel[...], self.bias[...])
    return x @ kernel + bias

  def recurrent_kernel_value(self) -> Array:
    """``W``, in the compute dtype."""
    return computed_in(self.dtype, self.recurrent_kernel[...])[0]

  def linear(self, inputs: tuple[Array, Array]) -> Array:
    """The pre-activation ``h_prev W_h + x W_x + b`` of one step, from ``(h_prev, x)``."""
    h_prev, x = inputs
    return computed_in(self.dtype, h_prev)[0] @ self.recurrent_kernel_value() + self.input_drive(x)

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
    """``argmin_h ||a^-1(target) - (h W + x U + b)||^2 + reg ||h||^2`` (docs/rules/target_propagation.rst)."""
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


class _Recurrent(Layer):
  """What :class:`SimpleRNN` and :class:`GRU` share: a cell scanned over time and a linear
  readout of the last state, or of every state with ``sequence_output``."""

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int,
    make_cell: Callable[[], nnx.Module],
    *,
    sequence_output: bool,
    precision: dict[str, Any],
    rngs: nnx.Rngs,
  ):
    if min(in_features, hidden_features, out_features) < 1:
      raise ValueError(f"{type(self).__name__} needs positive sizes, got {in_features}, {hidden_features}, {out_features}")
    self.in_features = in_features
    self.sequence_output = sequence_output
    self.cell = make_cell()  # before the readout: the params draw from rngs in this order
    self.readout = Dense(
      hidden_features,
      out_features,
      activation="identity",
      kernel_init=nnx.initializers.orthogonal(),
      rngs=rngs,
      **precision,
    )

  def _read_out(self, h: Array) -> Array:
    """The readout of states ``h`` ``(batch, time, hidden)``: of the last, or of every one."""
    return self.readout(h if self.sequence_output else h[:, -1])

  def check_input(self, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] != self.in_features or shape[1] < 1:
      raise ValueError(
        f"{type(self).__name__} expects inputs shaped (batch, time >= 1, {self.in_features}), got {describe_shape(x)}"
      )


class SimpleRNN(_Recurrent):
  """Elman RNN on inputs shaped ``(batch, time, in_features)``; outputs ``readout(h_T)``, or
  with ``sequence_output=True`` ``readout(h_t)`` at every step, ``(batch, time, out_features)``.

  ``h_0 = 0``; the time loop is a ``lax.scan``. Two sites: the cell (pre-activations shaped
  ``(batch, time, hidden_features)``) and the linear readout.

  Args:
    in_features: features per time step.
    hidden_features: state width.
    out_features: readout width.
    activation: the cell's activation (tanh by default).
    sequence_output: a readout at every step (a language model's setting; pair it with a loss
      over steps such as ``losses.over_time(losses.softmax_cross_entropy)``).
    param_dtype, dtype: of the parameters and of the computation, as for :class:`Dense`.
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int,
    *,
    activation: str | Callable[[Array], Array] | Activation = "tanh",
    sequence_output: bool = False,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    precision = {"param_dtype": param_dtype, "dtype": dtype}
    super().__init__(
      in_features,
      hidden_features,
      out_features,
      lambda: RNNCell(in_features, hidden_features, activation=activation, rngs=rngs, **precision),
      sequence_output=sequence_output,
      precision=precision,
      rngs=rngs,
    )

  def sites(self):
    return (self.cell, self.readout)

  def states(self, x: Array, perturbation: Array | None = None) -> tuple[Array, Array]:
    """The cell's inputs ``h_{t-1}`` and pre-activations ``z_t``, both ``(batch, time, hidden)``."""
    drive = jnp.swapaxes(self.cell.input_drive(x), 0, 1)
    if perturbation is not None:
      drive = drive + jnp.swapaxes(perturbation, 0, 1)
    recurrent_kernel = self.cell.recurrent_kernel_value()
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

    return self._read_out(self.cell.activation(site(self.cell, cell)))


class GRUGates(NamedTuple):
  """The gates of GRU steps: ``reset``, ``update``, ``candidate`` and ``recurrent_candidate``
  (the candidate's state term ``h_prev W_n + b_hn``, before the reset gate scales it)."""

  reset: Array
  update: Array
  candidate: Array
  recurrent_candidate: Array


def _orthogonal_blocks(init: Callable[..., Array], key: Array, rows: int, width: int, dtype: Any) -> Array:
  """Three ``(rows, width)`` blocks drawn by ``init`` side by side: one per gate, as the TP
  authors initialise each of torch's gate matrices (semi-)orthogonal on its own."""
  return jnp.concatenate([init(k, (rows, width), dtype) for k in jax.random.split(key, 3)], axis=1)


class GRUCell(nnx.Module):
  """One GRU step in the Flax and torch convention,

  ``r = sigmoid(x U_r + h W_r + b_r)``, ``z = sigmoid(x U_z + h W_z + b_z)``,
  ``n = tanh(x U_n + b_n + r * (h W_n + b_hn))``, ``h' = (1 - z) n + z h``,

  with the gates' kernels side by side (``input_kernel`` ``(in, 3 hidden)``,
  ``recurrent_kernel`` ``(hidden, 3 hidden)``, order r, z, n). ``b_hn`` is torch's hidden bias
  of the candidate (Flax's GRUCell has none); torch's other hidden biases add to the input
  ones and are folded into ``input_bias``. Its :meth:`inverse_linearized` is target
  propagation's per-gate regularized inverse.
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    kernel_init: Callable[..., Array] = nnx.initializers.orthogonal(),
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.dtype = dtype
    self.input_kernel = nnx.Param(
      _orthogonal_blocks(kernel_init, rngs.params(), in_features, hidden_features, param_dtype)
    )
    self.recurrent_kernel = nnx.Param(
      _orthogonal_blocks(kernel_init, rngs.params(), hidden_features, hidden_features, param_dtype)
    )
    self.input_bias = nnx.Param(jnp.zeros((3 * hidden_features,), param_dtype))
    self.recurrent_bias = nnx.Param(jnp.zeros((hidden_features,), param_dtype))

  def recurrent_kernels(self) -> tuple[Array, Array, Array]:
    """``W_r, W_z, W_n``, each ``(hidden, hidden)``."""
    return tuple(jnp.split(self.recurrent_kernel[...], 3, axis=-1))

  def gates(self, h_prev: Array, x: Array) -> GRUGates:
    """The gates of the steps from ``h_prev`` on inputs ``x`` (any leading axes)."""
    h_prev, x, input_kernel, recurrent_kernel, input_bias, recurrent_bias = computed_in(
      self.dtype, h_prev, x, self.input_kernel[...], self.recurrent_kernel[...], self.input_bias[...], self.recurrent_bias[...]
    )
    drive_r, drive_z, drive_n = jnp.split(x @ input_kernel + input_bias, 3, axis=-1)
    state_r, state_z, state_n = jnp.split(h_prev @ recurrent_kernel, 3, axis=-1)
    reset = jax.nn.sigmoid(drive_r + state_r)
    recurrent_candidate = state_n + recurrent_bias
    candidate = jnp.tanh(drive_n + reset * recurrent_candidate)
    return GRUGates(reset, jax.nn.sigmoid(drive_z + state_z), candidate, recurrent_candidate)

  def __call__(self, h_prev: Array, x: Array) -> Array:
    """``h'``, the state after one step (any leading axes)."""
    gates = self.gates(h_prev, x)
    return (1 - gates.update) * gates.candidate + gates.update * computed_in(self.dtype, h_prev)[0]

  def ridge_solvers(self, reg: float | Array) -> tuple[RidgeSolver, RidgeSolver, RidgeSolver]:
    """The regularized inverses of ``W_r``, ``W_z``, ``W_n`` (one factorization each per
    training step, each formed as one ``(hidden, hidden)`` matrix)."""
    return tuple(ridge_solver(kernel, reg, explicit=True) for kernel in self.recurrent_kernels())

  def inverse_linearized(
    self,
    displacement: Array,
    h_prev: Array,
    gates: GRUGates,
    solvers: tuple[RidgeSolver, RidgeSolver, RidgeSolver],
  ) -> Array:
    """The displacement of ``h_prev`` that TP gives a step's ``displacement`` of ``h'``:
    :func:`gru_inverse_linearized`."""
    return gru_inverse_linearized(displacement, h_prev, gates, solvers)


def gru_inverse_linearized(
  displacement: Array, h_prev: Array, gates: GRUGates, solvers: tuple[RidgeSolver, RidgeSolver, RidgeSolver]
) -> Array:
  """The displacement of ``h_prev`` that TP gives a GRU step's ``displacement`` of ``h'``: the
  per-gate linearized inverse of the TP authors' code, re-derived for the Flax and torch
  convention (``h' = (1 - z) n + z h``; the authors' derivation is written for ``(1 - z) h + z n``).

  ``d_prev = z d + R_z[(h - n) d / z'] + R_r[(h W_n + b_hn)(1 - z) n' d / r'] + R_n[r (1 - z) n' d]``

  where ``R_g(e) = e W_g^T (W_g W_g^T + reg I)^-1`` inverts the gate's state map by ridge
  regression (``solvers``, in the order r, z, n), ``r' = r (1 - r)`` and ``z'`` are the sigmoid
  gates' derivatives (each gate clipped to [1e-3, 1 - 1e-3] first, as the authors do) and
  ``n' = 1 - n^2``. Each path from ``h`` to ``h'`` contributes: the sigmoid gates' derivatives
  are divided out (inverted), the other factors multiply (as the transpose would), and the
  direct path ``z h`` has no kernel to invert. [recon] the per-gate split is the authors'
  code's; the paper's text was not available. Serves altgrad's :class:`GRUCell` and Flax's
  ``nnx.GRUCell`` (``b_hn = 0``).
  """
  solve_r, solve_z, solve_n = solvers
  r, z, n, state_n = gates
  through_candidate = (1 - z) * (1 - n * n) * displacement
  return (
    z * displacement
    + solve_z((h_prev - n) * displacement / gate_slope(z))
    + solve_r(state_n * through_candidate / gate_slope(r))
    + solve_n(r * through_candidate)
  )


def gate_slope(gate: Array) -> Array:
  """A sigmoid gate's slope ``g (1 - g)``, the gate clipped to [1e-3, 1 - 1e-3] first (as the TP
  authors do), so that dividing by it stays finite."""
  gate = jnp.clip(gate, 1e-3, 1 - 1e-3)
  return gate * (1 - gate)


class GRU(_Recurrent):
  """A GRU on inputs shaped ``(batch, time, in_features)``; outputs ``readout(h_T)``, or with
  ``sequence_output=True`` ``readout(h_t)`` at every step, ``(batch, time, out_features)``.

  ``h_0 = 0``; the time loop is a ``lax.scan`` of :class:`GRUCell`. The readout is a linear
  :class:`Dense` (a site); target propagation inverts the cell gate by gate. For the other
  rules the cell's params are params outside any site, as in any NNX model (consequentialism
  gives them backprop's gradient, node perturbation leaves them frozen by default and says so):
  for those rules, ``nnx.RNN(nnx.GRUCell(...))``, whose gates are ``nnx.Linear`` sites.

  Args:
    in_features: features per time step.
    hidden_features: state width.
    out_features: readout width.
    sequence_output: a readout at every step (as for :class:`SimpleRNN`).
    param_dtype, dtype: of the parameters and of the computation, as for :class:`Dense`.
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int,
    *,
    sequence_output: bool = False,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    precision = {"param_dtype": param_dtype, "dtype": dtype}
    super().__init__(
      in_features,
      hidden_features,
      out_features,
      lambda: GRUCell(in_features, hidden_features, rngs=rngs, **precision),
      sequence_output=sequence_output,
      precision=precision,
      rngs=rngs,
    )

  def sites(self):
    return (self.readout,)

  def states(self, x: Array) -> tuple[Array, Array]:
    """The states ``h_{t-1}`` and ``h_t`` of every step, both ``(batch, time, hidden)``."""

    def step(h, x_t):
      h_next = self.cell(h, x_t)
      return h_next, (h, h_next)

    h0 = jnp.zeros((x.shape[0], self.cell.hidden_features), self.cell.dtype or x.dtype)
    _, (h_prev, h) = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(h_prev, 0, 1), jnp.swapaxes(h, 0, 1)

  def __call__(self, x):
    return self._read_out(self.states(x)[1])
