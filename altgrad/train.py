"""A small training loop for any rule: one run, many seeds at once, on one device or many."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from altgrad import __version__, _distributed, _identity, _interrupt
from altgrad._checkpoints import Checkpoints
from altgrad.data import Dataset
from altgrad.nn import Layer, PureModel
from altgrad.rules import rises

__all__ = ["BATCH_AXIS", "REGRESSION_TOLERANCE", "History", "Probe", "epoch_order", "fit", "fit_seeds", "make_evaluate"]

Array = jax.Array
#: ``probe(params, opt_state) -> {name: scalar}``, recorded before training and after each epoch.
Probe = Callable[[Any, Any], dict[str, Array]]

#: A regression prediction counts as correct within this distance of its target
#: (docs/rules/target_propagation.rst, Benchmark settings).
REGRESSION_TOLERANCE = 0.04
#: The mesh axis that :func:`fit`'s ``data_parallel`` shards the batch over.
BATCH_AXIS = "batch"


@dataclasses.dataclass
class History:
  """Per-epoch record of a :func:`fit` run.

  ``step_time`` is the mean wall time of one training step in that epoch (seconds, compilation
  excluded; with several seeds, of the step of all of them together); ``wall_time`` the training
  time elapsed at the end of the epoch; ``compilations`` how many times the training step was
  compiled (1 when nothing recompiled); ``restored_epoch``, when a stopping rule fired, the epoch
  whose final params were kept (0: the initial ones); ``probes`` the values of ``fit``'s
  ``probe`` before training (epoch 0) and after each epoch, each with its ``epoch``;
  ``skipped_steps``, when ``tx`` is wrapped in :func:`altgrad.rules.finite_guard`, how many
  steps it has skipped by the end of each epoch (non-finite update or state);
  ``clipped_displacements``, for target propagation, how many displacements its guard has
  changed (zeroed where not finite, or scaled down to ``max_displacement``) by the end of each
  epoch; ``step_memory`` the device memory (bytes) the
  compiled epoch needs beyond its inputs and outputs (XLA's memory analysis; the data set and
  the params are inputs): the working memory of a training step.
  """

  epoch: list[int] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  test_loss: list[float] = dataclasses.field(default_factory=list)
  test_accuracy: list[float] = dataclasses.field(default_factory=list)
  step_time: list[float] = dataclasses.field(default_factory=list)
  wall_time: list[float] = dataclasses.field(default_factory=list)
  probes: list[dict[str, float]] = dataclasses.field(default_factory=list)
  skipped_steps: list[int] = dataclasses.field(default_factory=list)
  clipped_displacements: list[int] = dataclasses.field(default_factory=list)
  compile_time: float = 0.0
  step_memory: int = 0
  compilations: int = 0
  restored_epoch: int | None = None

  @property
  def median_step_time(self) -> float:
    """The median over epochs of the mean step time (NaN before any epoch)."""
    return statistics.median(self.step_time) if self.step_time else float("nan")

  def as_dict(self) -> dict:
    """The record as plain JSON-ready values, with ``median_step_time``."""
    return dataclasses.asdict(self) | {"median_step_time": self.median_step_time}


def _check_data(model: nnx.Module, data: Dataset, batch_size: int) -> None:
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


def fit(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  data: Dataset,
  *,
  loss_fn: Callable,
  epochs: int = 10,
  batch_size: int = 64,
  seed: int = 0,
  progress: bool | None = None,
  stop_on_discrepancy: bool = False,
  data_parallel: bool = False,
  checkpoint_dir: str | Path | None = None,
  probe: Probe | None = None,
  fresh_steps: int | None = None,
  resume_anyway: bool = False,
) -> History:
  """Trains ``model`` in place with the rule chain ``tx`` and returns the per-epoch history.

  Each epoch shuffles the training set (seeded by ``(seed, epoch)``), drops the last partial
  batch, and runs all its steps as one compiled ``lax.scan``; after it the test set is evaluated,
  in evaluation mode. The train loss of an epoch is the mean of the losses the rule logged at
  its steps (``state.common.loss``, each the loss of the step's clean pass in training mode, at
  the params the step started from): no pass is run for it. The model's other
  variables that the rule carries in its state (decorrelation matrices, BatchNorm running
  statistics, RNG counts) are used for evaluation and written back to the model with the params.
  ``tx`` is a rule, possibly chained with optimizers, called as
  ``tx.update(None, state, params, batch=(x, y))``.

  Args:
    model: any Flax NNX model (an ``altgrad.nn`` model or the user's own); its params and
      variables are replaced by the trained ones.
    tx: the rule (first in any chain).
    data: a :class:`altgrad.data.Dataset`.
    loss_fn: per-example loss used for evaluation (the rule has its own).
    epochs, batch_size, seed: the schedule; ``seed`` seeds the shuffling only (the model and
      the rule have their own seeds).
    progress: show a progress bar; default only when stderr is a terminal.
    stop_on_discrepancy: the reference stopping rule of Expectation Reflection: stop when the
      discrepancy the rule reports (its state's ``discrepancy``, measured at the params its last
      update started from) rises by more than float rounding
      (:func:`~altgrad.rules.rises`), and keep the best params. Meant
      for full-batch training (``batch_size`` = the training set), where each epoch is one update.
    data_parallel: shard every batch over all devices (``jax.devices()``, a one-axis mesh named
      :data:`BATCH_AXIS`) with params and rule state replicated; ``batch_size`` must divide by
      the device count. The compiler reduces every batch mean and sum (gradients, Gram
      matrices, moments) across devices, so the update is that of the whole batch. Under
      ``jax.distributed`` (several processes, each calling ``fit`` with the same arguments and
      data) the mesh spans every process's devices, each device reads its rows of each batch
      from its own process's copy of the data, the history is the same in every process, and
      only process 0 shows progress; required then.
    checkpoint_dir: save params, rule and optimizer state (PRNG keys and decorrelation matrices
      included) and the history there after every epoch with Orbax; if it holds a checkpoint,
      the run resumes from it and continues as the uninterrupted run would. The checkpoint
      records what defines the run (the rule and optimizer with their hyperparameters, the
      model's structure, the data set, batch size, seeds, altgrad's version): a checkpoint of
      another run is refused with a list of what differs (more ``epochs`` is the same run). One
      run writes a directory at a time (a lock). Not with ``stop_on_discrepancy``, whose best
      params are not saved.
    probe: ``probe(params, opt_state) -> {name: scalar}``, e.g. per-layer cosines to the
      backprop gradient (:func:`altgrad.diagnostics.cosine_probe`), recorded in
      ``History.probes`` before training and after each epoch.
    fresh_steps: train each epoch on this many batches freshly drawn by the data set's
      ``sampler`` (a synthetic task's; seeded by ``(seed, epoch)``) instead of a pass over
      ``x_train``, as the tasks' authors do; an epoch is then an evaluation interval (e.g. 200
      iterations).
    resume_anyway: resume a checkpoint in ``checkpoint_dir`` even where its run's description
      differs from this one's (a changed learning rate after a stop, say); a warning lists what.

  The model must be the one ``tx``'s rule was built from (its structure: layers, sizes,
  activations), and the labels must fit its outputs: both are refused by name otherwise.
  """
  settings = _Settings(loss_fn, epochs, batch_size, progress, stop_on_discrepancy, data_parallel)
  saving = _Saving(checkpoint_dir, resume_anyway)
  return _train([model], [tx], data, [seed], _Runs(False, True), settings, saving, probe, fresh_steps)[0]


def fit_seeds(
  build: Callable[[int], tuple[nnx.Module, optax.GradientTransformation]],
  seeds: Sequence[int],
  data: Dataset,
  *,
  loss_fn: Callable,
  epochs: int = 10,
  batch_size: int = 64,
  progress: bool | None = None,
  data_parallel: bool = False,
  checkpoint_dir: str | Path | None = None,
  probe: Probe | None = None,
  vectorize: bool = True,
  fresh_steps: int | None = None,
  resume_anyway: bool = False,
) -> list[tuple[nnx.Module, History]]:
  """Trains one run per seed in a single compiled program, ``jax.vmap`` over the runs.

  ``build(seed) -> (model, tx)`` makes each run's model and rule (seeding the initial params and
  the rule's key with ``seed``); every run shuffles with its own ``seed``, as :func:`fit` does,
  so run ``i`` matches ``fit(*build(seeds[i]), seed=seeds[i])`` up to float rounding. All runs
  share the first ``tx``'s ``update``: ``build`` may vary the seeds, not the rule's settings.
  ``vectorize=False`` steps the runs one after another (``lax.map``) in the same program: slower,
  for a rule that does not vmap well. Known case: on XLA's CPU backend (jaxlib 0.10.2) the
  vmapped update of multilayer :func:`~altgrad.rules.expectation_reflection` with hidden layers
  of 128 units or more, each run with its own batch, never finishes (it runs with XLA's
  optimizations off, and under ``lax.map``).
  Returns ``(model, history)`` per seed; the other arguments are :func:`fit`'s.
  """
  seeds = list(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
  models, txs = zip(*(build(s) for s in seeds), strict=True)
  structures = {str(nnx.graphdef(m)) for m in models}
  if len(structures) != 1:
    raise ValueError("build(seed) must make the same model for every seed (only the values may differ)")
  settings = _Settings(loss_fn, epochs, batch_size, progress, False, data_parallel)
  saving = _Saving(checkpoint_dir, resume_anyway)
  histories = _train(list(models), list(txs), data, seeds, _Runs(True, vectorize), settings, saving, probe, fresh_steps)
  return list(zip(models, histories, strict=True))


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  """The shuffled example order of ``epoch`` (from 1) of a run seeded ``seed``."""
  return np.random.default_rng([seed, epoch]).permutation(size)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What a :func:`fit` run is asked to do, beyond its models, rules and data."""

  loss_fn: Callable
  epochs: int
  batch_size: int
  progress: bool | None
  stop_on_discrepancy: bool
  data_parallel: bool


