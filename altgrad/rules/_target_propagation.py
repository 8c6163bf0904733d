"""Target propagation via regularized inversion (TP-RI), for any chain of layers (MLPs, conv
nets, ordinary NNX chains), Elman RNNs and GRUs.

Roulet and Harchaoui, "Target Propagation via Regularized Inversion", arXiv:2112.01453 (TMLR
2023: "... for Recurrent Neural Networks"). The algorithm follows the authors' public code
(vroulet/tpri) and slide as docs/rules/target_propagation.rst records: the paper's text was not
available. The feed-forward form, the Gauss-Newton reading, and everything on convolutions
(the sites' matrix-free inverses, the fallback for links without an inverse) are reconstructions.
Displacements ``d = v - h`` are carried instead of targets ``v`` (the reference forms targets,
which loses small displacements below float32's resolution of ``h``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad import _mesh
from altgrad._lapack import single_threaded_lapack
from altgrad.nn import GRU, PureModel, SimpleRNN
from altgrad.nn._base import at_step, check_number
from altgrad.nn._cells import INVERTIBLE_CELLS, CellSteps, cell_steps, check_invertible_cell
from altgrad.nn._chain import (
  CG_ITERATIONS,
  Chain,
  chain_of,
  regularized_least_squares,
  site_inverse,
  transpose_at,
)
from altgrad.nn._intercept import describe_site, site_modules
from altgrad.nn._matrix_form import linear_map
from altgrad.nn._sites import SiteError, tapping
from altgrad.rules._common import (
  ApplyFn,
  Common,
  LossFn,
  Rule,
  UnpackFn,
  check_choice,
  check_precision,
  check_static_int,
)

Array = jax.Array

Mode = Literal["linearized", "difference", "exact"]
Update = Literal["through_time", "local"]
FreeParams = Literal["gradient", "frozen"]
MODES = get_args(Mode)
UPDATES = get_args(Update)
FREE_PARAMS = get_args(FreeParams)


class TargetPropagationState(NamedTuple):
  """The state of :func:`target_propagation`."""

  common: Common
  displacement_norms: tuple[Array, ...]  # RMS displacement of each hidden layer at the last step
  clipped_displacements: Array  # how many displacements the guard has changed, all steps


@dataclasses.dataclass(frozen=True)
class _Settings:
  """One step's options (hyperparameters at the step's count)."""

  mode: Mode
  reg: Any
  lr_target: Any
  update: Update
  max_rms: Any
  iterations: int
  free_params: FreeParams = "gradient"


def _guard(d: Array, max_rms: float | None) -> tuple[Array, Array]:
  """Zeroes each example's displacement that is not finite (where the reference's overflows)
  and, given ``max_rms``, scales the others down to an RMS over units of at most ``max_rms``;
  also returns how many examples' displacements it changed."""
  axes = tuple(range(1, d.ndim))
  finite = jnp.all(jnp.isfinite(d), axis=axes, keepdims=True)
  d = jnp.where(finite, d, 0.0)
  fired = jnp.logical_not(finite)
  if max_rms is not None:
    rms = jnp.sqrt(jnp.mean(d * d, axis=axes, keepdims=True))
    d = d * jnp.minimum(1.0, max_rms / jnp.maximum(rms, max_rms))
    fired = fired | (rms > max_rms)
  return d, jnp.sum(fired, dtype=jnp.int32)


