"""Every rule on ordinary Flax NNX models, written as a user would (altgrad._zoo: no altgrad layers)."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cosine, make_rule, tapped
from flax import nnx

from altgrad import _bench, data, diagnostics, losses, nn, rules, train
from altgrad._bench import _zoo
from altgrad.nn import SiteError

CE = losses.softmax_cross_entropy


def _f64(model):
  return jax.tree.map(lambda p: p.astype(jnp.float64) if jnp.issubdtype(p.dtype, jnp.floating) else p, model)


def _zoo_case(name, batch_size=4, seed=0):
  """A small model of the zoo and a batch for it (3 classes; the transformer has 5 tokens)."""
  rng = np.random.default_rng(seed)
  labels = jnp.asarray(np.arange(batch_size) % 3, jnp.int32)
  if name == "residual_mlp":
    return _zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(seed)), (jnp.asarray(rng.normal(size=(batch_size, 4))), labels)
  if name == "resnet":
    model = _zoo.ResNet(1, 3, width=2, blocks=1, dropout=0.2, rngs=nnx.Rngs(seed))
    return model, (jnp.asarray(rng.normal(size=(batch_size, 6, 6, 1))), labels)
  if name == "transformer":
    model = _zoo.Transformer(5, 4, width=4, heads=2, depth=1, rngs=nnx.Rngs(seed))
    return model, (jnp.asarray(rng.integers(0, 5, size=(batch_size, 4)), jnp.int32), labels)
  if name == "scanned":
    return _zoo.ScannedMLP(4, 5, 3, depth=3, rngs=nnx.Rngs(seed)), (jnp.asarray(rng.normal(size=(batch_size, 4))), labels)
  raise KeyError(name)


ZOO = ("residual_mlp", "resnet", "transformer", "scanned")


def _jax_grad(model, batch):
  """The plain training step's gradient: ``jax.grad`` through the user's model as it is."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  x, y = batch
  return jax.grad(lambda p: jnp.mean(CE(nnx.merge(graphdef, p, rest, copy=True)(x), y)))(
    nnx.state(model, nnx.Param)
  )


def _update(tx, model, batch):
  params = nnx.state(model, nnx.Param)
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, tx.init(params), batch)


@pytest.mark.parametrize("name", ZOO)
def test_backprop_rule_equals_jax_grad(name):
  model, batch = _zoo_case(name)
  got, state = _update(rules.backprop(model, CE), model, batch)
  want = _jax_grad(model, batch)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  chex.assert_trees_all_close(got, want, atol=2e-6 * scale, rtol=0)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  chex.assert_tree_all_finite([a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.inexact)])


class _OtherSites(nnx.Module):
  """ConvTranspose and Einsum (sites without CW's matrix form) and LoRA (a Linear subclass)."""

  def __init__(self, rngs):
    self.up = nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), rngs=rngs)
    self.mix = nnx.Einsum("bhwc,cd->bhwd", (3, 4), (4,), rngs=rngs)
    self.head = nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.mix(jnp.tanh(self.up(x))))
    return self.head(jnp.mean(h, axis=(1, 2)))


def test_conv_transpose_einsum_and_lora_are_sites_with_the_plain_gradient_in_cw():
  """CW gives ConvTranspose and Einsum the plain gradient; it emends LoRA (tests/test_lora_and_freezing.py)."""
  model = _OtherSites(nnx.Rngs(0))
  batch = (jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 3, 2)), jnp.float32), jnp.arange(4) % 3)
  assert [t.path for t in tapped(model, batch[0])[1]] == [("up",), ("mix",), ("head",)]
  want = _jax_grad(model, batch)
  chex.assert_trees_all_close(_update(rules.backprop(model, CE), model, batch)[0], want, atol=1e-6)
  got, _ = _update(rules.consequentialism(model, CE), model, batch)
  chex.assert_trees_all_close({k: got[k] for k in ("up", "mix")}, {k: want[k] for k in ("up", "mix")}, atol=1e-6)
  assert not np.allclose(got["head"]["kernel"][...], want["head"]["kernel"][...], atol=1e-4)


def test_the_bench_baseline_is_plain_jax_grad_with_the_model_state():
  model, batch = _zoo_case("resnet")
  got, state = _update(_bench.plain_gradient(model, CE), model, batch)
  chex.assert_trees_all_close(got, _jax_grad(model, batch), atol=1e-6)
  plain = nnx.clone(model)
  plain(batch[0])
  chex.assert_trees_all_close(
    _comparable(state.model_variables), _comparable(nnx.state(plain, nnx.Not(nnx.Param))), atol=1e-6
  )
  # the bench's cosine probe takes it as it takes a rule: cosine 1 to backprop at every site
  params = nnx.state(model, nnx.Param)
  tx = _bench.plain_gradient(model, CE)
  cosines = diagnostics.cosine_probe(model, CE, tx, batch)(params, tx.init(params))
  assert cosines and all(abs(float(c) - 1) < 1e-4 for c in cosines.values()), cosines


