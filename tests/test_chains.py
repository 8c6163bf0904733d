"""Target propagation and Expectation Reflection on any chain of linear layers (altgrad.nn._chain):
ordinary NNX chains against altgrad's MLP, a convolution's regularized inverse against the dense
solve, the fallback for links without an inverse, and the errors for models that are not chains."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODELS, make_batch
from flax import nnx

from altgrad import losses, nn, rules
from altgrad._bench import _zoo
from altgrad.nn._chain import regularized_least_squares, site_inverse
from altgrad.nn._intercept import make_tappable
from altgrad.nn._pure import PureModel
from altgrad.nn._sites import SiteError

CE = losses.softmax_cross_entropy


def _twins(activation=jnp.tanh, name="tanh"):
  """An altgrad MLP and an nnx.Sequential of nnx.Linear with the same weights."""
  mlp = nn.MLP((5, 7, 6, 3), activation=name, rngs=nnx.Rngs(1))
  rngs = nnx.Rngs(2)
  chain = nnx.Sequential(
    nnx.Linear(5, 7, rngs=rngs), activation, nnx.Linear(7, 6, rngs=rngs), activation, nnx.Linear(6, 3, rngs=rngs)
  )
  for dense, linear in zip(mlp.layers, chain.layers[::2], strict=True):
    linear.kernel[...], linear.bias[...] = dense.kernel[...], dense.bias[...]
  x = jax.random.normal(jax.random.key(3), (8, 5))
  return mlp, chain, (x, jnp.arange(8) % 3)


def _update(tx, model, batch):
  params = nnx.state(model, nnx.Param)
  return jax.jit(tx.update)(None, tx.init(params), params, batch=batch)


@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
def test_tp_on_an_nnx_chain_is_tp_on_the_altgrad_mlp_with_its_weights(mode):
  mlp, chain, batch = _twins()
  for update in ("through_time", "local"):
    ours, theirs = (
      _update(rules.target_propagation(m, CE, mode=mode, update=update, reg=0.3, lr_target=0.1), m, batch)
      for m in (mlp, chain)
    )
    want = [ours[0]["layers"][i] for i in range(3)]
    got = [theirs[0]["layers"][2 * i] for i in range(3)]
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(theirs[1].displacement_norms, ours[1].displacement_norms, rtol=1e-6)
  # and the displacements are those of the layers' own inverses, as before the chain took over
  displacements = rules.target_displacements(chain, CE, nnx.state(chain, nnx.Param), batch, mode=mode, reg=0.3, lr_target=0.1)
  grad_top = jax.grad(lambda h: jnp.mean(CE(mlp.layers[2](h), batch[1])))(mlp.layers[1](mlp.layers[0](batch[0])))
  h1 = mlp.layers[0](batch[0])
  d = -0.1 * grad_top
  below = mlp.layers[1].inverse_linearized(d, mlp.layers[1](h1), reg=0.3) if mode == "linearized" else None
  if mode == "difference":
    out = mlp.layers[1](h1)
    below = mlp.layers[1].inverse(out + d, reg=0.3) - mlp.layers[1].inverse(out, reg=0.3)
  elif mode == "exact":
    below = mlp.layers[1].inverse(mlp.layers[1](h1) + d, reg=0.3) - h1
  chex.assert_trees_all_close(displacements, [below, d], rtol=1e-5, atol=1e-8)


def test_er_on_an_nnx_chain_is_er_on_the_altgrad_mlp_with_its_weights():
  mlp, chain, batch = _twins()
  for options in ({}, {"hidden_target": "ratio", "hidden_field": "atanh"}, {"hidden_target": "plain"}):
    ours, theirs = (_update(rules.expectation_reflection(m, data_size=64, **options), m, batch) for m in (mlp, chain))
    chex.assert_trees_all_close(
      [theirs[0]["layers"][2 * i] for i in range(3)], [ours[0]["layers"][i] for i in range(3)], rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(tuple(theirs[1].moments), tuple(ours[1].moments), rtol=1e-6, atol=1e-6)


def _dense_solve(linear, like, dz, reg):
  """``(J^T J + reg I)^-1 J^T dz`` with the Jacobian of ``linear`` on one example, materialized."""
  one = like[:1]
  jac = jax.jacobian(lambda v: linear(v.reshape(one.shape)).ravel())(one.ravel())
  normal = jac.T @ jac + reg * jnp.eye(jac.shape[1])
  rhs = dz.reshape(dz.shape[0], -1) @ jac
  return jnp.linalg.solve(normal, rhs.T).T.reshape(like.shape)


CONVS = {
  "same": lambda r: nnx.Conv(2, 3, (3, 3), rngs=r),
  "strided": lambda r: nnx.Conv(2, 3, (3, 3), strides=2, rngs=r),
  "padded": lambda r: nnx.Conv(2, 3, (3, 2), padding=((1, 2), (0, 1)), kernel_dilation=(1, 2), rngs=r),
  "valid": lambda r: nnx.Conv(2, 4, (2, 2), padding="VALID", rngs=r),
  "altgrad": lambda r: nn.Conv(2, 3, 3, strides=2, rngs=r),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_a_convolutions_regularized_inverse_is_the_dense_solve(kind):
  conv = make_tappable(CONVS[kind](nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (3, 5, 6, 2))
  linear = conv.linear if isinstance(conv, nn.Conv) else lambda v: type(conv).__mro__[1].__call__(conv, v)
  z = linear(x)
  dz = jax.random.normal(jax.random.key(2), z.shape)
  inverse = site_inverse(conv, x, 0.5, coupled=False, iterations=200)
  assert inverse.dense is None  # a convolution is solved matrix-free
  bias = linear(jnp.zeros_like(x))
  chex.assert_trees_all_close(inverse.displacement(dz), _dense_solve(lambda v: linear(v) - bias[:1], x, dz, 0.5), rtol=1e-5, atol=1e-5)


def test_an_invertible_convolution_is_inverted_as_the_ridge_vanishes_and_hard_cases_stay_finite():
  rngs = nnx.Rngs(0)
  conv = make_tappable(nnx.Conv(3, 3, (3, 3), rngs=rngs))
  noise = 0.05 * jax.random.normal(jax.random.key(4), conv.kernel.shape)
  conv.kernel[...] = noise.at[1, 1].add(jnp.eye(3))  # near the identity: well conditioned
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 3))
  target = type(conv).__mro__[1].__call__(conv, x)
  recovered = site_inverse(conv, x, 1e-7, coupled=False, iterations=200).target(target)
  chex.assert_trees_all_close(recovered, x, atol=1e-4)
  # rank-deficient (one output channel, stride 2: far fewer outputs than inputs) and zero kernels
  for kernel in (jax.random.normal(jax.random.key(6), (3, 3, 3, 1)), jnp.zeros((3, 3, 3, 1))):
    thin = make_tappable(nnx.Conv(3, 1, (3, 3), strides=2, rngs=rngs))
    thin.kernel[...] = kernel
    out = site_inverse(thin, x, 1e-6, coupled=False).displacement(jnp.ones((2, 3, 3, 1)))
    assert bool(jnp.all(jnp.isfinite(out)))
  # saturated tanh conv net: every displacement finite, the update too
  model = MODELS["conv"](0)
  for layer in model.layers[:2]:
    layer.kernel[...] = 100.0 * layer.kernel[...]
  updates, state = _update(rules.target_propagation(model, CE), model, make_batch("conv", 8))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((updates, state.displacement_norms)))


class _PoolNet(nnx.Module):
  """conv -> relu -> avg_pool -> conv -> (BatchNorm) -> relu -> flatten -> linear: no link is invertible."""

  def __init__(self, norm: bool, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(2, 3, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs) if norm else None
    self.head = nnx.Linear(4 * 3 * 3, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    h = self.conv2(h)
    h = nnx.relu(h if self.norm is None else self.norm(h))
    return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("norm", [False, True], ids=["per_example", "batch_norm"])
def test_a_layer_without_an_inverse_gets_the_regularized_inverse_of_its_linearization(norm):
  model = _PoolNet(norm, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
  batch = (x, jnp.arange(4) % 3)
  params = nnx.state(model, nnx.Param)
  low, top = rules.target_displacements(model, CE, params, batch, reg=0.5, lr_target=0.1, cg_iterations=300)
  pure = PureModel(model)
  p = nnx.state(model, nnx.Param)
  taps = pure.tapped(p, x).taps
  modules = pure.modules(p)

  def layer(h):  # conv2's input -> head's input (the whole batch: BatchNorm mixes examples)
    z = type(modules[("conv2",)]).__mro__[1].__call__(modules[("conv2",)], h)
    return pure.between(p, x, 1, z)

  jac = jax.jacobian(lambda v: layer(v.reshape(taps[1].inputs.shape)).ravel())(taps[1].inputs.ravel())
  want = jnp.linalg.solve(jac.T @ jac + 0.5 * jnp.eye(jac.shape[1]), jac.T @ top.ravel()).reshape(low.shape)
  chex.assert_trees_all_close(low, want, rtol=1e-4, atol=1e-6)
  blocker = r"norm \(flax.BatchNorm\)" if norm else r"custom_jvp_call \(relu\)"  # the layer, or the function
  with pytest.raises(SiteError, match=rf"between conv2 \(flax.Conv\) and head \(flax.Linear\) lies {blocker}, which has no inverse: use mode='linearized'"):
    rules.target_displacements(model, CE, params, batch, mode="difference")


def test_models_that_are_not_chains_are_refused_naming_the_site():
  def first_update(model, batch, build=lambda m: rules.target_propagation(m, CE)):
    return _update(build(model), model, batch)

  images = (jnp.ones((2, 8, 8, 1)), jnp.zeros(2, jnp.int32))
  with pytest.raises(SiteError, match=r"input of blocks/1/conv1 \(flax.Conv\) is not a function of blocks/0/conv2 \(flax.Conv\)'s output alone \(a skip or residual"):
    first_update(_zoo.ResNet(1, 3, width=4, rngs=nnx.Rngs(0)), images)
  mlp = _zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(0))
  with pytest.raises(SiteError, match=r"block \(flax.Linear\) is called more than once"):
    first_update(mlp, (jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)))
  tokens = (jnp.ones((2, 5), jnp.int32), jnp.zeros(2, jnp.int32))
  with pytest.raises(SiteError, match="is not a function of .* output alone"):
    first_update(_zoo.Transformer(7, 5, width=8, heads=2, depth=1, rngs=nnx.Rngs(0)), tokens)
  # ER: something after the output layer, and links other than tanh
  softmaxed = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(5, 3, rngs=nnx.Rngs(1)), jax.nn.softmax)
  er = lambda m: rules.expectation_reflection(m, data_size=8)  # noqa: E731
  with pytest.raises(SiteError, match=r"return its last linear layer's output unchanged \(logits\)"):
    first_update(softmaxed, (jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)), er)
  with pytest.raises(SiteError, match=r"reflects hidden fields through tanh, but between conv1 .* lies custom_jvp_call \(relu\)"):
    first_update(_PoolNet(False, nnx.Rngs(0)), (jnp.ones((2, 6, 6, 2)), jnp.zeros(2, jnp.int32)), er)


def test_conjugate_gradients_stop_early_and_are_exact_on_a_diagonal_system():
  d = jnp.arange(1.0, 7.0).reshape(2, 3)
  scale = jnp.array([[1.0, 2.0, 3.0]])
  solved = regularized_least_squares(lambda t: t * scale, lambda t: t * scale, d, 0.5, coupled=False, iterations=5)
  chex.assert_trees_all_close(solved, d * scale / (scale**2 + 0.5), rtol=1e-6)


def _loss_after_steps(model, tx, batch, steps=5):
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  for _ in range(steps):
    updates, state = step(params, state, batch)
    params = optax.apply_updates(params, updates)
  nnx.update(model, params)
  return float(np.mean(CE(model(batch[0]), batch[1])))


def test_tp_and_er_train_chains_of_user_layers_with_optax():
  """A few steps of the NNX CNN and altgrad's conv net lower the loss (not a benchmark)."""
  x, y = make_batch("conv", 32)

  def cnn():
    return nnx.Sequential(
      nnx.Conv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0)),
      jnp.tanh,
      lambda h: h.reshape(h.shape[0], -1),
      nnx.Linear(36, 3, rngs=nnx.Rngs(1)),
    )

  for model, rule, lr in (
    (MODELS["conv"](0), lambda m: rules.target_propagation(m, CE, lr_target=1.0), 0.2),
    (cnn(), lambda m: rules.target_propagation(m, CE, lr_target=1.0), 0.2),
    (cnn(), lambda m: rules.expectation_reflection(m, data_size=32, loss_fn=CE), 1.0),
  ):
    before = float(np.mean(CE(model(x), y)))
    assert _loss_after_steps(model, optax.chain(rule(model), optax.sgd(lr)), (x, y)) < before
