"""Flax's recurrent cells as the rules see them: which of a cell's linear layers add into one
pre-activation, and how target propagation carries a displacement back through a step.

A Flax cell computes each pre-activation as a sum of linear layers, ``x W_i + b + h W_h``
(``nnx.SimpleCell``; each gate of ``nnx.LSTMCell``; all gates at once in
``nnx.OptimizedLSTMCell`` and ``nnx.GRUCell``). Each layer is a site; the layers of one sum are a
*group*: one pre-activation, several linear maps. Consequentialism emends a group as one layer
with design rows ``[x, 1, h]``, as it does altgrad's RNN cell: emending each layer alone would ask
each for the whole error, and the sum would move twice as far. In ``nnx.GRUCell`` the candidate's
state term is gated, ``n = tanh(x W_in + b_in + r * h W_hn)``, so on the candidate's columns the
group's consequence is ``r`` times as large through ``h``: a reconstruction, like CW itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import get_activation
from altgrad.nn._intercept import user_class
from altgrad.nn._recurrent import GRUGates, gate_slope, gru_inverse_linearized
from altgrad.nn._sites import SiteError, Tap

Array = jax.Array

Path = tuple[Any, ...]

#: For each Flax cell, its linear layers (attribute names) whose outputs add, the one whose
#: output is the sum's own term first.
ADDED: dict[type, tuple[tuple[str, ...], ...]] = {
  nnx.SimpleCell: (("dense_i", "dense_h"),),
  nnx.GRUCell: (("dense_i", "dense_h"),),
  nnx.LSTMCell: (("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho")),
  nnx.OptimizedLSTMCell: (("dense_i", "dense_h"),),
}


def site_groups(modules: dict[Path, nnx.Module], paths: Iterable[Path]) -> tuple[tuple[Path, ...], ...]:
  """``paths`` (site modules, in order) as groups of sites that add into one pre-activation: the
  layers of a Flax cell's sum (:data:`ADDED`) together, every other site alone."""
  paths = tuple(paths)
  groups, grouped = [], set()
  for path in paths:
    if path in grouped:
      continue
    group = (path,)
    parent = modules.get(path[:-1])
    for names in ADDED.get(user_class(parent), ()) if parent is not None else ():
      members = tuple((*path[:-1], name) for name in names)
      if path in members and all(member in paths for member in members):
        group = members
    grouped.update(group)
    groups.append(group)
  return tuple(groups)


# --- Target propagation through a Flax cell ---------------------------------------------------

_TANH = get_activation("tanh")


class CellSteps:
  """A Flax cell's steps under ``nnx.RNN`` as target propagation carries displacements back
  through them, read from the taps of the cell's linear layers (batch first, then time).

  Subclass requirements: ``width`` (the carry's displacement in units of the hidden width: 1,
  or 2 for an LSTM's memory and state side by side), :meth:`solvers`, :meth:`steps` (what
  :meth:`carry_back` reads at every step, batch first), :meth:`carry_back`,
  :meth:`carry_before` (the carry each step starts from, as the cell takes it), and for the
  through-time update :meth:`errors_back` and what it reads, :meth:`error_inputs`.
  """

  width = 1
  input_layer = "dense_i"  # the layer that reads the step's input x_t

  def __init__(self, cell: nnx.Module, taps: dict[str, Tap]):
    self.cell, self.taps = cell, taps

  @property
  def inputs(self) -> Array:
    """``x_t`` of every step, ``(batch, time, features)``."""
    return self.taps[self.input_layer].inputs

  def solvers(self, reg: Any) -> tuple[RidgeSolver, ...]:
    """The regularized inverses of the cell's state kernels, factored once per training step."""
    raise NotImplementedError

  def steps(self, mode: str) -> Any:
    raise NotImplementedError

  def carry_back(self, d: Array, step: Any, solvers: tuple[RidgeSolver, ...], mode: str) -> Array:
    """The displacement of the carry before a step, ``(batch, width * hidden)``, from that of
    the carry after it."""
    raise NotImplementedError

  def carry_before(self) -> Any:
    raise NotImplementedError

  def state(self, d: Array) -> Array:
    """The hidden state's part of a carry's displacement."""
    return d[..., -self.cell.hidden_features :]

  def error_inputs(self) -> Any:
    """What :meth:`errors_back` reads at every step, batch first."""
    raise NotImplementedError

  def errors_back(self, cotangent: Any, own: Array, at: Any) -> tuple[Any, dict[str, Array]]:
    """One step of back-propagation through time, from the stored step (no forward pass
    recomputed): from the cotangent of the carry after the step (what later steps send back)
    and ``own``, the cotangent of the step's output, the cotangent of the carry before it and
    the errors at the step's layers, by name."""
    raise NotImplementedError