def test_site_calls_are_taps_and_the_user_model_is_untouched():
  model, (x, _) = _zoo_case("residual_mlp")
  before = jax.tree.map(jnp.copy, nnx.state(model))
  outputs, taps = tapped(model, x)
  chex.assert_trees_all_close(outputs, model(x), atol=1e-6)
  # embed, block, block (the same layer again), head: a site is a call, not a module.
  assert [t.path for t in taps] == [("embed",), ("block",), ("block",), ("head",)]
  chex.assert_trees_all_close(taps[0].preact, model.embed(x), atol=1e-6)
  deltas = tuple(jnp.full(t.preact.shape, 0.1) for t in taps)
  _, noisy = tapped(model, x, deltas)
  chex.assert_trees_all_close(noisy[0].preact, taps[0].preact + 0.1, atol=1e-6)
  # The user's model keeps its classes and state; the tapped clone's structure is stable (no retrace).
  assert type(model.embed) is nnx.Linear and not hasattr(model.embed, "altgrad_site_path")
  chex.assert_trees_all_equal(nnx.state(model), before)
  assert nn.PureModel(model).graphdef == nn.PureModel(model).graphdef
  # NNX internals this relies on (flax 0.12): an instance can take a generated subclass.
  clone = nn.PureModel(model).bind(nnx.state(model, nnx.Param))
  assert isinstance(clone.embed, nnx.Linear) and type(clone.embed) is not nnx.Linear


def test_residual_gradient_covers_params_outside_sites():
  model, batch = _zoo_case("transformer")
  pure = nn.PureModel(model)
  back = pure.errors(nnx.state(model, nnx.Param), *batch, CE)
  residual = nnx.State(back.residual)
  # The tied head and embedding, the positions and the norms are outside every site call...
  assert float(jnp.max(jnp.abs(residual["embed"]["embedding"][...]))) > 0
  assert float(jnp.max(jnp.abs(residual["positions"][...]))) > 0
  # ...the attention's projections are sites: their gradient comes from the site VJP only.
  assert float(jnp.max(jnp.abs(residual["blocks"][0]["attention"]["query"]["kernel"][...]))) == 0


@pytest.mark.parametrize(
  "name, variant, samples", [("residual_mlp", "np", 3000), ("transformer", "inp", 500), ("scanned", "np", 2000)]
)
def test_node_perturbation_mean_aligns_with_the_gradient(name, variant, samples):
  """Many draws (vmapped in one update) average to the gradient: sites and free params
  (weight perturbation) alike."""
  with jax.enable_x64(True):
    model, batch = _zoo_case(name, batch_size=2)
    model = _f64(model)
    want = _jax_grad(model, batch)
    tx = rules.node_perturbation(model, CE, variant=variant, sigma=1e-4, samples=samples, free_params="perturb")
    got, _ = _update(tx, model, batch)
  assert cosine(got, want) > 0.97


def test_batchnorm_is_detected_and_the_coupled_form_removes_the_bias():
  """With BatchNorm (training mode) and dropout: the batch-coupled INP mean aligns with the
  gradient at the step's dropout masks; per-example credit is biased."""
  with jax.enable_x64(True):
    model, batch = _zoo_case("resnet", batch_size=2)
    model = _f64(model)
    # the rule trains in training mode, whatever mode the model was built in
    assert nn.PureModel(model).batch_coupled
    assert nn.PureModel(nnx.view(model, use_running_average=True, raise_if_not_found=False)).batch_coupled
    want = _jax_grad(model, batch)
    kwargs = dict(variant="inp", sigma=1e-4, samples=2000)
    coupled, _ = _update(rules.node_perturbation(model, CE, **kwargs), model, batch)
    per_example, _ = _update(rules.node_perturbation(model, CE, batch_coupled=False, **kwargs), model, batch)
  assert cosine(coupled, want) > 0.97
  # Per-example credit misses what an example's noise does to the others' losses through the
  # batch statistics: at the same draws it is clearly further from the gradient.
  assert cosine(coupled, want) > cosine(per_example, want) + 0.03


def _comparable(tree):
  """PRNG keys as their raw data, so that trees of model state can be compared."""
  return jax.tree.map(lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, tree)


