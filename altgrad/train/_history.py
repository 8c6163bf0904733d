"""What a run records: its per-epoch history, and the recorder that fills it."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import jax
import optax

from altgrad.train._runs import Runs

Array = jax.Array


#: ``probe(params, opt_state) -> {name: scalar}``, recorded before training and after each epoch.
Probe = Callable[[Any, Any], dict[str, Array]]


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


class Recorder:
  """Appends each epoch's figures, and the ``probe``'s values, to every run's history."""

  def __init__(self, histories: list[History], runs: Runs, probe: Probe | None):
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
