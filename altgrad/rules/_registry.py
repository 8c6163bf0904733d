"""Every rule under a name, with its default hyperparameters: what `altgrad compare` and the
common test suite run. A rule's issue adds its entries here."""

from __future__ import annotations

import functools
from collections.abc import Callable

import optax
from flax import nnx

from altgrad.rules._backprop import backprop
from altgrad.rules._common import LossFn
from altgrad.rules._consequentialism import consequentialism
from altgrad.rules._direct_feedback import direct_feedback_alignment
from altgrad.rules._expectation_reflection import expectation_reflection
from altgrad.rules._feedback_alignment import feedback_alignment
from altgrad.rules._forward_gradient import forward_gradient
from altgrad.rules._node_perturbation import node_perturbation
from altgrad.rules._target_propagation import target_propagation

RuleFactory = Callable[[nnx.Module, LossFn], optax.GradientTransformationExtraArgs]

RULES: dict[str, RuleFactory] = {
  "backprop": backprop,
  "consequentialism": consequentialism,
  "np": functools.partial(node_perturbation, variant="np"),
  "inp": functools.partial(node_perturbation, variant="inp"),
  "anp": functools.partial(node_perturbation, variant="anp"),
  "tp": target_propagation,
  "er": lambda model, loss_fn, *, data_size=None, **options: expectation_reflection(
    model, data_size=data_size, loss_fn=loss_fn, **options
  ),  # it reflects labels (the loss is only logged); it streams statistics over data_size examples
  "fa": feedback_alignment,
  "sign": functools.partial(feedback_alignment, feedback="sign"),
  "kp": functools.partial(feedback_alignment, feedback="kolen_pollack"),
  "dfa": direct_feedback_alignment,
  "drtp": functools.partial(direct_feedback_alignment, signal="target"),
  "fg": forward_gradient,
  "fga": functools.partial(forward_gradient, perturb="activities"),
}

#: Rules that fix their own step: their pseudo-gradient is applied by ``optax.sgd(step)`` whatever
#: optimizer the others use (ER lands on its least-squares solution; it has no learning rate).
OWN_STEP: dict[str, float] = {"er": 1.0}