@dataclasses.dataclass(frozen=True)
class _Saving:
  """Where a run checkpoints, and whether it resumes a checkpoint of a run described otherwise."""

  directory: str | Path | None
  resume_anyway: bool

  def open(self, models, txs, data, seeds, settings: _Settings, fresh_steps) -> Checkpoints | None:
    if self.directory is None:
      return None
    run = {
      "altgrad": __version__,
      "transformation": _identity.describe_transformation(txs[0]),
      "model": _identity.model_signature(models[0]),
      "data": _identity.data_signature(data),
      "batch_size": settings.batch_size,
      "seeds": list(seeds),
      "fresh_steps": fresh_steps,
    }
    return Checkpoints(self.directory, run, resume_anyway=self.resume_anyway)


def _train(models, txs, data, seeds, runs: _Runs, settings: _Settings, saving: _Saving, probe, fresh_steps) -> list[History]:
  """The loop behind :func:`fit` (one run) and :func:`fit_seeds` (``runs.vmapped`` runs)."""
  _check_schedule(models, txs, data, settings, saving)
  checkpoints = saving.open(models, txs, data, seeds, settings, fresh_steps)  # fails fast, before compiling
  bar = None
  try:
    params = runs.stack([nnx.state(m, nnx.Param) for m in models])
    opt_state = runs.stack([t.init(nnx.state(m, nnx.Param)) for m, t in zip(models, txs, strict=True)])
    if optax.tree_utils.tree_get(opt_state, "loss") is None:
      raise TypeError("fit trains with a rule: tx must be an altgrad rule or a chain that starts with one")
    if settings.stop_on_discrepancy and optax.tree_utils.tree_get(opt_state, "discrepancy") is None:
      raise ValueError("stop_on_discrepancy needs a rule that reports a discrepancy (expectation_reflection)")
    own_variables = runs.stack([nnx.state(m, nnx.Not(nnx.Param)) for m in models])
    arrays = _Arrays.of(data)
    mesh = _batch_mesh(settings.batch_size) if settings.data_parallel else None
    if mesh is not None:
      params, opt_state, arrays = _replicate((params, opt_state, arrays), NamedSharding(mesh, P()))
    batches = _Batches(data, seeds, settings.batch_size, fresh_steps, runs.vmapped)
    histories = [History() for _ in models]
    run_epoch = _compile_epoch(txs[0], runs, batches, mesh, histories, params, opt_state, arrays)
    evaluate = make_evaluate(models[0], settings.loss_fn, data.num_classes)
    if runs.vmapped:
      evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None)))
    first, params, opt_state = _resume(checkpoints, histories, params, opt_state, settings.epochs)
    record = _Recorder(histories, runs, probe)  # after the resume: it continues the restored wall time
    if first == 1:
      record.probe(0, params, opt_state)

    def variables_of(opt_state):
      return optax.tree_utils.tree_get(opt_state, "model_variables", default=own_variables)

    show = (sys.stderr.isatty() if settings.progress is None else settings.progress) and _distributed.is_primary()
    bar = _progress_bar(settings.epochs, data.name, show, initial=first - 1)
    stop = _BestParams() if settings.stop_on_discrepancy else None
    for epoch in range(first, settings.epochs + 1):
      _interrupt.check()  # a Ctrl-C the command line caught: stop between epochs, the last one saved
      start, before = time.perf_counter(), (params, opt_state)
      params, opt_state, train_loss = run_epoch(params, opt_state, batches.plan(epoch), arrays.x_train, arrays.y_train)
      jax.block_until_ready(params)
      seconds = time.perf_counter() - start
      test = jax.device_get(evaluate(params, variables_of(opt_state), arrays.x_test, arrays.y_test))
      record.epoch(epoch, seconds, batches.steps, test, train_loss, opt_state)
      record.probe(epoch, params, opt_state)
      bar.update(1)
      bar.set_postfix(test_acc=f"{histories[0].test_accuracy[-1]:.3f}", loss=f"{histories[0].test_loss[-1]:.3f}")
      if checkpoints is not None:
        checkpoints.save(epoch, params, opt_state, histories)
      if stop is not None and stop.fired(opt_state, before, epoch):
        params, opt_state, histories[0].restored_epoch = stop.best
        break
  finally:
    if bar is not None:
      bar.close()
    if checkpoints is not None:
      checkpoints.close()
  variables = variables_of(opt_state)
  for i, m in enumerate(models):
    nnx.update(m, runs.member(params, i), runs.member(variables, i))
  return histories


