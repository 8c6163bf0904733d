"""The test set's loss and accuracy, and the checks of a data set against a model."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad.data import Dataset
from altgrad.nn import Layer, PureModel

#: A regression prediction counts as correct within this distance of its target
#: (docs/rules/target_propagation.rst, Benchmark settings).
REGRESSION_TOLERANCE = 0.04


def check_data(model: nnx.Module, data: Dataset, batch_size: int) -> None:
  """Refuses, by name, data the model cannot train on: an empty split, inputs or targets that are
  not finite, labels out of the data set's classes or beyond the model's outputs."""
  for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
    if len(x) == 0 or len(y) != len(x):
      raise ValueError(f"{data.name}: the {split} split has {len(x)} inputs and {len(y)} targets; it needs both, as many")
    if isinstance(model, Layer):
      model.check_input(x)
    for what, values in (("inputs", x), ("targets", y)):
      if np.issubdtype(np.asarray(values).dtype, np.inexact) and not np.all(np.isfinite(values)):
        raise ValueError(f"{data.name}: the {split} {what} contain NaN or infinite values")
  if data.num_classes is not None:
    for split, y in (("train", data.y_train), ("test", data.y_test)):
      if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= data.num_classes:
        raise ValueError(f"{data.name}: {split} labels must be integers in [0, {data.num_classes})")
    outputs = jax.eval_shape(lambda x: PureModel(model).evaluate(nnx.state(model, nnx.Param), x), data.x_test[:1])
    width = jax.tree.leaves(outputs)[0].shape[-1]
    highest = int(max(data.y_train.max(), data.y_test.max()))
    if highest >= max(width, 2):  # one output is a binary classifier's (labels 0 and 1)
      raise ValueError(
        f"{data.name}: labels go up to {highest}, but the model has {width} outputs (logits): its last "
        f"layer needs at least {highest + 1}"
      )
  if not 1 <= batch_size <= len(data.x_train):
    raise ValueError(f"batch_size must lie in [1, {len(data.x_train)}] (the training set), got {batch_size}")


def make_evaluate(model: nnx.Module, loss_fn: Callable, num_classes: int | None, chunk: int = 1024):
  """A jitted ``evaluate(params, variables, x, y) -> (mean loss, accuracy)`` over chunks of
  ``chunk`` examples, in evaluation mode (running BatchNorm statistics, no dropout);
  ``variables`` are the model's non-param variables."""
  pure = PureModel(model)

  @jax.jit
  def evaluate(params, variables, x, y):
    n = x.shape[0]
    size = min(chunk, n)
    pad = -n % size
    mask = jnp.arange(n + pad) < n
    padded = [jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in (x, y)]
    chunks = [a.reshape(-1, size, *a.shape[1:]) for a in (*padded, mask)]

    def one(args):
      xs, ys, ms = args
      out = pure.at(variables).evaluate(params, xs)
      loss = loss_fn(out, ys)
      if num_classes is None:
        correct = jnp.all(jnp.abs(out - ys) < REGRESSION_TOLERANCE, axis=-1)
      else:  # per example: the fraction of its steps right when there is an output per step
        correct = jnp.mean((jnp.argmax(out, axis=-1) == ys).reshape(size, -1), axis=1)
      return jnp.sum(jnp.where(ms, loss, 0.0)), jnp.sum(jnp.where(ms, correct, 0.0))

    losses, corrects = jax.lax.map(one, tuple(chunks))
    return jnp.sum(losses) / n, jnp.sum(corrects) / n

  return evaluate
