"""Per-example losses: ``loss_fn(outputs, targets) -> (batch,)``; the rules take the mean."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["clipped_cross_entropy", "mean_squared_error", "over_time", "softmax_cross_entropy", "squared_error"]

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Cross-entropy of integer ``labels`` ``(batch, ...)`` under ``softmax(logits)``
  ``(batch, ..., classes)``: one loss per example, or per token of a sequence ``(batch, time)``
  (the rules average each example's tokens).

  Labels must be integers in ``[0, classes)``; outside jit a label out of range raises.
  """
  labels = _check_labels(logits, labels, "softmax_cross_entropy")
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _check_labels(logits: Array, labels: Array, name: str) -> Array:
  """Integer labels ``(batch, ...)`` in range for ``logits`` ``(batch, ..., classes)``, or a clear error."""
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{name} needs integer class labels, got dtype {labels.dtype}")
  if logits.ndim < 2 or labels.shape != logits.shape[:-1]:
    raise ValueError(
      f"{name} needs logits (batch, ..., classes) and labels (batch, ...), "
      f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
    )
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high >= logits.shape[-1]:
      raise ValueError(
        f"labels must lie in [0, {logits.shape[-1]}) for {logits.shape[-1]} classes, "
        f"got values from {low} to {high}"
      )
  return labels


def clipped_cross_entropy(logits: Array, labels: Array, *, eps: float = 1e-7) -> Array:
  """Cross-entropy in probability space, ``-log(clip(softmax(logits)[label], eps, 1 - eps))``.

  The convention of the node-perturbation authors' code (SanderDalm/DANP_open_source trains with
  Keras' categorical cross-entropy on softmax outputs, which clips probabilities to
  ``[1e-7, 1 - 1e-7]``): bounded by ``-log(eps)`` (16.1 at the default), where a confidently
  wrong example's unbounded log-loss would dominate NP's loss differences. Its gradient is zero
  where the probability is clipped, as in Keras.
  """
  _check_labels(logits, labels, "clipped_cross_entropy")
  p = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.log(jnp.clip(p, eps, 1.0 - eps))


def mean_squared_error(outputs: Array, targets: Array) -> Array:
  """``mean((outputs - targets)^2)`` over the features of each example: with the rules' mean over
  the batch this is torch's ``MSELoss()`` (twice :func:`squared_error` for one output), the
  convention of the target-propagation authors' adding-task runs."""
  return 2.0 * squared_error(outputs, targets) / math.prod(outputs.shape[1:])


def squared_error(outputs: Array, targets: Array) -> Array:
  """``0.5 * sum((outputs - targets)^2)`` over the features of each example."""
  if outputs.shape != jnp.shape(targets):
    raise ValueError(
      f"squared_error needs targets shaped like the outputs {tuple(outputs.shape)}, "
      f"got {tuple(jnp.shape(targets))}"
    )
  diff = outputs - targets
  return 0.5 * jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)


def over_time(loss_fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
  """``loss_fn`` at every step of a sequence, averaged over the steps: outputs
  ``(batch, time, ...)`` and targets ``(batch, time, ...)`` give ``(batch,)``, so a model with
  a readout at every step (``SimpleRNN(..., sequence_output=True)``) keeps the per-example
  contract. With the rules' mean over the batch this is the mean over every token, as torch's
  default reduction is."""

  def loss(outputs: Array, targets: Array) -> Array:
    targets = jnp.asarray(targets)
    if outputs.ndim < 3 or targets.shape[:2] != outputs.shape[:2]:
      raise ValueError(
        f"over_time needs outputs (batch, time, ...) and targets with the same first two axes, "
        f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
      )
    batch, time = outputs.shape[:2]
    per_step = loss_fn(outputs.reshape(batch * time, *outputs.shape[2:]), targets.reshape(batch * time, *targets.shape[2:]))
    return jnp.mean(per_step.reshape(batch, time), axis=1)

  loss.__name__ = f"over_time({getattr(loss_fn, '__name__', 'loss')})"
  return loss
