"""Backpropagation as a rule: the reference every other rule is measured against."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax
from flax import nnx

from altgrad.nn import PureModel
from altgrad.rules._common import LossFn, check_loss_fn


class BackpropState(NamedTuple):
  model_variables: Any  # the model's non-param variables (decorrelation, BatchNorm statistics, RNG counts)


def backprop(model: nnx.Module, loss_fn: LossFn) -> optax.GradientTransformationExtraArgs:
  """The gradient of the mean of ``loss_fn`` over the batch, as a rule.

  Errors are ``dL/dz`` at every site call (the gradient with respect to a zero perturbation of
  the pre-activations), turned into parameter updates by the layers' own linear maps; params
  outside any site (norm scales, embeddings, free params) get their exact gradient from the
  same backward pass. The result equals ``jax.grad`` of the mean loss.

  Args:
    model: any Flax NNX model (it is cloned, never modified); its structure is fixed here, its
      params come to ``update``.
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
    back = model.errors(params, x, targets, loss_fn)
    updates = optax.tree.add(model.updates_from_errors(params, back.taps, back.errors), back.residual)
    return updates, BackpropState(model.next_variables(params, back.variables, back.taps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
