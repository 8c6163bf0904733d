"""Ridge solves shared by layer inverses and the rules: a Cholesky factor of the smaller side."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


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
    gram = kernel @ kernel.T if n_in <= n_out else kernel.T @ kernel
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    cholesky = jnp.linalg.cholesky(gram + reg * eye)
    inverse = lax.linalg.triangular_solve(cholesky, eye, left_side=True, lower=True)
    solver = cls(kernel, cholesky, inverse)
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
