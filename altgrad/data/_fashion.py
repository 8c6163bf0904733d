"""Fashion-MNIST read from local IDX files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from altgrad.data._dataset import Dataset, normalize_splits

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "ALTGRAD_FASHION_MNIST"
_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
_MAGIC = {1: 2049, 3: 2051}  # labels, images


def read_idx(path: str | Path) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (optionally gzipped) into a uint8 array."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4:
    raise ValueError(f"{path} is not an IDX file (too short)")
  ndim = raw[3]
  magic = int.from_bytes(raw[:4], "big")
  if _MAGIC.get(ndim) != magic:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic})")
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
  return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
  for name in (stem, stem + ".gz"):
    if (directory / name).is_file():
      return directory / name
  raise FileNotFoundError(
    f"Fashion-MNIST file {stem}[.gz] not found in {directory}: install it with "
    f"'apt-get install dataset-fashion-mnist', or point path= or ${ENV_VAR} at a directory "
    "holding the four IDX files."
  )


def fashion_mnist(
  path: str | os.PathLike | None = None, *, normalize: str | None = "unit", flatten: bool = True
) -> Dataset:
  """Fashion-MNIST, 60,000 train and 10,000 test images, 10 classes.

  Args:
    path: directory of the IDX files (gzipped or not); default ``$ALTGRAD_FASHION_MNIST``,
      then ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    normalize: ``"unit"`` (pixels / 255), ``"standardize"`` (per pixel) or None (0..255).
    flatten: x ``(n, 784)`` if True, else NHWC ``(n, 28, 28, 1)``; float32 either way.

  Returns:
    a :class:`Dataset` with int32 labels in [0, 10).
  """
  directory = Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)
  arrays = {key: read_idx(_find(directory, stem)) for key, stem in _FILES.items()}
  x_train, x_test = (arrays[k].astype(np.float32) for k in ("x_train", "x_test"))
  x_train, x_test = normalize_splits(x_train, x_test, normalize, scale=255.0)
  shape = (-1, 28 * 28) if flatten else (-1, 28, 28, 1)
  return Dataset(
    x_train.reshape(shape),
    arrays["y_train"].astype(np.int32),
    x_test.reshape(shape),
    arrays["y_test"].astype(np.int32),
    10,
    "fashion_mnist",
  )
