"""The public loop: :func:`fit` one run, :func:`fit_seeds` many seeds in one program."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import optax
from flax import nnx

from altgrad.data import Dataset
from altgrad.train._checkpoints import Saving
from altgrad.train._history import History, Probe
from altgrad.train._loop import train
from altgrad.train._runs import Runs, Settings


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
  batch, and runs all its steps as one compiled ``lax.scan`` (on CPU, for a model with a
  convolution, one compiled step per batch: XLA:CPU runs convolutions several times slower
  inside a loop, jax#12868); after it the test set is evaluated,
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
  settings = Settings(loss_fn, epochs, batch_size, progress, stop_on_discrepancy, data_parallel)
  saving = Saving(checkpoint_dir, resume_anyway)
  return train([model], [tx], data, [seed], Runs(False, True), settings, saving, probe, fresh_steps)[0]


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
  hyperparams: Sequence[dict[str, float]] | None = None,
) -> list[tuple[nnx.Module, History]]:
  """Trains one run per seed in a single compiled program, ``jax.vmap`` over the runs.

  ``build(seed) -> (model, tx)`` makes each run's model and rule (seeding the initial params and
  the rule's key with ``seed``); every run shuffles with its own ``seed``, as :func:`fit` does,
  so run ``i`` matches ``fit(*build(seeds[i]), seed=seeds[i])`` up to float rounding. All runs
  share the first ``tx``'s ``update``: ``build`` may vary the seeds, not the rule's settings.
  ``vectorize=False`` steps the runs one after another (``lax.map``; written out without a loop
  where :func:`fit` steps per batch) in the same program: slower,
  for a rule that does not vmap well. Known case: on XLA's CPU backend (jaxlib 0.10.2) the
  vmapped update of multilayer :func:`~altgrad.rules.expectation_reflection` with hidden layers
  of 128 units or more, each run with its own batch, never finishes (it runs with XLA's
  optimizations off, and under ``lax.map``); nor, on jaxlib 0.10.1's CPU backend, the vmapped
  update of :func:`~altgrad.rules.consequentialism` on the bench's conv net (the ``conv`` suite
  runs it under ``lax.map``; on a GPU it runs vmapped).
  ``hyperparams``, one dict per run, sets hyperparameters that ``optax.inject_hyperparams``
  keeps in the optimizer state (an optimizer's ``learning_rate``, a rule's float settings) to
  each run's own values, so a grid of them trains in the same program (:func:`tune`); a seed
  may then repeat with other values.
  Returns ``(model, history)`` per seed; the other arguments are :func:`fit`'s.
  """
  seeds = list(seeds)
  hyperparams = None if hyperparams is None else [dict(h) for h in hyperparams]
  if hyperparams is not None and len(hyperparams) != len(seeds):
    raise ValueError(f"hyperparams needs one dict per seed: {len(hyperparams)} for {len(seeds)} seeds")
  runs = list(zip(seeds, map(sorted, map(dict.items, hyperparams or [{}] * len(seeds))), strict=True))
  if not seeds or len({repr(run) for run in runs}) != len(runs):
    raise ValueError(f"seeds must be distinct (for the same hyperparams) and at least one, got {seeds}")
  models, txs = zip(*(build(s) for s in seeds), strict=True)
  structures = {str(nnx.graphdef(m)) for m in models}
  if len(structures) != 1:
    raise ValueError("build(seed) must make the same model for every seed (only the values may differ)")
  settings = Settings(loss_fn, epochs, batch_size, progress, False, data_parallel)
  saving = Saving(checkpoint_dir, resume_anyway)
  histories = train(
    list(models), list(txs), data, seeds, Runs(True, vectorize), settings, saving, probe, fresh_steps, hyperparams
  )
  return list(zip(models, histories, strict=True))
