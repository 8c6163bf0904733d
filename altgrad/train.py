"""A small training loop for any rule: a convenience for the command line and notebooks."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad.data import Dataset
from altgrad.nn import Decorrelation, Layer

Array = jax.Array

#: A regression prediction counts as correct within this distance of its target (spec/tp.md).
REGRESSION_TOLERANCE = 0.04


@dataclasses.dataclass
class History:
  """Per-epoch record of a :func:`fit` run.

  ``step_time`` is the mean wall time of one training step in that epoch (seconds, compilation
  excluded); ``wall_time`` the training time elapsed at the end of the epoch; ``compilations``
  how many times the training step was compiled (1 when nothing recompiled); ``restored_epoch``,
  when a stopping rule fired, the epoch whose final params were kept (0: the initial ones).
  """

  epoch: list[int] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  test_loss: list[float] = dataclasses.field(default_factory=list)
  test_accuracy: list[float] = dataclasses.field(default_factory=list)
  step_time: list[float] = dataclasses.field(default_factory=list)
  wall_time: list[float] = dataclasses.field(default_factory=list)
  compile_time: float = 0.0
  compilations: int = 0
  restored_epoch: int | None = None

  @property
  def median_step_time(self) -> float:
    return statistics.median(self.step_time) if self.step_time else float("nan")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"median_step_time": self.median_step_time}


def _check_data(model: Layer, data: Dataset, batch_size: int) -> None:
  for split, x in (("train", data.x_train), ("test", data.x_test)):
    model.check_input(x)
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{data.name}: the {split} inputs contain NaN or infinite values")
  if data.num_classes is not None:
    for split, y in (("train", data.y_train), ("test", data.y_test)):
      if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= data.num_classes:
        raise ValueError(f"{data.name}: {split} labels must be integers in [0, {data.num_classes})")
  if not 1 <= batch_size <= len(data.x_train):
    raise ValueError(f"batch_size must lie in [1, {len(data.x_train)}] (the training set), got {batch_size}")


def make_evaluate(model: Layer, loss_fn: Callable, num_classes: int | None, chunk: int = 1024):
  """A jitted ``evaluate(params, variables, x, y) -> (mean loss, accuracy)`` over chunks of
  ``chunk`` examples; ``variables`` are the model's decorrelation matrices."""
  graphdef, _, _, rest = nnx.split(model, nnx.Param, Decorrelation, ...)

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
      out = nnx.merge(graphdef, params, variables, rest)(xs)
      loss = loss_fn(out, ys)
      if num_classes is None:
        correct = jnp.all(jnp.abs(out - ys) < REGRESSION_TOLERANCE, axis=-1)
      else:
        correct = jnp.argmax(out, axis=-1) == ys
      return jnp.sum(jnp.where(ms, loss, 0.0)), jnp.sum(jnp.where(ms, correct, False))

    losses, corrects = jax.lax.map(one, tuple(chunks))
    return jnp.sum(losses) / n, jnp.sum(corrects) / n

  return evaluate


def fit(
  model: Layer,
  tx: optax.GradientTransformation,
  data: Dataset,
  *,
  loss_fn: Callable,
  epochs: int = 10,
  batch_size: int = 64,
  seed: int = 0,
  train_eval_size: int = 10_000,
  progress: bool | None = None,
  stop_on_discrepancy: bool = False,
) -> History:
  """Trains ``model`` in place with the rule chain ``tx`` and returns the per-epoch history.

  Each epoch shuffles the training set (seeded), drops the last partial batch, and runs all its
  steps as one compiled ``lax.scan``; after it the test set and up to ``train_eval_size``
  training examples are evaluated. Decorrelation matrices that the rule trains (in its state)
  are used for evaluation and written back to the model with the params. ``tx`` is a rule, possibly chained with optimizers, called
  as ``tx.update(None, state, params, batch=(x, y))``.

  Args:
    model: an ``altgrad.nn`` model; its params are replaced by the trained ones.
    tx: the rule (first in any chain).
    data: a :class:`altgrad.data.Dataset`.
    loss_fn: per-example loss used for evaluation (the rule has its own).
    epochs, batch_size, seed: the schedule.
    train_eval_size: how many training examples to evaluate the train loss on.
    progress: show a progress bar; default only when stderr is a terminal.
    stop_on_discrepancy: the reference stopping rule of Expectation Reflection: stop when the
      discrepancy the rule reports (its state's ``discrepancy``, measured at the params its last
      update started from) no longer falls, and keep the best params. Meant for full-batch
      training (``batch_size`` = the training set), where each epoch is one update.
  """
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}")
  _check_data(model, data, batch_size)
  params = nnx.state(model, nnx.Param)
  opt_state = tx.init(params)
  if stop_on_discrepancy and optax.tree_utils.tree_get(opt_state, "discrepancy") is None:
    raise ValueError("stop_on_discrepancy needs a rule that reports a discrepancy (expectation_reflection)")
  evaluate = make_evaluate(model, loss_fn, data.num_classes)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  x_eval, y_eval = x_train[:train_eval_size], y_train[:train_eval_size]
  steps = len(data.x_train) // batch_size
  history = History()

  def run_epoch(params, opt_state, order):
    history.compilations += 1  # runs once per trace

    def step(carry, idx):
      params, opt_state = carry
      updates, opt_state = tx.update(None, opt_state, params, batch=(x_train[idx], y_train[idx]))
      return (optax.apply_updates(params, updates), opt_state), None

    batches = order[: steps * batch_size].reshape(steps, batch_size)
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state

  rng = np.random.default_rng(seed)
  orders = (jnp.asarray(rng.permutation(len(data.x_train))) for _ in range(epochs))
  start = time.perf_counter()
  run_epoch = jax.jit(run_epoch).lower(params, opt_state, jnp.arange(len(data.x_train))).compile()
  history.compile_time = time.perf_counter() - start

  show = sys.stderr.isatty() if progress is None else progress
  bar = _progress_bar(epochs, data.name, show)
  elapsed = 0.0
  best = None  # (discrepancy, params, opt_state, epoch) of the best params seen by the stopping rule
  for epoch, order in enumerate(orders, start=1):
    start, before = time.perf_counter(), (params, opt_state)
    params, opt_state = run_epoch(params, opt_state, order)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    elapsed += seconds
    variables = model_variables(opt_state, model)
    test_loss, test_acc = (float(v) for v in evaluate(params, variables, x_test, y_test))
    train_loss, _ = evaluate(params, variables, x_eval, y_eval)
    history.epoch.append(epoch)
    history.train_loss.append(float(train_loss))
    history.test_loss.append(test_loss)
    history.test_accuracy.append(test_acc)
    history.step_time.append(seconds / steps)
    history.wall_time.append(elapsed)
    bar.update(1)
    bar.set_postfix(test_acc=f"{test_acc:.3f}", loss=f"{test_loss:.3f}")
    if stop_on_discrepancy:
      discrepancy = float(optax.tree_utils.tree_get(opt_state, "discrepancy"))  # measured at `before`
      if best is not None and not discrepancy < best[0]:
        _, params, opt_state, history.restored_epoch = best
        break
      best = (discrepancy, *before, epoch - 1)
  bar.close()
  nnx.update(model, params, model_variables(opt_state, model))
  return history


def model_variables(opt_state, model: Layer):
  """The decorrelation matrices a rule carries in ``opt_state`` (the model's own if none does)."""
  return optax.tree_utils.tree_get(opt_state, "model_variables", default=nnx.state(model, Decorrelation))


def _progress_bar(total: int, description: str, show: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=description, unit="epoch", disable=not show, leave=False)
