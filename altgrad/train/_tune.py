"""Choosing hyperparameters fairly: on a validation split carved from the training data, every
point of a grid and every seed trained in one compiled program."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import optax
from flax import nnx

from altgrad.data import Dataset, validation_split
from altgrad.train._fit import fit_seeds


@dataclasses.dataclass(frozen=True)
class Tuning:
  """What :func:`tune` tried and chose: the grid, the validation fraction and seeds, each point's
  score per seed (final validation accuracy, or minus the final validation loss for regression)
  and their mean, the chosen point, and how many programs the grid compiled."""

  grid: dict[str, tuple[float, ...]]
  validation: float
  seeds: tuple[int, ...]
  points: list[dict[str, float]]
  scores: list[list[float]]
  metric: str
  chosen: dict[str, float]
  compilations: int

  @property
  def means(self) -> list[float]:
    """Each point's mean score over the seeds."""
    return [float(np.mean(s)) for s in self.scores]

  def as_dict(self) -> dict:
    """The tuning as plain JSON-ready data, the means included."""
    return dataclasses.asdict(self) | {"means": self.means}


def tune(
  build: Callable[[int], tuple[nnx.Module, optax.GradientTransformation]],
  grid: Mapping[str, Sequence[float]],
  data: Dataset,
  *,
  loss_fn: Callable,
  epochs: int,
  batch_size: int,
  seeds: Sequence[int] = (1000, 1001),
  validation: float = 0.1,
  vectorize: bool = True,
  fresh_steps: int | None = None,
  progress: bool | None = None,
) -> Tuning:
  """Trains every point of ``grid`` (each combination of its values) from each of ``seeds`` on
  ``data``'s training split less a held-out ``validation`` fraction
  (:func:`~altgrad.data.validation_split`), all in one program (:func:`fit_seeds` with
  ``hyperparams``), and chooses the point with the best mean final score on the held-out part.
  ``data``'s test split is never read: train the chosen point on fresh seeds and report that.

  ``build(seed) -> (model, tx)`` as for :func:`fit_seeds`, where ``tx`` keeps every name of
  ``grid`` in its state by ``optax.inject_hyperparams``, e.g.
  ``optax.chain(rule, optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))`` for a grid
  ``{"learning_rate": (1e-4, 3e-4, 1e-3, 3e-3)}``. Ties go to the earlier point.
  """
  grid = {name: tuple(float(v) for v in values) for name, values in grid.items()}
  if not grid or any(not values for values in grid.values()):
    raise ValueError(f"tune needs at least one value for each hyperparameter, got {grid}")
  points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
  seeds = tuple(seeds)
  held_out = validation_split(data, validation)
  runs = [(seed, point) for point in points for seed in seeds]
  trained = fit_seeds(
    build,
    [seed for seed, _ in runs],
    held_out,
    loss_fn=loss_fn,
    epochs=epochs,
    batch_size=batch_size,
    progress=progress,
    vectorize=vectorize,
    fresh_steps=fresh_steps,
    hyperparams=[point for _, point in runs],
  )
  classes = data.num_classes is not None
  finals = [h.test_accuracy[-1] if classes else -h.test_loss[-1] for _, h in trained]
  scores = [finals[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(points))]
  best = int(np.argmax([np.mean(s) for s in scores]))
  return Tuning(
    grid,
    validation,
    seeds,
    points,
    scores,
    "validation accuracy" if classes else "minus validation loss",
    points[best],
    trained[0][1].compilations,
  )
