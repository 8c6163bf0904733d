"""How one call holds its runs (one, or several stacked), and where their batches come from."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from altgrad.data import Dataset

Array = jax.Array


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  """The shuffled example order of ``epoch`` (from 1) of a run seeded ``seed``."""
  return np.random.default_rng([seed, epoch]).permutation(size)


class Runs:
  """How one call holds its runs: a single run as it is, or (``vmapped``) every run's values
  stacked along a leading axis, stepped by ``jax.vmap`` or, without ``vectorize``, ``lax.map``."""

  def __init__(self, vmapped: bool, vectorize: bool):
    self.vmapped, self.vectorize = vmapped, vectorize

  def stack(self, trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees) if self.vmapped else trees[0]

  def lift(self, f: Callable, unroll: bool = False) -> Callable:
    """``f`` of one run made a function of every run's values; runs in turn are a loop, or with
    ``unroll`` straight-line code (no loop: see :func:`~altgrad.train._loop.steps_per_batch`)."""
    if not self.vmapped:
      return f
    if self.vectorize:
      return jax.vmap(f)
    if unroll:
      return lambda *members: self.stack([f(*self.member(members, i)) for i in range(len(jax.tree.leaves(members)[0]))])
    return functools.partial(map_members, f)

  def member(self, tree: Any, i: int) -> Any:
    """Run ``i``'s part of a value that holds every run's."""
    return jax.tree.map(lambda a: a[i], tree) if self.vmapped else tree


class Arrays(NamedTuple):
  """The data set on the device: training and test splits."""

  x_train: Array
  y_train: Array
  x_test: Array
  y_test: Array

  @classmethod
  def of(cls, data: Dataset) -> Arrays:
    return cls(*(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)))


class Batches:
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


def map_members(update, *members):
  """``update`` of each run in turn (``lax.map`` over the leading axis): :func:`fit_seeds`'s
  ``vectorize=False``."""
  return jax.lax.map(lambda args: update(*args), members)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a :func:`fit` run is asked to do, beyond its models, rules and data."""

  loss_fn: Callable
  epochs: int
  batch_size: int
  progress: bool | None
  stop_on_discrepancy: bool
  data_parallel: bool
