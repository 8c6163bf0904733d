"""The loop behind :func:`altgrad.train.fit` and :func:`altgrad.train.fit_seeds`: checks, one
compiled scan per epoch, evaluation, checkpoints and the stopping rule, in order."""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from altgrad import _distributed, _identity, _interrupt
from altgrad.nn._signature import model_signature
from altgrad.train._checkpoints import Saving, resume
from altgrad.train._devices import BATCH_AXIS, batch_mesh, replicate
from altgrad.train._evaluate import check_data, make_evaluate
from altgrad.train._history import History, Recorder
from altgrad.train._runs import Arrays, Batches, Runs, Settings
from altgrad.train._stopping import BestParams


def train(
  models, txs, data, seeds, runs: Runs, settings: Settings, saving: Saving, probe, fresh_steps, hyperparams=None
) -> list[History]:
  """The loop behind :func:`fit` (one run) and :func:`fit_seeds` (``runs.vmapped`` runs), each
  run's optimizer state given its ``hyperparams`` (see :func:`with_hyperparams`)."""
  check_schedule(models, txs, data, settings, saving)
  checkpoints = saving.open(models, txs, data, seeds, settings, fresh_steps)  # fails fast, before compiling
  bar = None
  try:
    params = runs.stack([nnx.state(m, nnx.Param) for m in models])
    states = [t.init(nnx.state(m, nnx.Param)) for m, t in zip(models, txs, strict=True)]
    opt_state = runs.stack([with_hyperparams(s, h) for s, h in zip(states, hyperparams or [{}] * len(states), strict=True)])
    if optax.tree_utils.tree_get(opt_state, "loss") is None:
      raise TypeError("fit trains with a rule: tx must be an altgrad rule or a chain that starts with one")
    if settings.stop_on_discrepancy and optax.tree_utils.tree_get(opt_state, "discrepancy") is None:
      raise ValueError("stop_on_discrepancy needs a rule that reports a discrepancy (expectation_reflection)")
    own_variables = runs.stack([nnx.state(m, nnx.Not(nnx.Param)) for m in models])
    arrays = Arrays.of(data)
    mesh = batch_mesh(settings.batch_size) if settings.data_parallel else None
    if mesh is not None:
      params, opt_state, arrays = replicate((params, opt_state, arrays), NamedSharding(mesh, P()))
    batches = Batches(data, seeds, settings.batch_size, fresh_steps, runs.vmapped)
    histories = [History() for _ in models]
    run_epoch = compile_epoch(txs[0], runs, batches, mesh, histories, params, opt_state, arrays)
    evaluate = make_evaluate(models[0], settings.loss_fn, data.num_classes)
    if runs.vmapped:
      evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None)))
    first, params, opt_state = resume(checkpoints, histories, params, opt_state, settings.epochs)
    record = Recorder(histories, runs, probe)  # after the resume: it continues the restored wall time
    if first == 1:
      record.probe(0, params, opt_state)

    def variables_of(opt_state):
      return optax.tree_utils.tree_get(opt_state, "model_variables", default=own_variables)

    show = (sys.stderr.isatty() if settings.progress is None else settings.progress) and _distributed.is_primary()
    bar = progress_bar(settings.epochs, data.name, show, initial=first - 1)
    stop = BestParams() if settings.stop_on_discrepancy else None
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


def with_hyperparams(opt_state, hyperparams: dict[str, float]):
  """``opt_state`` with each of ``hyperparams`` set where ``optax.inject_hyperparams`` keeps it
  (by name): the runs of one program then differ in their values, not in their programs."""
  for name, value in hyperparams.items():
    try:
      current = optax.tree_utils.tree_get(opt_state, name)
    except KeyError:
      raise ValueError(
        f"hyperparameter {name!r} is in the optimizer state more than once: keep one in the state (name the "
        "others in static_args= of optax.inject_hyperparams)"
      ) from None
    if current is None:
      raise ValueError(
        f"hyperparameter {name!r} is not in the optimizer state: build what takes it with "
        f"optax.inject_hyperparams, e.g. optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)"
      )
    opt_state = optax.tree_utils.tree_set(opt_state, **{name: jnp.asarray(value, jnp.asarray(current).dtype)})
  return opt_state


