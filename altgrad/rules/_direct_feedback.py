"""Direct feedback alignment (DFA) and direct random target projection (DRTP): the output's error
(DFA) or the one-hot target (DRTP) sent by a fixed random matrix straight to each layer, with no
error crossing a layer backwards.

- DFA: Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks", NeurIPS
  2016 (arXiv:1609.01596).
- DRTP: Frenkel, Lefebvre and Bol, "Learning without feedback: Fixed random learning signals
  allow for feedforward training of deep neural networks", Frontiers in Neuroscience 15 (2021),
  arXiv:1909.01311.

Each hidden layer's output (the input of the site above it) gets ``e B``, ``e`` the gradient of
the mean loss with respect to the model's outputs (DFA), or ``-y*/n``, the target's part of it
(DRTP: the one-hot targets ``y*`` of ``n`` examples; ``B`` absorbs any sign, the convention
makes DRTP DFA with the error replaced by the target); it then crosses what lies below it (the
activation, a norm, a skip) exactly, down to the site's pre-activation; sites let nothing
through. The output layer gets its own loss gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad.nn._crossing import stopped
from altgrad.rules._common import ApplyFn, Common, LossFn, Rule, UnpackFn, check_choice, check_crossable

Array = jax.Array

Signal = Literal["error", "target"]
SIGNALS = get_args(Signal)


class DirectFeedbackState(NamedTuple):
  """The state of :func:`direct_feedback_alignment`."""

  common: Common
  feedback_key: Array  # the key every step draws the same fixed matrices B from


def projection(signal: Array, like: Array, key: Array) -> Array:
  """``signal`` (batch, ...) sent by a random matrix ``B`` drawn from ``key`` to the shape of
  ``like`` (batch, ...): position by position over the last axis where the two share their other
  axes (a per-token error to a per-token activity), else from everything to everything. ``B``'s
  entries are normal with variance ``1 / fan_in``, as a LeCun-initialized layer's."""
  if signal.shape[:-1] == like.shape[:-1]:
    fan_in, fan_out = signal.shape[-1], like.shape[-1]
    flat = signal
  else:
    fan_in, fan_out = math.prod(signal.shape[1:]), math.prod(like.shape[1:])
    flat = signal.reshape(signal.shape[0], fan_in)
  matrix = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
  return (flat @ matrix.astype(signal.dtype)).reshape(like.shape)


def delivery_points(taps, inputs) -> list[int]:
  """The site calls whose input gets a delivered error: each one whose input is neither one of
  the model's ``inputs`` nor an input delivered to already (attention's projections of one
  input share it)."""
  points, seen = [], list(jax.tree.leaves(inputs))
  for index, tap in enumerate(taps):
    if not any(tap.inputs is other for other in seen):
      points.append(index)
      seen.append(tap.inputs)
  return points


def direct_feedback_alignment(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  signal: Signal = "error",
  feedback_fn: Callable[[Array, Array, Array], Array] | None = None,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Each hidden layer's error sent straight from the output: DFA (``signal="error"``) or DRTP
  (``signal="target"``).

  Every site call whose input is an array made inside the model (the output of a layer below,
  after its activation; an embedding's, a norm's), not one of the model's inputs, gets the
  delivered signal there, ``e B_l`` (:func:`projection`; ``B_l`` fixed,
  drawn every step from the state's ``feedback_key``, so the state holds no matrices and their
  shapes follow the batch); it crosses the operations below it exactly to the sites' outputs
  below; no error crosses a site. Each site's update is its error through its own linear map at
  its recorded input; the output layer's error, and params the loss reaches without crossing a
  site, are backprop's. One forward pass and no backward chain through the layers.

  On a chain (an MLP) this is the papers' rule: ``delta_l = (e B_l) * f'(z_l)``. On residual or
  attention models the delivered errors cross skips and attention's products below them (a
  reconstruction: the papers have chains), and sites sharing one input (attention's query, key
  and value) share its delivery.

  Args:
    model: any Flax NNX model (cloned, never modified).
    loss_fn: ``loss_fn(outputs, targets)``, as for :func:`altgrad.rules.backprop`.
    signal: ``"error"`` (DFA: ``e = dL/d outputs`` of the mean loss) or ``"target"`` (DRTP:
      ``-one_hot(labels) / n`` for integer labels, ``-targets / n`` otherwise; no error needed).
    feedback_fn: ``feedback_fn(signal, like, key)``, what a site's input gets (shaped like
      ``like``), in place of :func:`projection` (your own feedback matrices, a nonlinear
      projection); ``key`` is the site's, fixed over steps.
    apply, unpack, key: see :func:`altgrad.rules.backprop`; ``key`` also seeds ``B``.
  """
  rule = Rule("direct_feedback_alignment", model, loss_fn, apply=apply, unpack=unpack, key=key)
  check_crossable(model, "direct_feedback_alignment")
  check_choice(signal, "signal", SIGNALS)
  if feedback_fn is not None and not callable(feedback_fn):
    raise TypeError(f"feedback_fn must be a function (signal, like, key) -> delivered error, got {type(feedback_fn).__name__}")
  project = projection if feedback_fn is None else feedback_fn

  def init_fn(params):
    common = rule.common(params)
    return DirectFeedbackState(common, jax.random.fold_in(common.key, 1))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets)

    def delivered(outputs, taps):
      if signal == "error":
        top = jax.grad(lambda o: step.model.mean_loss(o, targets, rule.loss_fn))(outputs)
      else:
        top = _target_signal(targets, outputs, step.batch_size)
      sent = [None] * len(taps)
      for index in delivery_points(taps, inputs):
        sent[index] = project(top, taps[index].inputs, jax.random.fold_in(state.feedback_key, index))
      return sent

    back = step.model.errors(params, inputs, targets, rule.loss_fn, backward=stopped, delivered=delivered)
    updates = optax.tree.add(step.model.updates_from_errors(params, back.taps, back.errors), back.residual)
    variables = step.model.next_variables(params, back.variables, back.taps)
    return updates, DirectFeedbackState(rule.finish(step, back.loss, variables), state.feedback_key)

  return rule.transformation(init_fn, step_fn)


def _target_signal(targets: Array, outputs: Array, batch_size: int) -> Array:
  """DRTP's signal: the targets' part of the mean loss's output gradient, ``-y*/n``."""
  if jnp.issubdtype(targets.dtype, jnp.integer):
    targets = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
  return -targets.astype(outputs.dtype).reshape(outputs.shape) / batch_size
