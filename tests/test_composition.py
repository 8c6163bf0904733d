"""Rules compose as optax transformations do: in the NNX optimizer loop with model state, with
optax's wrappers, with injected and scheduled hyperparameters, two rules on one model, and the
loss of each step for logging."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_batch, make_rule
from flax import nnx

import altgrad
from altgrad import losses, nn, rules, train

CE = losses.softmax_cross_entropy
RULE_NAMES = sorted(rules.RULES)


class CNN(nnx.Module):
  """The Flax NNX tutorial's kind of model, small: conv, BatchNorm, dropout, a linear head."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm(self.conv(x)))
    return self.head(self.dropout(h.mean(axis=(1, 2))))


def _images(steps=3, batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (jnp.asarray(rng.normal(size=(batch_size, 5, 5, 1)), jnp.float32), jnp.asarray(rng.integers(0, 3, batch_size), jnp.int32))
    for _ in range(steps)
  ]


def _mlp(seed=0):
  return nn.MLP((6, 16, 12, 3), rngs=nnx.Rngs(seed))


def _update(tx, params, batch, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, state, batch)


# --- nnx.Optimizer with model state -----------------------------------------------------------


def test_altgrad_optimizer_follows_the_plain_nnx_loop_with_batchnorm_and_dropout():
  """Backprop through altgrad.Optimizer is the NNX tutorial's step (nnx.value_and_grad, then
  nnx.Optimizer): the same losses, params, running statistics and dropout RNG counts."""
  plain, ours = CNN(nnx.Rngs(0)), CNN(nnx.Rngs(0))
  plain_optimizer = nnx.Optimizer(plain, optax.adam(1e-2), wrt=nnx.Param)
  tx = optax.chain(rules.backprop(ours, CE), optax.adam(1e-2))
  our_optimizer = altgrad.Optimizer(ours, tx, wrt=nnx.Param)

  @nnx.jit
  def plain_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: CE(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def our_step(model, optimizer, x, y):
    optimizer.update(model, None, batch=(x, y))
    return optax.tree_utils.tree_get(optimizer.opt_state, "loss")

  for x, y in _images():
    np.testing.assert_allclose(our_step(ours, our_optimizer, x, y), plain_step(plain, plain_optimizer, x, y), rtol=1e-6)
  comparable = lambda m: jax.tree.map(  # noqa: E731
    lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, nnx.state(m)
  )
  chex.assert_trees_all_close(comparable(ours), comparable(plain), atol=1e-6)
  assert not np.allclose(ours.norm.mean[...], 0.0)
  ours.eval(), plain.eval()
  x, y = _images(1, seed=1)[0]
  np.testing.assert_allclose(CE(ours(x), y).mean(), CE(plain(x), y).mean(), rtol=1e-5)


@pytest.mark.parametrize("rule_name", ["consequentialism", "anp"])
def test_altgrad_optimizer_writes_back_what_a_plain_call_leaves(rule_name):
  """For any rule, the model's statistics after an update are those of the step's clean pass."""
  model, reference = CNN(nnx.Rngs(0)), CNN(nnx.Rngs(0))
  optimizer = altgrad.Optimizer(model, optax.chain(make_rule(rule_name, model), optax.sgd(0.1)), wrt=nnx.Param)
  x, y = _images(1)[0]
  optimizer.update(model, None, batch=(x, y))
  reference(x)
  chex.assert_trees_all_close(nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), atol=1e-6)
  assert int(model.dropout.rngs.count[...]) == int(reference.dropout.rngs.count[...]) == 1


def test_plain_nnx_optimizer_refuses_a_model_with_state_and_takes_one_without():
  model = CNN(nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"altgrad.Optimizer\(model, tx, wrt=nnx.Param\).*|norm/mean"):
    nnx.Optimizer(model, optax.chain(rules.backprop(model, CE), optax.sgd(0.1)), wrt=nnx.Param)
  mlp = _mlp()
  optimizer = nnx.Optimizer(mlp, optax.chain(rules.backprop(mlp, CE), optax.sgd(0.1)), wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(mlp, nnx.Param))
  batch = make_batch("mlp")
  optimizer.update(mlp, None, batch=batch)
  want, _ = _update(rules.backprop(_mlp(), CE), before, batch)
  moved = jax.tree.map(lambda new, old: (old - new) / 0.1, nnx.state(mlp, nnx.Param), before)
  chex.assert_trees_all_close(moved, want, rtol=1e-5, atol=1e-6)