def _invert_layer(chain: Chain, index: int, d: Array, settings: _Settings) -> Array:
  """The displacement of site ``index``'s input for a displacement ``d`` of the next site's:
  through the link's exact inverse where it is invertible, else (linearized only) by the
  regularized least squares of the whole layer's linearization (see ``altgrad.nn._chain``)."""
  link, tap, mode, reg = chain.links[index], chain.taps[index], settings.mode, settings.reg
  inverse = site_inverse(chain.modules[index], tap.inputs, reg, coupled=chain.coupled, iterations=settings.iterations)
  if link.invertible:
    activation, output = link.activation, link.activation(tap.preact)
    step = link.unstructure(d, tap.preact)
    if mode == "linearized":
      return inverse.displacement(step * activation.inverse_derivative(output))
    target = inverse.target(activation.inverse(output + step))
    return target - (inverse.target(activation.inverse(output)) if mode == "difference" else tap.inputs)
  if mode != "linearized":
    raise SiteError(
      f"target_propagation mode {mode!r} inverts every layer, but between {chain.describe(index)} and "
      f"{chain.describe(index + 1)} lies {link.blocker}, which has no inverse: use mode='linearized' "
      "(the regularized inverse of the layer's linearization), or invertible activations (tanh, sigmoid, leaky_relu)"
    )
  _, link_jvp = jax.linearize(link.apply, tap.preact)
  forward = lambda t: link_jvp(inverse.linear(t))  # noqa: E731
  transpose = transpose_at(lambda x: link.apply(linear_map(chain.modules[index], x)), tap.inputs)
  return regularized_least_squares(forward, transpose, d, reg, coupled=chain.coupled, iterations=settings.iterations)


def _chain_displacements(chain: Chain, top: Array, settings: _Settings) -> tuple[list[Array], Array]:
  """Displacements of the inputs of every site but the first, from ``top`` (the last site's),
  and how many the guard changed."""
  displacements, clipped = [top], jnp.zeros((), jnp.int32)
  for index in range(len(chain.taps) - 2, 0, -1):
    below, count = _guard(_invert_layer(chain, index, displacements[0], settings), settings.max_rms)
    displacements.insert(0, below)
    clipped = clipped + count
  return displacements, clipped


def _sweep_back(carry_back, first: Array, steps: Any, max_rms, error_back=None, error_start=None, error_inputs=None):
  """Displacements of ``h_1..h_T`` (batch, time, hidden) in one reverse scan over the steps
  ``t = T..2``: ``carry_back(d_t, step_inputs)`` takes ``d_t`` to ``h_{t-1}``, the guard acts
  there, and the loss's own displacement of ``h_{t-1}`` adds. ``first`` is the loss's
  displacement of ``h_T`` (batch, hidden), or of every state for a readout at every step
  (batch, time, hidden). ``steps`` are the steps' inputs, time-major. Returns the displacements,
  how many of them the guard changed and, given ``error_back``, the surrogate's errors
  back-propagated through time in the same scan (one backward sweep over time, not two), else
  None: ``error_back(above, d_t, at_t) -> (below, errors_t)`` takes what step ``t + 1`` sends
  back (``error_start`` at ``T``) to what step ``t`` sends back and its errors, ``at_t`` being
  step ``t``'s slice of ``error_inputs`` (a tree of batch-first arrays)."""
  through_time = error_back is not None

  def step(carry, inputs):
    d, above = carry
    step_inputs, own_before, at = inputs
    above, errors = error_back(above, d, at) if through_time else (None, None)
    below, count = _guard(carry_back(d, step_inputs), max_rms)
    below = below if own_before is None else below + own_before
    return (below, above), (below, count, errors)

  top, own = (first[:, -1], jnp.swapaxes(first[:, :-1], 0, 1)) if first.ndim == 3 else (first, None)
  later = jax.tree.map(lambda a: jnp.swapaxes(a[:, 1:], 0, 1), error_inputs) if through_time else None
  (bottom, above), (lower, counts, errors) = jax.lax.scan(step, (top, error_start), (steps, own, later), reverse=True)
  displacements = jnp.concatenate([jnp.swapaxes(lower, 0, 1), top[:, None]], axis=1)
  if not through_time:
    return displacements, jnp.sum(counts), None
  _, first_errors = error_back(above, bottom, jax.tree.map(lambda a: a[:, 0], error_inputs))  # from d_1
  errors = jax.tree.map(lambda e1, e: jnp.concatenate([e1[:, None], jnp.swapaxes(e, 0, 1)], axis=1), first_errors, errors)
  return displacements, jnp.sum(counts), errors


