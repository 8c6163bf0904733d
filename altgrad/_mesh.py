"""Where a rule's step runs: on one device, under a mesh with Explicit axes, or inside
``shard_map`` (Manual axes), where each device holds a shard of the batch.

Rules write their batch statistics (Gram matrices, moments, loss differences) as sums over the
rows a device holds, passed through :func:`batch_sum`, and divide by :func:`batch_count`;
gradients with respect to the params pass through :func:`gradient_sum`. On one device and under ``jit`` with a sharded batch these are the plain
sums (the compiler reduces across devices); inside ``shard_map`` they are summed over every
Manual axis, so every device computes the update of the whole batch, as on one device. Under a
mesh with Explicit axes (``jax.make_mesh``'s default) a rule computes in Auto mode
(:func:`auto_sharded`), where the compiler places those reductions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType

Array = jax.Array


def _axes(kind: AxisType) -> tuple[str, ...]:
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(name for name, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == kind)


def manual_axes() -> tuple[str, ...]:
  """The mesh axes of an enclosing ``shard_map`` (empty outside one)."""
  return _axes(AxisType.Manual)


def _varying(x: Any) -> frozenset:
  """The Manual axes along which ``x``'s value differs between devices, as ``shard_map`` types it."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  return frozenset(getattr(getattr(aval, "mat", None), "varying", ()) if vma is None else vma)


def _typed(axes: tuple[str, ...]) -> bool:
  """Whether the enclosing ``shard_map`` types values by where they vary (``check_vma=True``,
  its default): then gradients with respect to device-invariant params come out summed over
  the devices already, as their transpose sums them."""
  return bool(_varying(jax.lax.axis_index(axes)))


def batch_sum(tree: Any) -> Any:
  """``tree``, this device's sums over the rows it holds, summed over every device's rows."""
  axes = manual_axes()
  return jax.lax.psum(tree, axes) if axes else tree


def gradient_sum(tree: Any) -> Any:
  """``tree``, this device's part of a gradient (or VJP) with respect to the params, as the whole
  batch's. A typed ``shard_map`` (``check_vma=True``, its default) has summed it already: the
  transpose of using device-invariant params on each device's rows is that sum."""
  axes = manual_axes()
  return jax.lax.psum(tree, axes) if axes and not _typed(axes) else tree


def per_row(tree: Any) -> Any:
  """A fresh (device-invariant) ``tree`` typed as differing between the devices of an enclosing
  ``shard_map``, as every per-row quantity does (its perturbations of the rows' activity)."""
  axes = manual_axes()
  return jax.lax.pcast(tree, axes, to="varying") if axes and _typed(axes) else tree


def varying_like(x: Any, reference: Array) -> Any:
  """``x`` typed as differing between devices wherever ``reference`` does (a loop's initial carry
  must have the type of what the loop body makes of it)."""
  missing = tuple(sorted(_varying(reference) - _varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def batch_count(local_rows: int) -> int:
  """How many rows a batch of ``local_rows`` rows per device has in all."""
  mesh = jax.sharding.get_abstract_mesh()
  return local_rows * math.prod(mesh.shape[name] for name in manual_axes())


def device_index() -> Array | None:
  """This device's index among the devices of an enclosing ``shard_map`` (None outside one):
  folded into a rule's noise key so that the devices draw independent noise."""
  axes = manual_axes()
  return jax.lax.axis_index(axes) if axes else None


def gather_rows(rows: Array) -> Array:
  """Every device's ``rows`` stacked in device order (the rows themselves outside ``shard_map``)."""
  axes = manual_axes()
  return jax.lax.all_gather(rows, axes, axis=0, tiled=True) if axes else rows


def _explicit_mesh(tree: Any) -> Any:
  """The mesh with Explicit axes that ``tree``'s arrays are sharded over (their types carry it,
  with or without ``jax.set_mesh``), or None."""
  for leaf in jax.tree.leaves(tree):
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def auto_sharded(fn: Callable[..., Any], like: Any) -> Callable[..., Any]:
  """``fn`` computed in Auto mode over the mesh's Explicit axes, its outputs sharded like ``like``
  (a tree shaped like them); ``fn`` itself where there are none. The mesh is the context's
  (``jax.set_mesh``) or, without one, that of the arrays ``fn`` is called with."""

  def sharded(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      mesh = _explicit_mesh(args)
      if mesh is None:
        return fn(*args)
      with jax.sharding.use_abstract_mesh(mesh):
        return sharded(*args)
    axes = _axes(AxisType.Explicit)
    if not axes:
      return fn(*args)
    specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, like)
    return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs)(*args)

  return sharded
