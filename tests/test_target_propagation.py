"""Oracles for target propagation via regularized inversion."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODELS, cosine, flat, tapped
from flax import nnx

from altgrad import data, losses, nn, rules, train

CE = losses.softmax_cross_entropy


def _f64(model):
  return jax.tree.map(lambda p: p.astype(jnp.float64), model)


def _rnn_problem(time=20, hidden=8, seed=0):
  model = _f64(nn.SimpleRNN(2, hidden, 3, rngs=nnx.Rngs(seed)))
  x = jax.random.normal(jax.random.key(seed), (6, time, 2), jnp.float64)
  y = jnp.arange(6) % 3
  return model, nnx.state(model, nnx.Param), (x, y)


def _tp(model, params, batch, loss_fn=CE, **kw):
  tx = rules.target_propagation(model, loss_fn, **kw)
  return tx.update(None, tx.init(params), params, batch=batch)


def _grad(model, params, batch):
  tx = rules.backprop(model, CE)
  return tx.update(None, tx.init(params), params, batch=batch)[0]


def test_through_time_update_is_the_gradient_of_the_surrogate_with_fixed_targets():
  with jax.enable_x64(True):
    model, params, (x, y) = _rnn_problem()
    lr_target = 1e-2
    (d,) = rules.target_displacements(model, CE, params, (x, y), reg=1.0, lr_target=lr_target)
    graphdef, _ = nnx.split(model)
    h = jnp.tanh(tapped(model, x)[1][0].preact)
    targets = h + d

    def surrogate(p):
      _, taps = tapped(model, x, params=p)
      return 0.5 * jnp.sum((jnp.tanh(taps[0].preact) - targets) ** 2)

    want_cell = jax.grad(surrogate)(params)["cell"]
    update, _ = _tp(model, params, (x, y), reg=1.0, lr_target=lr_target)
    chex.assert_trees_all_close(update["cell"], want_cell, rtol=1e-10)
    # the readout always gets its ordinary loss gradient
    chex.assert_trees_all_close(update["readout"], _grad(model, params, (x, y))["readout"], rtol=1e-12)

    # The surrogate's last-step term alone is lr_target times backprop's gradient (docs/rules/target_propagation.rst, Test oracles).
    def last_term(p):
      _, taps = tapped(model, x, params=p)
      return 0.5 * jnp.sum((jnp.tanh(taps[0].preact[:, -1]) - targets[:, -1]) ** 2)

    bp_cell = jax.tree.map(lambda g: lr_target * g, _grad(model, params, (x, y))["cell"])
    chex.assert_trees_all_close(jax.grad(last_term)(params)["cell"], bp_cell, rtol=1e-10)


def test_local_update_is_the_gradient_of_each_layer_loss_at_its_stored_input():
  with jax.enable_x64(True):
    model = _f64(nn.MLP((5, 7, 6, 3), rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64)
    y = jnp.arange(8) % 3
    displacements = rules.target_displacements(model, CE, params, (x, y), reg=0.5)
    update, state = _tp(model, params, (x, y), reg=0.5, update="local")
    _, taps = tapped(model, x)
    for i, (layer, tap, d) in enumerate(zip(model.layers[:-1], taps, displacements, strict=False)):
      target = layer(tap.inputs) + d  # fixed target, stored input

      def layer_loss(kernel, layer=layer, tap=tap, target=target):
        return 0.5 * jnp.sum((jnp.tanh(tap.inputs @ kernel + layer.bias[...]) - target) ** 2)

      chex.assert_trees_all_close(
        update["layers"][i]["kernel"][...], jax.grad(layer_loss)(layer.kernel[...]), rtol=1e-10
      )
      assert float(state.displacement_norms[i]) == pytest.approx(float(jnp.sqrt(jnp.mean(d * d))), rel=1e-6)


def test_large_reg_through_time_tends_to_lr_target_times_backprop():
  with jax.enable_x64(True):
    model, params, batch = _rnn_problem(time=30)
    bp = _grad(model, params, batch)["cell"]
    cos = {
      reg: cosine(_tp(model, params, batch, reg=reg, lr_target=1e-3)[0]["cell"], bp)
      for reg in (1.0, 1e2, 1e5)
    }
    assert cos[1e5] > 0.9999 and cos[1e5] >= cos[1e2] >= cos[1.0] - 1e-3, cos
    update = _tp(model, params, batch, reg=1e5, lr_target=1e-3)[0]["cell"]
    ratio = float(jnp.linalg.norm(flat(update)) / jnp.linalg.norm(flat(bp)))
    assert ratio == pytest.approx(1e-3, rel=1e-2)
    # the local update keeps only the last step's signal: it does not tend to backprop
    local = _tp(model, params, batch, reg=1e5, lr_target=1e-3, update="local")[0]["cell"]
    assert cosine(local, bp) < 0.99


def test_layer_under_the_readout_moves_along_backprop_and_linear_paths_tend_to_it():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(2), (16, 6), jnp.float64)
    y = jnp.arange(16) % 3
    tanh = _f64(nn.MLP((6, 8, 8, 3), rngs=nnx.Rngs(2)))
    params = nnx.state(tanh, nnx.Param)
    update, _ = _tp(tanh, params, (x, y), reg=1e3, update="local")
    grad = _grad(tanh, params, (x, y))
    assert cosine(update["layers"][2], grad["layers"][2]) > 1 - 1e-12  # the readout: its gradient
    assert cosine(update["layers"][1], grad["layers"][1]) > 1 - 1e-12  # just below: lr_target x BP
    linear = _f64(nn.MLP((6, 8, 8, 3), activation="identity", rngs=nnx.Rngs(2)))
    params = nnx.state(linear, nnx.Param)
    update, _ = _tp(linear, params, (x, y), reg=1e3, update="local")
    grad = _grad(linear, params, (x, y))
    assert cosine(update["layers"][0], grad["layers"][0]) > 0.999  # through a linear path, as reg grows


def test_as_reg_vanishes_the_linearized_step_inverts_the_layer_jacobian():
  with jax.enable_x64(True):
    model = _f64(nn.MLP((6, 6, 6, 3), rngs=nnx.Rngs(3)))  # square hidden layers
    params = nnx.state(model, nnx.Param)
    x = 0.5 * jax.random.normal(jax.random.key(3), (4, 6), jnp.float64)
    y = jnp.arange(4) % 3
    below, top = rules.target_displacements(model, CE, params, (x, y), reg=1e-12)
    _, taps = tapped(model, x)
    layer = model.layers[1]
    jacobian_step = (below @ layer.kernel[...]) * layer.activation.derivative(taps[1].preact)
    chex.assert_trees_all_close(jacobian_step, top, rtol=1e-7)


def _saturated_rnn(time):
  model = nn.SimpleRNN(1, 16, 4, rngs=nnx.Rngs(0))
  model.cell.bias[...] = jnp.full(16, 3.0)  # saturates the units (tanh' ~ 0.01); W stays orthogonal
  x = jax.random.uniform(jax.random.key(0), (4, time, 1))
  return model, nnx.state(model, nnx.Param), (x, jnp.arange(4))


@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
def test_long_saturated_sequences_stay_finite_under_a_bound(mode):
  model, params, batch = _saturated_rnn(784)
  update, state = jax.jit(lambda p: _tp(model, p, batch, mode=mode, max_displacement=1.0))(params)
  chex.assert_tree_all_finite((update, state.displacement_norms, _grad(model, params, batch)))
  (d,) = rules.target_displacements(model, CE, params, batch, mode=mode, max_displacement=1.0)
  assert int(state.clipped_displacements) >= 1  # the guard fired, and says so
  assert float(jnp.max(jnp.sqrt(jnp.mean(d * d, axis=2)))) <= 1.0 + 1e-5


def test_without_a_bound_displacements_are_the_reference_until_they_overflow():
  # linearized displacements grow ~100x a step back in time through saturated units: float32
  # overflows within 40 steps, float64 (the reference's values, still in range) does not
  model, params, batch = _saturated_rnn(40)
  update, state = _tp(model, params, batch)
  chex.assert_tree_all_finite(update)
  (d,) = rules.target_displacements(model, CE, params, batch)
  with jax.enable_x64(True):
    (want,) = rules.target_displacements(_f64(model), CE, _f64(params), jax.tree.map(_as_f64, batch))
  assert bool(jnp.all(jnp.isfinite(want)))
  kept = np.any(np.asarray(d) != 0, axis=2)  # (example, time): the guard zeroes an example's whole displacement
  peak = np.max(np.abs(np.asarray(want)), axis=2)
  float32_max = float(jnp.finfo(jnp.float32).max)
  assert not kept.all() and int(state.clipped_displacements) >= 1  # it fired, and says so
  # where float32 kept a displacement it is the reference's; where it dropped one the reference's
  # is beyond float32's range at that step or a later one (zero propagates down through the inverse)
  # (float32 rounding, amplified ~100x a step, leaves ~1% between the two at the bottom)
  d, want = np.asarray(d, np.float64), np.asarray(want)
  gap = np.linalg.norm(d - want, axis=2) / np.linalg.norm(want, axis=2)
  assert gap[np.asarray(kept)].max() < 0.02
  beyond_from_here_up = np.maximum.accumulate((peak > float32_max / 4)[:, ::-1], axis=1)[:, ::-1]
  assert np.all(np.where(kept, peak < float32_max, beyond_from_here_up))


def _as_f64(a):
  return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a


def test_the_guard_leaves_ordinary_displacements_alone():
  with jax.enable_x64(True):
    model, params, batch = _rnn_problem()
    bounded, state = _tp(model, params, batch, max_displacement=1.0)
    default = _tp(model, params, batch)[0]
    chex.assert_trees_all_close(bounded, default)
    assert int(state.clipped_displacements) == 0


def test_difference_and_linearized_agree_to_second_order():
  with jax.enable_x64(True):
    model, params, batch = _rnn_problem()
    gaps = []
    for lr_target in (1e-2, 1e-4):
      (lin,) = rules.target_displacements(model, CE, params, batch, lr_target=lr_target)
      (dif,) = rules.target_displacements(model, CE, params, batch, lr_target=lr_target, mode="difference")
      gaps.append(float(jnp.linalg.norm(dif - lin) / jnp.linalg.norm(lin)))
    assert gaps[1] < gaps[0] / 50  # the relative gap is O(|d|): 100x smaller d, ~100x smaller gap


def test_rejections_are_clear():
  with pytest.raises(ValueError, match="'relu' has no inverse.*or mode='linearized'"):
    rules.target_propagation(nn.MLP((4, 5, 2), activation="relu", rngs=nnx.Rngs(0)), CE, mode="difference")
  with pytest.raises(ValueError, match="at least one hidden layer"):
    rules.target_propagation(nn.MLP((4, 2), rngs=nnx.Rngs(0)), CE)
  for kwargs, message in (
    ({"reg": 0.0}, "reg must be"),
    ({"lr_target": float("nan")}, "lr_target must be"),
    ({"mode": "dtp"}, "mode must be one of"),
    ({"update": "bptt"}, "update must be one of"),
    ({"max_displacement": -1.0}, "max_displacement must be"),
  ):
    with pytest.raises(ValueError, match=message):
      rules.target_propagation(MODELS["mlp"](0), CE, **kwargs)


def test_fit_records_how_often_the_guard_fired():
  task = data.temporal_order(10, num_train=64, num_test=16)
  counts = {}
  for bound in (1e-6, None):  # a bound every displacement exceeds, and no guard
    model = nn.SimpleRNN(6, 8, 4, rngs=nnx.Rngs(0))
    tx = optax.chain(rules.target_propagation(model, CE, max_displacement=bound), optax.sgd(0.1))
    history = train.fit(model, tx, task, loss_fn=CE, epochs=2, batch_size=16, progress=False)
    counts[bound] = history.clipped_displacements
  # cumulative over the steps; at most every example at every step below the top (4 steps an epoch)
  first, second = counts[1e-6]
  assert 0 < first < second <= 2 * first and second <= 16 * 9 * 8
  assert counts[None] == [0, 0]


def _gru_problem(time=6, hidden=5, seed=0):
  model = _f64(nn.GRU(2, hidden, 3, rngs=nnx.Rngs(seed)))
  model.cell.input_bias[...] = 0.5 * jax.random.normal(jax.random.key(seed + 1), (3 * hidden,), jnp.float64)
  model.cell.recurrent_bias[...] = 0.5 * jax.random.normal(jax.random.key(seed + 2), (hidden,), jnp.float64)
  x = jax.random.normal(jax.random.key(seed), (4, time, 2), jnp.float64)
  return model, nnx.state(model, nnx.Param), (x, jnp.arange(4) % 3)


def _numpy_gru_step_inverse(cell, h, x, d, reg):
  """The per-gate linearized inverse of one GRU step, in column form with torch's (out, in)
  matrices: h' = (1 - z) n + z h; d_h = z d + sum over gates of (W^T W + reg)^-1 W^T e_g."""
  hidden = cell.hidden_features
  wi, wh = np.asarray(cell.input_kernel[...]).T, np.asarray(cell.recurrent_kernel[...]).T  # (3 hidden, .)
  bi, bhn = np.asarray(cell.input_bias[...]), np.asarray(cell.recurrent_bias[...])
  gate = lambda k: slice(k * hidden, (k + 1) * hidden)  # noqa: E731
  sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
  r = sigmoid(wi[gate(0)] @ x + bi[gate(0)] + wh[gate(0)] @ h)
  z = sigmoid(wi[gate(1)] @ x + bi[gate(1)] + wh[gate(1)] @ h)
  m = wh[gate(2)] @ h + bhn
  n = np.tanh(wi[gate(2)] @ x + bi[gate(2)] + r * m)

  def ridge(k, e):
    w = wh[gate(k)]
    return np.linalg.solve(w.T @ w + reg * np.eye(hidden), w.T @ e)

  sigmoid_slope = lambda g: np.clip(g, 1e-3, 1 - 1e-3) * (1 - np.clip(g, 1e-3, 1 - 1e-3))  # noqa: E731
  candidate = (1 - z) * (1 - n**2) * d
  return z * d + ridge(1, (h - n) * d / sigmoid_slope(z)) + ridge(0, m * candidate / sigmoid_slope(r)) + ridge(2, r * candidate)


