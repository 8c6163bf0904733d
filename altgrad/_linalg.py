"""Cholesky factors and solves for the rules, and the ridge solver of the layer inverses.

:func:`cholesky` and :func:`cho_solve` take the LAPACK (or vendor) routine on small matrices
and, from a size measured per backend on (:data:`BLOCKING`), a blocked form whose bulk is
matrix products: on a GPU it beats the vendor's routine by a little from a few hundred rows. On
a CPU jaxlib's LAPACK calls run on one thread (``altgrad._lapack``); the blocked form runs on all
of XLA's, and is faster alone, but not inside a rule's step (see :data:`BLOCKING`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

class Blocking(NamedTuple):
  """Where the blocked forms beat a backend's own routine, and their diagonal block."""

  start: int  # the matrix rows from which they are used
  block: int  # rows of a diagonal block, up to 1024 rows
  large_block: int  # rows of a diagonal block beyond


#: Per backend, measured (``tools/blocked_cholesky.py``: results/blocked_cholesky.md and
#: results/gpu/blocked_cholesky.md); a backend absent here uses its own routine. Not the CPU: the
#: blocked forms are faster there alone but not in CW's step, where the one-thread LAPACK calls
#: overlap the other layers' products on XLA's other threads, and they compile slower.
BLOCKING: dict[str, Blocking] = {"gpu": Blocking(384, 256, 256)}


#: The blocks where a backend has no entry (the CPU's best alone: results/blocked_cholesky.md).
DEFAULT_BLOCKING = Blocking(512, 128, 256)


def _blocking() -> Blocking | None:
  return BLOCKING.get(jax.default_backend())


def block_for(n: int) -> int:
  """The diagonal block's rows for an ``n``-row matrix on the default backend."""
  blocking = _blocking() or DEFAULT_BLOCKING
  return blocking.block if n <= 1024 else blocking.large_block


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
  return [(start, min(start + block, n)) for start in range(0, n, block)]


def _inverse_lower(factor: Array) -> Array:
  """``L^-1`` of a small lower-triangular block."""
  eye = jnp.eye(factor.shape[-1], dtype=factor.dtype)
  return lax.linalg.triangular_solve(factor, eye, left_side=True, lower=True)


def blocked_cholesky(matrix: Array, block: int | None = None) -> Array:
  """The lower Cholesky factor of an SPD ``matrix``, right-looking by blocks: per diagonal block
  one small factor and its inverse, then the panel below as a product with that inverse and the
  trailing matrix updated by one product (the bulk of the work)."""
  rest, columns = matrix, []
  for start, stop in _blocks(matrix.shape[-1], block or block_for(matrix.shape[-1])):
    size = stop - start
    diagonal = lax.linalg.cholesky(rest[:size, :size])
    panel = rest[size:, :size] @ _inverse_lower(diagonal).T
    columns.append(jnp.concatenate([jnp.zeros((start, size), matrix.dtype), diagonal, panel]))
    rest = rest[size:, size:] - panel @ panel.T
  return jnp.concatenate(columns, axis=1)


def blocked_solve_lower(factor: Array, rhs: Array, *, transpose: bool = False, block: int | None = None) -> Array:
  """``L^-1 rhs`` (``L^-T rhs`` with ``transpose``) for a lower-triangular ``factor``, by blocks
  of rows: each is the inverse of its diagonal block times its rows of ``rhs`` less one product
  with the rows already solved (those above; below with ``transpose``)."""
  n = factor.shape[-1]
  blocks = _blocks(n, block or block_for(n))
  solved = rhs[:0]
  for start, stop in blocks[::-1] if transpose else blocks:
    inverse = _inverse_lower(factor[start:stop, start:stop])
    if transpose:
      left = rhs[start:stop] - factor[stop:, start:stop].T @ solved
      solved = jnp.concatenate([inverse.T @ left, solved])
    else:
      left = rhs[start:stop] - factor[start:stop, :start] @ solved
      solved = jnp.concatenate([solved, inverse @ left])
  return solved


def cholesky(matrix: Array) -> Array:
  """The lower Cholesky factor of an SPD ``matrix`` (NaN where it is not: never raises)."""
  if _blocked(matrix.shape[-1]):
    return blocked_cholesky(matrix)
  # ``matrix`` is symmetric, so it is its own transpose, which XLA passes to LAPACK (column-major)
  # without a copy; LAPACK reads one triangle, so nothing is symmetrized either (a copy per call).
  return lax.linalg.cholesky(jnp.swapaxes(matrix, -1, -2), symmetrize_input=False)


def _blocked(n: int) -> bool:
  blocking = _blocking()
  return blocking is not None and n >= blocking.start


def solve_lower(factor: Array, rhs: Array, *, transpose: bool = False) -> Array:
  """``L^-1 rhs`` (``L^-T rhs`` with ``transpose``) for a lower-triangular ``factor``."""
  if _blocked(factor.shape[-1]):
    return blocked_solve_lower(factor, rhs, transpose=transpose)
  return lax.linalg.triangular_solve(factor, rhs, left_side=True, lower=True, transpose_a=transpose)