def _check_schedule(models, txs, data, settings: _Settings, saving: _Saving) -> None:
  """Refuses, by name, a run :func:`_train` cannot do: a bad schedule, bad data, a model that is
  not the one the rule was built from."""
  if settings.epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {settings.epochs}")
  _check_data(models[0], data, settings.batch_size)
  for model, tx in zip(models, txs, strict=True):
    for rule in _identity.rules_in(tx):
      found = _identity.differences(rule.model_signature, _identity.model_signature(model), ("the rule's", "fit's"))
      if found:
        raise ValueError(
          f"fit was given another model than the one its {rule.name} rule was built from: "
          + "; ".join(found[:6])
          + ". Build the rule from the model fit trains"
        )
  if settings.stop_on_discrepancy and saving.directory is not None:
    raise ValueError("stop_on_discrepancy cannot be checkpointed (its best params are not saved)")
  if jax.process_count() > 1 and not settings.data_parallel:
    raise ValueError(
      f"running in {jax.process_count()} processes (jax.distributed): pass data_parallel=True, "
      "so that they train one model on shards of each batch"
    )


class _Runs:
  """How one call holds its runs: a single run as it is, or (``vmapped``) every run's values
  stacked along a leading axis, stepped by ``jax.vmap`` or, without ``vectorize``, ``lax.map``."""

  def __init__(self, vmapped: bool, vectorize: bool):
    self.vmapped, self.vectorize = vmapped, vectorize

  def stack(self, trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees) if self.vmapped else trees[0]

  def lift(self, f: Callable) -> Callable:
    """``f`` of one run made a function of every run's values."""
    if not self.vmapped:
      return f
    return jax.vmap(f) if self.vectorize else functools.partial(_map_members, f)

  def member(self, tree: Any, i: int) -> Any:
    """Run ``i``'s part of a value that holds every run's."""
    return jax.tree.map(lambda a: a[i], tree) if self.vmapped else tree