def test_gru_displacements_follow_the_per_gate_inverse_step_by_step():
  with jax.enable_x64(True):
    model, params, (x, y) = _gru_problem()
    reg = 0.5
    (d,) = rules.target_displacements(model, CE, params, (x, y), reg=reg, lr_target=0.1)
    h_prev, h = model.states(x)
    top = -0.1 * jax.grad(lambda s: jnp.mean(CE(model.readout(s), y)))(h[:, -1])
    chex.assert_trees_all_close(d[:, -1], top, rtol=1e-12)
    want = np.asarray(top[1])  # one example: the batch is handled row by row
    for t in range(x.shape[1] - 1, 0, -1):  # step t + 1 (0-based t) carries d_t back to d_{t-1}
      want = _numpy_gru_step_inverse(model.cell, np.asarray(h_prev[1, t]), np.asarray(x[1, t]), want, reg)
      np.testing.assert_allclose(d[1, t - 1], want, rtol=1e-9, atol=1e-15)


def test_gru_updates_are_the_surrogates_gradients_and_large_reg_leaves_the_direct_path():
  with jax.enable_x64(True):
    model, params, (x, y) = _gru_problem()
    for update in ("through_time", "local"):
      got, state = _tp(model, params, (x, y), reg=2.0, lr_target=1e-2, update=update)
      (d,) = rules.target_displacements(model, CE, params, (x, y), reg=2.0, lr_target=1e-2)
      h_prev, h = model.states(x)
      targets = h + d

      def surrogate(p, update=update, h_prev=h_prev, targets=targets):
        bound = nnx.merge(nnx.graphdef(model), p)
        states = bound.states(x)[1] if update == "through_time" else bound.cell(h_prev, x)
        return 0.5 * jnp.sum((states - targets) ** 2)

      chex.assert_trees_all_close(got["cell"], jax.grad(surrogate)(params)["cell"], rtol=1e-10, atol=1e-14)
      chex.assert_trees_all_close(got["readout"], _grad(model, params, (x, y))["readout"], rtol=1e-12)
      assert state.displacement_norms[0] > 0
    # as reg grows the gates' inverses vanish and only the direct path z h carries displacements
    # back: d_{t-1} = z_t d_t (so, unlike the SimpleRNN's, the update does not tend to BPTT's)
    (d,) = rules.target_displacements(model, CE, params, (x, y), reg=1e14, lr_target=1e-2)
    z = model.cell.gates(h_prev, x).update
    chex.assert_trees_all_close(d[:, :-1], z[:, 1:] * d[:, 1:], rtol=1e-8, atol=1e-17)


