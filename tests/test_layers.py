"""Layers: shapes, taps, activations and their guarded inverses, regularized inverses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MODELS, make_batch, tapped
from flax import nnx

from altgrad import nn
from altgrad.nn._activations import INVERSE_MARGIN


def test_forward_shapes():
  x = jnp.ones((5, 6))
  assert nn.MLP((6, 7, 3), rngs=nnx.Rngs(0))(x).shape == (5, 3)
  assert nn.Dense(6, 4, rngs=nnx.Rngs(0))(x).shape == (5, 4)
  images = jnp.ones((5, 8, 8, 2))
  assert nn.Conv(2, 3, 3, rngs=nnx.Rngs(0))(images).shape == (5, 8, 8, 3)
  assert nn.Conv(2, 3, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))(images).shape == (5, 3, 3, 3)
  assert nn.SimpleRNN(3, 8, 2, rngs=nnx.Rngs(0))(jnp.ones((5, 11, 3))).shape == (5, 2)


def test_taps_record_the_true_inputs_and_preactivations_of_an_mlp():
  model = nn.MLP((6, 5, 4, 3), rngs=nnx.Rngs(0))
  x, _ = make_batch("mlp")
  out, taps = tapped(model, x)
  a = x
  for layer, tap in zip(model.layers, taps, strict=True):
    z = a @ layer.kernel[...] + layer.bias[...]
    chex.assert_trees_all_close(tap.inputs, a)
    chex.assert_trees_all_close(tap.preact, z, rtol=1e-6)
    a = layer.activation(z)
  chex.assert_trees_all_close(out, a, rtol=1e-6)


def test_rnn_taps_are_the_states_of_an_explicit_time_loop():
  model = MODELS["rnn"](0)
  x, _ = make_batch("rnn")
  out, (cell_tap, readout_tap) = tapped(model, x)
  w, u, b = (p[...] for p in (model.cell.recurrent_kernel, model.cell.input_kernel, model.cell.bias))
  h = jnp.zeros((x.shape[0], w.shape[0]))
  for t in range(x.shape[1]):
    chex.assert_trees_all_close(cell_tap.inputs[0][:, t], h, atol=1e-6)
    z = h @ w + x[:, t] @ u + b
    chex.assert_trees_all_close(cell_tap.preact[:, t], z, atol=1e-5)
    h = jnp.tanh(z)
  chex.assert_trees_all_close(readout_tap.inputs, h, atol=1e-5)
  chex.assert_trees_all_close(out, model.readout(h), atol=1e-5)


def test_perturbations_are_added_at_every_site(model_kind):
  model = MODELS[model_kind](0)
  x, _ = make_batch(model_kind)
  _, clean = tapped(model, x)
  deltas = tuple(jnp.full(t.preact.shape, 0.01 * (i + 1)) for i, t in enumerate(clean))
  _, noisy = tapped(model, x, deltas)
  assert len(noisy) == len(model.sites())
  # Each recorded pre-activation is the site's linear part at its recorded input plus its delta.
  for site, c, n, delta in zip(model.sites(), clean, noisy, deltas, strict=True):
    chex.assert_trees_all_close(c.preact, site.linear(c.inputs), atol=1e-5)
    chex.assert_trees_all_close(n.preact - site.linear(n.inputs), delta, atol=1e-5)
  with pytest.raises(ValueError, match="perturbations"):
    tapped(model, x, deltas[:-1])


def test_check_input_names_the_expected_shape():
  with pytest.raises(ValueError, match=r"Conv expects inputs shaped \(batch, height, width, 2\)"):
    MODELS["conv"](0).check_input(jnp.ones((3, 4, 4, 5)))
  with pytest.raises(ValueError, match=r"SimpleRNN expects inputs shaped \(batch, time >= 1, 3\)"):
    MODELS["rnn"](0).check_input(jnp.ones((3, 4)))


@pytest.mark.parametrize("name", nn.ACTIVATIONS)
def test_activation_derivatives_match_autodiff(name):
  act = nn.get_activation(name)
  z = jnp.linspace(-3.0, 3.0, 41) + 0.013  # off the kinks
  chex.assert_trees_all_close(act.derivative(z), jax.vmap(jax.grad(act.fn))(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in nn.ACTIVATIONS if nn.get_activation(n).invertible])
def test_inverse_activations_invert_and_their_derivative_is_the_reciprocal(name):
  act = nn.get_activation(name)
  z = jnp.linspace(-2.0, 2.0, 33)
  a = act(z)
  chex.assert_trees_all_close(act.inverse(a), z, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(act.inverse_derivative(a), 1.0 / act.derivative(z), rtol=1e-3)


@pytest.mark.parametrize(
  "name, low, high, steepest",
  [("tanh", -1.0, 1.0, 1 / (2 * INVERSE_MARGIN)), ("sigmoid", 0.0, 1.0, 2 / INVERSE_MARGIN)],
)
def test_inverse_activations_are_guarded_at_the_range_boundaries(name, low, high, steepest):
  act = nn.get_activation(name)
  edge = jnp.array([low - 1.0, low, high, high + 1.0])
  inv, slope = act.inverse(edge), act.inverse_derivative(edge)
  assert bool(jnp.all(jnp.isfinite(inv))) and bool(jnp.all(jnp.isfinite(slope)))
  # Values past the edge are clipped to the same guarded value as the edge itself.
  assert float(inv[0]) == float(inv[1]) and float(inv[2]) == float(inv[3])
  # The guard bounds the inverse slope, as docs/rules/target_propagation.rst says (Guards) (~500 for tanh with e = 1e-3).
  assert float(jnp.max(slope)) <= 1.001 * steepest


def test_asking_an_activation_without_inverse_for_one_is_a_clear_error():
  for act in (nn.get_activation("relu"), nn.get_activation(jax.nn.gelu)):
    with pytest.raises(ValueError, match="has no inverse"):
      act.inverse(jnp.ones(3))
  layer = nn.Dense(3, 3, activation="relu", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'relu' has no inverse"):
    layer.inverse(jnp.ones((2, 3)), reg=1.0)


def test_unknown_activation_name_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown activation 'swish'"):
    nn.Dense(2, 2, activation="swish", rngs=nnx.Rngs(0))


def _square_dense(activation="tanh", n=5, seed=0):
  layer = nn.Dense(n, n, activation=activation, rngs=nnx.Rngs(seed))
  layer.bias[...] = 0.1 * jnp.arange(n, dtype=jnp.float32)
  return layer


@pytest.mark.parametrize("reg", [1e-2, 1.0, 10.0])
@pytest.mark.parametrize("shape", [(5, 5), (3, 7), (7, 3)])
def test_dense_inverse_solves_its_ridge_problem(reg, shape):
  with jax.enable_x64(True):
    layer = nn.Dense(*shape, activation="tanh", rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    target = 0.5 * jnp.tanh(jax.random.normal(jax.random.key(0), (4, shape[1]), jnp.float64))
    x = layer.inverse(target, reg=reg)

    def objective(x):
      return jnp.sum((jnp.arctanh(target) - layer.linear(x)) ** 2) + reg * jnp.sum(x**2)

    grad = jax.grad(objective)(x)
    assert float(jnp.max(jnp.abs(grad))) < 1e-10


def test_dense_inverse_recovers_the_input_as_reg_vanishes():
  with jax.enable_x64(True):
    layer = nn.Dense(5, 5, activation="tanh", rngs=nnx.Rngs(2), param_dtype=jnp.float64)
    x = 0.3 * jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    chex.assert_trees_all_close(layer.inverse(layer(x), reg=1e-12), x, atol=1e-8)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "leaky_relu", "identity"])
def test_linearized_inverse_is_the_jacobian_of_the_exact_one(activation):
  with jax.enable_x64(True):
    layer = nn.Dense(4, 6, activation=activation, rngs=nnx.Rngs(3), param_dtype=jnp.float64)
    x = 0.3 * jax.random.normal(jax.random.key(2), (3, 4), jnp.float64)
    y = layer(x)
    d = 1e-3 * jax.random.normal(jax.random.key(3), y.shape, jnp.float64)
    _, jvp = jax.jvp(lambda v: layer.inverse(v, reg=0.5), (y,), (d,))
    chex.assert_trees_all_close(layer.inverse_linearized(d, y, reg=0.5), jvp, rtol=1e-10, atol=1e-14)
    # and it is the first-order change: the exact difference agrees up to O(|d|^2)
    exact = layer.inverse(y + d, reg=0.5) - layer.inverse(y, reg=0.5)
    gap = float(jnp.linalg.norm(exact - jvp) / jnp.linalg.norm(jvp))
    assert gap < 1e-2


def test_rnn_cell_inverse_solves_its_problem_and_recovers_the_state():
  with jax.enable_x64(True):
    cell = nn.RNNCell(3, 6, rngs=nnx.Rngs(4), param_dtype=jnp.float64)
    h_prev = 0.4 * jax.random.normal(jax.random.key(4), (5, 6), jnp.float64)
    x = jax.random.normal(jax.random.key(5), (5, 3), jnp.float64)
    h = jnp.tanh(cell.linear((h_prev, x)))
    chex.assert_trees_all_close(cell.inverse(h, x, reg=1e-12), h_prev, atol=1e-8)
    for reg in (0.1, 1.0, 10.0):
      solution = cell.inverse(h, x, reg=reg)
      grad = jax.grad(
        lambda g, reg=reg: jnp.sum((jnp.arctanh(h) - cell.linear((g, x))) ** 2) + reg * jnp.sum(g**2)
      )(solution)
      assert float(jnp.max(jnp.abs(grad))) < 1e-10
    # As reg -> 0 the linearized inverse inverts the Jacobian J = D W of the cell.
    d_prev = cell.inverse_linearized(1e-3 * jnp.ones_like(h), h, reg=1e-12)
    d_next = (d_prev @ cell.recurrent_kernel[...]) * (1.0 - h**2)
    chex.assert_trees_all_close(d_next, 1e-3 * jnp.ones_like(h), rtol=1e-8)


def test_a_solver_factored_once_gives_the_same_inverse():
  layer = _square_dense()
  y = layer(jnp.ones((2, 5)))
  solver = layer.ridge_solver(0.3)
  chex.assert_trees_all_close(layer.inverse(y, solver=solver), layer.inverse(y, reg=0.3))
  assert bool(solver.finite)
  with pytest.raises(ValueError, match="exactly one of reg"):
    layer.inverse(y, reg=0.3, solver=solver)
  with pytest.raises(ValueError, match="reg must be a finite number >= 0"):
    layer.inverse(y, reg=-1.0)
  with pytest.raises(ValueError, match="reg must be a finite number >= 0"):
    layer.inverse(y, reg=float("nan"))


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (5, 5)])
def test_an_explicit_solver_is_the_same_ridge_solve_as_one_product(shape):
  from altgrad._linalg import RidgeSolver

  with jax.enable_x64(True):
    kernel = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    z = jax.random.normal(jax.random.key(1), (3, 2, shape[1]), jnp.float64)
    expected = jnp.linalg.solve(kernel @ kernel.T + 0.3 * jnp.eye(shape[0]), kernel @ z.reshape(-1, shape[1]).T).T
    for explicit in (False, True):
      solver = RidgeSolver.create(kernel, 0.3, explicit=explicit)
      assert (solver.projection is not None) == explicit
      chex.assert_trees_all_close(solver(z), expected.reshape(3, 2, shape[0]), rtol=1e-10)


def test_ridge_solver_reports_a_failed_factorization():
  layer = _square_dense()
  layer.kernel[...] = layer.kernel[...].at[0, 0].set(jnp.nan)
  assert not bool(layer.ridge_solver(1.0).finite)


def test_mlp_validates_its_sizes():
  with pytest.raises(ValueError, match="at least an input and an output"):
    nn.MLP((4,), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="altgrad.nn layers"):
    nn.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  model = nn.MLP((4, 8, 2), activation="relu", output_activation="sigmoid", rngs=nnx.Rngs(0))
  assert [layer.activation.name for layer in model.layers] == ["relu", "sigmoid"]
  assert np.all(np.asarray(model(jnp.ones((3, 4)))) > 0)


def test_every_site_is_affine_in_its_matrix(model_kind):
  model = MODELS[model_kind](0)
  x, _ = make_batch(model_kind)
  _, taps = tapped(model, x)
  for site, tap in zip(model.sites(), taps, strict=True):
    rows = site.design(tap.inputs)
    z = tap.preact.reshape(rows.shape[0], -1)
    chex.assert_trees_all_close(rows @ site.matrix(), z, rtol=1e-5, atol=1e-5)


def test_updates_from_matrices_places_each_matrix_in_its_site(model_kind):
  model = MODELS[model_kind](0)
  pure = nn.PureModel(model)
  params = nnx.state(model, nnx.Param)
  matrices = {(nn._sites.site_path(site), 0): 2.0 * site.matrix() for site in pure.bind(params).sites()}
  doubled = pure.updates_from_matrices(params, matrices)
  chex.assert_trees_all_close(doubled, jax.tree.map(lambda p: 2.0 * p, params))


def test_mlp_takes_a_kernel_initializer():
  he = nn.MLP((400, 300, 3), kernel_init=nnx.initializers.he_normal(), rngs=nnx.Rngs(0))
  lecun = nn.MLP((400, 300, 3), rngs=nnx.Rngs(0))
  std = lambda m: float(jnp.std(m.layers[0].kernel[...]))  # noqa: E731
  assert abs(std(he) / np.sqrt(2 / 400) - 1) < 0.05 and abs(std(lecun) / np.sqrt(1 / 400) - 1) < 0.05