class _Arrays(NamedTuple):
  """The data set on the device: training and test splits."""

  x_train: Array
  y_train: Array
  x_test: Array
  y_test: Array

  @classmethod
  def of(cls, data: Dataset) -> _Arrays:
    return cls(*(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)))


def _batch_mesh(batch_size: int) -> jax.sharding.Mesh:
  """:func:`fit`'s ``data_parallel`` mesh: every device of every process on one batch axis."""
  devices = jax.devices()
  if batch_size % len(devices):
    where = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    raise ValueError(f"data_parallel: batch_size {batch_size} must divide by the {len(devices)} devices{where}")
  return jax.sharding.Mesh(np.array(devices), (BATCH_AXIS,))


def _compile_epoch(tx, runs: _Runs, batches: _Batches, mesh, histories, params, opt_state, arrays: _Arrays):
  """One epoch of every run's steps as one compiled ``lax.scan``, the data passed as arguments
  (never closed over: XLA would fold it as constants), giving the params, the state and each
  run's mean training loss; records its compile time and memory."""

  def update(params, opt_state, x, y):
    updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
    return optax.apply_updates(params, updates), opt_state, optax.tree_utils.tree_get(opt_state, "loss")

  update = runs.lift(update)
  batch_spec = P(None, BATCH_AXIS) if runs.vmapped else P(BATCH_AXIS)

  def run_epoch(params, opt_state, plan, x_train, y_train):
    for h in histories:
      h.compilations += 1  # runs once per trace

    def step(carry, how):
      x, y = batches.draw(how, x_train, y_train)
      if mesh is not None:
        x, y = jax.lax.with_sharding_constraint((x, y), NamedSharding(mesh, batch_spec))
      params, opt_state, loss = update(*carry, x, y)
      return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), plan)
    return params, opt_state, jnp.mean(losses, axis=0)  # per run: the mean of its steps' losses

  start = time.perf_counter()
  compiled = jax.jit(run_epoch).lower(params, opt_state, batches.plan(1), arrays.x_train, arrays.y_train).compile()
  compile_time, step_memory = time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes
  for h in histories:
    h.compile_time, h.step_memory = compile_time, step_memory
  return compiled


