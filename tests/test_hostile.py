"""Hostile input and numerical stress, every rule (issue #8): a clear error or a tested behaviour,
never a silent NaN."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import MODELS, make_batch, make_rule
from flax import nnx

from altgrad import losses, nn, rules

CE = losses.softmax_cross_entropy
RULE_NAMES = sorted(rules.RULES)
UNSUPPORTED = {("tp", "conv"), ("er", "conv"), ("er", "rnn"), *((r, "rnn") for r in ("fa", "sign", "kp", "dfa", "drtp"))}
NEEDS_FLOAT32 = {"consequentialism", "np", "inp", "anp", "tp", "er"}


def _rule(name, model, **options):
  return make_rule(name, model, CE, **options)


def _update(tx, params, batch, state=None):
  return tx.update(None, tx.init(params) if state is None else state, params, batch=batch)


def _supported(name, kind):
  if (name, kind) in UNSUPPORTED:
    pytest.skip(f"{name} does not handle {kind} models")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_a_nonfinite_step_inside_jit_is_skipped_and_counted(name):
  """finite_guard: a NaN batch changes nothing (params, keys, decorrelation, moments); the next
  clean batch gives the unguarded step."""
  model = nn.MLP((6, 16, 12, 3), decorrelation_lr=1e-2, rngs=nnx.Rngs(0))
  optimizer = optax.sgd(rules.OWN_STEP[name]) if name in rules.OWN_STEP else optax.adam(1e-2)
  plain = optax.chain(_rule(name, model), optimizer)
  guarded = rules.finite_guard(plain)
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp", batch_size=32)
  bad = x.at[3, 2].set(jnp.nan)
  step = jax.jit(lambda tx, p, s, b: tx.update(None, s, p, batch=b), static_argnums=0)
  state = guarded.init(params)
  updates, after_bad = step(guarded, params, state, (bad, y))
  assert int(after_bad.skipped_steps) == 1 and bool(after_bad.last_skipped)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(after_bad.inner_state, state.inner_state)
  updates, after_good = step(guarded, params, after_bad, (x, y))
  expected, expected_state = step(plain, params, plain.init(params), (x, y))
  chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)
  assert int(after_good.skipped_steps) == 1 and not bool(after_good.last_skipped)
  chex.assert_trees_all_close(
    jax.tree.leaves(after_good.inner_state[0].common.model_variables),
    jax.tree.leaves(expected_state[0].common.model_variables),
  )


def test_fit_reports_the_guard_count():
  from altgrad import data, train

  ds = data.digits()
  model = nn.MLP((64, 16, 10), rngs=nnx.Rngs(0))
  tx = rules.finite_guard(optax.chain(rules.backprop(model, CE), optax.adam(1e-2)))
  history = train.fit(model, tx, ds, loss_fn=CE, epochs=2, batch_size=128, progress=False)
  assert history.skipped_steps == [0, 0] and history.test_accuracy[-1] > 0.8


@pytest.mark.parametrize("name", RULE_NAMES)
def test_infinite_inputs_are_refused_outside_jit(name):
  model = MODELS["mlp"](0)
  x, y = make_batch("mlp")
  with pytest.raises(ValueError, match="NaN or infinite"):
    _update(_rule(name, model), nnx.state(model, nnx.Param), (x.at[0, 0].set(jnp.inf), y))


@pytest.mark.parametrize("name", RULE_NAMES)
def test_a_batch_of_one_in_bfloat16_gives_the_float32_update(name, model_kind):
  """One example, in bfloat16, meets float32 params: the update is finite, moves something, and
  is the float32 one of the rounded inputs (a batch of one and low-precision inputs are
  independent stresses, checked in one program to compile less)."""
  _supported(name, model_kind)
  model = MODELS[model_kind](0)
  tx, params = _rule(name, model), nnx.state(model, nnx.Param)
  x, y = make_batch(model_kind, batch_size=1)
  low = x.astype(jnp.bfloat16)
  updates, _ = _update(tx, params, (low, y))
  chex.assert_tree_all_finite(updates)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
  reference, _ = _update(tx, params, (low.astype(jnp.float32), y))
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_close(updates, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_bfloat16_params_work_for_backprop_and_are_refused_where_they_cannot(name):
  rngs = nnx.Rngs(0)
  model = nn.Sequential(
    nn.Dense(6, 16, param_dtype=jnp.bfloat16, rngs=rngs),
    nn.Dense(16, 3, activation="identity", param_dtype=jnp.bfloat16, rngs=rngs),
  )
  if name in NEEDS_FLOAT32:
    with pytest.raises(TypeError, match="bfloat16 params"):
      _rule(name, model)
    return
  params = nnx.state(model, nnx.Param)
  updates, _ = _update(_rule(name, model), params, make_batch("mlp"))
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)


HYPERPARAMETERS = [
  ("consequentialism", "eps"),
  ("np", "sigma"),
  ("anp", "sigma"),
  ("tp", "reg"),
  ("tp", "lr_target"),
  ("tp", "max_displacement"),
  ("er", "reg"),
]


@pytest.mark.parametrize("name, option", HYPERPARAMETERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_nonfinite_or_negative_hyperparameters_are_named(name, option, value):
  with pytest.raises(ValueError, match=f"{option} must be"):
    _rule(name, MODELS["mlp"](0), **{option: value})


@pytest.mark.parametrize("value", [float("nan"), -1e-3])
def test_a_bad_decorrelation_rate_is_named(value):
  with pytest.raises(ValueError, match="decorrelation_lr must be"):
    nn.MLP((4, 3, 2), decorrelation_lr=value, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("name", "options"), [("tp", {"mode": "difference"}), ("tp", {"mode": "exact"}), ("er", {})])
def test_an_activation_without_inverse_is_refused_by_inverse_rules(name, options):
  """(TP's linearized mode crosses relu by its linearization: tests/test_chains.py.)"""
  with pytest.raises(ValueError, match="relu"):
    _rule(name, nn.MLP((4, 5, 2), activation="relu", rngs=nnx.Rngs(0)), **options)


@pytest.mark.parametrize("name", ["backprop", "consequentialism", "anp"])
def test_wrong_input_width_is_named_under_jit_too(name):
  model = MODELS["rnn"](0)
  tx = _rule(name, model)
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("rnn")
  with pytest.raises(ValueError, match="SimpleRNN expects inputs shaped"):
    jax.jit(lambda p, b: _update(tx, p, b))(params, (x[..., :2], y))


# Numerical stress


@pytest.mark.parametrize("name", ["consequentialism", "er"])
def test_rank_deficient_batches_give_finite_descending_updates(name):
  """Duplicated examples and a constant input column: the Gram matrices are singular."""
  model = nn.MLP((6, 8, 3), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp", batch_size=8)
  x = jnp.concatenate([x, x, x]).at[:, 0].set(1.0)  # 24 rows of 8 distinct ones, column 0 constant
  y = jnp.concatenate([y, y, y])
  updates, _ = _update(_rule(name, model), params, (x, y))
  chex.assert_tree_all_finite(updates)
  gradient, _ = _update(rules.backprop(model, CE), params, (x, y))
  dot = sum(jnp.vdot(u, g) for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(gradient), strict=True))
  assert float(dot) > 0  # still a descent direction


def test_decorrelation_of_perfectly_correlated_inputs_stays_finite():
  model = nn.MLP((6, 8, 3), decorrelation_lr=1e-1, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.backprop(model, CE), optax.sgd(0.1))
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp", batch_size=32)
  x = jnp.tile(x[:, :1], (1, 6))  # six copies of one column: covariance of rank one
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=(x, y)))
  for _ in range(50):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  chex.assert_tree_all_finite((params, [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.inexact)]))


@pytest.mark.parametrize("name", ["backprop", "consequentialism", "np", "inp", "anp", "tp"])
def test_sequences_of_784_steps_give_finite_updates(name):
  model = nn.SimpleRNN(1, 16, 10, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  x = jax.random.uniform(jax.random.key(0), (8, 784, 1))
  y = jnp.arange(8) % 10
  tx = _rule(name, model)
  updates, _ = jax.jit(lambda p: _update(tx, p, (x, y)))(params)
  chex.assert_tree_all_finite(updates)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", RULE_NAMES)
def test_saturated_tanh_units_give_finite_updates(name):
  """Pre-activations of +-20 (tanh = +-1 in float32) reach every inverse and every division."""
  model = nn.MLP((6, 16, 12, 3), rngs=nnx.Rngs(0))
  for layer in model.layers[:-1]:
    layer.bias[...] = jnp.where(jnp.arange(layer.bias.shape[0]) % 2 == 0, 20.0, -20.0)
  params = nnx.state(model, nnx.Param)
  updates, _ = _update(_rule(name, model), params, make_batch("mlp"))
  chex.assert_tree_all_finite(updates)
