"""Backpropagation as a rule: the reference every other rule is measured against."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from altgrad.nn import Layer, PureModel
from altgrad.rules._common import LossFn, check_loss_fn


class BackpropState(NamedTuple):
  model_variables: Any  # the model's decorrelation matrices (empty without decorrelation)


def backprop(model: Layer, loss_fn: LossFn) -> optax.GradientTransformationExtraArgs:
  """The gradient of the mean of ``loss_fn`` over the batch, as a rule.

  Errors are ``dL/dz`` at every site (the gradient with respect to a zero perturbation of the
  pre-activations), turned into parameter updates by the layers' own linear maps; the result
  equals ``jax.grad`` of the mean loss.

  Args:
    model: an ``altgrad.nn`` model; its structure is fixed here, its params come to ``update``.
    loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-example losses.

  With a decorrelating model (``decorrelation_lr`` on its layers) this is decorrelated
  backprop: the gradient at the current ``R``, then ``R`` moves by its own rule.

  Returns:
    An optax transformation whose ``update(updates, state, params, *, batch=(x, y))`` ignores
    ``updates`` and returns the gradient, shaped like ``params``.
  """
  pure = PureModel(model)
  check_loss_fn(loss_fn)

  def init_fn(params):
    del params
    return BackpropState(pure.variables)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del updates, extra_args
    model = pure.with_variables(state.model_variables)
    x, targets = model.check_batch(params, batch, rule="backprop")
    _, _, taps, errors = model.errors(params, x, targets, loss_fn)
    updates = model.updates_from_errors(params, taps, errors)
    return updates, BackpropState(model.decorrelation_step(params, taps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