def check_schedule(models, txs, data, settings: Settings, saving: Saving) -> None:
  """Refuses, by name, a run :func:`train` cannot do: a bad schedule, bad data, a model that is
  not the one the rule was built from."""
  if settings.epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {settings.epochs}")
  check_data(models[0], data, settings.batch_size)
  for model, tx in zip(models, txs, strict=True):
    for rule in _identity.rules_in(tx):
      found = _identity.differences(rule.model_signature, model_signature(model), ("the rule's", "fit's"))
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


def compile_epoch(tx, runs: Runs, batches: Batches, mesh, histories, params, opt_state, arrays: Arrays):
  """One epoch of every run's steps, compiled, the data passed as arguments (never closed over:
  XLA would fold it as constants), giving the params, the state and each run's mean training
  loss; records its compile time and memory. One ``lax.scan`` over the steps; but where XLA:CPU
  runs a convolution inside a loop several times slower than outside one (jax#12868), one
  compiled step called per batch (:func:`steps_per_batch`)."""

  def update(params, opt_state, x, y):
    updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
    return optax.apply_updates(params, updates), opt_state, optax.tree_utils.tree_get(opt_state, "loss")

  batch_spec = P(None, BATCH_AXIS) if runs.vmapped else P(BATCH_AXIS)

  def step_of(update):
    def step(carry, how, x_train, y_train):
      x, y = batches.draw(how, x_train, y_train)
      if mesh is not None:
        x, y = jax.lax.with_sharding_constraint((x, y), NamedSharding(mesh, batch_spec))
      params, opt_state, loss = update(*carry, x, y)
      return (params, opt_state), loss

    return step

  def scanned_epoch(params, opt_state, plan, x_train, y_train):
    step = step_of(runs.lift(update))
    (params, opt_state), losses = jax.lax.scan(
      lambda c, how: step(c, how, x_train, y_train), (params, opt_state), plan
    )
    return params, opt_state, jnp.mean(losses, axis=0)  # per run: the mean of its steps' losses

  start = time.perf_counter()
  plan = batches.plan(1)
  lowered = jax.jit(scanned_epoch).lower(params, opt_state, plan, arrays.x_train, arrays.y_train)
  if steps_per_batch(lowered):
    step = step_of(runs.lift(update, unroll=True))  # runs in turn without a loop either
    compiled = jax.jit(step).lower((params, opt_state), plan[0], arrays.x_train, arrays.y_train).compile()
    run_epoch = functools.partial(_epoch_of_steps, compiled)
  else:
    compiled = run_epoch = lowered.compile()
  compile_time, step_memory = time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes
  for h in histories:
    h.compilations += 1
    h.compile_time, h.step_memory = compile_time, step_memory
  return run_epoch


def steps_per_batch(lowered) -> bool:
  """Whether to call a compiled step per batch rather than scan an epoch: on CPU, where the
  epoch's program has a convolution (about 6x faster on XLA:CPU outside a loop: jax#12868)."""
  return jax.default_backend() == "cpu" and "stablehlo.convolution" in lowered.as_text()


def _epoch_of_steps(step, params, opt_state, plan, x_train, y_train):
  """An epoch as :func:`compile_epoch`'s scan gives it, from the compiled ``step`` per batch."""
  carry, losses = (params, opt_state), []
  for i in range(plan.shape[0]):
    carry, loss = step(carry, plan[i], x_train, y_train)
    losses.append(loss)
  return *carry, jnp.mean(jnp.stack(losses), axis=0)


def progress_bar(total: int, description: str, show: bool, initial: int = 0):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=description, unit="epoch", disable=not show, leave=False)
