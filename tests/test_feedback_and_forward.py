"""Oracles for the baselines built on the public rule API: feedback alignment (random, sign,
Kolen-Pollack, symmetric), direct feedback alignment and DRTP, forward gradients; and the
machinery under them (a backward hook at every site, errors delivered from outside the chain,
``PureModel.errors`` of per-token and one-number losses)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cosine, flat
from flax import nnx

from altgrad import losses, nn, rules
from altgrad._bench import _zoo
from altgrad.rules import _direct_feedback

CE = losses.softmax_cross_entropy


class NormedCNN(nnx.Module):
  """Two convolutions with BatchNorm and relu, average pooling, a linear head."""

  def __init__(self, rngs):
    self.conv1, self.norm1 = nnx.Conv(1, 3, (3, 3), rngs=rngs), nnx.BatchNorm(3, rngs=rngs)
    self.conv2, self.norm2 = nnx.Conv(3, 4, (3, 3), strides=(2, 2), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm1(self.conv1(x)))
    h = nnx.relu(self.norm2(self.conv2(h)))
    return self.head(h.mean(axis=(1, 2)))


def _case(name):
  """A small model of each kind the rules must take, and a batch of 3 classes."""
  rng = np.random.default_rng(0)
  labels = jnp.arange(6) % 3
  if name == "mlp":
    return nn.MLP((5, 8, 7, 3), rngs=nnx.Rngs(0)), (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), labels)
  if name == "cnn_batchnorm":
    return NormedCNN(nnx.Rngs(0)), (jnp.asarray(rng.normal(size=(6, 6, 6, 1)), jnp.float32), labels)
  if name == "attention":
    model = _zoo.Transformer(5, 4, width=4, heads=2, depth=1, rngs=nnx.Rngs(0))
    return model, (jnp.asarray(rng.integers(0, 5, (6, 4)), jnp.int32), labels)
  return _zoo.ResidualMLP(5, 6, 3, rngs=nnx.Rngs(0)), (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), labels)


CASES = ("mlp", "cnn_batchnorm", "attention", "residual")


def _update(tx, params, batch, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, state, batch)


def _last_site(model, params, batch):
  """The path of the model's output layer (its last site call)."""
  return nn.PureModel(model).tapped(params, batch[0]).taps[-1].path


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("case", CASES)
def test_symmetric_feedback_is_backprop_and_random_feedback_keeps_the_readouts(case):
  """``B = W`` crosses each site exactly: backprop, to float32 rounding, on an MLP, a CNN with
  BatchNorm, attention and a residual model with a shared layer. A random ``B`` changes every
  error below the output layer but not the output layer's own update."""
  model, batch = _case(case)
  params = nnx.state(model, nnx.Param)
  grad, _ = _update(rules.backprop(model, CE), params, batch)
  symmetric, _ = _update(rules.feedback_alignment(model, CE, feedback="symmetric"), params, batch)
  chex.assert_trees_all_close(nnx.as_pure(symmetric), nnx.as_pure(grad), atol=1e-6, rtol=1e-5)
  random, state = _update(rules.feedback_alignment(model, CE), params, batch)
  top = _last_site(model, params, batch)
  chex.assert_trees_all_close(nnx.as_pure(_at(random, top)), nnx.as_pure(_at(grad, top)), atol=1e-6)
  assert cosine(random, grad) < 0.999
  assert jax.tree.structure(state.feedback) == jax.tree.structure(nn._crossing.site_params(params, _sites(model)))


def _sites(model):
  return [path for path, _ in nn._intercept.site_modules(model)]


def test_sign_symmetry_with_equal_magnitudes_is_backprop_up_to_a_positive_scale_per_layer():
  model, batch = _case("mlp")
  for layer, scale in zip(model.layers, (0.4, 0.3, 0.5), strict=True):
    shape = layer.kernel[...].shape
    layer.kernel[...] = scale * jax.random.rademacher(jax.random.key(shape[0]), shape, jnp.float32)
  params = nnx.state(model, nnx.Param)
  grad, _ = _update(rules.backprop(model, CE), params, batch)
  sign, _ = _update(rules.feedback_alignment(model, CE, feedback="sign"), params, batch)
  for i, scale in enumerate((1 / (0.3 * 0.5), 1 / 0.5, 1.0)):  # each crossing divides by |W| = scale
    np.testing.assert_allclose(sign["layers"][i]["kernel"][...], scale * grad["layers"][i]["kernel"][...], rtol=1e-4, atol=1e-6)


