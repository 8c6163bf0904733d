"""Forward gradients: the gradient estimated from directional derivatives along random tangents,
computed in forward mode (``jax.jvp``), with no backward pass.

- ``perturb="weights"``: Baydin, Pearlmutter, Syme, Wood and Torr, "Gradients without
  Backpropagation", arXiv:2202.08587 (2022): ``(grad . v) v`` for ``v ~ N(0, I)`` over all params.
- ``perturb="activities"``: Ren, Kornblith, Liao and Hinton, "Scaling Forward Gradient With Local
  Losses", ICLR 2023 (arXiv:2210.03310): the tangent at the sites' pre-activations, one per
  example, and each site's update from its own error estimate ``(sum_k dL/dz_k . u_k) u_l``
  through its linear map (their global-loss activity perturbation; their local losses and
  architecture are not reproduced).

Both are unbiased: the mean over ``samples`` directions tends to the gradient, the relative error
of ``K`` weight directions near ``sqrt((n + 1) / K)`` for ``n`` params. The activity form is
node perturbation's limit as its ``sigma`` shrinks, on the same noise (docs/rules/forward_gradient.rst).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad import _mesh
from altgrad.nn import Forward
from altgrad.rules._common import (
  ApplyFn,
  Common,
  FreeParams,
  LossFn,
  Rule,
  UnpackFn,
  check_choice,
  check_static_int,
  free_params_or_frozen,
)
from altgrad.rules._noise import NoiseFn, noise_like

Array = jax.Array

Perturb = Literal["weights", "activities"]
PERTURBS = get_args(Perturb)


class ForwardGradientState(NamedTuple):
  """The state of :func:`forward_gradient`."""

  common: Common


def _over_samples(fn, keys: Array) -> Any:
  """The mean of ``fn(key)`` over the samples' keys (vmapped)."""
  return jax.tree.map(lambda u: jnp.mean(u, axis=0), jax.vmap(fn)(keys))


def forward_gradient(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  perturb: Perturb = "weights",
  samples: int = 1,
  tangent_fn: NoiseFn | None = None,
  free_params: FreeParams | None = None,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """The forward gradient: directional derivatives of the loss along random tangents, one
  ``jax.jvp`` of the forward pass per direction, times the tangents.

  - ``"weights"``: a tangent ``v`` over every param given, ``N(0, I)``; the update is
    ``(grad . v) v``, the directional derivative of the mean loss along ``v`` times ``v``.
  - ``"activities"``: a tangent ``u_l`` at every site's pre-activation, per example; each
    example's directional derivative ``d = sum_l dL/dz_l . u_l`` gives each site the error
    ``d u_l``, turned into its update by its own linear map at its recorded input (as backprop's
    errors are). Params outside sites: ``free_params`` as for :func:`node_perturbation`
    (``"frozen"`` by default with a warning naming them; ``"gradient"``; ``"perturb"``: a weight
    tangent over them in a forward pass of its own).

  Args:
    model: any Flax NNX model (cloned, never modified).
    loss_fn: ``loss_fn(outputs, targets)``: per-example losses for ``"activities"`` (one number
      for the batch works for ``"weights"``).
    perturb: ``"weights"`` or ``"activities"``.
    samples: directions per step (``K``), vmapped and averaged (structural: with
      ``optax.inject_hyperparams`` name it in ``static_args``).
    tangent_fn: ``tangent_fn(key, shape, dtype)`` in place of the standard normal tangent.
    free_params: for ``"activities"``, see above.
    apply, unpack, key: see :func:`altgrad.rules.backprop`; ``key`` seeds the tangents.
  """
  check_choice(perturb, "perturb", PERTURBS)
  activities = perturb == "activities"
  rule = Rule("forward_gradient", model, loss_fn, apply=apply, unpack=unpack, key=key, per_example=activities)
  samples = check_static_int(samples, "samples", minimum=1)
  if free_params is not None and not activities:
    raise ValueError("free_params applies to perturb='activities'; perturb='weights' takes a tangent over every param")
  if activities:
    free_params = free_params_or_frozen(free_params, model, "forward_gradient(perturb='activities')")

  def init_fn(params):
    return ForwardGradientState(rule.common(params))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets, noise_keys=samples)
    if activities:
      loss, updates, clean = _activity_directions(step, params, rule, tangent_fn, free_params)
      variables = step.model.next_variables(params, clean.variables, clean.taps)
    else:
      loss, updates, forward = _weight_directions(step, params, rule, tangent_fn, all_params=True)
      variables = step.model.next_variables(params, forward.variables, forward.taps)
    return updates, ForwardGradientState(rule.finish(step, loss, variables))

  return rule.transformation(init_fn, step_fn)