def test_tp_trains_a_gru_and_refuses_modes_it_has_no_inverse_for():
  task = data.temporal_order(10, num_train=96, num_test=32)
  model = nn.GRU(6, 16, 4, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.target_propagation(model, CE, reg=1.0, lr_target=1e-2), optax.sgd(0.5))
  history = train.fit(model, tx, task, loss_fn=CE, epochs=3, batch_size=16, progress=False)
  assert history.train_loss[-1] < history.train_loss[0]
  assert history.clipped_displacements == [0, 0, 0]
  for mode in ("difference", "exact"):
    with pytest.raises(ValueError, match="GRU gate by gate"):
      rules.target_propagation(model, CE, mode=mode)


def _per_step_problem(kind, time=6, hidden=5, seed=0):
  rngs = nnx.Rngs(seed)
  model = nn.SimpleRNN(2, hidden, 3, sequence_output=True, rngs=rngs) if kind == "rnn" else nn.GRU(
    2, hidden, 3, sequence_output=True, rngs=rngs
  )
  x = jax.random.normal(jax.random.key(seed), (4, time, 2), jnp.float64)
  y = jax.random.randint(jax.random.key(seed + 1), (4, time), 0, 3)
  model = _f64(model)
  return model, nnx.state(model, nnx.Param), (x, y)