def test_kolen_pollack_feedback_aligns_with_the_weights():
  """B receives W's update and both decay: the angle between them falls toward 0."""
  model, batch = _case("mlp")
  params = nnx.state(model, nnx.Param)
  tx = optax.chain(rules.feedback_alignment(model, CE, feedback="kolen_pollack", feedback_lr=0.1, weight_decay=0.1), optax.sgd(0.1))
  state = tx.init(params)

  def angle(params, state):
    b, w = state[0].feedback["layers"][1]["kernel"][...], params["layers"][1]["kernel"][...]
    return float(jnp.arccos(jnp.sum(b * w) / (jnp.linalg.norm(b) * jnp.linalg.norm(w))))

  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(None, s, p, batch=batch)))
  angles = [angle(params, state)]
  for _ in range(3):
    for _ in range(40):
      params, state = step(params, state)
    angles.append(angle(params, state))
  assert angles[0] > 1.0 and all(a > b for a, b in zip(angles, angles[1:], strict=False)) and angles[-1] < 0.5 * angles[0], angles


def test_direct_feedback_alignment_keeps_the_readout_and_with_the_readouts_weights_is_backprop():
  """DFA's output layer is backprop's; with one hidden layer and the readout's own ``W^T`` as
  the feedback matrix it is backprop everywhere. DRTP is DFA with the error replaced by the
  target's projection."""
  model = nn.MLP((5, 8, 3), rngs=nnx.Rngs(0))
  _, batch = _case("mlp")
  params = nnx.state(model, nnx.Param)
  grad, _ = _update(rules.backprop(model, CE), params, batch)
  dfa, _ = _update(rules.direct_feedback_alignment(model, CE), params, batch)
  chex.assert_trees_all_close(nnx.as_pure(dfa["layers"][1]), nnx.as_pure(grad["layers"][1]), atol=1e-6)
  assert cosine(dfa["layers"][0], grad["layers"][0]) < 0.99
  readout = model.layers[1].kernel[...]
  exact = rules.direct_feedback_alignment(model, CE, feedback_fn=lambda e, like, key: e @ readout.T)
  chex.assert_trees_all_close(nnx.as_pure(_update(exact, params, batch)[0]), nnx.as_pure(grad), atol=1e-6)
  drtp, _ = _update(rules.direct_feedback_alignment(model, CE, signal="target"), params, batch)
  target = -jax.nn.one_hot(batch[1], 3) / 6
  as_dfa = rules.direct_feedback_alignment(
    model, CE, feedback_fn=lambda e, like, key: _direct_feedback.projection(target, like, key)
  )
  chex.assert_trees_all_close(nnx.as_pure(drtp["layers"][0]), nnx.as_pure(_update(as_dfa, params, batch)[0]["layers"][0]), atol=1e-6)


@pytest.mark.parametrize("case", ["cnn_batchnorm", "attention", "residual"])
def test_direct_feedback_alignment_trains_every_param_of_other_models(case):
  model, batch = _case(case)
  params = nnx.state(model, nnx.Param)
  for signal in ("error", "target"):
    updates, _ = _update(rules.direct_feedback_alignment(model, CE, signal=signal), params, batch)
    chex.assert_tree_all_finite(updates)
    moved = {"/".join(map(str, p)): float(jnp.max(jnp.abs(u))) for p, u in nnx.to_flat_state(nnx.State(updates))}
    assert all(m > 0 for m in moved.values()), moved


def test_one_forward_gradient_direction_is_the_directional_derivative_times_the_direction():
  model, batch = _case("mlp")
  params = nnx.state(model, nnx.Param)
  grad, _ = _update(rules.backprop(model, CE), params, batch)
  tangent = lambda key, shape, dtype: jnp.cos(jnp.arange(np.prod(shape), dtype=dtype)).reshape(shape)  # noqa: E731
  got, _ = _update(rules.forward_gradient(model, CE, tangent_fn=tangent), params, batch)
  v = jax.tree.map(lambda g: tangent(None, g.shape, g.dtype), grad)
  slope = jnp.sum(flat(grad) * flat(v))
  chex.assert_trees_all_close(nnx.as_pure(got), nnx.as_pure(jax.tree.map(lambda t: slope * t, v)), rtol=1e-4, atol=1e-6)


