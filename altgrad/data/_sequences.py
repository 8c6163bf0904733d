"""The synthetic long-range sequence tasks of target propagation's benchmarks (docs/rules/target_propagation.rst; after Manchev and Spratling, JMLR 2020)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from altgrad.data._dataset import Dataset

TEMPORAL_ORDER_SYMBOLS = 6  # two informative symbols (X, Y) and four distractors


def _check_length(length: int, minimum: int, task: str) -> None:
  if not isinstance(length, (int, np.integer)) or length < minimum:
    raise ValueError(f"{task} needs a sequence length of at least {minimum}, got {length!r}")


def _temporal_order_split(rng: np.random.Generator, n: int, length: int):
  tenth = max(1, length // 10)
  symbols = rng.integers(2, TEMPORAL_ORDER_SYMBOLS, size=(n, length))
  first_pos = rng.integers(0, tenth, size=n) + length // 10
  second_pos = rng.integers(0, tenth, size=n) + length // 2
  first, second = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
  rows = np.arange(n)
  symbols[rows, first_pos] = first
  symbols[rows, second_pos] = second
  x = np.eye(TEMPORAL_ORDER_SYMBOLS, dtype=np.float32)[symbols]
  return x, (first + 2 * second).astype(np.int32)


def _temporal_order_sample(key, n: int, length: int):
  """``n`` fresh temporal-order sequences, drawn as :func:`_temporal_order_split` draws them."""
  tenth = max(1, length // 10)
  keys = jax.random.split(key, 5)
  symbols = jax.random.randint(keys[0], (n, length), 2, TEMPORAL_ORDER_SYMBOLS)
  first_pos = jax.random.randint(keys[1], (n,), 0, tenth) + length // 10
  second_pos = jax.random.randint(keys[2], (n,), 0, tenth) + length // 2
  first, second = jax.random.randint(keys[3], (n,), 0, 2), jax.random.randint(keys[4], (n,), 0, 2)
  rows = jnp.arange(n)
  symbols = symbols.at[rows, first_pos].set(first).at[rows, second_pos].set(second)
  return jax.nn.one_hot(symbols, TEMPORAL_ORDER_SYMBOLS, dtype=jnp.float32), (first + 2 * second).astype(jnp.int32)


def temporal_order(
  length: int = 60, *, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0
) -> Dataset:
  """Temporal order: which of X, Y appear at two marked periods, in which order (4 classes).

  Each step is a one-hot symbol out of six: four distractors, and X or Y placed once in
  ``[0.1, 0.2) * length`` and once in ``[0.5, 0.6) * length``. The class is
  ``first + 2 * second`` (X = 0, Y = 1). x ``(n, length, 6)`` float32, y ``(n,)`` int32. Its
  ``sampler`` draws fresh sequences the same way (``fit(..., fresh_steps=...)``).
  """
  _check_length(length, 10, "temporal_order")
  rng = np.random.default_rng(seed)
  x_train, y_train = _temporal_order_split(rng, num_train, length)
  x_test, y_test = _temporal_order_split(rng, num_test, length)
  sampler = functools.partial(_temporal_order_sample, length=length)
  return Dataset(x_train, y_train, x_test, y_test, 4, f"temporal_order_{length}", sampler)


def _adding_split(rng: np.random.Generator, n: int, length: int):
  tenth = max(1, length // 10)
  values = rng.random((n, length), dtype=np.float32)
  first_pos = rng.integers(0, tenth, size=n)
  second_pos = rng.integers(tenth, max(tenth + 1, length // 2), size=n)
  rows = np.arange(n)
  markers = np.zeros((n, length), np.float32)
  markers[rows, first_pos] = 1.0
  markers[rows, second_pos] = 1.0
  x = np.stack([markers, values], axis=-1)
  y = (values[rows, first_pos] + values[rows, second_pos]) / 2
  return x, y[:, None].astype(np.float32)


def _adding_sample(key, n: int, length: int):
  """``n`` fresh adding-problem sequences, drawn as :func:`_adding_split` draws them."""
  tenth = max(1, length // 10)
  keys = jax.random.split(key, 3)
  values = jax.random.uniform(keys[0], (n, length), jnp.float32)
  first_pos = jax.random.randint(keys[1], (n,), 0, tenth)
  second_pos = jax.random.randint(keys[2], (n,), tenth, max(tenth + 1, length // 2))
  rows = jnp.arange(n)
  markers = jnp.zeros((n, length), jnp.float32).at[rows, first_pos].set(1.0).at[rows, second_pos].set(1.0)
  y = (values[rows, first_pos] + values[rows, second_pos]) / 2
  return jnp.stack([markers, values], axis=-1), y[:, None]


def adding(length: int = 30, *, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0) -> Dataset:
  """Adding problem: the mean of the two values marked in a sequence of uniform [0, 1) values.

  Channel 0 holds the markers (one in the first tenth, one before the middle), channel 1 the
  values. x ``(n, length, 2)`` float32, y ``(n, 1)`` float32 in [0, 1). A prediction counts as
  correct within 0.04 of the target (docs/rules/target_propagation.rst). Its ``sampler`` draws fresh sequences the
  same way (``fit(..., fresh_steps=...)``).
  """
  _check_length(length, 4, "adding")
  rng = np.random.default_rng(seed)
  x_train, y_train = _adding_split(rng, num_train, length)
  x_test, y_test = _adding_split(rng, num_test, length)
  sampler = functools.partial(_adding_sample, length=length)
  return Dataset(x_train, y_train, x_test, y_test, None, f"adding_{length}", sampler)


def _majority_split(rng: np.random.Generator, n: int, length: int, vocab: int):
  tokens = rng.integers(0, vocab, size=(n, length))
  counts = np.stack([(tokens == v).sum(axis=1) for v in range(vocab)], axis=1)
  return tokens.astype(np.int32), np.argmax(counts, axis=1).astype(np.int32)


def majority(
  length: int = 16, *, vocab: int = 8, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0
) -> Dataset:
  """Majority: the most frequent token of a uniform random sequence (ties go to the smallest).

  A task for attention (it must count across the whole sequence). x ``(n, length)`` int32 token
  ids in ``[0, vocab)``, y ``(n,)`` int32: ``vocab`` classes, one per token.
  """
  _check_length(length, 2, "majority")
  if not isinstance(vocab, (int, np.integer)) or vocab < 2:
    raise ValueError(f"majority needs a vocabulary of at least 2 tokens, got {vocab!r}")
  rng = np.random.default_rng(seed)
  x_train, y_train = _majority_split(rng, num_train, length, vocab)
  x_test, y_test = _majority_split(rng, num_test, length, vocab)
  return Dataset(x_train, y_train, x_test, y_test, vocab, f"majority_{length}")