def _rnn_displacements(cell, tap, first: Array, settings: _Settings) -> tuple[Array, Array, Array | None]:
  """A SimpleRNN's displacements by the cell's inverse (regularized normal matrix factored
  once), how many the guard changed and, for ``update="through_time"``, the surrogate's errors
  at the pre-activations back-propagated through time, ``e_t = a'(z_t) (e_{t+1} W^T - d_t)``,
  in the same sweep: see :func:`_sweep_back`."""
  mode, reg, max_rms = settings.mode, settings.reg, settings.max_rms
  solver = cell.ridge_solver(reg)
  h_prev, x = tap.inputs
  h = cell.activation(tap.preact)
  time_major = lambda a: jnp.swapaxes(a[:, 1:], 0, 1)  # noqa: E731  (the steps t = 2..T)

  def carry_back(d, step_inputs):
    h_t, x_t, h_before = step_inputs
    if mode == "linearized":
      return cell.inverse_linearized(d, h_t, solver=solver)
    if mode == "difference":
      return cell.inverse(h_t + d, x_t, solver=solver) - cell.inverse(h_t, x_t, solver=solver)
    return cell.inverse(h_t + d, x_t, solver=solver) - h_before

  kernel = cell.recurrent_kernel_value()

  def error_back(error_above, d, preact):
    error = cell.activation.derivative(preact) * (error_above @ kernel.T - d)
    return error, error

  through_time = settings.update == "through_time"
  steps = (  # what the mode's inverse reads
    time_major(h),
    None if mode == "linearized" else time_major(x),
    time_major(h_prev) if mode == "exact" else None,
  )
  if not through_time:
    return _sweep_back(carry_back, first, steps, max_rms)
  return _sweep_back(carry_back, first, steps, max_rms, error_back, jnp.zeros_like(tap.preact[:, 0]), tap.preact)


def _gru_displacements(cell, h_prev: Array, x: Array, first: Array, reg, max_rms) -> tuple[Array, Array]:
  """A GRU's displacements by the cell's per-gate inverse (gates of every step computed
  beforehand, in parallel), and how many the guard changed: see :func:`_sweep_back`."""
  solvers = cell.ridge_solvers(reg)
  before = h_prev[:, 1:]  # h_{t-1} for the steps t = 2..T
  steps = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (before, cell.gates(before, x[:, 1:])))

  def carry_back(d, step_inputs):
    h_before, step_gates = step_inputs
    return cell.inverse_linearized(d, h_before, step_gates, solvers)

  displacements, clipped, _ = _sweep_back(carry_back, first, steps, max_rms)
  return displacements, clipped


def _mean_loss(loss, outputs, targets) -> Array:
  """This device's part of the whole batch's mean loss (all of it outside ``shard_map``)."""
  values = loss(outputs, targets)
  return jnp.sum(values) / _mesh.batch_count(values.shape[0])


def _gru_step(view: PureModel, params, x, targets, loss, settings: _Settings):
  """:func:`_step` for a GRU: the readout's loss gradient plus the cell's surrogate gradient
  (cotangent ``h - v = -d`` through the whole scan, or at each step's stored input)."""
  bound = view.bind(params)
  (h_prev, h), pull_back_states = jax.vjp(lambda p: view.bind(p).states(x), params)

  def mean_loss(p, states):
    return _mean_loss(loss, view.bind(p).readout(states), targets)

  top = h if bound.sequence_output else h[:, -1]
  mean, (readout_update, top_grad) = jax.value_and_grad(mean_loss, argnums=(0, 1))(params, top)
  first = -settings.lr_target * top_grad
  displacement, clipped = _gru_displacements(bound.cell, h_prev, x, first, settings.reg, settings.max_rms)
  if settings.update == "through_time":  # the surrogate holds h_{t-1} only through h: no cotangent there
    (cell_update,) = pull_back_states((jnp.zeros_like(h_prev), -displacement))
  else:
    _, pull_back = jax.vjp(lambda p: view.bind(p).cell(h_prev, x), params)
    (cell_update,) = pull_back(-displacement)
  return optax.tree.add(readout_update, cell_update), [displacement], clipped, (), mean