def test_frozen_free_params_get_zero_and_the_clean_pass_owns_the_model_state():
  model, batch = _zoo_case("resnet")
  tx = rules.node_perturbation(model, CE, variant="np", free_params="frozen")
  updates, state = _update(tx, model, batch)
  assert float(jnp.max(jnp.abs(updates["stem_norm"]["scale"][...]))) == 0.0
  assert float(jnp.max(jnp.abs(updates["stem"]["kernel"][...]))) > 0.0
  # BatchNorm statistics and the dropout RNG count advance exactly as one plain training call does.
  plain = nnx.clone(model)
  plain(batch[0])
  chex.assert_trees_all_close(
    _comparable(state.common.model_variables), _comparable(nnx.state(plain, nnx.Not(nnx.Param))), atol=1e-6
  )
  with pytest.raises(ValueError, match="free_params must be one of"):
    rules.node_perturbation(model, CE, free_params="zero")


@pytest.mark.parametrize("variant", ["np", "anp"])
def test_free_params_get_their_own_pass_or_their_gradient_and_leave_the_nodes_credit_alone(variant):
  """``free_params``: weight perturbation in a pass of its own (``"perturb"``), the loss
  gradient (``"gradient"``) or nothing (``"frozen"``); the sites' update is the same in all three
  (the free params' noise never enters the nodes' pass)."""
  model, batch = _zoo_case("residual_mlp")
  with pytest.warns(UserWarning, match=r"leaves params outside linear layers unchanged by default .* They are norm/bias, norm/scale, temperature"):
    rules.node_perturbation(model, CE)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rules.node_perturbation(model, CE, free_params="frozen")
  got = {
    choice: _update(rules.node_perturbation(model, CE, variant=variant, free_params=choice), model, batch)[0]
    for choice in ("perturb", "gradient", "frozen")
  }
  want = _jax_grad(model, batch)
  free = ("norm", "temperature")
  for choice in ("perturb", "gradient"):
    chex.assert_trees_all_close({k: v for k, v in got[choice].items() if k not in free}, {k: v for k, v in got["frozen"].items() if k not in free})
  chex.assert_trees_all_close({k: got["gradient"][k] for k in free}, {k: want[k] for k in free}, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(a))) == 0 for a in jax.tree.leaves({k: got["frozen"][k] for k in free}))
  assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves({k: got["perturb"][k] for k in free}))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_cw_on_nnx_layers_equals_cw_on_altgrad_layers(kind):
  rngs = nnx.Rngs(0)
  rng = np.random.default_rng(0)
  if kind == "mlp":
    ours = nn.MLP((5, 7, 3), rngs=rngs)
    x = rng.normal(size=(6, 5))

    class Users(nnx.Module):
      def __init__(self):
        self.hidden = nnx.Linear(5, 7, rngs=rngs)
        self.out = nnx.Linear(7, 3, rngs=rngs)

      def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))

  else:
    ours = nn.Sequential(
      nn.Conv(2, 3, 3, activation="tanh", rngs=rngs),
      nn.Conv(3, 2, 3, strides=2, padding="VALID", activation="tanh", rngs=rngs),
      nn.Flatten(),
      nn.Dense(8, 3, activation="identity", rngs=rngs),
    )
    x = rng.normal(size=(6, 5, 5, 2))

    class Users(nnx.Module):
      def __init__(self):
        self.conv1 = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(3, 2, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

      def __call__(self, x):
        h = jnp.tanh(self.conv2(jnp.tanh(self.conv1(x))))
        return self.out(h.reshape(h.shape[0], -1))

  users = Users()
  pairs = [(i, name) for i, name in enumerate(("hidden", "out") if kind == "mlp" else ("conv1", "conv2", None, "out"))]
  for i, name in pairs:  # the same weights in both
    if name is not None:
      getattr(users, name).kernel[...] = ours.layers[i].kernel[...]
      getattr(users, name).bias[...] = ours.layers[i].bias[...]
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(np.arange(6) % 3, jnp.int32))
  ours_update, _ = _update(rules.consequentialism(ours, CE), ours, batch)
  users_update, _ = _update(rules.consequentialism(users, CE), users, batch)
  for i, name in pairs:
    if name is not None:
      chex.assert_trees_all_close(users_update[name], ours_update["layers"][i], atol=1e-6)


def test_cw_runs_on_attention_and_gives_other_params_their_gradient():
  model, batch = _zoo_case("transformer")
  updates, _ = _update(rules.consequentialism(model, CE), model, batch)
  want = _jax_grad(model, batch)
  chex.assert_tree_all_finite(updates)
  # Params outside sites get the exact gradient; emended sites differ from it.
  chex.assert_trees_all_close(updates["positions"][...], want["positions"][...], atol=1e-6)
  query = updates["blocks"][0]["attention"]["query"]["kernel"][...]
  assert not np.allclose(query, want["blocks"][0]["attention"]["query"]["kernel"][...], atol=1e-6)


