"""Data loaders that need no network at run time; each returns a :class:`Dataset` of NumPy arrays."""

from altgrad.data._dataset import NORMALIZATIONS, Dataset, validation_split
from altgrad.data._fashion import fashion_mnist, read_idx
from altgrad.data._sequences import adding, majority, temporal_order
from altgrad.data._tabular import breast_cancer, digits, mnist1d

LOADERS = {
  "digits": digits,
  "breast_cancer": breast_cancer,
  "mnist1d": mnist1d,
  "fashion_mnist": fashion_mnist,
  "temporal_order": temporal_order,
  "adding": adding,
  "majority": majority,
}


def load(name: str, **options) -> Dataset:
  """The data set ``name`` (a key of ``LOADERS``) with the loader's ``options``."""
  try:
    loader = LOADERS[name]
  except KeyError:
    raise ValueError(f"unknown data set {name!r}; expected one of {sorted(LOADERS)}") from None
  return loader(**options)


__all__ = [
  "LOADERS",
  "NORMALIZATIONS",
  "Dataset",
  "adding",
  "breast_cancer",
  "digits",
  "fashion_mnist",
  "load",
  "majority",
  "mnist1d",
  "read_idx",
  "temporal_order",
  "validation_split",
]