def _check_model(model: nnx.Module, mode: Mode) -> int:
  """Checks what can be checked before a batch (a chain is read from the first batch's trace) and
  returns how many hidden states the model has."""
  if isinstance(model, GRU):
    if mode != "linearized":
      raise ValueError(
        f"target_propagation inverts a GRU gate by gate, linearized (as the authors' code does); mode {mode!r} "
        "needs a whole-cell inverse it does not have: use mode='linearized'"
      )
    return 1
  recurrent = _check_recurrence(model, mode)
  sites = [model.cell] if isinstance(model, SimpleRNN) else [m for _, m in site_modules(model)]
  if recurrent is not None:  # the RNN's states are one hidden layer; its cell's layers are not
    cell = (*recurrent[0], "cell")
    sites = [recurrent[1].cell] + [m for p, m in site_modules(model) if p[: len(cell)] != cell]
  if not isinstance(model, SimpleRNN) and len(sites) < 2:
    raise ValueError("target_propagation needs at least one hidden layer below the output layer")
  hidden = sites if isinstance(model, SimpleRNN) else sites[:-1]
  for site in hidden if isinstance(model, SimpleRNN) or mode != "linearized" else ():
    activation = getattr(site, "activation", None)
    if activation is not None and not activation.invertible:
      raise ValueError(
        f"target_propagation mode {mode!r} inverts every hidden layer, but activation {activation.name!r} has "
        "no inverse; use tanh, sigmoid, leaky_relu or identity"
        + ("" if isinstance(model, SimpleRNN) else ", or mode='linearized' (the layer's linearization)")
      )
  return 1 if isinstance(model, SimpleRNN) else len(hidden)


def _check_recurrence(model: nnx.Module, mode: Mode) -> tuple[Any, nnx.RNN] | None:
  """``(path, rnn)`` of the model's ``nnx.RNN`` if it has one TP can invert, None if it has
  none; an error naming the RNN or cell and what works otherwise."""
  rnns = [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.RNN)]
  for path, cell in nnx.iter_modules(model):
    if isinstance(cell, nnx.RNN) or not isinstance(cell, INVERTIBLE_CELLS):
      continue
    if not any(tuple(path)[:-1] == p for p, _ in rnns):
      raise SiteError(
        f"target_propagation carries targets back in time through a cell that nnx.RNN scans; {describe_site(tuple(path), cell)} "
        "is stepped by the model's own code: wrap it, nnx.RNN(cell), or use backprop, consequentialism or node_perturbation"
      )
  if not rnns:
    return None
  if len(rnns) > 1:
    raise SiteError(
      f"target_propagation inverts one nnx.RNN at the bottom of the model; {type(model).__name__} has "
      f"{len(rnns)} ({', '.join(describe_site(p, m) for p, m in rnns)}; nnx.Bidirectional is two): use backprop, "
      "consequentialism or node_perturbation for this model"
    )
  path, rnn = rnns[0]
  check_invertible_cell(rnn.cell, "/".join(map(str, (*path, "cell"))), mode)
  return path, rnn


def _recurrent_step(view: PureModel, params, x, targets, loss, settings: _Settings):
  """:func:`_step` for a SimpleRNN: displacements carried back in time by the cell's inverse,
  and with them, through time, the surrogate's errors."""
  cell, top = view.bind(params).sites()
  taps = view.tapped(params, x).taps
  mean, top_error = jax.value_and_grad(lambda z: _mean_loss(loss, top.activation(z), targets))(taps[-1].preact)
  first = -settings.lr_target * transpose_at(top.linear, taps[-1].inputs)(top_error)
  displacement, clipped, own = _rnn_displacements(cell, taps[0], first, settings)
  if own is None:  # the local update: each step's error at its stored input
    own = -displacement * cell.activation.derivative(taps[0].preact)
  return view.updates_from_errors(params, taps, (own, top_error)), [displacement], clipped, taps, mean


