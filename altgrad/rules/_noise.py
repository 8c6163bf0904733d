"""Node perturbation's noise: Gaussian noise for many arrays in one draw, with JAX's hash
written out so that it fuses on the CPU."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from altgrad import _mesh

Array = jax.Array
#: ``noise_fn(key, shape, dtype) -> noise``: a model of a device's noise in place of the Gaussian.
NoiseFn = Callable[[Array, tuple[int, ...], Any], Array]


def noise_like(noise_fn: NoiseFn | None, sigma: float, key: Array, like: list[Array], batched: bool = False) -> tuple[Array, ...]:
  """Noise shaped like each array of ``like``: ``noise_fn`` called per array with a key of its
  own, or by default ``sigma`` times :func:`gaussian` in a single draw split among them (one
  hash computation however many sites: XLA compiles each one separately, and their compile
  time dominated node perturbation's step: results/noise_hash.md). ``batched``: the arrays share their
  first (batch) axis, which the single draw keeps, so a batch sharded over devices draws its
  noise where it lives."""
  if not like:
    return ()
  if noise_fn is not None:
    keys = jax.random.split(key, len(like))
    return tuple(noise_fn(k, a.shape, a.dtype) for k, a in zip(keys, like, strict=True))
  lead = like[0].shape[:1] if batched else ()
  widths = [math.prod(a.shape[len(lead) :]) for a in like]
  flat = sigma * gaussian(key, (*lead, sum(widths)), jnp.float32)
  pieces = jnp.split(flat, np.cumsum(widths)[:-1].tolist(), axis=-1)
  return tuple(p.reshape(a.shape).astype(a.dtype) for p, a in zip(pieces, like, strict=True))


def _rotate_left(word: Array, bits: int) -> Array:
  return (word << np.uint32(bits)) | (word >> np.uint32(32 - bits))


def threefry2x32(key: tuple[Array, Array], counters: tuple[Array, Array]) -> tuple[Array, Array]:
  """The Threefry-2x32 hash of 20 rounds (Salmon et al., SC 2011), JAX's default PRNG, word for
  word as ``jax.random`` computes it, written out as elementwise ops.

  On CPU, JAX lowers its hash primitive as a loop over the rounds: written out, the rounds fuse
  into one elementwise kernel and a draw compiles faster (``tools/noise_hash.py``:
  results/noise_hash.md).
  """
  k0, k1 = key
  schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = counters[0] + k0, counters[1] + k1
  for block in range(5):
    for bits in ((13, 15, 26, 6), (17, 29, 16, 24))[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, bits) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def gaussian(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """Standard normal noise, as ``jax.random.normal`` draws it but with half the hashing, each
  number computed once.

  ``jax.random.normal`` (partitionable threefry, JAX's default) hashes a counter per number and
  keeps one of the two words each hash yields; on CPU that costs about as much as one layer's
  matmul at node-perturbation shapes. Here each hash of a counter ``(i, 0)`` gives two numbers:
  its two words fill the two halves of the last axis, and they leave the hash as the real and
  imaginary parts of one complex number, so that XLA (whose fused loops compute each output
  element on its own) hashes each counter once. Counters are iotas of the array's own shape, so
  the noise of a batch sharded over devices is drawn where it lives. The numbers are made in a
  loop over two chunks of columns: XLA fuses nothing across a loop, so the noise is stored once,
  where otherwise the inverse CDF (some 180 operations a number) is fused, compiled and
  evaluated again in every reader of the noise (results/noise_once.md). Keys of other
  implementations (``rbg``) use ``jax.random.normal``.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32" or not shape or 0 in shape:
    return jax.random.normal(key, shape, dtype)
  *lead, width = shape
  half = (width + 1) // 2
  chunk = -(-half // _CHUNKS)
  strides = np.cumprod([1, half, *lead[::-1]])[:-1][::-1]
  counters = sum(
    jax.lax.broadcasted_iota(jnp.uint32, (*lead, chunk), axis) * jnp.uint32(stride)
    for axis, stride in enumerate(strides)
  )
  key_words = tuple(jax.random.key_data(key))

  def draw(index, pairs):
    first, second = threefry2x32(key_words, (counters + (index * chunk).astype(jnp.uint32), jnp.zeros_like(counters)))
    chunk_pairs = jax.lax.complex(_standard_normal(first), _standard_normal(second))
    return jax.lax.dynamic_update_index_in_dim(pairs, chunk_pairs, index, axis=len(lead))

  start = _mesh.varying_like(jnp.zeros((*lead, _CHUNKS, chunk), jnp.complex64), key_words[0])
  pairs = jax.lax.fori_loop(0, _CHUNKS, draw, start)
  pairs = pairs.reshape(*lead, _CHUNKS * chunk)[..., :half]
  return jnp.concatenate([pairs.real, pairs.imag], axis=-1)[..., :width].astype(dtype)


#: Column chunks of :func:`gaussian`'s loop: two, since XLA removes a loop of one trip.
_CHUNKS = 2


def _standard_normal(words: Array) -> Array:
  """A standard normal number from each word's 23 high bits: ``[1, 2)`` -> ``(-1, 1)`` (never
  -1, where ``erf_inv`` is infinite) -> the inverse CDF."""
  unit = jax.lax.bitcast_convert_type((words >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  low = np.nextafter(np.float32(-1), np.float32(0))
  return np.sqrt(2, dtype=np.float32) * jax.lax.erf_inv(jnp.maximum(low, 2 * unit - 3))
