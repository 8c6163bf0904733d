"""The backprop rule, built on taps and the shared update function, is jax.grad."""

import chex
import jax
import jax.numpy as jnp
import pytest
from conftest import MODELS, make_batch
from flax import nnx

from altgrad import diagnostics, losses, nn, rules


def _reference_grad(model, loss_fn, params, x, y):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return jax.grad(lambda p: jnp.mean(loss_fn(nnx.merge(graphdef, p, rest)(x), y)))(params)


def test_backprop_equals_jax_grad(model_kind):
  model = MODELS[model_kind](0)
  params = nnx.state(model, nnx.Param)
  x, y = make_batch(model_kind)
  tx = rules.backprop(model, losses.softmax_cross_entropy)
  got, _ = tx.update(None, tx.init(params), params, batch=(x, y))
  chex.assert_trees_all_close(
    got, _reference_grad(model, losses.softmax_cross_entropy, params, x, y), rtol=1e-5, atol=1e-7
  )


def test_backprop_equals_jax_grad_in_float64_with_squared_error():
  with jax.enable_x64(True):
    model = nn.MLP((6, 9, 4), activation="sigmoid", rngs=nnx.Rngs(1))
    model = jax.tree.map(lambda p: p.astype(jnp.float64), model)
    params = nnx.state(model, nnx.Param)
    x = jax.random.normal(jax.random.key(0), (8, 6), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (8, 4), jnp.float64)
    tx = rules.backprop(model, losses.squared_error)
    got, _ = tx.update(None, tx.init(params), params, batch=(x, y))
    chex.assert_trees_all_close(got, _reference_grad(model, losses.squared_error, params, x, y), rtol=1e-12)


def test_errors_are_the_gradient_at_the_preactivations():
  model = MODELS["mlp"](0)
  pure = nn.PureModel(model)
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp")
  _, outputs, taps, errors, *_ = pure.errors(params, x, y, losses.softmax_cross_entropy)
  # At the linear output site, dL/dz of the mean cross-entropy is (softmax - onehot) / B.
  expected = (jax.nn.softmax(outputs) - jax.nn.one_hot(y, outputs.shape[-1])) / x.shape[0]
  chex.assert_trees_all_close(errors[-1], expected, atol=1e-7)
  assert [e.shape for e in errors] == [t.preact.shape for t in taps]


def test_layer_cosines():
  model = MODELS["mlp"](0)
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp")
  tx = rules.backprop(model, losses.softmax_cross_entropy)
  grad, _ = tx.update(None, tx.init(params), params, batch=batch)
  same = diagnostics.cosine_to_backprop(model, losses.softmax_cross_entropy, grad, params, batch)
  assert sorted(same) == ["layers/0", "layers/1", "layers/2"]
  assert all(abs(float(c) - 1.0) < 1e-5 for c in same.values())
  # Flip one layer's update: only that layer's cosine becomes -1.
  flipped = jax.tree_util.tree_map_with_path(
    lambda path, g: -g if diagnostics._layer_name(path) == "layers/1" else g, grad
  )
  cos = diagnostics.layer_cosines(flipped, grad)
  assert abs(float(cos["layers/1"]) + 1.0) < 1e-5 and abs(float(cos["layers/0"]) - 1.0) < 1e-5
  zero = jax.tree.map(jnp.zeros_like, grad)
  assert all(float(c) == 0.0 for c in diagnostics.layer_cosines(zero, grad).values())
  with pytest.raises(ValueError, match="same structure"):
    diagnostics.layer_cosines(grad, {"a": 1.0})
