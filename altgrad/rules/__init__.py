"""Learning rules: factories that return optax transformations producing pseudo-gradients.

Every rule has the same contract: ``tx = rule(model, ...)``; ``state = tx.init(params)``;
``updates, state = tx.update(None, state, params, batch=(x, y))``. The incoming updates are
ignored (a rule is the source of the update, as ``jax.grad`` is); the output is shaped like
``params`` and carries a gradient's sign, so any optax optimizer can follow it in a chain.
"""

from altgrad.rules._backprop import backprop
from altgrad.rules._consequentialism import consequentialism
from altgrad.rules._er_classifier import ERClassifier
from altgrad.rules._expectation_reflection import (
  expectation_reflection,
  reflection_moments,
  reflection_solution,
)
from altgrad.rules._guard import FiniteGuardState, finite_guard
from altgrad.rules._node_perturbation import node_perturbation
from altgrad.rules._registry import OWN_STEP, RULES
from altgrad.rules._target_propagation import target_displacements, target_propagation

__all__ = [
  "ERClassifier",
  "FiniteGuardState",
  "finite_guard",
  "expectation_reflection",
  "reflection_moments",
  "reflection_solution",
  "OWN_STEP",
  "RULES",
  "backprop",
  "consequentialism",
  "node_perturbation",
  "target_displacements",
  "target_propagation",
]
