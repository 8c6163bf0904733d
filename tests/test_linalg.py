"""The blocked Cholesky factor and triangular solves against LAPACK's, and where they are used."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from altgrad import _linalg, losses, nn, rules

#: (rows, rank of the Gram, ridge relative to its mean eigenvalue): well conditioned, rank
#: deficient with the rules' regularization, and ill conditioned (condition number ~1e6).
CASES = [(200, 200, 1.0), (200, 60, 1e-2), (200, 200, 1e-6)]


def _gram(rows, rank, ridge, seed=0):
  x = np.random.default_rng(seed).standard_normal((rows, rank))
  gram = x @ x.T
  return gram + ridge * np.trace(gram) / rows * np.eye(rows)


def _error(estimate, truth):
  return float(np.linalg.norm(np.asarray(estimate, np.float64) - truth) / np.linalg.norm(truth))


@pytest.mark.parametrize(("rows", "rank", "ridge"), CASES)
def test_blocked_cholesky_and_solves_are_as_accurate_as_lapack(rows, rank, ridge):
  """Blocks of 64 on 200 rows (uneven last block): the factor reproduces the matrix, and the
  solve is as close to the float64 solution as LAPACK's in float32, within a factor of two in
  the geometric mean over six matrices (ill conditioned, one matrix's ratio is rounding's draw:
  0.1-10x either way, and which way moves with the JAX version)."""
  factor = jax.jit(lambda a: _linalg.blocked_cholesky(a, block=64))
  ratios = []
  for seed in range(6):
    exact = _gram(rows, rank, ridge, seed)
    matrix = jnp.asarray(exact, jnp.float32)
    rhs = np.random.default_rng(seed + 1).standard_normal((rows, 5))
    truth = np.linalg.solve(exact, rhs)
    blocked, lapack = factor(matrix), jnp.linalg.cholesky(matrix)
    residuals = [float(jnp.linalg.norm(f @ f.T - matrix) / jnp.linalg.norm(matrix)) for f in (blocked, lapack)]
    assert residuals[0] <= 2 * residuals[1] + 1e-7
    assert np.all(np.triu(np.asarray(blocked), 1) == 0)
    b = jnp.asarray(rhs, jnp.float32)
    solved = _linalg.blocked_solve_lower(blocked, _linalg.blocked_solve_lower(blocked, b, block=64), transpose=True, block=64)
    lapack_error = _error(jax.scipy.linalg.cho_solve((lapack, True), b), truth)
    ratios.append(_error(solved, truth) / lapack_error)
    # the library path (LAPACK, the right side solved transposed so that nothing is copied)
    assert _error(_linalg.cho_solve(_linalg.cholesky(matrix), b), truth) <= 1.1 * lapack_error + 1e-7
  assert np.exp(np.mean(np.log(ratios))) <= 2


def test_the_library_factor_and_solve_are_lapacks_under_jit_and_vmap():
  matrices = jnp.stack([jnp.asarray(_gram(60, 60, r, seed=r > 0.5), jnp.float32) for r in (0.1, 1.0)])
  rhs = jnp.asarray(np.random.default_rng(4).standard_normal((2, 60, 7)), jnp.float32)
  factors = jax.jit(jax.vmap(_linalg.cholesky))(matrices)
  np.testing.assert_allclose(factors, jnp.linalg.cholesky(matrices), rtol=1e-5, atol=1e-5)
  expected = jax.vmap(lambda f, b: jax.scipy.linalg.cho_solve((f, True), b))(factors, rhs)
  np.testing.assert_allclose(jax.jit(jax.vmap(_linalg.cho_solve))(factors, rhs), expected, rtol=1e-4, atol=1e-5)


def test_blocked_triangular_solves_match_lapack_and_vmap():
  factor = jnp.linalg.cholesky(jnp.asarray(_gram(150, 150, 0.1), jnp.float32))
  rhs = jnp.asarray(np.random.default_rng(2).standard_normal((150, 9)), jnp.float32)
  for transpose in (False, True):
    expected = jax.lax.linalg.triangular_solve(factor, rhs, left_side=True, lower=True, transpose_a=transpose)
    got = _linalg.blocked_solve_lower(factor, rhs, transpose=transpose, block=32)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
  stacked = jnp.stack([factor, 2 * factor])
  batched = jax.vmap(lambda f: _linalg.blocked_solve_lower(f, rhs, block=32))(stacked)
  np.testing.assert_allclose(batched[1], _linalg.blocked_solve_lower(2 * factor, rhs, block=32), rtol=1e-6)


def test_a_matrix_that_is_not_positive_definite_gives_nan_as_lapack_does():
  matrix = jnp.asarray(_gram(100, 100, 0.1), jnp.float32).at[70, 70].set(-1e3)
  assert not np.all(np.isfinite(_linalg.blocked_cholesky(matrix, block=32)))
  assert not np.all(np.isfinite(jnp.linalg.cholesky(matrix)))
  assert not np.all(np.isfinite(_linalg.cholesky(matrix)))


def test_the_rules_take_the_blocked_forms_from_the_measured_size_and_agree_with_lapack(monkeypatch):
  """CW at batch 96 solves a 96 x 96 Gram: with the blocked forms forced on (from 32 rows, blocks
  of 32) its update is LAPACK's to float32 rounding; so are a ridge solver's."""
  model = nn.MLP((20, 40, 5), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(3)
  batch = (jnp.asarray(rng.standard_normal((96, 20)), jnp.float32), jnp.asarray(rng.integers(0, 5, 96)))

  def update():
    tx = rules.consequentialism(model, losses.softmax_cross_entropy, form="dual")
    return tx.update(None, tx.init(params), params, batch=batch)[0]

  kernel = jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((7, 80)), jnp.float32)
  lapack, lapack_ridge = update(), _linalg.RidgeSolver.create(kernel, 0.5)(z)
  monkeypatch.setitem(_linalg.BLOCKING, jax.default_backend(), _linalg.Blocking(32, 32, 32))
  assert _linalg._blocked(96)
  np.testing.assert_allclose(_linalg.RidgeSolver.create(kernel, 0.5)(z), lapack_ridge, rtol=1e-4, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(update()), jax.tree.leaves(lapack), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
  assert optax.tree.norm(update()) > 0


@pytest.mark.parametrize("rows", [7, 64, 257])
def test_gram_from_its_lower_blocks_is_the_product_under_jit_and_vmap(rows, monkeypatch):
  """Halving the rows down to 16 (forced on): the Gram matrix to float32 rounding, from more
  than one product where there are 32 rows or more."""
  monkeypatch.setitem(_linalg.GRAM_HALF_ROWS, jax.default_backend(), 16)
  x = np.random.default_rng(rows).standard_normal((rows, 33)).astype(np.float32)
  expected = x.astype(np.float64) @ x.T.astype(np.float64)
  got = jax.jit(_linalg.gram)(x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(jax.vmap(_linalg.gram)(jnp.stack([x, 2 * x]))[1], 4 * expected, rtol=1e-5, atol=1e-3)
  products = str(jax.make_jaxpr(_linalg.gram)(x)).count("dot_general")
  assert products == 1 if rows < 32 else products > 1


def test_cw_and_the_ridge_solver_agree_with_the_gram_halved(monkeypatch):
  """CW's dual (96 x 96) and primal (21 x 21, 41 x 41) Grams and a ridge solver's, halved down
  to 8 rows: the same updates to float32 rounding."""
  model = nn.MLP((20, 40, 5), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(4)
  batch = (jnp.asarray(rng.standard_normal((96, 20)), jnp.float32), jnp.asarray(rng.integers(0, 5, 96)))
  kernel, z = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((64, 80), (7, 80)))

  def outcomes():
    cw = {}
    for form in ("dual", "primal"):
      tx = rules.consequentialism(model, losses.softmax_cross_entropy, form=form)
      cw[form] = tx.update(None, tx.init(params), params, batch=batch)[0]
    return cw, _linalg.RidgeSolver.create(kernel, 0.5)(z)

  monkeypatch.delitem(_linalg.GRAM_HALF_ROWS, jax.default_backend(), raising=False)
  plain = outcomes()
  monkeypatch.setitem(_linalg.GRAM_HALF_ROWS, jax.default_backend(), 8)
  for got, expected in zip(jax.tree.leaves(outcomes()), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
