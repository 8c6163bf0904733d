"""Flax's own recurrent models with every rule: ``nnx.RNN`` over each of Flax's cells,
``nnx.Bidirectional``, and a cell stepped in the user's own Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cosine, flat, make_rule
from flax import nnx

from altgrad import data, losses, nn, rules, train
from altgrad.nn import _cells
from altgrad.nn._sites import SiteError

CE = losses.softmax_cross_entropy
GRADIENT_RULES = ("backprop", "consequentialism", "np", "inp", "anp")
CELLS = {"simple": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": nnx.LSTMCell, "optimized_lstm": nnx.OptimizedLSTMCell}


class Classifier(nnx.Module):
  """A Flax RNN (or two, read both ways) and a linear head on its last output."""

  def __init__(self, cell: str, rngs: nnx.Rngs, *, bidirectional: bool = False, features: int = 3, hidden: int = 6):
    make = lambda: CELLS[cell](features, hidden, rngs=rngs)  # noqa: E731
    self.rnn = nnx.Bidirectional(nnx.RNN(make()), nnx.RNN(make())) if bidirectional else nnx.RNN(make())
    self.head = nnx.Linear(hidden * (2 if bidirectional else 1), 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.rnn(x)[:, -1])


class Loop(nnx.Module):
  """A cell stepped in the user's own Python loop."""

  def __init__(self, rngs: nnx.Rngs):
    self.cell = nnx.LSTMCell(3, 6, rngs=rngs)
    self.head = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    carry = self.cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
    for t in range(x.shape[1]):
      carry, out = self.cell(carry, x[:, t])
    return self.head(out)


MODELS = {
  **{name: lambda rngs, name=name: Classifier(name, rngs) for name in CELLS},
  "bidirectional_gru": lambda rngs: Classifier("gru", rngs, bidirectional=True),
  "python_loop": Loop,
}


def _batch(seed=0, batch=6, time=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, time, 3)), jnp.float32), jnp.arange(batch) % 4


def _update(tx, params, batch):
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, tx.init(params), batch)[0]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_rule_on_flax_recurrent_models(kind):
  """Backprop equals ``nnx.grad`` (through the scan, both directions, or the user's loop); every
  other rule updates every param of the cell and the head, finitely."""
  model = MODELS[kind](nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  batch = _batch()
  grad = nnx.state(nnx.grad(lambda m: jnp.mean(CE(m(batch[0]), batch[1])))(model), nnx.Param)
  for name in GRADIENT_RULES:
    updates = _update(make_rule(name, model), params, batch)
    chex.assert_tree_all_finite(updates)
    if name == "backprop":
      chex.assert_trees_all_close(nnx.as_pure(updates), nnx.as_pure(grad), atol=1e-6)
    else:
      assert all(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates)), name


def _flax_copy_of(ours: nn.SimpleRNN) -> Classifier:
  """``nnx.RNN(nnx.SimpleCell)`` and a head with the weights of altgrad's SimpleRNN."""
  theirs = Classifier("simple", nnx.Rngs(1), hidden=ours.cell.hidden_features)
  cell = theirs.rnn.cell
  cell.dense_i.kernel[...], cell.dense_i.bias[...] = ours.cell.input_kernel[...], ours.cell.bias[...]
  cell.dense_h.kernel[...] = ours.cell.recurrent_kernel[...]
  theirs.head.kernel[...], theirs.head.bias[...] = ours.readout.kernel[...], ours.readout.bias[...]
  return theirs


