"""Two control rules the bench compares with: plain ``jax.grad`` (the backprop rule's overhead)
and backprop at target propagation's step sizes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad import nn, rules
from altgrad.nn._pure import param_path


class PlainGradientState(NamedTuple):
  loss: Any  # the mean loss of the step, as the rules log it
  model_variables: Any  # the model's non-param variables after the step (BatchNorm statistics, RNG counts)


def plain_gradient(model: nnx.Module, loss_fn) -> optax.GradientTransformationExtraArgs:
  """``jax.grad`` of the mean loss through the model as it is, with no sites: the plain training
  step of an NNX user, against which the backprop rule's overhead is timed."""
  graphdef, _, variables = nnx.split(model, nnx.Param, ...)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del updates, extra_args
    x, targets = batch

    def mean_loss(p):
      bound = nnx.merge(graphdef, p, state.model_variables, copy=True)
      return jnp.mean(loss_fn(bound(x), targets)), nnx.split(bound, nnx.Param, ...)[2]

    (loss, variables), gradient = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return gradient, PlainGradientState(loss, variables)

  return optax.GradientTransformationExtraArgs(lambda params: PlainGradientState(jnp.asarray(jnp.inf, jnp.float32), variables), update_fn)


def scaled_backprop(model: nnx.Module, loss_fn, *, hidden_scale: float) -> optax.GradientTransformationExtraArgs:
  """Backprop with the gradient of every param but the output layer's multiplied by
  ``hidden_scale``: BPTT at target propagation's step sizes (its hidden layers move by about
  ``lr_target`` times the optimizer's step, its output layer by the step), the control that
  separates TP's credit assignment from its step sizes."""
  if isinstance(model, (nn.SimpleRNN, nn.GRU)):
    output = ("readout",)
  elif isinstance(model, nn.Sequential):
    output = ("layers", len(model.layers) - 1)
  else:
    raise TypeError(f"scaled_backprop knows the output layer of a SimpleRNN, GRU or Sequential, not {type(model).__name__}")
  rule = rules.backprop(model, loss_fn)

  def scale(key_path, update):
    return update if param_path(key_path)[: len(output)] == output else hidden_scale * update

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = rule.update(updates, state, params, **extra_args)
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformationExtraArgs(rule.init, update_fn)


#: The rules a suite can name: altgrad's, ``jax_grad`` (:func:`plain_gradient`) and
#: ``scaled_backprop``.
BENCH_RULES = {**rules.RULES, "jax_grad": plain_gradient, "scaled_backprop": scaled_backprop}