def test_forward_gradients_average_to_the_gradient_at_the_predicted_rate():
  """K weight directions: relative error near sqrt((n + 1) / K); activity directions at the
  sites' pre-activations align with the gradient as K grows."""
  with jax.enable_x64(True):
    model, (x, y) = _case("mlp")
    model = jax.tree.map(lambda p: p.astype(jnp.float64), model)
    params, batch = nnx.state(model, nnx.Param), (x.astype(jnp.float64), y)
    grad = flat(_update(rules.backprop(model, CE), params, batch)[0])
    n, k = grad.size, 4000
    errors = []
    for seed in range(3):
      mean = flat(_update(rules.forward_gradient(model, CE, samples=k, key=seed), params, batch)[0])
      errors.append(float(jnp.linalg.norm(mean - grad) / jnp.linalg.norm(grad)))
    assert 0.8 < np.sqrt(np.mean(np.square(errors))) / np.sqrt((n + 1) / k) < 1.25, (errors, np.sqrt((n + 1) / k))
    activities = _update(rules.forward_gradient(model, CE, perturb="activities", samples=k, free_params="frozen"), params, batch)[0]
    assert cosine(activities, grad) > 0.99


def test_node_perturbation_tends_to_the_activity_forward_gradient_as_sigma_shrinks():
  """With the same key both draw the same noise at the sites: NP's loss difference over sigma is
  the finite-difference form of the activity forward gradient's directional derivative, so the
  two updates differ by O(sigma)."""
  model, batch = _case("mlp")
  params = nnx.state(model, nnx.Param)
  forward = flat(_update(rules.forward_gradient(model, CE, perturb="activities"), params, batch)[0])
  gaps = []
  for sigma in (1e-2, 1e-3):
    node = flat(_update(rules.node_perturbation(model, CE, variant="np", sigma=sigma), params, batch)[0])
    gaps.append(float(jnp.linalg.norm(node - forward) / jnp.linalg.norm(forward)))
  assert gaps[1] < 2e-3 and gaps[1] < 0.2 * gaps[0], gaps


def test_errors_are_the_gradient_of_the_mean_loss_per_token_or_per_batch():
  """``PureModel.errors`` of a per-token loss is the mean over tokens (it was T times too
  large), and a loss that returns one number for the batch works."""
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 3))
  y = jnp.arange(10).reshape(2, 5) % 4
  params = nnx.state(model, nnx.Param)
  pure = nn.PureModel(model)
  want = float(jnp.mean(CE(model(x), y)))
  grad = jax.grad(lambda p: jnp.mean(CE(nnx.merge(nnx.graphdef(model), p)(x), y)))(params)
  for loss_fn in (CE, lambda o, t: jnp.mean(CE(o, t))):
    back = pure.errors(params, x, y, loss_fn)
    assert float(back.loss) == pytest.approx(want, rel=1e-6)
    chex.assert_trees_all_close(pure.updates_from_errors(params, back.taps, back.errors), grad, atol=1e-6)


def test_sign_symmetry_with_random_magnitudes_is_fa_at_those_magnitudes_times_the_signs():
  """frSF: ``B = |M| sign(W)`` with ``M`` drawn as FA's ``B`` once (in the state); brSF: a new
  ``M`` every step, alike on every device. Each equals FA given that ``B``; the readout is
  backprop's; a magnitude without sign symmetry is refused."""
  model, batch = _case("mlp")
  params = nnx.state(model, nnx.Param)
  fa = rules.feedback_alignment(model, CE, key=3)
  fa_state = fa.init(params)
  fixed = rules.feedback_alignment(model, CE, feedback="sign", magnitude="fixed_random", key=3)
  state = fixed.init(params)
  chex.assert_trees_all_close(nnx.as_pure(state.feedback), jax.tree.map(jnp.abs, nnx.as_pure(fa_state.feedback)))
  signed = jax.tree.map(lambda m, w: m * jnp.sign(w), state.feedback, nn._crossing.site_params(params, _sites(model)))
  expected, _ = _update(fa, params, batch, fa_state._replace(feedback=signed))
  got, after = _update(fixed, params, batch, state)
  chex.assert_trees_all_close(nnx.as_pure(got), nnx.as_pure(expected), atol=1e-6)
  chex.assert_trees_all_close(nnx.as_pure(after.feedback), nnx.as_pure(state.feedback))  # fixed
  batchwise = rules.feedback_alignment(model, CE, feedback="sign", magnitude="batch_random", key=3)
  state = batchwise.init(params)
  first, state = _update(batchwise, params, batch, state)
  second, _ = _update(batchwise, params, batch, state)
  grad, _ = _update(rules.backprop(model, CE), params, batch)
  for update in (first, second):  # the readout is backprop's; the layers below differ from step to step
    np.testing.assert_allclose(update["layers"][2]["kernel"][...], grad["layers"][2]["kernel"][...], atol=1e-6)
  assert not np.allclose(first["layers"][0]["kernel"][...], second["layers"][0]["kernel"][...])
  with pytest.raises(ValueError, match="magnitude='batch_random' is sign symmetry's: give it with feedback='sign', not 'random'"):
    rules.feedback_alignment(model, CE, magnitude="batch_random")
