"""A guard for jitted training, where a bad batch cannot raise: skip the step, say so."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class FiniteGuardState(NamedTuple):
  """The state of :func:`finite_guard`: the guarded state and the count of skipped steps."""

  inner_state: Any  # the guarded transformation's state
  skipped_steps: Array  # int32: how many steps were left undone because something was not finite
  last_skipped: Array  # bool: whether the last step was


def _all_finite(tree: Any) -> Array:
  floats = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(floats)) if floats else jnp.array(True)


def finite_guard(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps a rule (or a chain that starts with one) so that a step whose update or new state is
  not finite changes nothing: the update is zero, the state (PRNG keys, decorrelation matrices,
  optimizer moments) stays as it was, and ``skipped_steps`` counts it.

  Outside jit the rules raise on NaN or infinite inputs; inside a compiled training loop they
  cannot, and one bad batch would otherwise turn every parameter into NaN. This is the check
  for that case: ``tx = finite_guard(optax.chain(rule, optimizer))``. Unlike
  ``optax.apply_if_finite``, which inspects the updates coming *in*, it inspects what the rule
  produces and its state. :func:`altgrad.train.fit` reports the count in ``History.skipped_steps``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return FiniteGuardState(inner.init(params), jnp.zeros((), jnp.int32), jnp.array(False))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = inner.update(updates, state.inner_state, params, **extra_args)
    finite = _all_finite((new_updates, new_state))
    new_updates, new_state = jax.lax.cond(
      finite,
      lambda: (new_updates, new_state),
      lambda: (jax.tree.map(jnp.zeros_like, new_updates), state.inner_state),
    )
    skipped = state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, FiniteGuardState(new_state, skipped, jnp.logical_not(finite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