def cho_solve(factor: Array, rhs: Array) -> Array:
  """``(L L^T)^-1 rhs`` for the lower factor ``L`` of :func:`cholesky`."""
  if _blocked(factor.shape[-1]):
    return blocked_solve_lower(factor, blocked_solve_lower(factor, rhs), transpose=True)
  # As ``rhs^T L^-T L^-1``, transposed: LAPACK reads and writes column-major matrices, and
  # ``rhs^T`` in column-major order is ``rhs`` as XLA stores it, so neither is copied.
  transposed = jnp.swapaxes(rhs, -1, -2)
  right = lax.linalg.triangular_solve(factor, transposed, left_side=False, lower=True, transpose_a=True)
  return jnp.swapaxes(lax.linalg.triangular_solve(factor, right, left_side=False, lower=True), -1, -2)


#: Per backend, the fewest rows each half keeps where :func:`gram` halves a Gram matrix's rows
#: (measured: ``tools/symmetric_gram.py``, results/symmetric_gram.md); a backend absent here takes
#: the one product (the GPU: not measured).
GRAM_HALF_ROWS: dict[str, int] = {"cpu": 256}


def gram(rows: Array) -> Array:
  """``rows @ rows.T``: where :data:`GRAM_HALF_ROWS` says, from the products of its diagonal and
  lower blocks only (the upper blocks are their transposes), halving the rows while each half
  keeps that many: 3/4 of the one product's FLOPs at 1000 rows on the CPU (halving
  further is faster alone by a few percent, and compiles CW's step 1.6x slower)."""
  smallest = GRAM_HALF_ROWS.get(jax.default_backend())
  n = rows.shape[-2]
  if smallest is None or n < 2 * smallest:
    return rows @ jnp.swapaxes(rows, -1, -2)
  top, bottom = rows[..., : n // 2, :], rows[..., n // 2 :, :]
  lower = bottom @ jnp.swapaxes(top, -1, -2)
  upper = jnp.concatenate([gram(top), jnp.swapaxes(lower, -1, -2)], axis=-1)
  return jnp.concatenate([upper, jnp.concatenate([lower, gram(bottom)], axis=-1)], axis=-2)


class RidgeSolver(NamedTuple):
  """Solves ``argmin_x ||z - x K||^2 + reg ||x||^2 = z K^T (K K^T + reg I)^-1`` for many ``z``.

  Factor once with :meth:`create`, then call the solver on any number of right-hand sides (rows
  of ``z``). The Cholesky factor ``L`` is of ``K K^T + reg I`` when ``K`` has no more rows than
  columns, and of ``K^T K + reg I`` otherwise (push-through identity), so its size is
  ``min(K.shape)``. The solver keeps ``L^-1`` (one triangular solve at creation) and applies
  ``L^-T L^-1`` as two products: XLA's CPU backend runs a triangular solve inside a loop
  (``lax.scan``, as target propagation's backward sweep does) far slower than outside one, and the ridge keeps ``L`` well conditioned (``cond(L)^2 <= (|K|^2 + reg) / reg``).

  The solve is a fixed linear map ``z -> z P``. With ``explicit=True`` the solver forms
  ``P = K^T (K K^T + reg I)^-1`` (``(n_out, n_in)``) once and each call is one product: worth it
  when it is called on many more rows than ``min(K.shape)``, e.g. at every time step of a
  recurrent layer (an RNN's target sweep), not for one batch through an MLP layer.
  """

  kernel: Array
  cholesky: Array
  inverse_factor: Array
  projection: Array | None = None

  @classmethod
  def create(cls, kernel: Array, reg: float | Array, *, explicit: bool = False) -> RidgeSolver:
    n_in, n_out = kernel.shape
    gram_matrix = gram(kernel if n_in <= n_out else kernel.T)
    eye = jnp.eye(gram_matrix.shape[0], dtype=gram_matrix.dtype)
    factor = cholesky(gram_matrix + reg * eye)
    inverse = solve_lower(factor, eye)
    solver = cls(kernel, factor, inverse)
    return solver._replace(projection=solver(jnp.eye(n_out, dtype=kernel.dtype))) if explicit else solver

  @property
  def finite(self) -> Array:
    """False when the factorization failed (``jnp.linalg.cholesky`` returns NaN, it never raises)."""
    return jnp.all(jnp.isfinite(self.cholesky))

  def _solve(self, rhs: Array) -> Array:
    """``(L L^T)^-1 rhs`` for rows of ``rhs``: ``rhs L^-T L^-1`` (the Gram is symmetric)."""
    return (rhs @ self.inverse_factor.T) @ self.inverse_factor

  def __call__(self, z: Array) -> Array:
    n_in, n_out = self.kernel.shape
    flat = z.reshape(-1, n_out)
    if self.projection is not None:
      x = flat @ self.projection
    elif n_in <= n_out:
      x = self._solve(flat @ self.kernel.T)
    else:
      x = self._solve(flat) @ self.kernel.T
    return x.reshape(*z.shape[:-1], n_in)
