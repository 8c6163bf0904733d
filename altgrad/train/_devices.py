"""Data parallelism: the batch mesh, and values replicated on it from one or many processes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

#: The mesh axis that :func:`fit`'s ``data_parallel`` shards the batch over.
BATCH_AXIS = "batch"


def batch_mesh(batch_size: int) -> jax.sharding.Mesh:
  """:func:`fit`'s ``data_parallel`` mesh: every device of every process on one batch axis."""
  devices = jax.devices()
  if batch_size % len(devices):
    where = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    raise ValueError(f"data_parallel: batch_size {batch_size} must divide by the {len(devices)} devices{where}")
  return jax.sharding.Mesh(np.array(devices), (BATCH_AXIS,))


def replicate(tree, sharding: NamedSharding):
  """Every leaf of ``tree`` on every device of ``sharding``'s mesh. Across processes (each holds
  the same values), each process places its own copy: a host array can go to devices of other
  processes' meshes, an array already on a local device cannot."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    return jax.device_put(np.asarray(leaf), sharding)

  return jax.tree.map(one, tree)
