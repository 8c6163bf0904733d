"""Consequentialism weight updates (CW): backprop's update emended over the mini-batch (NLMS / APA).

Paeedeh and Ghiasi-Shirazi, "Improving the Backpropagation Algorithm with Consequentialism
Weight Updates over Mini-Batches", arXiv:2003.05164 (Neurocomputing 461, 2021).

Reconstruction: only the paper's abstracts were available and no code was published, so the
equations here are reconstructed (docs/rules/consequentialism.rst) from the abstracts and standard NLMS /
affine-projection theory. Unconfirmed: the scaling of eps, sum versus mean, and how the paper
combines the rule with momentum or Adam.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _linalg, _mesh
from altgrad._lapack import single_threaded_lapack
from altgrad.nn._base import at_step, check_number
from altgrad.nn._cells import site_groups
from altgrad.nn._matrix_form import linear_parts
from altgrad.nn._pure import given_paths
from altgrad.rules._common import ApplyFn, Common, LossFn, Rule, UnpackFn, check_choice, check_precision

Array = jax.Array

Form = Literal["auto", "dual", "primal"]
EpsMode = Literal["relative", "absolute"]
FORMS = get_args(Form)
EPS_MODES = get_args(EpsMode)


def _solve_spd(matrix: Array, rhs: Array, eps: Array) -> Array:
  """``(matrix + eps I)^-1 rhs`` by Cholesky (``matrix`` is a Gram matrix, so this is SPD)."""
  factor = _linalg.cholesky(matrix + eps * jnp.eye(matrix.shape[0], dtype=matrix.dtype))
  return _linalg.cho_solve(factor, rhs)


def emend(
  rows: Array,
  errors: Array,
  *,
  eps: float,
  eps_mode: EpsMode = "relative",
  form: Form = "auto",
  diag: bool = False,
) -> Array:
  """The CW update of one site in matrix form, ``X^T (X X^T + eps I)^-1 D``.

  Args:
    rows: the site's design rows ``X`` (rows, features), bias column included.
    errors: ``D`` (rows, out), the errors of the loss summed over the batch.
    eps: the ridge; with ``eps_mode="relative"`` it is multiplied by ``tr(X X^T) / rows``, the
      mean of ``||x_i||^2 + 1``, which makes the rule invariant to the input scale.
    form: ``"dual"`` solves the (rows x rows) system, ``"primal"`` the (features x features)
      one, ``X^T X``; ``"auto"`` the smaller. Both give the same matrix.
    diag: the ablation that keeps only the diagonal of ``X X^T``: per-example NLMS steps.

  Returns:
    the emended update (features, out), gradient-signed: ``sgd(eta)`` after it moves every
    example's output by ``-eta * D`` as far as the ridge allows.
  """
  dtype = errors.dtype
  compute = jnp.promote_types(dtype, jnp.float32)  # Grams and factors never in half precision
  rows, errors = rows.astype(compute), errors.astype(compute)
  count = _mesh.batch_count(rows.shape[0])  # inside shard_map, the rows of every device

  def ridge(trace):  # trace: tr(X X^T), the sum of the squared row norms over every device
    return eps * trace / count if eps_mode == "relative" else jnp.asarray(eps, compute)

  if diag:
    squared_norms = jnp.sum(rows * rows, axis=1)
    scale = ridge(_mesh.batch_sum(jnp.sum(squared_norms))) + squared_norms
    return _mesh.batch_sum(rows.T @ (errors / scale[:, None])).astype(dtype)
  side = form if form != "auto" else ("dual" if count < rows.shape[1] else "primal")
  if side == "dual":
    rows, errors = _mesh.gather_rows(rows), _mesh.gather_rows(errors)
    gram, rhs = _linalg.gram(rows), errors
  else:
    gram, rhs = _mesh.batch_sum(_linalg.gram(rows.T)), _mesh.batch_sum(rows.T @ errors)
  # the ridge's trace read off the Gram's diagonal: tr(X X^T) = tr(X^T X), no pass over X
  solved = _solve_spd(gram, rhs, ridge(jnp.sum(jnp.diagonal(gram))))
  return (rows.T @ solved if side == "dual" else solved).astype(dtype)


def _blocks(group, parts, given) -> list[list[tuple[int, int]]]:
  """What CW emends as one layer, as ``(site, part)`` indices into a site group's ``parts``: the
  parts that add into the group's output together (one pre-activation, several linear maps),
  and each part below another map alone; parts whose params are all frozen (not in ``params``)
  are left out."""
  trained = [
    (i, k)
    for i, site_parts in enumerate(parts)
    for k, part in enumerate(site_parts)
    if any((*group[i], *p) in given for p in part.params)
  ]
  adding = [(i, k) for i, k in trained if parts[i][k].error is None]
  return ([adding] if adding else []) + [[(i, k)] for i, k in trained if parts[i][k].error is not None]


class ConsequentialismState(NamedTuple):
  """The state of :func:`consequentialism`: only what every rule carries."""

  common: Common


def consequentialism(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  eps: float | Array | optax.Schedule = 1.0,
  eps_mode: EpsMode = "relative",
  form: Form = "auto",
  diag: bool = False,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Consequentialism weight updates: backprop's errors, with each site's update emended so
  that the step's consequence on every example of the batch is what that example asked for.

  Per site, with design rows ``X`` (inputs plus a bias column; a conv's patches, a recurrent
  cell's every time step) and backprop errors ``D`` of the summed loss:
  ``update = X^T (X X^T + eps I)^-1 D = (X^T X + eps I)^-1 X^T D``. With batch size 1 this is
  NLMS, ``delta x^T / (eps + ||x||^2)``; as ``eps`` grows it tends to ``B / eps`` times the
  gradient of the mean loss. The errors sent down are backprop's: only the weight update
  changes. Reconstructed from the paper's abstract (docs/rules/consequentialism.rst); see the module docstring.

  Follow it with any optimizer ("emend, then optimize"): with ``optax.sgd(eta)``, ``eta`` in
  (0, 1] is the fraction of each example's virtual error corrected (the mean loss's ``1/B`` is
  undone, so ``eta`` keeps that meaning). Momentum and Nesterov act on the emended update;
  Adam and RMSProp rescale per coordinate, which cancels CW's normalization and keeps its
  decorrelation. The library never right-multiplies an optimizer's step by the inverse Gram,
  which blows up outside the batch's span when the batch is smaller than the fan-in.

  Mixed precision: with a ``bfloat16`` compute dtype the errors and design rows are the layers'
  (bfloat16), and the Gram matrices, factors and solves float32.

  Args:
    model: any Flax NNX model. Emended sites: ``nnx.Linear``, ``nnx.LinearGeneral`` without
      batch axes (attention's query/key/value/out), ``nnx.Conv`` (ungrouped, unmasked,
      SAME/VALID/explicit padding), LoRA layers (the base and ``(x A) B`` as one layer, ``A``
      with the error ``D B^T``), Flax's recurrent cells (the layers that add into one
      pre-activation as one layer, on every step) and altgrad's Dense, Conv and SimpleRNN cell;
      a layer called twice stacks the rows of its calls (docs/rules/consequentialism.rst).
      Other sites (ConvTranspose, Einsum, grouped convs, a stack of layers under ``nnx.scan``)
      and params outside any site (norm scales, embeddings) get the plain gradient.
    loss_fn: ``loss_fn(outputs, targets)``, losses per example (see :func:`backprop`).
    eps: the ridge (``lam`` of the spec), relative to the mean squared input norm by default; a
      number, an array or an optax schedule of the step count.
    eps_mode: ``"relative"`` or ``"absolute"``.
    form: ``"auto"`` (smaller solve per site), ``"dual"`` or ``"primal"``. The primal form's
      statistics are sums over rows, so it is exact across micro-batches and devices.
    diag: per-example NLMS (the diagonal of the Gram matrix only): fixes the step's scale,
      not the interference between examples.
    apply, unpack, key: see :func:`backprop`.
  """
  rule = Rule("consequentialism", model, loss_fn, apply=apply, unpack=unpack, key=key)
  check_precision(model, "consequentialism", "solves a linear system per layer")
  check_number(eps, "eps", positive=True, schedule=True)
  check_choice(eps_mode, "eps_mode", EPS_MODES)
  check_choice(form, "form", FORMS)
  single_threaded_lapack()

  def init_fn(params):
    return ConsequentialismState(rule.common(params))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets)
    model = step.model
    back = model.errors(params, inputs, targets, rule.loss_fn)
    modules = model.modules(params)
    ridge = at_step(eps, step.count)
    given = given_paths(params)
    emended, plain = {}, []
    for group in site_groups(modules, model.site_paths(back.taps)):
      uses = [[(t, e) for t, e in zip(back.taps, back.errors, strict=True) if t.path == path] for path in group]
      parts = [None if u[0][0].stacked else linear_parts(modules[path]) for path, u in zip(group, uses, strict=True)]
      if None in parts or len({len(u) for u in uses}) > 1:  # no matrix form (or a stack): the plain gradient
        plain += [use for u in uses for use in u]
        continue
      for block in _blocks(group, parts, given):
        # each call's rows: the block's designs side by side (a shared layer stacks its calls)
        designs = [[parts[i][k].design(t.inputs) for t, _ in uses[i]] for i, k in block]
        rows = [jnp.concatenate(side_by_side, axis=1) for side_by_side in zip(*designs, strict=True)]
        i, k = block[0]
        to_part = parts[i][k].error or (lambda d: d)
        summed = [step.batch_size * to_part(e).reshape(r.shape[0], -1) for r, (_, e) in zip(rows, uses[i], strict=True)]
        matrix = emend(jnp.concatenate(rows), jnp.concatenate(summed), eps=ridge, eps_mode=eps_mode, form=form, diag=diag)
        widths = np.cumsum([d[0].shape[1] for d in designs])[:-1]
        emended.update(zip([(group[i], k) for i, k in block], jnp.split(matrix, widths), strict=True))
    updates = model.updates_from_matrices(params, emended)
    rest = back.residual
    if plain:
      taps, errors = zip(*plain, strict=True)
      rest = optax.tree.add(rest, model.updates_from_errors(params, taps, errors))
    updates = optax.tree.add(updates, _mesh.gradient_sum(rest))
    variables = model.next_variables(params, back.variables, back.taps)
    return updates, ConsequentialismState(rule.finish(step, back.loss, variables))

  return rule.transformation(init_fn, step_fn)