class SimpleCellSteps(CellSteps):
  """``h' = tanh(x W_i + b + h W_h)`` (``+ h`` with ``residual``): inverted as altgrad's
  SimpleRNN cell is, ``h = (tanh^-1(h') - x W_i - b) K^T (K K^T + reg I)^-1`` with ``K = W_h``
  (``W_h + I`` with ``residual``), in every mode."""

  def _kernel(self) -> Array:
    kernel = self.cell.dense_h.kernel[...]
    return kernel + jnp.eye(kernel.shape[0], dtype=kernel.dtype) if self.cell.residual else kernel

  def solvers(self, reg):
    return (RidgeSolver.create(self._kernel(), reg, explicit=True),)

  def steps(self, mode):
    h_prev, drive = self.taps["dense_h"].inputs, self.taps["dense_i"].preact
    z = drive + self.taps["dense_h"].preact + (h_prev if self.cell.residual else 0)
    return jnp.tanh(z), drive, h_prev

  def carry_back(self, d, step, solvers, mode):
    (solve,), (h, drive, h_prev) = solvers, step
    if mode == "linearized":
      return solve(d * _TANH.inverse_derivative(h))
    if mode == "difference":  # the input drive cancels
      return solve(_TANH.inverse(h + d) - _TANH.inverse(h))
    return solve(_TANH.inverse(h + d) - drive) - h_prev

  def carry_before(self):
    return self.taps["dense_h"].inputs

  def error_inputs(self):
    return self.steps("linearized")[0]

  def errors_back(self, cotangent, own, h):
    """As altgrad's SimpleRNN: ``e_t = tanh'(z_t) (g_t + own_t)``, ``g_{t-1} = e_t K^T``, from
    the stored states (no recomputed step)."""
    error = (1 - h * h) * (cotangent + own)
    return error @ self._kernel().T, dict.fromkeys(self.taps, error)


class GRUCellSteps(CellSteps):
  """``nnx.GRUCell``, gate by gate as altgrad's :class:`~altgrad.nn.GRUCell` (its candidate's
  state term has no bias here): see :func:`~altgrad.nn._recurrent.gru_inverse_linearized`."""

  def solvers(self, reg):
    return tuple(RidgeSolver.create(k, reg, explicit=True) for k in jnp.split(self.cell.dense_h.kernel[...], 3, axis=-1))

  def steps(self, mode):
    drive_r, drive_z, drive_n = jnp.split(self.taps["dense_i"].preact, 3, axis=-1)
    state_r, state_z, state_n = jnp.split(self.taps["dense_h"].preact, 3, axis=-1)
    reset = jax.nn.sigmoid(drive_r + state_r)
    gates = GRUGates(reset, jax.nn.sigmoid(drive_z + state_z), jnp.tanh(drive_n + reset * state_n), state_n)
    return self.taps["dense_h"].inputs, gates

  def carry_back(self, d, step, solvers, mode):
    h_prev, gates = step
    return gru_inverse_linearized(d, h_prev, gates, solvers)

  def carry_before(self):
    return self.taps["dense_h"].inputs

  def error_inputs(self):
    return self.steps("linearized")

  def errors_back(self, cotangent, own, step):
    """``h' = (1 - z) n + z h``, ``n = tanh(x W_in + b_in + r (h W_hn))``, by the chain rule."""
    h, (r, z, n, state_n) = step
    total = cotangent + own
    candidate = total * (1 - z) * (1 - n * n)
    reset = candidate * state_n * r * (1 - r)
    update = total * (h - n) * z * (1 - z)
    state = jnp.concatenate([reset, update, candidate * r], axis=-1)
    errors = {"dense_i": jnp.concatenate([reset, update, candidate], axis=-1), "dense_h": state}
    return total * z + state @ self.cell.dense_h.kernel[...].T, errors


