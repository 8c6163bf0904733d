"""Expectation Reflection's reference stopping rule, for :func:`altgrad.train.fit`."""

from __future__ import annotations

import optax

from altgrad.rules import rises


class BestParams:
  """Expectation Reflection's reference stopping rule: stop when the discrepancy rises by more
  than float rounding, keeping the params (and the epoch) of the lowest one seen."""

  def __init__(self):
    self.best = None  # (params, opt_state, epoch) at the lowest discrepancy
    self._lowest = None

  def fired(self, opt_state, before, epoch: int) -> bool:
    """Whether to stop after ``epoch``; its discrepancy was measured at ``before``'s params."""
    discrepancy = optax.tree_utils.tree_get(opt_state, "discrepancy")
    if self._lowest is not None and rises(discrepancy, self._lowest):
      return True
    if self._lowest is None or discrepancy < self._lowest:
      self._lowest, self.best = discrepancy, (*before, epoch - 1)
    return False