@pytest.mark.parametrize("rule_name", ["backprop", "consequentialism"])
def test_a_flax_simple_cell_gets_altgrad_rnn_cells_update(rule_name):
  """CW emends the cell's two layers as one (they add into one pre-activation), on every time
  step's input: the update of altgrad's SimpleRNN, whose cell is one site ``[h, x, 1] W``."""
  ours = nn.SimpleRNN(3, 6, 4, rngs=nnx.Rngs(0))
  ours.cell.bias[...] = jnp.full((6,), 0.1)
  theirs = _flax_copy_of(ours)
  batch = _batch()
  np.testing.assert_allclose(theirs(batch[0]), ours(batch[0]), atol=1e-6)
  expected = _update(make_rule(rule_name, ours), nnx.state(ours, nnx.Param), batch)
  got = _update(make_rule(rule_name, theirs), nnx.state(theirs, nnx.Param), batch)
  cell = got["rnn"]["cell"]
  pairs = [
    (cell["dense_h"]["kernel"], expected["cell"]["recurrent_kernel"]),
    (cell["dense_i"]["kernel"], expected["cell"]["input_kernel"]),
    (cell["dense_i"]["bias"], expected["cell"]["bias"]),
    (got["head"]["kernel"], expected["readout"]["kernel"]),
  ]
  for a, b in pairs:
    np.testing.assert_allclose(a[...], b[...], atol=2e-6)