def _tiny_dataset(n=64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2 * n, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
  return data.Dataset(x[:n], y[:n], x[n:], y[n:], 3, "tiny")


def test_fit_fit_seeds_and_nnx_optimizer_on_a_user_model():
  dataset = _tiny_dataset()
  model = _zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(0))
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  tx = optax.chain(rules.consequentialism(model, CE), optax.adam(1e-2))
  history = train.fit(model, tx, dataset, loss_fn=CE, epochs=3, batch_size=16, progress=False)
  assert history.compilations == 1 and history.test_loss[-1] < history.test_loss[0]
  assert not np.allclose(model.embed.kernel[...], before["embed"]["kernel"][...])
  assert type(model.embed) is nnx.Linear

  def build(seed):
    m = _zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(seed))
    return m, optax.chain(rules.node_perturbation(m, CE, variant="inp", key=seed), optax.adam(1e-2))

  runs = train.fit_seeds(build, [0, 1], dataset, loss_fn=CE, epochs=1, batch_size=16, progress=False)
  assert len(runs) == 2 and runs[0][1].test_loss != runs[1][1].test_loss

  model = _zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(0))
  rule = rules.backprop(model, CE)
  optimizer = nnx.Optimizer(model, optax.chain(rule, optax.sgd(0.1)), wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  batch = (jnp.asarray(dataset.x_train[:8]), jnp.asarray(dataset.y_train[:8]))
  optimizer.update(model, None, batch=batch)
  moved = jax.tree.map(lambda new, old: (old - new) / 0.1, nnx.as_pure(nnx.state(model, nnx.Param)), params)
  want = nnx.as_pure(_jax_grad(_zoo.ResidualMLP(4, 6, 3, rngs=nnx.Rngs(0)), batch))
  chex.assert_trees_all_close(moved, want, atol=1e-5)


def test_fit_writes_back_batchnorm_statistics_and_evaluates_in_eval_mode():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 6, 6, 1)).astype(np.float32)
  y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
  dataset = data.Dataset(x[:32], y[:32], x[32:], y[32:], 2, "tiny-images")
  model = _zoo.ResNet(1, 2, width=2, blocks=1, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.backprop(model, CE), optax.adam(1e-2))
  history = train.fit(model, tx, dataset, loss_fn=CE, epochs=2, batch_size=8, progress=False)
  assert np.isfinite(history.test_loss).all()
  assert not np.allclose(model.stem_norm.mean[...], 0.0)  # running statistics written back
  evaluate = train.make_evaluate(model, CE, 2)
  variables = nnx.state(model, nnx.Not(nnx.Param))
  loss, _ = evaluate(nnx.state(model, nnx.Param), variables, dataset.x_test, dataset.y_test)
  eval_model = nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)
  want = jnp.mean(CE(eval_model(jnp.asarray(dataset.x_test)), jnp.asarray(dataset.y_test)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("rule_name", ["tp", "er"])
def test_rules_that_need_inverses_name_the_layer_without_one(rule_name):
  model, batch = _zoo_case("residual_mlp")
  tx = make_rule(rule_name, model, CE)  # a chain is found from the trace, at the first update
  params = nnx.state(model, nnx.Param)
  with pytest.raises(SiteError, match=r"block \(flax.Linear\) is called more than once"):
    tx.update(None, tx.init(params), params, batch=batch)


def test_layers_under_nnx_scan_are_stacked_sites():
  model, (x, _) = _zoo_case("scanned", batch_size=5)
  _, taps = tapped(model, x)
  assert [(t.path, t.nested, t.stacked, t.preact.shape) for t in taps] == [
    (("embed",), False, False, (5, 5)),
    (("layers",), True, True, (5, 3, 5)),  # batch first, then the three scanned layers
    (("head",), False, False, (5, 3)),
  ]
  deltas = tuple(jnp.full(t.preact.shape, 0.1 * (i + 1)) for i, t in enumerate(taps))
  _, noisy = tapped(model, x, deltas)
  layers = model.layers
  h = jnp.tanh(noisy[0].preact)
  for i in range(3):  # each scanned layer's pre-activation carries its own slice of the perturbation
    z = h @ layers.kernel[...][i] + layers.bias[...][i] + 0.2
    chex.assert_trees_all_close(noisy[1].preact[:, i], z, atol=1e-5)
    h = jnp.tanh(z)


class _Remat(nnx.Module):
  def __init__(self):
    self.inner = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
    self.head = nnx.Linear(5, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.head(nnx.remat(lambda layer, x: jnp.tanh(layer(x)))(self.inner, x))


def test_a_layer_under_nnx_remat_is_a_site():
  model = _Remat()
  x, y = _zoo_case("residual_mlp", batch_size=6)[1]
  _, taps = tapped(model, x)
  assert [(t.path, t.nested, t.stacked) for t in taps] == [(("inner",), True, False), (("head",), False, False)]
  got, _ = _update(rules.backprop(model, CE), model, (x, y))
  chex.assert_trees_all_close(got, _jax_grad(model, (x, y)), atol=1e-6)
