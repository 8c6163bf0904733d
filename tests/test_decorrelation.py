"""Decorrelation on the user's model: ``nn.decorrelate`` and ``nn.fold_decorrelation``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_rule
from flax import nnx

import altgrad
from altgrad import data, losses, nn, train
from altgrad._bench import _zoo

CE = losses.softmax_cross_entropy


class _UsersMLP(nnx.Module):
  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=False)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def _train(model, rule_name, batches, **options):
  """Params and every decorrelation matrix after each of ``batches`` (rule, then SGD 0.1)."""
  tx = optax.chain(make_rule(rule_name, model, CE, **options), optax.sgd(0.1))
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  history = []
  for batch in batches:
    params, state = step(params, state, batch)
    variables = optax.tree_utils.tree_get(state, "model_variables")
    history.append((jax.tree.leaves(params), jax.tree.leaves(nnx.state(variables, nn.Decorrelation))))
  return history


@pytest.mark.parametrize("rule_name", ["backprop", "np", "inp", "anp", "consequentialism"])
def test_every_rule_on_a_decorrelated_nnx_mlp_equals_the_altgrad_mlp(rule_name):
  sizes, lr = (5, 7, 3), 0.05
  ours = nn.MLP(sizes, decorrelation_lr=lr, rngs=nnx.Rngs(0))
  users = _UsersMLP(sizes, nnx.Rngs(1))
  for mine, theirs in zip(ours.layers, users.layers, strict=True):
    theirs.kernel[...], theirs.bias[...] = mine.kernel[...], mine.bias[...]
  users = nn.decorrelate(users, lr)
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(5, 5))  # correlated inputs, so R moves
  batches = [
    (jnp.asarray(rng.normal(size=(16, 5)) @ mixing, jnp.float32), jnp.asarray(rng.integers(0, 3, 16)))
    for _ in range(5)
  ]
  trained = zip(_train(ours, rule_name, batches), _train(users, rule_name, batches), strict=True)
  for (p_ours, r_ours), (p_users, r_users) in trained:
    chex.assert_trees_all_close(p_users, p_ours, atol=1e-6)
    chex.assert_trees_all_close(r_users, r_ours, atol=1e-6)
  assert not np.allclose(r_ours[0], np.eye(5))


def _perturbed(model, scale=0.1):
  """``model`` with every decorrelation matrix moved off the identity."""
  for i, (_, module) in enumerate(nnx.iter_modules(model)):
    if getattr(module, "decorrelation", None) is not None:
      r = module.decorrelation[...]
      module.decorrelation[...] = r + scale * jax.random.normal(jax.random.key(i), r.shape)
  return model


@pytest.mark.parametrize("altgrads", [False, True])
def test_a_conv_site_fuses_r_into_its_kernel(altgrads):
  rngs = nnx.Rngs(0)
  if altgrads:
    conv = nn.Conv(2, 3, 3, strides=2, activation="identity", decorrelation_lr=0.1, rngs=rngs)
  else:
    conv = nn.decorrelate(nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs), 0.1)
  _perturbed(conv)
  x = jax.random.normal(jax.random.key(1), (4, 7, 7, 2))
  layout = conv.kernel_layout() if altgrads else nn._matrix_form.kernel_layout(conv)
  r, kernel, bias = conv.decorrelation[...], conv.kernel[...], conv.bias[...]

  def unfused(kernel, x):  # the explicit patch matrix, decorrelated, times the kernel
    return (layout.features(x) @ r) @ layout.to_matrix(kernel) + bias

  out = conv(x)
  chex.assert_trees_all_close(out.reshape(-1, 3), unfused(kernel, x), atol=1e-5)
  errors = jax.random.normal(jax.random.key(2), out.shape)
  params = nnx.state(conv, nnx.Param)
  graphdef, _, rest = nnx.split(conv, nnx.Param, ...)
  fused_grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * errors))(params)["kernel"][...]
  unfused_grad = jax.grad(lambda k: jnp.sum(unfused(k, x) * errors.reshape(-1, 3)))(kernel)
  chex.assert_trees_all_close(fused_grad, unfused_grad, atol=1e-5)


def _zoo_model(name):
  if name == "resnet":
    model = _zoo.ResNet(2, 3, width=4, blocks=1, rngs=nnx.Rngs(0))
    return model, jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
  model = _zoo.Transformer(5, 4, width=8, heads=2, depth=1, rngs=nnx.Rngs(0))
  return model, jax.random.randint(jax.random.key(0), (4, 4), 0, 5)


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_decorrelate_and_fold_keep_the_outputs_and_the_users_classes(name):
  model, x = _zoo_model(name)
  model.eval()
  decorrelated = nn.decorrelate(model, 1e-3)
  chex.assert_trees_all_close(decorrelated(x), model(x), atol=1e-6)
  assert nnx.state(model, nnx.Param) is not None and not nnx.state(model, nn.Decorrelation)  # untouched
  sites = [m for _, m in nnx.iter_modules(decorrelated) if getattr(m, "decorrelation", None) is not None]
  assert len(sites) == (4 if name == "resnet" else 6)  # every Conv and Linear; q, k, v, out and the MLP
  _perturbed(decorrelated)
  folded = nn.fold_decorrelation(decorrelated)
  chex.assert_trees_all_close(folded(x), decorrelated(x), atol=1e-6, rtol=1e-6)
  assert [type(m) for _, m in nnx.iter_modules(folded)] == [type(m) for _, m in nnx.iter_modules(model)]
  assert jax.tree.structure(nnx.state(folded)) == jax.tree.structure(nnx.state(model))


def test_fold_of_altgrads_own_layers_leaves_no_decorrelation():
  model = _perturbed(nn.MLP((4, 5, 3), decorrelation_lr=0.1, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (6, 4))
  folded = nn.fold_decorrelation(model)
  chex.assert_trees_all_close(folded(x), model(x), atol=1e-6)
  assert not nnx.state(folded, nn.Decorrelation) and folded.layers[0].decorrelation_lr is None


def _mean_offdiagonal_correlation(rows):
  c = np.corrcoef(np.asarray(rows).T)
  return float(np.mean(np.abs(c[~np.eye(len(c), dtype=bool)])))


def test_training_decorrelates_every_site_of_a_resnet():
  model, _ = _zoo_model("resnet")
  rng = np.random.default_rng(0)
  common = rng.normal(size=(32, 8, 8, 1))  # two correlated channels
  x = jnp.asarray(np.concatenate([common, 0.6 * common + rng.normal(size=common.shape)], -1), jnp.float32)
  batch = (x, jnp.asarray(rng.integers(0, 3, 32), jnp.int32))
  model = nn.decorrelate(model, 0.05, only=nnx.Conv)
  tx = optax.chain(make_rule("backprop", model, CE), optax.sgd(0.0))  # only R moves
  optimizer = altgrad.Optimizer(model, tx, wrt=nnx.Param)
  step = nnx.jit(lambda model, optimizer, batch: optimizer.update(model, None, batch=batch))

  def correlations():
    pure = nn.PureModel(model)
    forward = pure.tapped(nnx.state(model, nnx.Param), x)
    modules = pure.modules(nnx.state(model, nnx.Param))
    sites = {tap.path: (modules[tap.path], tap.inputs) for tap in forward.taps}
    return {
      path: _mean_offdiagonal_correlation(site.decorrelated(site.decorrelation_features(inputs)))
      for path, (site, inputs) in sites.items()
      if getattr(site, "decorrelation", None) is not None
    }

  before = correlations()
  for _ in range(30):
    step(model, optimizer, batch)
  after = correlations()
  assert len(before) == 3 and all(after[path] < 0.8 * before[path] for path in before), (before, after)


class _Others(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.transpose = nnx.ConvTranspose(4, 2, (3,), rngs=rngs)

  def __call__(self, x):
    return self.transpose(self.linear(x))


def test_sites_that_cannot_be_decorrelated_are_named_and_can_be_left_out():
  model = _Others(nnx.Rngs(0))
  with pytest.raises(nn.SiteError, match=r"transpose \(flax.ConvTranspose\) cannot be decorrelated.*only="):
    nn.decorrelate(model, 0.1)
  decorrelated = nn.decorrelate(model, 0.1, only=nnx.Linear)
  assert decorrelated.linear.decorrelation is not None and not hasattr(decorrelated.transpose, "decorrelation")
  with pytest.raises(nn.SiteError, match="decorrelated already"):
    nn.decorrelate(decorrelated, 0.1, only=nnx.Linear)
  with pytest.raises(nn.SiteError, match="cannot be decorrelated"):
    nn.decorrelate(_zoo.ScannedMLP(4, 5, 3, rngs=nnx.Rngs(0)), 0.1)  # a stack made by nnx.vmap
  with pytest.raises(nn.SiteError, match="cannot be decorrelated"):
    nn.decorrelate(nn.SimpleRNN(3, 4, 2, rngs=nnx.Rngs(0)), 0.1)
  with pytest.raises(ValueError, match="decorrelation_sample is a fraction"):
    nn.decorrelate(model, 0.1, sample=0.0)
  with pytest.raises(ValueError, match="decorrelation_lr must be"):
    nn.decorrelate(model, -1.0, only=nnx.Linear)


def test_fit_writes_r_back_to_a_decorrelated_users_model():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(64, 5)) @ rng.normal(size=(5, 5))).astype(np.float32)
  y = (np.arange(64) % 3).astype(np.int32)
  dataset = data.Dataset(x, y, x[:16], y[:16], 3, "correlated")
  model = nn.decorrelate(_UsersMLP((5, 6, 3), nnx.Rngs(0)), 0.05)
  tx = optax.chain(make_rule("anp", model, CE), optax.adam(1e-2))
  train.fit(model, tx, dataset, loss_fn=CE, epochs=1, batch_size=16, progress=False)
  assert not np.allclose(model.layers[0].decorrelation[...], np.eye(5))
  assert type(model.layers[0]).__mro__[1] is nnx.Linear
