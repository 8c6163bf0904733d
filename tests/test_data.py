"""Loaders: shapes, dtypes, determinism, normalization and the clear errors."""

import gzip

import jax
import numpy as np
import pytest

from altgrad import data


def _check(ds, n_features_shape, num_classes):
  assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
  assert ds.x_train.shape[1:] == n_features_shape and ds.x_test.shape[1:] == n_features_shape
  assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
  assert ds.num_classes == num_classes
  if num_classes is not None:
    assert ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) <= set(range(num_classes))


@pytest.mark.parametrize("loader, shape, classes", [(data.digits, (64,), 10), (data.breast_cancer, (30,), 2)])
def test_sklearn_sets(loader, shape, classes):
  ds = loader()
  _check(ds, shape, classes)
  # standardized with train statistics; features with spread have unit variance on train
  std = ds.x_train.std(axis=0)
  assert np.allclose(ds.x_train.mean(axis=0), 0, atol=1e-4)
  assert np.allclose(std[std > 0.5], 1, atol=1e-3)
  again = loader()
  assert all(np.array_equal(a, b) for a, b in zip(ds[:4], again[:4], strict=True))
  other = loader(seed=1)
  assert not np.array_equal(ds.y_train, other.y_train)
  raw = loader(normalize=None)
  assert raw.x_train.max() > 5


def test_bad_normalization_and_split_are_clear_errors():
  with pytest.raises(ValueError, match="normalize must be one of"):
    data.digits(normalize="minmax")
  with pytest.raises(ValueError, match="test_fraction"):
    data.digits(test_fraction=1.5)
  with pytest.raises(ValueError, match="unknown data set"):
    data.load("cifar")


def test_mnist1d_is_generated_locally_with_the_package_split(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
  ds = data.mnist1d(num_samples=500)
  _check(ds, (40,), 10)
  assert (len(ds.x_train), len(ds.x_test)) == (400, 100)
  assert np.array_equal(ds.x_train, data.mnist1d(num_samples=500).x_train)
  assert data.mnist1d(num_samples=500, as_sequence=True).x_train.shape == (400, 40, 1)
  assert list(tmp_path.iterdir()) == []


def _write_idx(path, array, magic, compress):
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  if compress:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(payload)
  else:
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch, compress):
  rng = np.random.default_rng(0)
  images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
  labels = {"train": rng.integers(0, 10, 12), "t10k": rng.integers(0, 10, 5)}
  for split in ("train", "t10k"):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images[split], 2051, compress)
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels[split], 2049, compress)
  ds = data.fashion_mnist(tmp_path)
  _check(ds, (784,), 10)
  assert np.allclose(ds.x_train * 255, images["train"].reshape(12, -1), atol=1e-3)
  assert np.array_equal(ds.y_test, labels["t10k"])
  monkeypatch.setenv("ALTGRAD_FASHION_MNIST", str(tmp_path))
  images_nhwc = data.fashion_mnist(flatten=False, normalize=None)
  assert images_nhwc.x_train.shape == (12, 28, 28, 1) and images_nhwc.x_train.max() > 1


def test_fashion_mnist_missing_is_one_clear_sentence(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.fashion_mnist(tmp_path / "nowhere")


def test_corrupt_idx_is_a_clear_error(tmp_path):
  bad = tmp_path / "x"
  bad.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00")
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(bad)


def _check_temporal_order(x, y):
  symbols = x.argmax(-1)
  assert np.all(x.sum(-1) == 1)  # one-hot
  informative = symbols < 2
  assert np.all(informative.sum(axis=1) == 2)
  first, second = (np.argwhere(informative)[:, 1].reshape(-1, 2)).T
  assert np.all((first >= 4) & (first < 8)) and np.all((second >= 20) & (second < 24))
  rows = np.arange(len(symbols))
  assert np.array_equal(y, symbols[rows, first] + 2 * symbols[rows, second])
  return first, symbols


def test_temporal_order_task_and_its_fresh_batches():
  ds = data.temporal_order(40, num_train=300, num_test=50, seed=3)
  _check(ds, (40, 6), 4)
  _check_temporal_order(ds.x_train, ds.y_train)
  assert np.array_equal(ds.x_train, data.temporal_order(40, num_train=300, num_test=50, seed=3).x_train)
  x, y = jax.jit(ds.sampler, static_argnums=1)(jax.random.key(0), 2000)
  assert x.shape == (2000, 40, 6) and x.dtype == ds.x_train.dtype and y.dtype == ds.y_train.dtype
  first, symbols = _check_temporal_order(np.asarray(x), np.asarray(y))
  # the same distribution as the fixed split: positions, classes and distractors all used
  assert set(first) == set(range(4, 8)) and set(np.asarray(y)) == set(range(4))
  assert set(symbols[symbols >= 2]) == set(range(2, 6))
  with pytest.raises(ValueError, match="sequence length of at least 10"):
    data.temporal_order(5)


def _check_adding(x, y):
  markers, values = x[..., 0], x[..., 1]
  assert np.all(markers.sum(axis=1) == 2)
  assert np.allclose(y[:, 0], (markers * values).sum(axis=1) / 2)
  positions = np.argwhere(markers > 0)[:, 1].reshape(-1, 2)
  assert np.all(positions[:, 0] < 3) and np.all(positions[:, 1] < 15)


def test_adding_task_and_its_fresh_batches():
  ds = data.adding(30, num_train=200, num_test=20, seed=1)
  _check(ds, (30, 2), None)
  assert ds.y_train.shape == (200, 1) and ds.output_size == 1
  _check_adding(ds.x_train, ds.y_train)
  x, y = ds.sampler(jax.random.key(1), 500)
  assert x.shape == (500, 30, 2) and y.shape == (500, 1) and x.dtype == ds.x_train.dtype
  _check_adding(np.asarray(x), np.asarray(y))
  assert abs(float(np.mean(x[..., 1])) - 0.5) < 0.01  # uniform values