# --- optax's wrappers ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_wrappers_around_a_rule_are_refused_with_the_composition_that_works(rule_name):
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  rule = make_rule(rule_name, model)
  with pytest.raises(TypeError, match=r"optax.chain\(rule, optax.MultiSteps\(optimizer, k\)\)"):
    optax.MultiSteps(optax.chain(rule, optax.adam(1e-3)), 4).init(params)
  with pytest.raises(TypeError, match=r"optax.chain\(rule, optax.apply_if_finite\(optimizer, n\)\)"):
    optax.apply_if_finite(optax.chain(rule, optax.adam(1e-3)), 3).init(params)
  mask = jax.tree.map(lambda p: p.ndim == 2, params)
  labels = jax.tree.map(lambda p: "a" if p.ndim == 2 else "b", params)
  for wrapped in (
    optax.masked(rule, mask),
    optax.partition({"a": rule, "b": optax.sgd(1.0)}, labels),
    optax.multi_transform({"a": rule, "b": optax.sgd(1.0)}, labels),
  ):
    with pytest.raises(ValueError, match=r"masked params.*altgrad.rules.partition"):
      wrapped.init(params)


def test_multisteps_after_the_rule_accumulates_backprop_into_the_big_batch_gradient():
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp", batch_size=32)
  tx = optax.chain(rules.backprop(model, CE), optax.MultiSteps(optax.sgd(1.0), 4))
  state, moved = tx.init(params), params
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  for i in range(4):
    updates, state = step(params, state, (x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]))
    if i < 3:
      assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) == 0.0
    moved = optax.apply_updates(moved, updates)
  big, _ = _update(rules.backprop(model, CE), params, (x, y))
  chex.assert_trees_all_close(jax.tree.map(jnp.subtract, params, moved), big, rtol=1e-5, atol=1e-7)


def test_apply_if_finite_and_clipping_after_the_rule_see_its_update():
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp")
  guarded = optax.chain(rules.backprop(model, CE), optax.apply_if_finite(optax.sgd(1.0), 3))
  updates, state = _update(guarded, params, (x.at[0, 0].set(jnp.nan), y))  # in jit: no eager check
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) == 0.0
  assert int(optax.tree_utils.tree_get(state, "total_notfinite")) == 1
  clipped = optax.chain(rules.backprop(model, CE), optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
  updates, _ = _update(clipped, params, (x, y))
  gradient, _ = _update(rules.backprop(model, CE), params, (x, y))
  norm = optax.tree.norm(gradient)
  assert float(norm) > 1e-3
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -1e-3 * g / norm, gradient), rtol=1e-5, atol=1e-9)


def test_incoming_updates_may_be_none_or_any_params_shaped_tree():
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  tx = rules.node_perturbation(model, CE)
  batch = make_batch("mlp")
  state = tx.init(params)
  a, _ = tx.update(None, state, params, batch=batch)
  b, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params, batch=batch)
  chex.assert_trees_all_equal(a, b)


# --- two rules on one model -------------------------------------------------------------------


def _hidden_or_head(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: "head" if path[1].key == 2 else "hidden", params)


def test_partition_gives_each_param_its_rules_update_from_one_shared_state():
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=32)
  node = rules.node_perturbation(model, CE, variant="np", sigma=1e-2)
  both = rules.partition({"hidden": node, "head": rules.backprop(model, CE)}, _hidden_or_head)
  updates, state = _update(both, params, batch)
  np_update, np_state = _update(node, params, batch)
  gradient, _ = _update(rules.backprop(model, CE), params, batch)
  labels = _hidden_or_head(params)
  want = jax.tree.map(lambda label, u, g: g if label == "head" else u, labels, np_update, gradient)
  chex.assert_trees_all_close(updates, want, atol=1e-7)
  assert float(optax.tree_utils.tree_get(state, "loss")) == float(np_state.common.loss)
  # the next step goes on from the shared state: NP's next key
  chex.assert_trees_all_equal(jax.random.key_data(state.inner_states["hidden"].common.key), jax.random.key_data(np_state.common.key))
  with pytest.raises(ValueError, match=r"labels \['other'\] have no rule"):
    rules.partition({"hidden": node}, jax.tree.map(lambda _: "other", params)).init(params)
  with pytest.raises(TypeError, match="partition takes rules"):
    rules.partition({"hidden": node, "head": optax.sgd(1.0)}, _hidden_or_head).init(params)