class _Recorder:
  """Appends each epoch's figures, and the ``probe``'s values, to every run's history."""

  def __init__(self, histories: list[History], runs: _Runs, probe: Probe | None):
    self.histories, self.runs = histories, runs
    self._probe = None if probe is None else jax.jit(runs.lift(probe))
    self._elapsed = histories[0].wall_time[-1] if histories[0].wall_time else 0.0

  def epoch(self, epoch: int, seconds: float, steps: int, test, train_loss, opt_state) -> None:
    """The epoch that took ``seconds`` for ``steps`` steps; ``test`` is (loss, accuracy)."""
    self._elapsed += seconds
    member = self.runs.member
    skipped = optax.tree_utils.tree_get(opt_state, "skipped_steps")
    clipped = optax.tree_utils.tree_get(opt_state, "clipped_displacements")
    for i, h in enumerate(self.histories):
      h.epoch.append(epoch)
      h.train_loss.append(float(member(train_loss, i)))
      h.test_loss.append(float(member(test[0], i)))
      h.test_accuracy.append(float(member(test[1], i)))
      h.step_time.append(seconds / steps)
      h.wall_time.append(self._elapsed)
      if skipped is not None:
        h.skipped_steps.append(int(member(skipped, i)))
      if clipped is not None:
        h.clipped_displacements.append(int(member(clipped, i)))

  def probe(self, epoch: int, params, opt_state) -> None:
    if self._probe is None:
      return
    values = jax.device_get(self._probe(params, opt_state))
    for i, h in enumerate(self.histories):
      h.probes.append({"epoch": epoch} | {k: float(v) for k, v in self.runs.member(values, i).items()})