class LSTMCellSteps(CellSteps):
  """``nnx.LSTMCell`` and ``nnx.OptimizedLSTMCell``, ``c' = f c + i g``, ``h' = o tanh(c')``,
  inverted the way the TP authors invert a GRU [reconstruction: the authors have no LSTM]: the
  carry's displacement ``(d_c, d_h)`` first gathers on the memory, ``D = d_c + o tanh'(c') d_h``;
  the memory path is carried as is, ``d_c,prev = f D``; and each gate's state kernel ``W_g`` is
  inverted by ridge regression, ``R_g(e) = e W_g^T (W_g W_g^T + reg I)^-1``, with the sigmoid
  gates' slopes divided out and every other factor multiplied, as the transpose would:

  ``d_h,prev = R_i[g D / i'] + R_f[c D / f'] + R_g[i (1 - g^2) D] + R_o[tanh(c') d_h / o']``.

  The memory ``c`` is recomputed from the gates from ``c_0 = 0`` (Flax's default carry). Linearized
  mode only.
  """

  width = 2

  def __init__(self, cell, taps):
    super().__init__(cell, taps)
    self.optimized = isinstance(cell, nnx.OptimizedLSTMCell)
    self.input_layer = "dense_i" if self.optimized else "ii"

  def _state_taps(self) -> list[Tap]:
    return [self.taps["dense_h"]] if self.optimized else [self.taps[n] for n in ("hi", "hf", "hg", "ho")]

  def solvers(self, reg):
    if self.optimized:
      kernels = jnp.split(self.cell.dense_h.kernel[...], 4, axis=-1)
    else:
      kernels = [self.cell.hi.kernel[...], self.cell.hf.kernel[...], self.cell.hg.kernel[...], self.cell.ho.kernel[...]]
    return tuple(RidgeSolver.create(k, reg, explicit=True) for k in kernels)

  def _gates(self) -> tuple[Array, Array, Array, Array]:
    if self.optimized:
      sums = jnp.split(self.taps["dense_i"].preact + self.taps["dense_h"].preact, 4, axis=-1)
    else:
      pairs = (("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho"))
      sums = [self.taps[a].preact + self.taps[b].preact for a, b in pairs]
    i, f, g, o = sums
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)

  def _memory(self) -> tuple[Array, Array]:
    """``c_{t-1}`` and ``c_t`` of every step, ``(batch, time, hidden)``."""
    i, f, g, _ = self._gates()

    def step(c, gates):
      f_t, input_t = gates
      c = f_t * c + input_t
      return c, c

    time_major = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
    _, c = jax.lax.scan(step, jnp.zeros_like(i[:, 0]), (time_major(f), time_major(i * g)))
    c = time_major(c)
    return jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1), c

  def steps(self, mode):
    i, f, g, o = self._gates()
    c_prev, c = self._memory()
    return i, f, g, o, c_prev, c

  def carry_back(self, d, step, solvers, mode):
    i, f, g, o, c_prev, c = step
    solve_i, solve_f, solve_g, solve_o = solvers
    d_c, d_h = jnp.split(d, 2, axis=-1)
    squashed = jnp.tanh(c)
    memory = d_c + o * (1 - squashed * squashed) * d_h
    d_h_prev = (
      solve_i(g * memory / gate_slope(i))
      + solve_f(c_prev * memory / gate_slope(f))
      + solve_g(i * (1 - g * g) * memory)
      + solve_o(squashed * d_h / gate_slope(o))
    )
    return jnp.concatenate([f * memory, d_h_prev], axis=-1)

  def carry_before(self):
    return self._memory()[0], self._state_taps()[0].inputs

  def error_inputs(self):
    return self.steps("linearized")

  def errors_back(self, cotangent, own, step):
    """``c' = f c + i g``, ``h' = o tanh(c')``, by the chain rule."""
    i, f, g, o, c_prev, c = step
    memory_above, state_above = cotangent
    state = state_above + own
    squashed = jnp.tanh(c)
    memory = memory_above + state * o * (1 - squashed * squashed)
    gates = (memory * g * i * (1 - i), memory * c_prev * f * (1 - f), memory * i * (1 - g * g), state * squashed * o * (1 - o))
    if self.optimized:
      joined = jnp.concatenate(gates, axis=-1)
      errors = {"dense_i": joined, "dense_h": joined}
      below = joined @ self.cell.dense_h.kernel[...].T
    else:
      errors = dict(zip(("ii", "if_", "ig", "io"), gates, strict=True))
      errors |= dict(zip(("hi", "hf", "hg", "ho"), gates, strict=True))
      below = sum(e @ getattr(self.cell, n).kernel[...].T for e, n in zip(gates, ("hi", "hf", "hg", "ho"), strict=True))
    return (memory * f, below), errors


_STEPS = {
  nnx.SimpleCell: SimpleCellSteps,
  nnx.GRUCell: GRUCellSteps,
  nnx.LSTMCell: LSTMCellSteps,
  nnx.OptimizedLSTMCell: LSTMCellSteps,
}
#: The Flax cells target propagation inverts through time.
INVERTIBLE_CELLS = tuple(_STEPS)


def check_invertible_cell(cell: nnx.Module, where: str, mode: str) -> None:
  """Refuses a cell target propagation cannot invert in ``mode``, naming it and what works."""
  cls = user_class(cell)
  name = f"{where} ({cls.__module__.split('.')[0]}.{cls.__name__})"
  if cls not in _STEPS:
    raise SiteError(
      f"target_propagation cannot invert the recurrent cell {name}: it inverts nnx.SimpleCell, nnx.GRUCell, "
      "nnx.LSTMCell and nnx.OptimizedLSTMCell under nnx.RNN (and altgrad's SimpleRNN and GRU); use "
      "backprop, consequentialism or node_perturbation for this model"
    )
  activation = getattr(cell, "activation_fn", jnp.tanh)
  gate = getattr(cell, "gate_fn", jax.nn.sigmoid)
  if activation is not jnp.tanh or gate is not jax.nn.sigmoid:
    raise SiteError(
      f"target_propagation inverts {name} with tanh activations and sigmoid gates (Flax's defaults), "
      "but it has others: build the cell with the defaults, or use backprop, consequentialism or node_perturbation"
    )
  if cls is not nnx.SimpleCell and mode != "linearized":
    raise SiteError(
      f"target_propagation inverts {name} gate by gate, linearized (as the TP authors invert a GRU); "
      f"mode {mode!r} needs a whole-cell inverse: use mode='linearized'"
    )


def cell_steps(cell: nnx.Module, taps: dict[str, Tap]) -> CellSteps:
  """The :class:`CellSteps` of a Flax cell from its layers' taps by attribute name."""
  return _STEPS[user_class(cell)](cell, taps)
