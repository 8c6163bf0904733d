"""The per-example losses, and the conventions of the papers' own code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad import losses


def test_clipped_cross_entropy_is_bounded_and_equals_the_log_loss_inside_the_clip():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 60.0, -60.0]])
  labels = jnp.array([0, 2])
  got = losses.clipped_cross_entropy(logits, labels)
  plain = losses.softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(got[0], plain[0], rtol=1e-6)  # p = 0.79: not clipped
  assert float(plain[1]) > 100 and abs(float(got[1]) + np.log(1e-7)) < 1e-3  # capped at 16.1
  grad = jax.grad(lambda z: jnp.sum(losses.clipped_cross_entropy(z, labels)))(logits)
  assert float(jnp.max(jnp.abs(grad[1]))) == 0.0  # clipped: no gradient, as in Keras
  with pytest.raises(TypeError, match="clipped_cross_entropy needs integer class labels"):
    losses.clipped_cross_entropy(logits, jnp.array([0.0, 1.0]))


def test_mean_squared_error_is_torch_mse_and_twice_squared_error_for_one_output():
  rng = np.random.default_rng(0)
  out, target = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
  np.testing.assert_allclose(jnp.mean(losses.mean_squared_error(out, target)), jnp.mean((out - target) ** 2), rtol=1e-6)
  one = out[:, :1], target[:, :1]
  np.testing.assert_allclose(losses.mean_squared_error(*one), 2 * losses.squared_error(*one), rtol=1e-6)
