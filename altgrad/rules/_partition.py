"""Different rules for different params of one model."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import optax


class PartitionState(NamedTuple):
  """The state of :func:`partition`: each label's rule state. They share one model state, held
  by the first label's (the others hold ``common=None``), so ``tree_get(state, "loss")`` finds it."""

  inner_states: dict[Hashable, Any]


def partition(
  transforms: Mapping[Hashable, optax.GradientTransformation], param_labels: Any | Callable[[Any], Any]
) -> optax.GradientTransformationExtraArgs:
  """Several rules on one model, each for the params of its label, as ``optax.partition`` is for
  optimizers: ``partition({"np": node_perturbation(model, loss), "bp": backprop(model, loss)},
  labels)`` gives node perturbation's update to the params labelled ``"np"`` and the gradient to
  those labelled ``"bp"``. Follow it with any optimizer (or with ``optax.partition`` of
  optimizers).

  Every rule runs on the whole model (each needs every param to run it) and the step keeps, for
  each param, its label's rule's update. The rules share one model state and key: each starts a
  step from the same BatchNorm statistics, RNG counts and call-time rngs, so their clean passes
  are the same computation, which XLA's common-subexpression elimination runs once in a jitted
  step, and what a rule computes for params it does not keep (the gradient of the hidden layers
  when backprop serves only the readout) is dead code that XLA removes. The next model state and
  the logged loss are the first label's rule's.

  Args:
    transforms: label -> rule, each built on the same model (optimizers go after ``partition``).
    param_labels: a tree of labels shaped like the params, or a function of the params that
      returns one (as ``optax.partition`` takes).
  """
  if not transforms:
    raise ValueError("partition needs at least one rule")
  first = next(iter(transforms))

  def labels_of(params):
    labels = param_labels(params) if callable(param_labels) else param_labels
    found = set(jax.tree.leaves(labels))
    if found - set(transforms):
      raise ValueError(f"partition: labels {sorted(map(str, found - set(transforms)))} have no rule in {list(transforms)}")
    return labels

  def init_fn(params):
    labels_of(params)
    states = {label: tx.init(params) for label, tx in transforms.items()}
    for label, state in states.items():
      if not hasattr(state, "common"):
        raise TypeError(
          f"partition takes rules; {label!r} is {type(state).__name__}'s transformation. Put optimizers "
          "after it: optax.chain(altgrad.rules.partition(...), optimizer)"
        )
    return PartitionState({label: s if label == first else s._replace(common=None) for label, s in states.items()})

  def update_fn(updates, state, params=None, **extra_args):
    common = state.inner_states[first].common
    results = {
      label: tx.update(updates, state.inner_states[label]._replace(common=common), params, **extra_args)
      for label, tx in transforms.items()
    }
    order = list(transforms)
    per_label = [results[label][0] for label in order]
    chosen = jax.tree.map(lambda label, *candidates: candidates[order.index(label)], labels_of(params), *per_label)
    states = {label: s if label == first else s._replace(common=None) for label, (_, s) in results.items()}
    return chosen, PartitionState(states)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
