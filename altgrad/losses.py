"""Per-example losses: ``loss_fn(outputs, targets) -> (batch,)``; the rules take the mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Cross-entropy of integer ``labels`` (batch,) under ``softmax(logits)`` (batch, classes).

  Labels must be integers in ``[0, classes)``; outside jit a label out of range raises.
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"softmax_cross_entropy needs integer class labels, got dtype {labels.dtype}")
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
      f"softmax_cross_entropy needs logits (batch, classes) and labels (batch,), "
      f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
    )
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high >= logits.shape[1]:
      raise ValueError(
        f"labels must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes, "
        f"got values from {low} to {high}"
      )
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def squared_error(outputs: Array, targets: Array) -> Array:
  """``0.5 * sum((outputs - targets)^2)`` over the features of each example."""
  if outputs.shape != jnp.shape(targets):
    raise ValueError(
      f"squared_error needs targets shaped like the outputs {tuple(outputs.shape)}, "
      f"got {tuple(jnp.shape(targets))}"
    )
  diff = outputs - targets
  return 0.5 * jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)