def test_node_perturbation_draws_noise_at_every_step():
  """NP's noise enters every step's pre-activations independently: the mean of many estimates
  is the gradient through time (float64, small sigma)."""
  with jax.enable_x64(True):
    model = Classifier("simple", nnx.Rngs(0), hidden=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    model = nnx.merge(graphdef, params, rest)
    x, y = _batch()
    batch = (x.astype(jnp.float64), y)
    mean = _update(rules.node_perturbation(model, CE, variant="np", sigma=1e-4, samples=4000), params, batch)
    grad = _update(rules.backprop(model, CE), params, batch)
    assert cosine(mean, grad) > 0.98
    taps = nn.PureModel(model).tapped(params, batch[0]).taps
    assert [t.preact.shape for t in taps[:2]] == [(6, 3, 4)] * 2  # (batch, time, hidden): a node per step
    assert flat(mean).dtype == jnp.float64


# --- Target propagation through Flax's cells ------------------------------------------------


def _flax_gru_copy_of(ours: nn.GRU) -> Classifier:
  """``nnx.RNN(nnx.GRUCell)`` and a head with the weights of altgrad's GRU (whose candidate's
  state bias, which Flax's cell has not, is zero)."""
  theirs = Classifier("gru", nnx.Rngs(1), hidden=ours.cell.hidden_features)
  cell = theirs.rnn.cell
  cell.dense_i.kernel[...], cell.dense_i.bias[...] = ours.cell.input_kernel[...], ours.cell.input_bias[...]
  cell.dense_h.kernel[...] = ours.cell.recurrent_kernel[...]
  theirs.head.kernel[...], theirs.head.bias[...] = ours.readout.kernel[...], ours.readout.bias[...]
  return theirs


def _altgrad_and_flax(cell: str):
  if cell == "simple":
    ours = nn.SimpleRNN(3, 6, 4, rngs=nnx.Rngs(0))
    ours.cell.bias[...] = jnp.full((6,), 0.1)
    return ours, _flax_copy_of(ours), {"recurrent_kernel": ("dense_h", "kernel"), "input_kernel": ("dense_i", "kernel"), "bias": ("dense_i", "bias")}
  ours = nn.GRU(3, 6, 4, rngs=nnx.Rngs(0))
  ours.cell.input_bias[...] = 0.3 * jax.random.normal(jax.random.key(5), ours.cell.input_bias.shape)
  names = {"recurrent_kernel": ("dense_h", "kernel"), "input_kernel": ("dense_i", "kernel"), "input_bias": ("dense_i", "bias")}
  return ours, _flax_gru_copy_of(ours), names


@pytest.mark.parametrize(
  "cell, options",
  [("simple", {}), ("simple", {"update": "local"}), ("simple", {"mode": "difference"}), ("gru", {}), ("gru", {"update": "local"})],
)
def test_target_propagation_inverts_flax_cells_as_altgrads_own(cell, options):
  """One mechanism: TP on ``nnx.RNN(nnx.SimpleCell)`` is TP on altgrad's SimpleRNN (the cell in
  closed form, every mode), on ``nnx.RNN(nnx.GRUCell)`` TP on altgrad's GRU (gate by gate), for
  the same weights, whichever update."""
  ours, theirs, names = _altgrad_and_flax(cell)
  batch = _batch()
  np.testing.assert_allclose(theirs(batch[0]), ours(batch[0]), atol=1e-6)
  tp = lambda m: _update(rules.target_propagation(m, CE, **options), nnx.state(m, nnx.Param), batch)  # noqa: E731
  expected, got = tp(ours), tp(theirs)
  for ours_name, (layer, param) in names.items():
    np.testing.assert_allclose(got["rnn"]["cell"][layer][param][...], expected["cell"][ours_name][...], atol=1e-6)
  np.testing.assert_allclose(got["head"]["kernel"][...], expected["readout"]["kernel"][...], atol=1e-6)
  assert float(jnp.max(jnp.abs(expected["cell"]["input_kernel"][...]))) > 1e-4


def _lstm_pair():
  """``nnx.LSTMCell`` and ``nnx.OptimizedLSTMCell`` with the same weights, gates side by side."""
  plain, optimized = Classifier("lstm", nnx.Rngs(0)), Classifier("optimized_lstm", nnx.Rngs(1))
  a, b = plain.rnn.cell, optimized.rnn.cell
  side_by_side = lambda names, what: jnp.concatenate([getattr(getattr(a, n), what)[...] for n in names], axis=-1)  # noqa: E731
  b.dense_i.kernel[...] = side_by_side(("ii", "if_", "ig", "io"), "kernel")
  b.dense_h.kernel[...] = side_by_side(("hi", "hf", "hg", "ho"), "kernel")
  b.dense_h.bias[...] = side_by_side(("hi", "hf", "hg", "ho"), "bias")
  optimized.head.kernel[...], optimized.head.bias[...] = plain.head.kernel[...], plain.head.bias[...]
  return plain, optimized


@pytest.mark.parametrize("update", ["through_time", "local"])
def test_target_propagation_inverts_both_flax_lstm_layouts_alike(update):
  """The LSTM inverse (a reconstruction, ``altgrad.nn._cells.LSTMCellSteps``) reads the same
  gates from ``LSTMCell``'s eight layers as from ``OptimizedLSTMCell``'s two, and its memory,
  recomputed from the gates, is the cell's own."""
  plain, optimized = _lstm_pair()
  batch = _batch()
  np.testing.assert_allclose(plain(batch[0]), optimized(batch[0]), atol=1e-6)
  a = _update(rules.target_propagation(plain, CE, update=update), nnx.state(plain, nnx.Param), batch)["rnn"]["cell"]
  b = _update(rules.target_propagation(optimized, CE, update=update), nnx.state(optimized, nnx.Param), batch)["rnn"]["cell"]
  kernels = jnp.concatenate([a[name]["kernel"][...] for name in ("hi", "hf", "hg", "ho")], axis=-1)
  np.testing.assert_allclose(kernels, b["dense_h"]["kernel"][...], atol=1e-8)
  assert float(jnp.max(jnp.abs(kernels))) > 1e-5
  # the memory: c_t of the cell stepped by hand against c_t from the recorded gates
  cell = plain.rnn.cell
  taps = nn.PureModel(plain).tapped(nnx.state(plain, nnx.Param), batch[0]).taps
  steps = _cells.cell_steps(cell, {tap.path[-1]: tap for tap in taps[:-1]})
  carry = cell.initialize_carry(batch[0][:, 0].shape, nnx.Rngs(0))
  for t in range(batch[0].shape[1]):
    carry, _ = cell(carry, batch[0][:, t])
    np.testing.assert_allclose(steps.steps("linearized")[5][:, t], carry[0], atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_target_propagation_trains_flax_rnns_on_the_temporal_order_task(cell):
  task = data.temporal_order(10, num_train=96, num_test=32)
  model = Classifier(cell, nnx.Rngs(0), features=task.input_shape[1], hidden=16)
  model.head = nnx.Linear(16, task.output_size, rngs=nnx.Rngs(3))
  tx = optax.chain(rules.target_propagation(model, CE, reg=1.0, lr_target=1e-2), optax.sgd(0.5))
  history = train.fit(model, tx, task, loss_fn=CE, epochs=3, batch_size=16, progress=False)
  assert history.train_loss[-1] < history.train_loss[0] - 0.02
  assert history.clipped_displacements == [0, 0, 0]


class Stacked(nnx.Module):
  """An RNN under a hidden layer and a readout: the chain above the RNN takes targets down to its states."""

  def __init__(self, rngs, dtype=jnp.float32, cell=nnx.SimpleCell):
    self.rnn = nnx.RNN(cell(3, 5, dtype=dtype, param_dtype=dtype, rngs=rngs))
    self.hidden = nnx.Linear(5, 4, param_dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(4, 4, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(self.rnn(x)[:, -1])))


@pytest.mark.parametrize("cell", [nnx.SimpleCell, nnx.GRUCell, nnx.LSTMCell])
def test_target_propagation_through_layers_above_an_rnn_is_the_surrogates_gradient(cell):
  """Through time, the update of the cell and the layer above it is the gradient of
  ``sum 0.5 ||h - (h + d)||^2`` over the RNN's states and the hidden layer, the displacements
  held fixed (the cell's errors come from TP's own sweep back in time, not from a backward pass
  through the RNN's scan); the readout gets its loss gradient (float64)."""
  with jax.enable_x64(True):
    model = Stacked(nnx.Rngs(0), jnp.float64, cell)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = _batch()
    x = x.astype(jnp.float64)
    states, hidden = rules.target_displacements(model, CE, params, (x, y), reg=0.5)
    assert states.shape == (6, 3, 5) and hidden.shape == (6, 4)

    def surrogate(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      h = m.rnn(x)
      a = jnp.tanh(m.hidden(h[:, -1]))
      return 0.5 * jnp.sum((h - jax.lax.stop_gradient(h + states)) ** 2) + 0.5 * jnp.sum(
        (a - jax.lax.stop_gradient(a + hidden)) ** 2
      )

    want = jax.grad(surrogate)(params)
    got = _update(rules.target_propagation(model, CE, reg=0.5), params, (x, y))
    chex.assert_trees_all_close(got["rnn"], want["rnn"], rtol=1e-8, atol=1e-14)
    chex.assert_trees_all_close(got["hidden"], want["hidden"], rtol=1e-8, atol=1e-14)
    grad = _update(rules.backprop(model, CE), params, (x, y))
    chex.assert_trees_all_close(got["head"], grad["head"], rtol=1e-10)


class Below(nnx.Module):
  def __init__(self, rngs):
    self.project = nnx.Linear(3, 3, rngs=rngs)
    self.rnn = nnx.RNN(nnx.GRUCell(3, 4, rngs=rngs))
    self.head = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.rnn(self.project(x))[:, -1])


def test_target_propagation_names_the_recurrence_it_cannot_invert_and_what_works():
  tp = lambda model, **kw: rules.target_propagation(model, CE, **kw)  # noqa: E731
  with pytest.raises(SiteError, match=r"inverts one nnx.RNN at the bottom of the model; Classifier has 2 .*nnx.Bidirectional is two"):
    tp(MODELS["bidirectional_gru"](nnx.Rngs(0)))
  with pytest.raises(SiteError, match=r"cell \(flax.LSTMCell\) is stepped by the model's own code: wrap it, nnx.RNN\(cell\)"):
    tp(Loop(nnx.Rngs(0)))
  with pytest.raises(SiteError, match=r"inverts rnn/cell \(flax.GRUCell\) gate by gate, linearized .* use mode='linearized'"):
    tp(MODELS["gru"](nnx.Rngs(0)), mode="difference")
  relu = Classifier("simple", nnx.Rngs(0))
  relu.rnn.cell.activation_fn = jax.nn.relu
  with pytest.raises(SiteError, match=r"with tanh activations and sigmoid gates \(Flax's defaults\)"):
    tp(relu)
  model = Classifier("gru", nnx.Rngs(0))
  model.rnn.reverse = True
  with pytest.raises(SiteError, match=r"nnx.RNN at rnn, forward over a batch-first sequence .* runs with reverse"):
    _update(tp(model), nnx.state(model, nnx.Param), _batch())
  model = Below(nnx.Rngs(0))
  with pytest.raises(SiteError, match=r"inverts an nnx.RNN at the bottom .* but project \(flax.Linear\) runs below it"):
    _update(tp(model), nnx.state(model, nnx.Param), _batch())
