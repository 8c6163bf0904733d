"""Choosing hyperparameters fairly: on a validation split carved from the training data, every
point of a grid and every seed trained in one compiled program."""

from __future__ import annotations

import dataclasses
import functools
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
  build: Callable[..., tuple[nnx.Module, optax.GradientTransformation]],
  grid: Mapping[str, Sequence[float]],
  data: Dataset,
  *,
  loss_fn: Callable,
  epochs: int,
  batch_size: int,
  seeds: Sequence[int] = (1000, 1001),
  validation: float = 0.1,
  static: Sequence[str] = (),
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

  ``static`` names the grid's values that shape the program instead, such as a layer's
  decorrelation rate (``decorrelation_lr``, an attribute of the layer, not a state):
  ``build(seed, **values)`` takes them as keyword arguments, and each combination of them is a
  program of its own.
  """
  grid = {name: tuple(float(v) for v in values) for name, values in grid.items()}
  if not grid or any(not values for values in grid.values()):
    raise ValueError(f"tune needs at least one value for each hyperparameter, got {grid}")
  if not set(static) <= set(grid):
    raise ValueError(f"static names values of the grid ({sorted(grid)}), got {sorted(set(static) - set(grid))}")
  points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
  seeds = tuple(seeds)
  held_out = validation_split(data, validation)
  train = functools.partial(
    fit_seeds, data=held_out, loss_fn=loss_fn, epochs=epochs, batch_size=batch_size, progress=progress,
    vectorize=vectorize, fresh_steps=fresh_steps,
  )
  histories, compilations = {}, 0
  for shape in dict.fromkeys(tuple(p[name] for name in static) for p in points):  # a program each
    shaped = dict(zip(static, shape, strict=True))
    runs = [(i, seed) for i, point in enumerate(points) if shaped.items() <= point.items() for seed in seeds]
    others = [{k: v for k, v in points[i].items() if k not in shaped} for i, _ in runs]
    trained = train(functools.partial(build, **shaped), [seed for _, seed in runs], hyperparams=others)
    histories |= {run: history for run, (_, history) in zip(runs, trained, strict=True)}
    compilations += trained[0][1].compilations
  classes = data.num_classes is not None
  final = lambda h: h.test_accuracy[-1] if classes else -h.test_loss[-1]  # noqa: E731
  scores = [[final(histories[i, seed]) for seed in seeds] for i in range(len(points))]
  best = int(np.argmax([np.mean(s) for s in scores]))
  return Tuning(
    grid,
    validation,
    seeds,
    points,
    scores,
    "validation accuracy" if classes else "minus validation loss",
    points[best],
    compilations,
  )