def _step(view: PureModel, params, x, targets, loss, settings: _Settings):
  """This device's part of the update, the hidden states' displacements, how many of them the
  guard changed, the taps of the linear layers, and this device's part of the mean loss, of one
  TP step: on a chain of layers, with an ``nnx.RNN`` at its bottom or not."""
  bound = view.bind(params)
  if isinstance(bound, GRU):
    return _gru_step(view, params, x, targets, loss, settings)
  if isinstance(bound, SimpleRNN):
    return _recurrent_step(view, params, x, targets, loss, settings)
  recurrent = any(isinstance(m, nnx.RNN) for _, m in nnx.iter_modules(bound))
  view = view.with_rnn_outputs() if recurrent else view

  def forward(perturbations, params):
    tapped = view.tapped(params, x, perturbations, stop_site_params=True)
    return (_mean_loss(loss, tapped.outputs, targets), tuple(t.preact for t in tapped.taps)), tapped.taps

  (mean, preacts), pull_back, taps = jax.vjp(forward, view.zero_perturbations(params, x), params, has_aux=True)
  start = _recurrence_start(view, params, taps) if recurrent else 0
  chain = chain_of(view, params, x, taps, "target_propagation", start=start)
  nothing = tuple(jnp.zeros_like(z) for z in preacts)
  # dL/dz at the last site, and the loss gradient of the params outside sites (the rest is dead code)
  down, free_gradient = pull_back((jnp.ones_like(mean), nothing))
  top_error = down[-1]
  to_inputs = transpose_at(lambda h: linear_map(chain.modules[-1], h), taps[-1].inputs)
  first = -settings.lr_target * to_inputs(top_error)  # displacement of the last site's input
  displacements, clipped = _chain_displacements(chain, first, settings)
  local = [-link.vjp(tap.preact, d) for link, tap, d in zip(chain.links, chain.taps[:-1], displacements, strict=True)]
  through_time = settings.update == "through_time"
  if recurrent:  # the RNN's outputs: its states, displaced back in time by the cell's inverse
    cell = view.modules(params)[(*taps[start].path, "cell")]
    steps = cell_steps(cell, {tap.path[-1]: tap for tap in taps[:start]})
    above = None  # the through-time cotangent the layers above the RNN send to its outputs
    if through_time and len(local) > 1:
      above = pull_back((jnp.zeros_like(mean), (*nothing[: start + 1], *local[1:], jnp.zeros_like(top_error))))[0]
    own = _through_link(chain, 0, displacements[0], settings)
    cell_taps = taps[:start] if through_time else None
    states, count, cell_errors = _state_displacements(steps, own, settings, cell_taps, None if above is None else above[start])
    displacements, clipped = [states, *displacements[1:]], clipped + count
    if not through_time:  # each step's own error, at the carry it started from
      cell_errors = _one_step_errors(cell, steps, taps[:start], -states)
    errors = (*cell_errors, *(local[1:] if above is None else above[start + 1 : -1]), top_error)
    sites = (*taps[:start], *taps[start + 1 :])
  elif through_time:
    errors, _ = pull_back((jnp.zeros_like(mean), (*local, jnp.zeros_like(top_error))))
    errors, sites = (*errors[:-1], top_error), taps
  else:
    errors, sites = (*local, top_error), taps
  updates = view.updates_from_errors(params, sites, errors)
  if settings.free_params == "gradient":
    updates = optax.tree.add(updates, free_gradient)
  return updates, displacements, clipped, sites, mean


def _through_link(chain: Chain, index: int, d: Array, settings: _Settings) -> Array:
  """The displacement of site ``index``'s output for a displacement ``d`` of the next site's
  input, through the link alone (from an ``nnx.RNN``'s outputs to the layer above): by its
  exact inverse where it has one (a selection, ``h[:, -1]``, by its transpose), else,
  linearized, by the regularized least squares of its Jacobian."""
  link, tap = chain.links[index], chain.taps[index]
  if link.invertible:
    output, step = link.activation(tap.preact), link.unstructure(d, tap.preact)
    if settings.mode == "linearized":
      return step * link.activation.inverse_derivative(output)
    return link.activation.inverse(output + step) - link.activation.inverse(output)
  if settings.mode != "linearized":
    raise SiteError(
      f"target_propagation mode {settings.mode!r} inverts every layer, but between {chain.describe(index)} and "
      f"{chain.describe(index + 1)} lies {link.blocker}, which has no inverse: use mode='linearized'"
    )
  _, link_jvp = jax.linearize(link.apply, tap.preact)
  transpose = transpose_at(link.apply, tap.preact)
  return regularized_least_squares(link_jvp, transpose, d, settings.reg, coupled=chain.coupled, iterations=settings.iterations)


