"""``altgrad.Optimizer``: ``nnx.Optimizer`` for a rule, with the model's state kept in the model."""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` for a chain that starts with an altgrad rule.

  ``update(model, None, batch=...)`` works as ``nnx.Optimizer``'s (the gradient argument is
  ignored: the rule makes the update) and also carries the model's other variables through the
  rule: BatchNorm statistics, RNG counts (dropout), decorrelation matrices. Each step starts from
  the variables the model holds and writes back those the rule's clean pass leaves, so after an
  update the model is where a plain NNX training step (``nnx.value_and_grad``, then
  ``nnx.Optimizer.update``) would leave it, and ``model.eval()`` evaluates with current
  statistics. A plain ``nnx.Optimizer`` cannot (the rule never sees the model) and refuses such
  a model at construction. Works under ``nnx.jit`` like ``nnx.Optimizer``::

    optimizer = altgrad.Optimizer(model, optax.chain(rule, optax.adam(1e-3)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
      optimizer.update(model, None, batch=batch)
  """

  #: Read by the rules' construction check: this optimizer writes the model's variables back.
  writes_model_variables = True

  def update(self, model: nnx.Module, grads: Any = None, /, **kwargs) -> optax.Updates:
    params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
    opt_state = nnx.as_pure(self.opt_state)
    held = optax.tree_utils.tree_get(opt_state, "model_variables")
    if held is None:
      raise TypeError("altgrad.Optimizer needs a tx that starts with an altgrad rule (its state holds the model's variables)")
    opt_state = optax.tree_utils.tree_set(opt_state, model_variables=_restricted(model, held))
    incoming = None if grads is None else nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
    updates, new_state = self.tx.update(incoming, opt_state, params, **nnx.as_pure(kwargs))
    nnx.update(model, optax.apply_updates(params, updates))
    nnx.update(model, optax.tree_utils.tree_get(new_state, "model_variables"))
    nnx.update(self.opt_state, nnx.state(new_state, graph=self.graph))
    self.step[...] += 1
    return updates


def _restricted(model: nnx.Module, held: Any) -> Any:
  """The model's current values of the variables the rule holds (those it had when the rule was
  built, and the params outside ``wrt``; one the model created since, e.g. a sown intermediate,
  is left out)."""
  own = dict(nnx.to_flat_state(nnx.state(model)))
  missing = [path for path, _ in nnx.to_flat_state(held) if path not in own]
  if missing:
    raise ValueError(
      f"the model no longer has the variables {['/'.join(map(str, p)) for p in missing]} that the rule was built with"
    )
  return nnx.from_flat_state([(path, own[path]) for path, _ in nnx.to_flat_state(held)])
