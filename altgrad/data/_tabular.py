"""Data sets that ship with scikit-learn or are generated locally: no network at run time."""

from __future__ import annotations

import numpy as np

from altgrad.data._dataset import Dataset, normalize_splits, split


def _sklearn(name: str, loader, test_fraction: float, seed: int, normalization: str | None) -> Dataset:
  x, y = loader(return_X_y=True)
  x_train, y_train, x_test, y_test = split(x, y.astype(np.int32), test_fraction, seed)
  x_train, x_test = normalize_splits(x_train, x_test, normalization)
  return Dataset(x_train, y_train, x_test, y_test, int(y.max()) + 1, name)


def digits(*, test_fraction: float = 0.2, seed: int = 0, normalize: str | None = "standardize") -> Dataset:
  """scikit-learn's bundled 8x8 digits: x ``(n, 64)`` float32, y ``(n,)`` int32 in [0, 10).

  1,797 examples; a seeded shuffle puts ``test_fraction`` of them in the test split.
  """
  from sklearn.datasets import load_digits

  return _sklearn("digits", load_digits, test_fraction, seed, normalize)


def breast_cancer(
  *, test_fraction: float = 0.3, seed: int = 0, normalize: str | None = "standardize"
) -> Dataset:
  """scikit-learn's bundled Wisconsin breast cancer set: x ``(n, 30)`` float32, y ``(n,)`` int32 in {0, 1}.

  569 examples; a seeded shuffle puts ``test_fraction`` of them in the test split.
  """
  from sklearn.datasets import load_breast_cancer

  return _sklearn("breast_cancer", load_breast_cancer, test_fraction, seed, normalize)


def mnist1d(
  *, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, as_sequence: bool = False
) -> Dataset:
  """MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (never downloaded).

  x ``(n, 40)`` float32, already standardized by the generator (``(n, 40, 1)`` with
  ``as_sequence``, one scalar per time step); y ``(n,)`` int32 in [0, 10). The defaults give the
  package's 4,000 / 1,000 split.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
  generated = make_dataset(args)
  x_train, x_test = (np.asarray(generated[k], np.float32) for k in ("x", "x_test"))
  if as_sequence:
    x_train, x_test = x_train[..., None], x_test[..., None]
  y_train, y_test = (np.asarray(generated[k], np.int32) for k in ("y", "y_test"))
  return Dataset(x_train, y_train, x_test, y_test, 10, "mnist1d")
