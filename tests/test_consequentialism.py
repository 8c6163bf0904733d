"""Oracles for the consequentialism (mini-batch NLMS) rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODELS, make_batch
from flax import nnx

from altgrad import losses, nn, rules
from altgrad.rules._consequentialism import emend


def _update(model, batch, loss_fn=losses.softmax_cross_entropy, **kw):
  tx = rules.consequentialism(model, loss_fn, **kw)
  params = nnx.state(model, nnx.Param)
  return tx.update(None, tx.init(params), params, batch=batch)[0]


def _bp_errors(model, batch, loss_fn=losses.softmax_cross_entropy):
  pure = nn.PureModel(model)
  params = nnx.state(model, nnx.Param)
  _, _, taps, errors, *_ = pure.errors(params, *batch, loss_fn)
  return taps, errors


def _f64_mlp(sizes, seed=0, activation="tanh"):
  model = nn.MLP(sizes, activation=activation, rngs=nnx.Rngs(seed))
  return jax.tree.map(lambda p: p.astype(jnp.float64), model)


@pytest.mark.parametrize("eps, eps_mode", [(0.3, "absolute"), (1.0, "relative")])
def test_batch_of_one_is_nlms_in_every_layer(eps, eps_mode):
  with jax.enable_x64(True):
    model = _f64_mlp((5, 7, 3))
    x = jax.random.normal(jax.random.key(0), (1, 5), jnp.float64)
    y = jnp.array([2])
    update = _update(model, (x, y), eps=eps, eps_mode=eps_mode)
    taps, errors = _bp_errors(model, (x, y))
    for i, (tap, delta) in enumerate(zip(taps, errors, strict=True)):
      xa = jnp.append(tap.inputs[0], 1.0)  # input with the bias folded in
      ridge = eps * (xa @ xa) if eps_mode == "relative" else eps
      step = jnp.outer(xa, delta[0]) / (ridge + xa @ xa)
      chex.assert_trees_all_close(update["layers"][i]["kernel"][...], step[:-1], rtol=1e-12)
      chex.assert_trees_all_close(update["layers"][i]["bias"][...], step[-1], rtol=1e-12)


def test_diag_variant_is_the_sum_of_per_example_nlms_steps():
  with jax.enable_x64(True):
    model = _f64_mlp((5, 4))
    x, y = make_batch("mlp", batch_size=6)
    x = jnp.asarray(x[:, :5], jnp.float64)
    update = _update(model, (x, y[:]), eps=0.5, eps_mode="absolute", diag=True)
    taps, errors = _bp_errors(model, (x, y))
    xa = jnp.concatenate([x, jnp.ones((6, 1))], axis=1)
    delta = 6 * errors[0]  # errors of the summed loss
    steps = sum(jnp.outer(xa[i], delta[i]) / (0.5 + xa[i] @ xa[i]) for i in range(6))
    chex.assert_trees_all_close(update["layers"][0]["kernel"][...], steps[:-1], rtol=1e-12)


def test_the_step_moves_each_example_by_its_own_error_without_interference():
  # B = 16 <= n + 1 = 65, small eps: X dW = D exactly (affine projection); BP's step interferes.
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64)) * rng.uniform(0.1, 10, 64))  # badly scaled inputs
    d = jnp.asarray(rng.normal(size=(16, 10)))
    rows = jnp.concatenate([x, jnp.ones((16, 1))], axis=1)
    cw = emend(rows, d, eps=1e-3, eps_mode="absolute")
    residual = float(jnp.linalg.norm(rows @ cw - d) / jnp.linalg.norm(d))
    bp_residual = float(jnp.linalg.norm(rows @ (rows.T @ d) - d) / jnp.linalg.norm(d))
    assert residual < 1e-4 and bp_residual > 10
    # The update stays bounded: CW never multiplies by the inverse Gram outside the batch's span.
    assert float(jnp.linalg.norm(cw)) < 10 * float(jnp.linalg.norm(jnp.linalg.pinv(rows) @ d))


@pytest.mark.parametrize("rows_count", [8, 200])
def test_dual_and_primal_forms_agree(rows_count):
  rng = np.random.default_rng(1)
  rows = np.concatenate([rng.normal(size=(rows_count, 40)), np.ones((rows_count, 1))], axis=1)
  d = rng.normal(size=(rows_count, 5))
  with jax.enable_x64(True):
    reference = emend(jnp.asarray(rows), jnp.asarray(d), eps=1.0, form="dual")
    chex.assert_trees_all_close(
      emend(jnp.asarray(rows), jnp.asarray(d), eps=1.0, form="primal"), reference, rtol=1e-10
    )
  # float32 at the smallest ridge the spec recommends (1e-3 tr(K)/B): the side "auto" picks
  # (the smaller, full-rank Gram) is accurate to ~1e-7; the other side's Gram is rank-deficient
  # and loses ~1e-4 to 1e-3 (docs/rules/consequentialism.rst, Precision), which is why auto never picks it.
  with jax.enable_x64(True):
    want = np.asarray(emend(jnp.asarray(rows), jnp.asarray(d), eps=1e-3, form="dual"))
  other = "primal" if rows_count < 41 else "dual"
  for form, bound in (("auto", 1e-5), (other, 2e-3)):
    got = np.asarray(emend(jnp.asarray(rows, jnp.float32), jnp.asarray(d, jnp.float32), eps=1e-3, form=form))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound, form


def test_large_eps_tends_to_a_scaled_gradient():
  with jax.enable_x64(True):
    model = _f64_mlp((6, 8, 3))
    x, y = make_batch("mlp", batch_size=10)
    x = jnp.asarray(x, jnp.float64)
    eps = 1e9
    update = _update(model, (x, y), eps=eps, eps_mode="absolute")
    tx = rules.backprop(model, losses.softmax_cross_entropy)
    params = nnx.state(model, nnx.Param)
    grad, _ = tx.update(None, tx.init(params), params, batch=(x, y))
    chex.assert_trees_all_close(jax.tree.map(lambda u: u * eps / 10, update), grad, rtol=1e-6)


def test_conv_update_matches_explicit_patches():
  with jax.enable_x64(True):
    conv = nn.Conv(2, 3, (3, 2), strides=(2, 1), padding="VALID", activation="tanh", rngs=nnx.Rngs(0))
    model = nn.Sequential(conv, nn.Flatten(), nn.Dense(3 * 3 * 4, 3, activation="identity", rngs=nnx.Rngs(1)))
    model = jax.tree.map(lambda p: p.astype(jnp.float64), model)
    x = jax.random.normal(jax.random.key(0), (4, 7, 5, 2), jnp.float64)
    y = jnp.array([0, 1, 2, 1])
    update = _update(model, (x, y), eps=0.7, eps_mode="absolute")
    taps, errors = _bp_errors(model, (x, y))
    # Explicit patches, features in the kernel's own (kh, kw, in) order, plus the bias.
    patches, deltas = [], []
    for b in range(4):
      for i in range(3):
        for j in range(4):
          patches.append(np.append(np.asarray(x[b, 2 * i : 2 * i + 3, j : j + 2, :]).ravel(), 1.0))
          deltas.append(4 * np.asarray(errors[0][b, i, j]))
    X, D = np.array(patches), np.array(deltas)
    expected = np.linalg.solve(X.T @ X + 0.7 * np.eye(X.shape[1]), X.T @ D)
    kernel = np.asarray(update["layers"][0]["kernel"][...]).reshape(-1, 3)
    np.testing.assert_allclose(kernel, expected[:-1], rtol=1e-9)
    np.testing.assert_allclose(update["layers"][0]["bias"][...], expected[-1], rtol=1e-9)


def test_primal_statistics_add_over_micro_batches():
  # The primal form needs only sums over rows (X^T X, X^T D, sum ||x||^2): micro-batches and
  # devices add them up and give the full batch's update.
  rng = np.random.default_rng(2)
  rows = jnp.asarray(np.concatenate([rng.normal(size=(96, 20)), np.ones((96, 1))], axis=1), jnp.float32)
  d = jnp.asarray(rng.normal(size=(96, 4)), jnp.float32)
  full = emend(rows, d, eps=0.5, form="primal")
  parts = [(rows[i : i + 32], d[i : i + 32]) for i in (0, 32, 64)]
  gram = sum(r.T @ r for r, _ in parts)
  cross = sum(r.T @ e for r, e in parts)
  ridge = 0.5 * sum(jnp.sum(r * r) for r, _ in parts) / 96
  chex.assert_trees_all_close(full, jnp.linalg.solve(gram + ridge * jnp.eye(21), cross), rtol=1e-4, atol=1e-6)


def test_recurrent_cell_stacks_every_time_step():
  model = MODELS["rnn"](0)
  batch = make_batch("rnn", batch_size=4)
  update = _update(model, batch, form="primal")
  dual = _update(model, batch, form="dual")
  chex.assert_trees_all_close(update, dual, rtol=2e-3, atol=1e-5)
  taps, errors = _bp_errors(model, batch)
  rows = model.cell.design(taps[0].inputs)
  assert rows.shape == (4 * 7, 8 + 3 + 1)


@pytest.mark.parametrize(
  "optimizer",
  [
    optax.sgd(0.5),
    optax.sgd(0.2, momentum=0.9),
    optax.sgd(0.2, momentum=0.9, nesterov=True),
    optax.rmsprop(1e-2),
    optax.adam(1e-2),
  ],
)
def test_composes_with_optimizers_and_descends(optimizer):
  model = MODELS["mlp"](0)
  x, y = make_batch("mlp", batch_size=32)
  tx = optax.chain(rules.consequentialism(model, losses.softmax_cross_entropy), optimizer)
  graphdef = nnx.graphdef(model)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=(x, y)))
  loss = lambda p: float(jnp.mean(losses.softmax_cross_entropy(nnx.merge(graphdef, p)(x), y)))  # noqa: E731
  before = loss(params)
  for _ in range(20):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.7 * before


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"eps": 0.0}, "eps must be"),
    ({"eps": float("nan")}, "eps must be"),
    ({"eps": -1.0}, "eps must be"),
    ({"form": "woodbury"}, "form must be"),
    ({"eps_mode": "rel"}, "eps_mode must be"),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rules.consequentialism(MODELS["mlp"](0), losses.softmax_cross_entropy, **kwargs)
