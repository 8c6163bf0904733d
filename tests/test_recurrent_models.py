"""Flax's own recurrent models with every rule: ``nnx.RNN`` over each of Flax's cells,
``nnx.Bidirectional``, and a cell stepped in the user's own Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cosine, flat, make_rule
from flax import nnx

from altgrad import losses, nn, rules

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