def _state_displacements(
  steps: CellSteps, own: Array, settings: _Settings, taps=None, above: Array | None = None
) -> tuple[Array, Array, tuple[Array, ...] | None]:
  """The displacements of an ``nnx.RNN``'s states ``h_1..h_T`` (batch, time, hidden), each
  step's ``own`` (from the layers above) plus what the cell's inverse carries back from the step
  after it (:func:`_sweep_back`), how many the guard changed and, given the cell's ``taps``, the
  through-time update's errors at them in the same sweep: each state's cotangent is ``-d_t``,
  plus ``above`` (what the layers above send back to it), plus what the next step sends back."""
  own, count = _guard(own, settings.max_rms)
  hidden = own.shape[-1]
  if steps.width > 1:  # the layers above read the state; the memory beside it starts undisplaced
    own = jnp.concatenate([jnp.zeros((*own.shape[:-1], (steps.width - 1) * hidden), own.dtype), own], axis=-1)
  solvers = steps.solvers(settings.reg)
  sequence = jax.tree.map(lambda a: jnp.swapaxes(a[:, 1:], 0, 1), steps.steps(settings.mode))
  carry_back = lambda d, step: steps.carry_back(d, step, solvers, settings.mode)  # noqa: E731
  if taps is None:
    carried, swept, _ = _sweep_back(carry_back, own, sequence, settings.max_rms)
    return carried[..., -hidden:], count + swept, None

  def error_back(cotangent, d, at):
    step, from_above = at
    own = -steps.state(d) if from_above is None else from_above - steps.state(d)
    return steps.errors_back(cotangent, own, step)

  start = jax.tree.map(lambda a: jnp.zeros_like(a[:, 0]), steps.carry_before())
  carried, swept, errors = _sweep_back(
    carry_back, own, sequence, settings.max_rms, error_back, start, (steps.error_inputs(), above)
  )
  errors = tuple(errors[tap.path[-1]] for tap in taps)
  return carried[..., -hidden:], count + swept, errors


def _one_step_errors(cell: nnx.Module, steps: CellSteps, taps, cotangent: Array) -> tuple[Array, ...]:
  """The errors at the cell's layers of ``cotangent`` on each step's state, each step on its own
  from the carry it started from (the local update's)."""
  flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731  (batch and time as one axis)
  carry, x = jax.tree.map(flat, steps.carry_before()), flat(steps.inputs)

  def step(perturbations):
    with tapping(perturbations):
      return cell(carry, x)[1]

  out, pull_back = jax.vjp(step, tuple(jnp.zeros_like(flat(t.preact)) for t in taps))
  (errors,) = pull_back(flat(cotangent).astype(out.dtype))
  return tuple(e.reshape(t.preact.shape) for e, t in zip(errors, taps, strict=True))


def _recurrence_start(view: PureModel, params, taps) -> int:
  """Where the model's ``nnx.RNN``'s output tap is, after its cell's layers' taps: TP inverts an
  RNN at the bottom of the model (on its inputs, or an embedding's), the layers above as a chain."""
  modules = view.modules(params)
  start = next(i for i, t in enumerate(taps) if isinstance(modules.get(t.path), nnx.RNN))
  cell = (*taps[start].path, "cell")
  for tap in taps[:start]:
    if tap.path[:-1] != cell or not tap.steps:
      raise SiteError(
        f"target_propagation inverts an nnx.RNN at the bottom of the model (on its inputs or an embedding's), "
        f"but {describe_site(tap.path, modules[tap.path])} runs below it: use backprop, consequentialism or "
        "node_perturbation for this model"
      )
  return start