SEQUENCE_CE = losses.over_time(CE)


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_a_readout_at_every_step_gives_every_state_its_own_displacement(kind):
  with jax.enable_x64(True):
    model, params, (x, y) = _per_step_problem(kind)
    lr_target, reg = 1e-2, 0.7
    (d,) = rules.target_displacements(model, SEQUENCE_CE, params, (x, y), reg=reg, lr_target=lr_target)
    h_prev, h = model.states(x) if kind == "gru" else (None, jnp.tanh(tapped(model, x)[1][0].preact))
    own = -lr_target * jax.grad(lambda s: jnp.mean(SEQUENCE_CE(model.readout(s), y)))(h)
    if kind == "rnn":
      carried = model.cell.inverse_linearized(d[:, 1:], h[:, 1:], reg=reg)
    else:
      solvers = model.cell.ridge_solvers(reg)
      carried = model.cell.inverse_linearized(d[:, 1:], h_prev[:, 1:], model.cell.gates(h_prev[:, 1:], x[:, 1:]), solvers)
    chex.assert_trees_all_close(d[:, -1], own[:, -1], rtol=1e-12)
    chex.assert_trees_all_close(d[:, :-1], carried + own[:, :-1], rtol=1e-9, atol=1e-15)
    if kind == "rnn":  # as reg grows only each step's own displacement is left: lr_target times BPTT
      update, _ = _tp(model, params, (x, y), SEQUENCE_CE, reg=1e12, lr_target=lr_target)
      tx = rules.backprop(model, SEQUENCE_CE)
      gradient = tx.update(None, tx.init(params), params, batch=(x, y))[0]
      chex.assert_trees_all_close(update["cell"], jax.tree.map(lambda g: lr_target * g, gradient["cell"]), rtol=1e-8)


def test_fit_trains_and_scores_a_readout_at_every_step():
  tokens = jax.random.randint(jax.random.key(0), (96, 8), 0, 4)
  x = np.asarray(jax.nn.one_hot(tokens, 4), np.float32)
  y = np.asarray(jnp.roll(tokens, 1, axis=1))  # the previous token (the first step: the last one)
  task = data.Dataset(x[:64], y[:64], x[64:], y[64:], 4, "previous token")
  model = nn.SimpleRNN(4, 16, 4, sequence_output=True, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.target_propagation(model, SEQUENCE_CE, reg=1.0, lr_target=0.1), optax.sgd(0.5))
  history = train.fit(model, tx, task, loss_fn=SEQUENCE_CE, epochs=4, batch_size=16, progress=False)
  assert history.train_loss[-1] < history.train_loss[0]
  assert 0.5 < history.test_accuracy[-1] <= 1.0  # per step: 7 of 8 steps are predictable, chance 0.25
