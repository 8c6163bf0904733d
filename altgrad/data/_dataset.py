"""The split every loader returns, and the normalizations they offer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

NORMALIZATIONS = ("standardize", "unit", None)


class Dataset(NamedTuple):
  """Train and test splits as NumPy arrays.

  Attributes:
    x_train, x_test: float32 inputs, ``(examples, ...)``, or int32 token ids.
    y_train, y_test: int32 class labels ``(examples,)``, or float32 regression targets
      ``(examples, outputs)``.
    num_classes: number of classes, or None for regression.
    name: the data set's name.
    sampler: for a synthetic task, ``sampler(key, n) -> (x, y)`` draws ``n`` fresh training
      examples (jittable), so that ``fit(..., fresh_steps=...)`` can train on a new batch every
      step as the tasks' authors do; None for a fixed data set.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int | None
  name: str
  sampler: Callable[[Any, int], tuple[Any, Any]] | None = None

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one input example."""
    return tuple(self.x_train.shape[1:])

  @property
  def output_size(self) -> int:
    """The model's output width: the number of classes, or the size of a regression target."""
    return self.num_classes if self.num_classes is not None else int(np.prod(self.y_train.shape[1:]))


def normalize_splits(
  x_train: np.ndarray, x_test: np.ndarray, mode: str | None, *, scale: float | None = None
):
  """Applies ``mode`` with statistics of the training split only.

  ``"standardize"``: zero mean, unit variance per feature (constant features are only centred).
  ``"unit"``: divide by ``scale`` (the range's maximum, e.g. 255 for pixels). ``None``: as is.
  """
  if mode not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
  x_train = np.asarray(x_train, np.float32)
  x_test = np.asarray(x_test, np.float32)
  if mode == "standardize":
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    return (x_train - mean) / std, (x_test - mean) / std
  if mode == "unit":
    scale = float(np.abs(x_train).max()) if scale is None else scale
    return x_train / scale, x_test / scale
  return x_train, x_test


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
  """A seeded shuffle, then the last ``test_fraction`` of examples as the test split."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, int(round(len(x) * test_fraction)))
  train, test = order[:-n_test], order[-n_test:]
  return x[train], y[train], x[test], y[test]


def held_out_count(count: int, fraction: float, name: str = "the data set") -> int:
  """How many of ``count`` training examples :func:`validation_split` holds out."""
  if not 0 < fraction < 1:
    raise ValueError(f"the validation fraction is in (0, 1), got {fraction!r}")
  held = max(1, round(fraction * count))
  if held >= count:
    raise ValueError(f"{name} has {count} training examples: too few to hold {fraction:g} of them out")
  return held


def validation_split(data: Dataset, fraction: float = 0.1, *, seed: int = 0) -> Dataset:
  """``data`` with a ``fraction`` of its training examples (a seeded random choice) held out as
  its test split, the rest as its training split: the split a setting is chosen on. The
  returned data set holds nothing of ``data``'s test split, so what is tuned on it never reads
  that split. (A loader's normalization was fitted on the whole training split.)"""
  count = len(data.x_train)
  held = held_out_count(count, fraction, data.name)
  order = np.random.default_rng(seed).permutation(count)
  train, valid = order[held:], order[:held]
  return data._replace(
    x_train=data.x_train[train],
    y_train=data.y_train[train],
    x_test=data.x_train[valid],
    y_test=data.y_train[valid],
    name=f"{data.name} (validation)",
  )
