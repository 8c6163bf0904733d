"""Diagnostics the field reports: how well a rule's update aligns with the backprop gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from altgrad.nn import Layer
from altgrad.rules import BackpropState, backprop

__all__ = ["cosine_probe", "cosine_to_backprop", "layer_cosines"]

Array = jax.Array


def _layer_name(path) -> str:
  """``layers/0`` for the leaf path ``layers, 0, kernel, value``: the owning module's path."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      names.append(key.name)
  return "/".join(names[:-1]) or "/"


def layer_cosines(updates: Any, reference: Any) -> dict[str, Array]:
  """Cosine between ``updates`` and ``reference`` per layer (all parameters of a module together).

  Both are pytrees shaped like the params. A layer where either side is zero gets 0.
  """
  if jax.tree.structure(updates) != jax.tree.structure(reference):
    raise ValueError("updates and reference must have the same structure (both shaped like params)")
  dots: dict[str, Array] = {}
  norms_u: dict[str, Array] = {}
  norms_r: dict[str, Array] = {}
  pairs = zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(reference), strict=True)
  for (path, u), r in pairs:
    name = _layer_name(path)
    u32, r32 = jnp.ravel(u).astype(jnp.float32), jnp.ravel(r).astype(jnp.float32)
    dots[name] = dots.get(name, 0.0) + jnp.vdot(u32, r32)
    norms_u[name] = norms_u.get(name, 0.0) + jnp.vdot(u32, u32)
    norms_r[name] = norms_r.get(name, 0.0) + jnp.vdot(r32, r32)
  cosines = {}
  for name, dot in dots.items():
    denom = jnp.sqrt(norms_u[name] * norms_r[name])
    cosines[name] = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
  return cosines


def cosine_to_backprop(model: Layer, loss_fn, updates: Any, params: Any, batch) -> dict[str, Array]:
  """Per-layer cosine between a rule's ``updates`` and the backprop gradient on ``batch``."""
  tx = backprop(model, loss_fn)
  gradient, _ = tx.update(None, tx.init(params), params, batch=batch)
  return layer_cosines(updates, gradient)


def cosine_probe(model: Layer, loss_fn, rule, batch):
  """A :func:`altgrad.train.fit` probe: per-layer cosine of ``rule``'s update to the backprop
  gradient on the fixed ``batch``, at the params and rule state of the moment.

  ``rule`` is the rule that ``fit``'s ``tx`` starts with: its state is ``opt_state[0]`` when
  ``tx`` is an ``optax.chain``, else ``opt_state``. The probe does not advance the rule's state
  (an NP probe draws the noise the next step will draw, and discards it).
  """
  reference = backprop(model, loss_fn)

  def probe(params, opt_state):
    state = opt_state[0] if type(opt_state) is tuple else opt_state
    updates, _ = rule.update(None, state, params, batch=batch)
    # backprop at the rule's current model variables (its decorrelation), found by name as fit
    # finds them: any transformation that keeps them, altgrad's rules or a plain gradient's
    variables = optax.tree_utils.tree_get(state, "model_variables")
    common = reference.init(params).common._replace(model_variables=variables)
    gradient, _ = reference.update(None, BackpropState(common), params, batch=batch)
    return layer_cosines(updates, gradient)

  return probe
