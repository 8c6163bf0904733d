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


def test_over_time_averages_a_loss_over_the_steps_of_each_example():
  rng = np.random.default_rng(0)
  logits, labels = jnp.asarray(rng.normal(size=(3, 5, 4))), jnp.asarray(rng.integers(0, 4, size=(3, 5)))
  got = losses.over_time(losses.softmax_cross_entropy)(logits, labels)
  want = [np.mean([losses.softmax_cross_entropy(logits[i], labels[i])]) for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"over_time needs outputs \(batch, time, ...\)"):
    losses.over_time(losses.softmax_cross_entropy)(logits[:, 0], labels[:, 0])
