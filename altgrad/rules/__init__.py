"""Learning rules: factories that return optax transformations producing pseudo-gradients.

Every rule has the same contract: ``tx = rule(model, ...)``; ``state = tx.init(params)``;
``updates, state = tx.update(updates, state, params, batch=batch)``. The incoming updates
(``None`` or any params-shaped tree) are ignored: a rule is the source of the update, as
``jax.grad`` is. The output is shaped like ``params`` and carries a gradient's sign, so any optax
optimizer can follow it in a chain. Every state holds :class:`Common` (``state.common``): the
step count, the key, the loss of the last update's clean pass and the model's other variables.
How one update runs, step by step, from the batch to the update: altgrad/nn/README.md.
"""

from altgrad.nn._base import at_step
from altgrad.rules._backprop import BackpropState, backprop
from altgrad.rules._common import Common, Rule, Step
from altgrad.rules._consequentialism import ConsequentialismState, consequentialism, emend
from altgrad.rules._direct_feedback import DirectFeedbackState, direct_feedback_alignment
from altgrad.rules._er_classifier import ERClassifier
from altgrad.rules._expectation_reflection import (
  ExpectationReflectionState,
  Moments,
  expectation_reflection,
  reflect,
  reflection_moments,
  reflection_solution,
  rises,
)
from altgrad.rules._feedback_alignment import FeedbackAlignmentState, feedback_alignment, feedback_weights
from altgrad.rules._forward_gradient import ForwardGradientState, forward_gradient
from altgrad.rules._guard import FiniteGuardState, finite_guard
from altgrad.rules._node_perturbation import NodePerturbationState, node_perturbation
from altgrad.rules._partition import PartitionState, partition
from altgrad.rules._registry import OWN_STEP, RULES
from altgrad.rules._target_propagation import TargetPropagationState, target_displacements, target_propagation

__all__ = [
  "OWN_STEP",
  "RULES",
  "BackpropState",
  "Common",
  "ConsequentialismState",
  "DirectFeedbackState",
  "ERClassifier",
  "ExpectationReflectionState",
  "FeedbackAlignmentState",
  "FiniteGuardState",
  "ForwardGradientState",
  "Moments",
  "NodePerturbationState",
  "PartitionState",
  "Rule",
  "Step",
  "TargetPropagationState",
  "at_step",
  "backprop",
  "consequentialism",
  "direct_feedback_alignment",
  "emend",
  "expectation_reflection",
  "feedback_alignment",
  "feedback_weights",
  "finite_guard",
  "forward_gradient",
  "node_perturbation",
  "partition",
  "reflect",
  "reflection_moments",
  "reflection_solution",
  "rises",
  "target_displacements",
  "target_propagation",
]
