"""Feedback alignment (FA) and its kin: backprop's chain, but each site's error crosses it through
feedback weights ``B`` instead of the site's own ``W``.

- ``"random"``: Lillicrap, Cownden, Tweed and Akerman, "Random synaptic feedback weights support
  error backpropagation for deep learning", Nature Communications 7, 13276 (2016): a fixed random
  ``B`` per site.
- ``"sign"``: Liao, Leibo and Poggio, "How important is weight symmetry in backpropagation?",
  AAAI 2016 (arXiv:1510.05067): ``B = M * sign(W)`` at every step, with the paper's magnitudes
  ``M`` (biotorch's names): ``1`` (uSF), fixed random (frSF) or redrawn every batch (brSF); a
  random ``M`` is the absolute value of FA's draw, as biotorch's later layers take it.
- ``"kolen_pollack"``: Akrout, Wilson, Humphreys, Lillicrap and Tweed, "Deep learning without
  weight transport", NeurIPS 2019 (arXiv:1904.05391): ``B`` receives ``W``'s update, and both
  decay, so that ``B`` aligns with ``W``.
- ``"symmetric"``: ``B = W`` at every step, which is backprop (the oracle that the crossing is exact).

The crossing is the transpose of each site's own linear map at ``B`` (``altgrad.nn._crossing``),
so every site kind takes it as it is: a dense layer's ``g B^T``, attention's projections, a
convolution's transposed convolution with ``B``'s kernel, an RNN cell's layers at every step.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad.nn._base import at_step, check_number
from altgrad.nn._crossing import site_params, through
from altgrad.nn._intercept import site_modules
from altgrad.nn._pure import by_path, map_by_path
from altgrad.rules._common import ApplyFn, Common, LossFn, Rule, UnpackFn, check_choice, check_crossable

Array = jax.Array

Feedback = Literal["random", "sign", "kolen_pollack", "symmetric"]
FEEDBACKS = get_args(Feedback)
Magnitude = Literal["unit", "fixed_random", "batch_random"]
MAGNITUDES = get_args(Magnitude)


class FeedbackAlignmentState(NamedTuple):
  """The state of :func:`feedback_alignment`."""

  common: Common
  feedback: Any  # B for the site modules' params, shaped like them ("random", "kolen_pollack", and
  # "sign" with fixed random magnitudes, |B|; else empty)


def feedback_weights(model: nnx.Module, key: Array) -> nnx.State:
  """A random ``B`` for every param of the model's site modules, shaped like them and at their
  layer's own init scale: the layer's ``kernel_init`` for its kernel, else the param's own spread
  (zero for a zero param). What ``feedback_alignment`` draws at ``init`` from its key, for a rule
  of your own to draw alike."""
  modules = {tuple(path): module for path, module in nnx.iter_modules(model)}
  sites = [path for path, _ in site_modules(model)]
  drawn = []
  for index, (path, variable) in enumerate(nnx.to_flat_state(site_params(nnx.state(model, nnx.Param), sites))):
    key_i, value = jax.random.fold_in(key, index), variable[...]
    init = getattr(modules.get(path[:-1]), "kernel_init", None) if path[-1] == "kernel" else None
    new = init(key_i, value.shape, value.dtype) if init is not None else jnp.std(value) * jax.random.normal(key_i, value.shape, value.dtype)
    drawn.append((path, variable.replace(new)))
  return nnx.from_flat_state(drawn)


def feedback_alignment(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  feedback: Feedback = "random",
  magnitude: Magnitude = "unit",
  feedback_lr: float | Array | optax.Schedule = 1e-2,
  weight_decay: float | Array | optax.Schedule = 1e-4,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Backprop's errors with feedback weights in place of each site's own in the backward pass.

  The output layer's error is backprop's; each site's error crosses it to the layer below through
  the transpose of the site's linear map at ``B`` instead of ``W``. Everything between sites
  (activations, norms, skips, attention's products) is crossed exactly, params outside sites get
  their gradient (through the same pass), and each site's update is its error through its own
  linear map at its recorded input, as in backprop. One forward and one backward pass.

  Args:
    model: any Flax NNX model (cloned, never modified); every site takes a ``B`` shaped like its
      params. A layer of a stack made by ``nnx.scan``/``nnx.vmap`` and altgrad's SimpleRNN (one
      site for the whole recurrence) are refused at the first update; ``nnx.RNN``'s cells work.
    loss_fn: ``loss_fn(outputs, targets)``, as for :func:`altgrad.rules.backprop`.
    feedback: ``"random"`` (FA: ``B`` drawn once at ``init`` from the rule's key, at the layer's
      own init scale: :func:`feedback_weights`), ``"sign"`` (``M * sign(W)``, see ``magnitude``),
      ``"kolen_pollack"`` (``B`` drawn as for FA, then ``B <- B - feedback_lr (g_W + weight_decay
      B)`` after every step, with ``weight_decay W`` added to the sites' pseudo-gradients: with
      ``optax.sgd(feedback_lr)`` after the rule, ``B`` receives exactly ``W``'s update) or
      ``"symmetric"`` (``B = W``: backprop).
    magnitude: sign symmetry's ``M``: ``"unit"`` (``1``, uSF), ``"fixed_random"`` (``|B|`` for
      a ``B`` drawn as FA's at ``init``, frSF) or ``"batch_random"`` (drawn so at every step from
      the rule's key, alike on every device, brSF); only with ``feedback="sign"``.
    feedback_lr, weight_decay: Kolen-Pollack's step of ``B`` and its decay of both ``B`` and
      ``W`` (numbers, arrays or optax schedules); unused otherwise.
    apply, unpack, key: see :func:`altgrad.rules.backprop`.

  The state holds ``B`` (``state.feedback``), shaped like the site modules' params: checkpointed,
  replicated or sharded like them.
  """
  rule = Rule("feedback_alignment", model, loss_fn, apply=apply, unpack=unpack, key=key)
  check_crossable(model, "feedback_alignment")
  check_choice(feedback, "feedback", FEEDBACKS)
  check_choice(magnitude, "magnitude", MAGNITUDES)
  if magnitude != "unit" and feedback != "sign":
    raise ValueError(f"magnitude={magnitude!r} is sign symmetry's: give it with feedback='sign', not {feedback!r}")
  for name, value in (("feedback_lr", feedback_lr), ("weight_decay", weight_decay)):
    check_number(value, name, schedule=True)
  sites = [path for path, _ in site_modules(model)]
  learned = feedback in ("random", "kolen_pollack")
  drawn_at_init = learned or magnitude == "fixed_random"

  def init_fn(params):
    common = rule.common(params)
    drawn = feedback_weights(model, jax.random.fold_in(common.key, 1)) if drawn_at_init else nnx.State({})
    return FeedbackAlignmentState(common, drawn if learned else jax.tree.map(jnp.abs, drawn))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets, noise_keys=int(magnitude == "batch_random"))
    if learned:
      weights = state.feedback
    else:  # the sites' own params now (those frozen by wrt= included)
      weights = site_params(nnx.state(step.model.bind(params), nnx.Param), sites)
    if feedback == "sign":
      weights = jax.tree.map(jnp.sign, weights)
    if magnitude == "fixed_random":
      weights = jax.tree.map(jnp.multiply, state.feedback, weights)
    elif magnitude == "batch_random":
      weights = jax.tree.map(lambda m, w: jnp.abs(m) * w, feedback_weights(model, step.shared_keys[0]), weights)
    back = step.model.errors(params, inputs, targets, rule.loss_fn, backward=through(weights))
    updates = optax.tree.add(step.model.updates_from_errors(params, back.taps, back.errors), back.residual)
    new_feedback = state.feedback
    if feedback == "kolen_pollack":
      updates, new_feedback = _kolen_pollack(params, updates, state.feedback, at_step(feedback_lr, step.count), at_step(weight_decay, step.count))
    variables = step.model.next_variables(params, back.variables, back.taps)
    return updates, FeedbackAlignmentState(rule.finish(step, back.loss, variables), new_feedback)

  return rule.transformation(init_fn, step_fn)


def _kolen_pollack(params: Any, updates: Any, feedback: Any, lr: Any, decay: Any) -> tuple[Any, Any]:
  """``W``'s pseudo-gradient with ``decay W`` added, and ``B <- B - lr (g_W + decay B)``, for the
  site params given (a site param not given keeps its ``B``)."""
  gradients, weights = by_path(updates), by_path(params)
  held = by_path(feedback)
  decayed = map_by_path(lambda p, u: u + decay * weights[p] if p in held else u, updates)
  moved = map_by_path(lambda p, b: b - lr * (gradients[p] + decay * b) if p in gradients else b, feedback)
  return decayed, moved
