"""Ridge solves shared by layer inverses and the rules: Cholesky on the smaller side, never an inverse."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

Array = jax.Array


class RidgeSolver(NamedTuple):
  """Solves ``argmin_x ||z - x K||^2 + reg ||x||^2 = z K^T (K K^T + reg I)^-1`` for many ``z``.

  Factor once with :meth:`create`, then call the solver on any number of right-hand sides
  (rows of ``z``). The factor is of ``K K^T + reg I`` when ``K`` has no more rows than
  columns, and of ``K^T K + reg I`` otherwise (push-through identity), so its size is
  ``min(K.shape)``.
  """

  kernel: Array
  cholesky: Array

  @classmethod
  def create(cls, kernel: Array, reg: float | Array) -> RidgeSolver:
    n_in, n_out = kernel.shape
    gram = kernel @ kernel.T if n_in <= n_out else kernel.T @ kernel
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    return cls(kernel, jnp.linalg.cholesky(gram + reg * eye))

  @property
  def finite(self) -> Array:
    """False when the factorization failed (``jnp.linalg.cholesky`` returns NaN, it never raises)."""
    return jnp.all(jnp.isfinite(self.cholesky))

  def __call__(self, z: Array) -> Array:
    n_in, n_out = self.kernel.shape
    factor = (self.cholesky, True)
    flat = z.reshape(-1, n_out)
    if n_in <= n_out:
      x = jsl.cho_solve(factor, self.kernel @ flat.T).T
    else:
      x = jsl.cho_solve(factor, flat.T).T @ self.kernel.T
    return x.reshape(*z.shape[:-1], n_in)