def test_partition_runs_the_shared_clean_pass_once():
  """XLA merges the rules' identical clean passes and drops what a rule computes for params it
  does not keep: NP on the hidden layers plus backprop on the head costs NP's step plus a
  small fraction of backprop's (measured in XLA's FLOP count of the compiled step)."""
  model = nn.MLP((64, 256, 256, 10), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  batch = (jnp.ones((128, 64)), jnp.zeros((128,), jnp.int32))

  def flops(tx):
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
    cost = step.lower(params, tx.init(params), batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]  # one dict per device in older JAX

  node = rules.node_perturbation(model, CE, variant="np")
  both = rules.partition({"hidden": node, "head": rules.backprop(model, CE)}, _hidden_or_head)
  alone, backprop = flops(node), flops(rules.backprop(model, CE))
  assert flops(both) < alone + 0.2 * backprop


# --- hyperparameters as values and schedules --------------------------------------------------

#: A float hyperparameter of each rule, a value to inject and another to set later.
HYPERPARAMETERS = {
  "np": ("node_perturbation", {"variant": "np"}, "sigma", 1e-2, 3e-2),
  "consequentialism": ("consequentialism", {}, "eps", 1.0, 0.1),
  "tp": ("target_propagation", {}, "lr_target", 1e-2, 1e-1),
  "er": ("expectation_reflection", {"data_size": 64}, "reg", 0.01, 1.0),
}


@pytest.mark.parametrize("case", sorted(HYPERPARAMETERS))
def test_inject_hyperparams_passes_arrays_and_a_changed_value_takes_effect(case):
  factory_name, options, name, value, other = HYPERPARAMETERS[case]
  factory = getattr(rules, factory_name)
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=32)
  static = {"node_perturbation": ("model", "loss_fn", "samples"), "expectation_reflection": ("model",)}
  static = static.get(factory_name, ("model", "loss_fn"))
  args = (model, CE) if factory_name != "expectation_reflection" else (model,)
  injected = optax.inject_hyperparams(factory, static_args=static)(*args, **options, **{name: value})
  state = injected.init(params)
  for hyper in (value, other):
    state.hyperparams[name] = jnp.asarray(hyper, jnp.float32)
    got, _ = _update(injected, params, batch, state)
    direct = factory(*args, **options, **{name: hyper})
    want, _ = _update(direct, params, batch, state.inner_state)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def test_structural_options_stay_static_and_say_so():
  model = _mlp()
  with pytest.raises(TypeError, match=r"static_args=\(\.\.\., 'samples'\)"):
    optax.inject_hyperparams(rules.node_perturbation, static_args=("model", "loss_fn"))(model, CE).init(
      nnx.state(model, nnx.Param)
    )
  optax.inject_hyperparams(rules.node_perturbation, static_args=("model", "loss_fn", "samples"))(model, CE).init(
    nnx.state(model, nnx.Param)
  )
  with pytest.raises(ValueError, match="sigma must be a finite number or a schedule"):
    rules.node_perturbation(model, CE, sigma=jnp.asarray(-1.0))
  with pytest.raises(ValueError, match=r"sigma \(a schedule\) at step 0"):
    rules.node_perturbation(model, CE, sigma=lambda step: 0.0 * step)


@pytest.mark.parametrize(
  "factory, options, name",
  [
    (rules.node_perturbation, {"variant": "np"}, "sigma"),
    (rules.consequentialism, {}, "eps"),
    (rules.target_propagation, {}, "lr_target"),
  ],
)
def test_a_scheduled_hyperparameter_takes_its_value_at_the_step_count(factory, options, name):
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=32)
  schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
  scheduled = factory(model, CE, **options, **{name: schedule})
  state = scheduled.init(params)
  for count in range(3):
    got, next_state = _update(scheduled, params, batch, state)
    want, _ = _update(factory(model, CE, **options, **{name: 0.1 * 0.5**count}), params, batch, state)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(next_state.common.step) == count + 1
    state = next_state


# --- the loss for logging -----------------------------------------------------------------------


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_every_rule_logs_the_loss_of_its_clean_pass(rule_name):
  model = _mlp()
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=32)
  tx = rules.finite_guard(optax.chain(make_rule(rule_name, model), optax.adam(1e-3)))
  _, state = _update(tx, params, batch)
  want = jnp.mean(CE(model(batch[0]), batch[1]))
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "loss"), want, rtol=1e-6)


def test_fit_takes_its_train_loss_from_the_rules_steps():
  """One full-batch step per epoch: the epoch's train loss is the loss at the params it started
  from, which is the model's loss before training (epoch 1) and after epoch 1 (epoch 2)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 6)).astype(np.float32)
  y = rng.integers(0, 3, 64).astype(np.int32)
  dataset = altgrad.data.Dataset(x[:32], y[:32], x[32:], y[32:], 3, "tiny")
  model = _mlp()
  before = jnp.mean(CE(model(jnp.asarray(x[:32])), jnp.asarray(y[:32])))
  tx = optax.chain(rules.backprop(model, CE), optax.sgd(0.5))
  history = train.fit(model, tx, dataset, loss_fn=CE, epochs=1, batch_size=32, progress=False)
  np.testing.assert_allclose(history.train_loss[0], before, rtol=1e-6)
  with pytest.raises(TypeError, match="fit trains with a rule"):
    train.fit(model, optax.sgd(0.1), dataset, loss_fn=CE, epochs=1, batch_size=32, progress=False)