def target_displacements(
  model: nnx.Module,
  loss_fn: LossFn,
  params: Any,
  batch,
  *,
  mode: Mode = "linearized",
  reg: float = 1.0,
  lr_target: float = 1e-2,
  max_displacement: float | None = None,
  cg_iterations: int | None = None,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
) -> list[Array]:
  """The displacements ``v - h`` that TP gives each hidden state on ``batch``: one array per
  site input but the first's of a chain (each hidden layer of an MLP), or one ``(batch, time, hidden)`` array for a SimpleRNN or GRU (its norm over
  time shows how far back the targets carry signal). Options as in :func:`target_propagation`."""
  rule = Rule("target_displacements", model, loss_fn, apply=apply, unpack=unpack, float32=True)
  _check_model(model, mode)
  x, targets = rule.read_batch(batch)
  rows = jax.tree.leaves(x)[0].shape[0]
  iterations = CG_ITERATIONS if cg_iterations is None else check_static_int(cg_iterations, "cg_iterations", minimum=1)
  settings = _Settings(mode, reg, lr_target, "local", max_displacement, iterations)
  return _step(rule.pure, params, x, targets, lambda o, t: rule.losses(o, t, rows), settings)[1]


def target_propagation(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  mode: Mode = "linearized",
  reg: float = 1.0,
  lr_target: float = 1e-2,
  update: Update = "through_time",
  max_displacement: float | None = None,
  cg_iterations: int | None = None,
  free_params: FreeParams = "gradient",
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Target propagation via regularized inversion.

  The output layer's input ``h`` (the last hidden layer, or the RNN's last state) gets the
  displacement ``d = -lr_target * dL/dh`` of the mean loss; displacements travel down (through
  the layers, or back in time through the cell) by each layer's regularized inverse
  ``f_r^-1(v) = argmin_h ||a^-1(v) - linear(h)||^2 + reg ||h||^2``:

  - ``"linearized"`` (the paper's practical form): ``d_below = J_r d``, the inverse's Jacobian;
  - ``"difference"``: ``d_below = f_r^-1(h + d) - f_r^-1(h)``;
  - ``"exact"`` (plain TP): ``d_below = f_r^-1(h + d) - h_below``.

  A recurrent model with a readout at every step (``sequence_output=True``) gives every state
  its own ``-lr_target * dL/dh_t`` through that step's readout, added to the displacement
  carried back from the step above (a reconstruction, docs/rules/target_propagation.rst; the authors' file
  counts the last step's own term twice, altgrad once).

  Each hidden layer then moves toward its target ``v = h + d``:

  - ``update="through_time"`` (default; the reference code, which reproduces the published
    curves): the gradient of ``sum 0.5 ||h(theta) - v||^2`` over layers (and time steps),
    back-propagated through the network with the targets held fixed. Its term at the top is
    exactly ``lr_target`` times backprop's, and as ``reg`` grows the whole update tends to
    ``lr_target`` times the backprop gradient.
  - ``update="local"`` (the paper's description): each layer's own ``0.5 ||v - f(h_below)||^2``
    at its stored input, ``(h - v) * a'(z)`` through its linear map; no backward pass.

  The output layer always gets its ordinary loss gradient; hidden layers move by about
  ``lr_target`` times the optimizer's step, so compare learning rates fairly.

  On any model that is a chain of linear layers (altgrad's MLP and conv net, an
  ``nnx.Sequential`` or a module calling ``nnx.Linear``/``nnx.Conv`` layers one after another;
  read from the first batch's trace, see ``altgrad.nn._chain``) a layer is a site and what lies
  between it and the next site: ``a^-1`` is the activation's guarded inverse where that is a
  known invertible activation followed by reshapes, and ``linear``'s ridge inverse is closed form
  for a dense site and conjugate gradients for a convolution [reconstruction on convolutions].
  Where what lies between two sites has no inverse (relu, pooling, normalization), the
  linearized mode uses the regularized least squares of the layer's Jacobian instead,
  ``(J^T J + reg I)^-1 J^T d`` [reconstruction, not the paper's inverse]; the other modes say
  so. A model that is not a chain (residual blocks, attention) is refused, naming the site.

  Args:
    model: a chain of linear layers as above (invertible hidden activations for the
      ``difference`` and ``exact`` modes), a SimpleRNN with an invertible activation, or a
      GRU (inverted gate by gate, ``mode="linearized"`` only: see ``GRUCell.inverse_linearized``).
    loss_fn: ``loss_fn(outputs, targets) -> (batch,)``.
    mode: ``"linearized"``, ``"difference"`` or ``"exact"``.
    reg: the inverse's ridge ``r > 0``; small values let targets explode backward.
    lr_target: the step ``gamma_h`` of the first target.
    update: ``"through_time"`` or ``"local"``.
    max_displacement: an optional bound, not in the reference: each example's displacement is
      scaled down to an RMS over units of at most this, at every layer and time step. Whatever
      the bound, a displacement that is not finite is set to zero (the example's target is its
      state there, and, through the inverses, below it): saturated units multiply displacements
      by up to ``1 / a'`` per step (500 for tanh after the clip of ``a^-1``), which overflows
      float32 within tens of steps, where the reference's targets turn to inf and NaN. With the
      default ``None`` the displacements are therefore the reference's wherever those are
      finite. The state's ``clipped_displacements`` counts the displacements (example, layer,
      time step) the guard has changed over all steps, and ``fit`` records it per epoch
      (``History.clipped_displacements``).
    cg_iterations: the most conjugate-gradient iterations of one matrix-free solve (a
      convolution's inverse, a layer without an inverse; ``None``:
      ``altgrad.nn._chain.CG_ITERATIONS``); each stops earlier once every example's relative
      residual is below ``altgrad.nn._chain.CG_TOLERANCE``.
    free_params: what params outside every linear layer get (an embedding below the first
      layer, LayerNorm scales and biases between layers, free ``nnx.Param`` s): ``"gradient"``
      (default), the gradient of the mean loss, as backprop and consequentialism give them
      (TP has no target for them: they do not map one layer's activity to the next), from the
      backward pass TP runs for its top layer anyway; ``"frozen"``, a zero update. The output
      layer too gets the ordinary loss gradient, so at ``optax.sgd(lr)`` these move at the
      output layer's scale, not at the hidden layers' ``lr_target``-sized one.
    apply, unpack, key: see :func:`altgrad.rules.backprop` (altgrad's SimpleRNN and GRU are
      called as ``model(inputs)``).

  The state records the RMS displacement of each hidden layer at the last step;
  :func:`target_displacements` gives them whole (per time step for an RNN). On a CPU, building
  the rule runs jaxlib's LAPACK calls on one OpenBLAS thread, whatever loop trains with it
  (their threads would take the cores from XLA's).
  """
  rule = Rule("target_propagation", model, loss_fn, apply=apply, unpack=unpack, key=key, float32=True)
  check_choice(mode, "mode", MODES)
  check_choice(update, "update", UPDATES)
  check_choice(free_params, "free_params", FREE_PARAMS)
  hidden = _check_model(model, mode)
  check_precision(model, "target_propagation", "solves a ridge system per layer")
  iterations = CG_ITERATIONS if cg_iterations is None else check_static_int(cg_iterations, "cg_iterations", minimum=1)
  for name, value in (("reg", reg), ("lr_target", lr_target), ("max_displacement", max_displacement)):
    if value is not None:
      check_number(value, name, positive=True, schedule=True)
  single_threaded_lapack()

  def init_fn(params):
    zeros = (jnp.zeros((), jnp.float32),) * hidden
    return TargetPropagationState(rule.common(params), zeros, jnp.zeros((), jnp.int32))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets)
    count = step.count
    max_rms = None if max_displacement is None else at_step(max_displacement, count)
    settings = _Settings(mode, at_step(reg, count), at_step(lr_target, count), update, max_rms, iterations, free_params)
    updates, displacements, clipped, taps, mean = _step(
      step.model, params, inputs, targets, lambda o, t: rule.losses(o, t, step.rows), settings
    )
    if len(displacements) != hidden:
      raise SiteError(
        f"target_propagation: the model has {hidden + 1} linear layers but its pass calls {len(taps)}: "
        "every linear layer of a chain runs once per pass"
      )
    norms = tuple(jnp.sqrt(rule.mean(jnp.mean(d.reshape(d.shape[0], -1) ** 2, axis=1))) for d in displacements)
    variables = step.model.next_variables(params, step.model.variables, taps)
    clipped = state.clipped_displacements + _mesh.batch_sum(clipped)
    common = rule.finish(step, _mesh.batch_sum(mean), variables)
    return _mesh.gradient_sum(updates), TargetPropagationState(common, norms, clipped)

  return rule.transformation(init_fn, step_fn)