def _weight_directions(step, params, rule: Rule, tangent_fn, *, all_params: bool, clean: Forward | None = None):
  """The mean loss, ``(grad . v) v`` averaged over the step's directions (``v`` the same on every
  device) over every param, or only over the params outside the sites of ``clean``, and the
  first direction's forward pass."""
  leaves, tree = jax.tree.flatten(params)
  moved = [True] * len(leaves) if all_params else jax.tree.leaves(step.model.free_params(params, clean.taps))

  def mean(p):
    forward = step.model.tapped(p, step.inputs)
    return step.model.mean_loss(forward.outputs, step.targets, rule.loss_fn), forward

  def along(key):
    drawn = iter(noise_like(tangent_fn, 1.0, key, [a for a, m in zip(leaves, moved, strict=True) if m]))
    tangent = jax.tree.unflatten(tree, [next(drawn) if m else jnp.zeros_like(a) for a, m in zip(leaves, moved, strict=True)])
    loss, slope, forward = jax.jvp(mean, (params,), (tangent,), has_aux=True)
    return _mesh.batch_sum(loss), jax.tree.map(lambda v: (_mesh.batch_sum(slope) * v).astype(v.dtype), tangent), forward

  loss, updates, forward = jax.vmap(along)(step.shared_keys)
  first = lambda a: a[0]  # noqa: E731
  return first(loss), jax.tree.map(lambda u: jnp.mean(u, axis=0), updates), jax.tree.map(first, forward)


def _activity_directions(step, params, rule: Rule, tangent_fn, free_params: str) -> tuple[Array, Any, Forward]:
  """The mean loss, the update and the clean pass of ``perturb="activities"``."""
  if free_params == "gradient":
    back = step.model.errors(params, step.inputs, step.targets, rule.loss_fn)
    clean, free_gradient = Forward(back.outputs, back.taps, back.variables), back.residual
  else:
    clean = step.model.tapped(params, step.inputs)
  zeros = step.model.zero_perturbations(params, step.inputs)

  def losses(perturbations):
    return rule.losses(step.model.tapped(params, step.inputs, perturbations).outputs, step.targets, step.rows)

  def along(key):
    tangents = noise_like(tangent_fn, 1.0, key, list(zeros), batched=True)
    _, slopes = jax.jvp(losses, (zeros,), (tangents,))  # per example: sum_l dL_b/dz_l . u_l
    return tuple(slopes.reshape(-1, *(1,) * (u.ndim - 1)) * u / step.batch_size for u in tangents)

  errors = _over_samples(along, step.keys)
  updates = _mesh.gradient_sum(step.model.updates_from_errors(params, clean.taps, errors))
  if free_params == "gradient":
    updates = optax.tree.add(updates, _mesh.gradient_sum(free_gradient))
  elif free_params == "perturb":
    updates = optax.tree.add(updates, _weight_directions(step, params, rule, tangent_fn, all_params=False, clean=clean)[1])
  loss = rule.mean(rule.losses(clean.outputs, step.targets, step.rows))
  return loss, updates, clean