def _resume(checkpoints: Checkpoints | None, histories: list[History], params, opt_state, epochs: int):
  """``(first epoch to run, params, opt_state)``: from the latest checkpoint, its histories
  restored, or from the start."""
  if checkpoints is None or checkpoints.latest() is None:
    return 1, params, opt_state
  last, params, opt_state, saved = checkpoints.restore(params, opt_state, epochs)
  for h, s in zip(histories, saved, strict=True):
    for name, value in s.items():
      if name != "median_step_time":
        setattr(h, name, value)
  return last + 1, params, opt_state


class _BestParams:
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


class _Batches:
  """Where an epoch's batches come from: shuffled passes over ``x_train`` (a plan of example
  indices per step), or ``fresh_steps`` batches drawn by ``data.sampler`` (a plan of keys)."""

  def __init__(self, data: Dataset, seeds: Sequence[int], batch_size: int, fresh_steps: int | None, vmapped: bool):
    if fresh_steps is not None:
      if data.sampler is None:
        raise ValueError(f"fresh_steps draws fresh batches, but {data.name} is a fixed data set (it has no sampler)")
      if not isinstance(fresh_steps, int) or fresh_steps < 1:
        raise ValueError(f"fresh_steps must be a positive number of steps, got {fresh_steps!r}")
    self.data, self.seeds, self.batch_size, self.vmapped = data, list(seeds), batch_size, vmapped
    self.fresh = fresh_steps is not None
    self.steps = fresh_steps if self.fresh else len(data.x_train) // batch_size

  def _stack(self, per_seed: list[Array]) -> Array:
    return jnp.stack(per_seed, axis=1) if self.vmapped else per_seed[0]  # steps first, then runs

  def plan(self, epoch: int) -> Array:
    """Per step (leading axis), what :meth:`draw` takes: keys, or example indices."""
    if self.fresh:
      keys = [jax.random.split(jax.random.fold_in(jax.random.key(s), epoch), self.steps) for s in self.seeds]
      return self._stack(keys)
    size = self.steps * self.batch_size
    orders = [jnp.asarray(epoch_order(s, epoch, len(self.data.x_train))[:size]) for s in self.seeds]
    return self._stack([o.reshape(self.steps, self.batch_size) for o in orders])

  def draw(self, how: Array, x_train: Array, y_train: Array) -> tuple[Array, Array]:
    """One step's batch (of every run): indexed from the training set, or drawn afresh."""
    if not self.fresh:
      return x_train[how], y_train[how]
    sample = lambda key: self.data.sampler(key, self.batch_size)  # noqa: E731
    return jax.vmap(sample)(how) if self.vmapped else sample(how)


def _map_members(update, *members):
  """``update`` of each run in turn (``lax.map`` over the leading axis): :func:`fit_seeds`'s
  ``vectorize=False``."""
  return jax.lax.map(lambda args: update(*args), members)


def _replicate(tree, sharding: NamedSharding):
  """Every leaf of ``tree`` on every device of ``sharding``'s mesh. Across processes (each holds
  the same values), each process places its own copy: a host array can go to devices of other
  processes' meshes, an array already on a local device cannot."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    return jax.device_put(np.asarray(leaf), sharding)

  return jax.tree.map(one, tree)


def _progress_bar(total: int, description: str, show: bool, initial: int = 0):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=description, unit="epoch", disable=not show, leave=False)
