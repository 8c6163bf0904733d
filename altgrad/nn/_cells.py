"""Flax's recurrent cells as the rules see them: which of a cell's linear layers add into one
pre-activation.

A Flax cell computes each pre-activation as a sum of linear layers, ``x W_i + b + h W_h``
(``nnx.SimpleCell``; each gate of ``nnx.LSTMCell``; all gates at once in
``nnx.OptimizedLSTMCell`` and ``nnx.GRUCell``). Each layer is a site; the layers of one sum are a
*group*: one pre-activation, several linear maps. Consequentialism emends a group as one layer
with design rows ``[x, 1, h]``, as it does altgrad's RNN cell: emending each layer alone would ask
each for the whole error, and the sum would move twice as far. In ``nnx.GRUCell`` the candidate's
state term is gated, ``n = tanh(x W_in + b_in + r * h W_hn)``, so on the candidate's columns the
group's consequence is ``r`` times as large through ``h``: a reconstruction, like CW itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flax import nnx

from altgrad.nn._intercept import user_class

Path = tuple[Any, ...]

#: For each Flax cell, its linear layers (attribute names) whose outputs add, the one whose
#: output is the sum's own term first.
ADDED: dict[type, tuple[tuple[str, ...], ...]] = {
  nnx.SimpleCell: (("dense_i", "dense_h"),),
  nnx.GRUCell: (("dense_i", "dense_h"),),
  nnx.LSTMCell: (("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho")),
  nnx.OptimizedLSTMCell: (("dense_i", "dense_h"),),
}


def site_groups(modules: dict[Path, nnx.Module], paths: Iterable[Path]) -> tuple[tuple[Path, ...], ...]:
  """``paths`` (site modules, in order) as groups of sites that add into one pre-activation: the
  layers of a Flax cell's sum (:data:`ADDED`) together, every other site alone."""
  paths = tuple(paths)
  groups, grouped = [], set()
  for path in paths:
    if path in grouped:
      continue
    group = (path,)
    parent = modules.get(path[:-1])
    for names in ADDED.get(user_class(parent), ()) if parent is not None else ():
      members = tuple((*path[:-1], name) for name in names)
      if path in members and all(member in paths for member in members):
        group = members
    grouped.update(group)
    groups.append(group)
  return tuple(groups)
