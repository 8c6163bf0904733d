"""Backpropagation as a rule: the reference every other rule is measured against."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax
from flax import nnx

from altgrad import _mesh
from altgrad.rules._common import ApplyFn, Common, LossFn, Rule, UnpackFn


class BackpropState(NamedTuple):
  """The state of :func:`backprop`: only what every rule carries."""

  common: Common


def backprop(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Any = 0,
) -> optax.GradientTransformationExtraArgs:
  """The gradient of the mean of ``loss_fn`` over the batch, as a rule.

  Errors are ``dL/dz`` at every site call (the gradient with respect to a zero perturbation of
  the pre-activations), turned into parameter updates by the layers' own linear maps; params
  outside any site (norm scales, embeddings, free params) get their exact gradient from the
  same backward pass. The result equals ``jax.grad`` of the mean loss.

  Args:
    model: any Flax NNX model (it is cloned, never modified); its structure is fixed here, its
      params come to ``update``.
    loss_fn: ``loss_fn(outputs, targets)``: losses per example, ``(batch,)`` or ``(batch, ...)``
      (a per-token loss), whose mean over everything is the objective; one number for the batch
      also works here.
    apply, unpack, key: how the model is called (``apply(model, inputs, rngs)``), how a batch
      splits into ``(inputs, targets)``, and the seed of the call-time ``rngs``; see
      "Your own model" in the README.

  With a decorrelating model (``decorrelation_lr`` on its layers) this is decorrelated
  backprop: the gradient at the current ``R``, then ``R`` moves by its own rule.

  Returns:
    An optax transformation whose ``update(updates, state, params, *, batch)`` ignores
    ``updates`` and returns the gradient, shaped like ``params``.
  """
  rule = Rule("backprop", model, loss_fn, apply=apply, unpack=unpack, key=key)

  def init_fn(params):
    return BackpropState(rule.common(params))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets)
    back = step.model.errors(params, inputs, targets, rule.loss_fn)
    updates = optax.tree.add(step.model.updates_from_errors(params, back.taps, back.errors), back.residual)
    variables = step.model.next_variables(params, back.variables, back.taps)
    return _mesh.gradient_sum(updates), BackpropState(rule.finish(step, back.loss, variables))

  return rule.transformation(init_fn, step_fn)
