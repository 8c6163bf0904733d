"""One suite, every rule: the optax contract of docs/rules/common.rst."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import MODELS, make_batch, make_rule
from flax import nnx

from altgrad import losses, nn, rules

RULE_NAMES = sorted(rules.RULES)
# Model families a rule cannot handle: it must say so at construction.
UNSUPPORTED = {("er", "rnn"), ("fa", "rnn"), ("sign", "rnn"), ("kp", "rnn"), ("dfa", "rnn"), ("drtp", "rnn")}
CONSTRUCTOR = {
  "tp": "target_propagation",
  "er": "expectation_reflection",
  **dict.fromkeys(("fa", "sign", "kp"), "feedback_alignment"),
  **dict.fromkeys(("dfa", "drtp"), "direct_feedback_alignment"),
}


def _setup(rule_name, kind, seed=0, **options):
  model = MODELS[kind](seed)
  if (rule_name, kind) in UNSUPPORTED:
    with pytest.raises(TypeError, match=CONSTRUCTOR[rule_name]):
      make_rule(rule_name, model, losses.softmax_cross_entropy)
    pytest.skip(f"{rule_name} does not handle {kind} models (and says so)")
  tx = make_rule(rule_name, model, losses.softmax_cross_entropy, **options)
  return model, tx, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_incoming_updates_are_ignored(rule_name):
  _, tx, params = _setup(rule_name, "mlp")
  state = tx.init(params)
  batch = make_batch("mlp")
  a, _ = tx.update(None, state, params, batch=batch)
  b, _ = tx.update(jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params), state, params, batch=batch)
  chex.assert_trees_all_close(a, b)


#: Forward gradients' estimates have the variance of a random direction (n + 1 times the
#: gradient's squared norm): several directions a step, for 30 steps to lower the loss.
DESCENT_OPTIONS = {"fg": {"samples": 64}, "fga": {"samples": 8}}


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_jitted_chain_compiles_once_updates_like_the_params_and_lowers_the_loss(rule_name, model_kind):
  """The rule's update (through the optimizer after it) has the params' structure, shapes and
  dtypes and is finite; in a jitted ``optax.chain`` it compiles once and 30 steps lower the loss."""
  model, rule, params = _setup(rule_name, model_kind, **DESCENT_OPTIONS.get(rule_name, {}))
  tx = optax.chain(
    rule, optax.sgd(rules.OWN_STEP[rule_name]) if rule_name in rules.OWN_STEP else optax.adam(1e-2)
  )
  x, y = make_batch(model_kind, batch_size=32)
  graphdef = nnx.graphdef(model)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state, updates

  def loss(params):
    return float(jnp.mean(losses.softmax_cross_entropy(nnx.merge(graphdef, params)(x), y)))

  state = tx.init(params)
  before = loss(params)
  for i in range(30):
    params, state, updates = step(params, state)
    if i == 0:  # the optimizer after the rule keeps its update's structure, shapes and dtypes
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      chex.assert_tree_all_finite(updates)
      assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert len(traces) == 1
  chex.assert_tree_all_finite(params)
  chex.assert_trees_all_equal_dtypes(params, nnx.state(model, nnx.Param))
  assert loss(params) < 0.9 * before


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_works_through_nnx_optimizer(rule_name):
  model, rule, _ = _setup(rule_name, "mlp")
  params = nnx.as_pure(nnx.state(model, nnx.Param))  # arrays, not the model's live Variables
  optimizer = nnx.Optimizer(model, optax.chain(rule, optax.sgd(0.1)), wrt=nnx.Param)
  batch = make_batch("mlp")
  expected, _ = rule.update(None, rule.init(params), params, batch=batch)
  optimizer.update(model, None, batch=batch)
  moved = jax.tree.map(lambda new, old: (old - new) / 0.1, nnx.as_pure(nnx.state(model, nnx.Param)), params)
  chex.assert_trees_all_close(moved, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_float64_stays_float64(rule_name):
  with jax.enable_x64(True):
    model = MODELS["mlp"](0)
    model = jax.tree.map(lambda p: p.astype(jnp.float64), model)
    tx = make_rule(rule_name, model, losses.softmax_cross_entropy)
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(None, tx.init(params), params, batch=make_batch("mlp", dtype=jnp.float64))
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("rule_name", RULE_NAMES)
@pytest.mark.parametrize(
  "batch, message",
  [
    (None, "needs the batch"),
    ((jnp.ones((4, 6)),), "pair"),
    ((jnp.ones((4, 5)), jnp.zeros(4, jnp.int32)), "Dense expects inputs shaped"),
    ((jnp.ones((4, 6)), jnp.zeros(3, jnp.int32)), "one row per input"),
    ((jnp.ones((4, 6), jnp.int32), jnp.zeros(4, jnp.int32)), "floating-point"),
    ((jnp.full((4, 6), jnp.nan), jnp.zeros(4, jnp.int32)), "NaN"),
    ((jnp.ones((4, 6)), jnp.full(4, 7, jnp.int32)), "labels must lie in"),
    ((jnp.ones((4, 6)), jnp.zeros(4, jnp.float32)), "integer class labels"),
    ((jnp.ones((0, 6)), jnp.zeros(0, jnp.int32)), "empty"),
  ],
)
def test_bad_batch_is_a_clear_error(rule_name, batch, message):
  _, tx, params = _setup(rule_name, "mlp")
  with pytest.raises((ValueError, TypeError), match=message):
    tx.update(None, tx.init(params), params, batch=batch)


class _NoLinearLayer(nnx.Module):
  def __init__(self):
    self.scale = nnx.Param(jnp.ones(3))

  def __call__(self, x):
    return x * self.scale


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_rejects_a_model_without_a_linear_layer(rule_name):
  with pytest.raises(nn.SiteError, match="_NoLinearLayer has no linear layer"):
    make_rule(rule_name, _NoLinearLayer(), losses.softmax_cross_entropy)


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_update_mutates_neither_its_state_nor_the_model(rule_name):
  """Pure like any optax transformation: the decorrelation matrices move in the returned state only."""
  model = nn.MLP((6, 16, 12, 3), decorrelation_lr=1e-1, rngs=nnx.Rngs(0))
  tx = make_rule(rule_name, model, losses.softmax_cross_entropy)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  before = jax.tree.map(jnp.copy, (state, nnx.state(model)))
  _, new_state = tx.update(None, state, params, batch=make_batch("mlp", batch_size=32))
  chex.assert_trees_all_equal((state, nnx.state(model)), before)
  assert not all(
    bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
  )
