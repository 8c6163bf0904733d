"""The models and batches users have: call-time arguments and rngs, dict batches and several
inputs, per-token and auxiliary losses, state made while the model runs, eval mode, remat in the
model's own code, mixed precision, and a small model written like Flax's lm1b transformer."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_rule
from flax import nnx

from altgrad import losses, nn, rules
from altgrad.nn._sites import SiteError

CE = losses.softmax_cross_entropy
RULE_NAMES = sorted(rules.RULES)
GRADIENT_RULES = ("backprop", "consequentialism", "np", "inp", "anp")  # the rules that take any model


def _jit_update(tx, params, batch, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, state, batch)


def _jax_grad(model, loss):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest, copy=True)))(params)


def _close(a, b, **tolerance):
  chex.assert_trees_all_close(nnx.as_pure(a), nnx.as_pure(b), **tolerance)


class CallTime(nnx.Module):
  """Dropout that takes its rngs at call time and a flag at call time, as Flax's examples do."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
    h = jnp.tanh(self.hidden(x))
    return self.head(self.dropout(h, deterministic=not train, rngs=rngs))


def _images(batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(rng.normal(size=(batch_size, 6)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 3, batch_size), jnp.int32),
  }


def _unpack(batch):
  return batch["image"], batch["label"]


def _apply(model, x, rngs):
  return model(x, train=True, rngs=rngs)


@pytest.mark.parametrize("rule_name", GRADIENT_RULES)
def test_call_time_rngs_and_dict_batches(rule_name):
  """The rule calls the model as ``apply`` says, with rngs from its state: backprop is
  ``jax.grad`` at those rngs' dropout masks, and every rule's passes of a step share them."""
  model = CallTime(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  batch = _images()
  tx = make_rule(rule_name, model, apply=_apply, unpack=_unpack)
  state = tx.init(params)
  updates, after = _jit_update(tx, params, batch, state)
  chex.assert_tree_all_finite(updates)
  call_key = jax.random.split(state.common.key, 2)[1]  # the step's call key (Rule.begin)
  x, y = _unpack(batch)
  loss = lambda m: jnp.mean(CE(m(x, train=True, rngs=nnx.Rngs(call_key)), y))  # noqa: E731
  np.testing.assert_allclose(after.common.loss, loss(model), rtol=1e-6)
  if rule_name == "backprop":
    _close(updates, _jax_grad(model, loss), atol=1e-6)
    # the masks change from step to step, and evaluation runs without them
    later, _ = _jit_update(tx, params, batch, after)
    assert not np.allclose(later["head"]["kernel"][...], updates["head"]["kernel"][...])


def test_batch_errors_name_the_way_that_works():
  model = nn.MLP((6, 4, 3), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = rules.backprop(model, CE)
  with pytest.raises(ValueError, match=r"unpack=lambda batch: \(batch\['image'\], batch\['label'\]\)"):
    tx.update(None, tx.init(params), params, batch=_images())
  with pytest.raises(ValueError, match="unpack\\(batch\\) must return \\(inputs, targets\\)"):
    rules.backprop(model, CE, unpack=lambda b: b["image"]).update(None, tx.init(params), params, batch=_images())
  with pytest.raises(TypeError, match="apply must be a function"):
    rules.backprop(model, CE, apply="model(x)")


class TwoInputs(nnx.Module):
  """A model of several inputs: a dict of a sequence and side features."""

  def __init__(self, rngs):
    self.tokens = nnx.Linear(3, 8, rngs=rngs)
    self.side = nnx.Linear(2, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, inputs):
    h = jnp.tanh(self.tokens(inputs["sequence"]).mean(axis=1) + self.side(inputs["side"]))
    return self.head(h)


@pytest.mark.parametrize("rule_name", GRADIENT_RULES)
def test_inputs_may_be_a_tree_of_arrays(rule_name):
  model = TwoInputs(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  inputs = {"sequence": jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32), "side": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
  y = jnp.arange(8) % 4
  updates, state = _jit_update(make_rule(rule_name, model), params, (inputs, y))
  chex.assert_tree_all_finite(updates)
  np.testing.assert_allclose(state.common.loss, jnp.mean(CE(model(inputs), y)), rtol=1e-6)
  if rule_name == "backprop":
    _close(updates, _jax_grad(model, lambda m: jnp.mean(CE(m(inputs), y))), atol=1e-6)
  with pytest.raises(ValueError, match="the inputs disagree on the batch size"):
    make_rule(rule_name, model).update(None, state, params, batch=({**inputs, "side": inputs["side"][:4]}, y))


class Tokens(nnx.Module):
  """A per-token classifier: one output per position."""

  def __init__(self, rngs):
    self.embed = nnx.Linear(3, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.embed(x)))


@pytest.mark.parametrize("rule_name", GRADIENT_RULES)
def test_per_token_losses_and_a_batch_mean_refused_where_credit_is_per_example(rule_name):
  """Losses (batch, time) work for every rule: the objective is the mean over all tokens, and
  node perturbation credits an example with the mean of its tokens' losses."""
  model = Tokens(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32), jnp.asarray(rng.integers(0, 4, (8, 5)), jnp.int32)
  updates, state = _jit_update(make_rule(rule_name, model), params, (x, y))
  chex.assert_tree_all_finite(updates)
  np.testing.assert_allclose(state.common.loss, jnp.mean(CE(model(x), y)), rtol=1e-6)
  mean_loss = lambda out, t: jnp.mean(CE(out, t))  # noqa: E731  (the NNX tutorial's loss)
  if rule_name in ("np", "inp", "anp"):
    with pytest.raises(ValueError, match="loss_fn returned one number for the batch"):
      _jit_update(make_rule(rule_name, model, loss_fn=mean_loss), params, (x, y))
  else:  # one number for the batch is the same objective for the rules that backpropagate
    got, _ = _jit_update(make_rule(rule_name, model, loss_fn=mean_loss), params, (x, y))
    _close(got, updates, rtol=1e-5, atol=1e-7)


class KL(nnx.Variable):
  pass


class VAE(nnx.Module):
  """Written like Flax's VAE example: the encoder sets a KL term while it runs (a Variable made
  in ``__call__``) and draws its noise from a stored rng stream."""

  def __init__(self, rngs):
    self.encoder = nnx.Linear(6, 8, rngs=rngs)
    self.mean = nnx.Linear(8, 2, rngs=rngs)
    self.log_std = nnx.Linear(8, 2, rngs=rngs)
    self.decoder = nnx.Linear(2, 6, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = jax.nn.relu(self.encoder(x))
    mean, log_std = self.mean(h), self.log_std(h)
    self.kl = KL(0.5 * jnp.sum(mean**2 + jnp.exp(2 * log_std) - 1 - 2 * log_std, axis=-1))
    z = mean + jnp.exp(log_std) * jax.random.normal(self.rngs.noise(), mean.shape)
    return self.decoder(z)


def _with_kl(model, x, rngs):
  del rngs
  reconstruction = model(x)
  return reconstruction, nnx.pop(model, KL)["kl"][...]  # the KL term set while it ran


def _elbo(outputs, targets):
  reconstruction, kl = outputs
  return losses.squared_error(reconstruction, targets) + 0.1 * kl


@pytest.mark.parametrize("rule_name", GRADIENT_RULES)
def test_a_model_that_makes_variables_while_it_runs_and_an_auxiliary_loss(rule_name):
  model = VAE(nnx.Rngs(0, noise=1))
  params = nnx.state(model, nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
  # without apply: the KL Variable made in __call__ is an output of the pass, not state
  updates, state = _jit_update(make_rule(rule_name, model, loss_fn=losses.squared_error), params, (x, x))
  chex.assert_tree_all_finite(updates)
  assert ("kl",) not in dict(nnx.to_flat_state(state.common.model_variables))
  # with apply: the KL term reaches the loss
  tx = make_rule(rule_name, model, loss_fn=_elbo, apply=_with_kl)
  updates, state = _jit_update(tx, params, (x, x))
  reference = nnx.clone(model)
  want = jnp.mean(_elbo(_with_kl(reference, x, None), x))
  np.testing.assert_allclose(state.common.loss, want, rtol=1e-6)
  assert int(state.common.model_variables["rngs"]["noise"]["count"][...]) == 1  # the noise stream advanced once
  if rule_name == "backprop":
    _close(updates, _jax_grad(nnx.clone(model), lambda m: jnp.mean(_elbo(_with_kl(m, x, None), x))), atol=1e-6)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(self.norm(self.hidden(x))))


@pytest.mark.parametrize("rule_name", ["backprop", "consequentialism", "anp"])
def test_a_rule_built_after_model_eval_trains_in_training_mode(rule_name):
  """The same update and model state as a rule built in training mode: batch statistics and a
  dropout mask, as a training-mode call has."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  batch = (x, jnp.arange(16) % 3)
  trained, evaluating = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  evaluating.eval()
  params = nnx.state(trained, nnx.Param)
  want, want_state = _jit_update(make_rule(rule_name, trained), params, batch)
  got, state = _jit_update(make_rule(rule_name, evaluating), params, batch)
  _close(got, want, atol=1e-6)
  reference = nnx.clone(trained)
  reference(x)
  _close(state.common.model_variables["norm"], nnx.state(reference.norm, nnx.BatchStat), atol=1e-6)
  assert int(state.common.model_variables["dropout"]["rngs"]["count"][...]) == 1
  assert evaluating.dropout.deterministic  # the user's model keeps its mode


class Remat(nnx.Module):
  """A block under ``jax.checkpoint`` in the model's own code."""

  def __init__(self, rngs):
    self.first = nnx.Linear(4, 8, rngs=rngs)
    self.block = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.first(x))
    h = jax.checkpoint(lambda h: jnp.tanh(self.block(h)))(h)
    return self.head(h)


class RawScan(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(3, 3, rngs=rngs)

  def __call__(self, x):
    return jax.lax.scan(lambda h, _: (jnp.tanh(self.layer(h)), None), x, None, length=2)[0]


def test_a_layer_under_a_raw_jax_transform_counts_as_params_outside_sites():
  """jax.checkpoint (or lax.scan) in the model's own code: its layers are not sites, a warning
  says so, and every rule still updates their params: backprop and CW with the gradient."""
  rng = np.random.default_rng(0)
  cases = [
    (Remat(nnx.Rngs(0)), jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.arange(6) % 3, CE, "block"),
    (RawScan(nnx.Rngs(0)), jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), jnp.zeros((6, 3)), losses.squared_error, "layer"),
  ]
  for model, x, y, loss, inside in cases:
    params = nnx.state(model, nnx.Param)
    gradient = _jax_grad(model, lambda m, x=x, y=y, loss=loss: jnp.mean(loss(m(x), y)))
    with pytest.warns(nn.SiteWarning, match=f"Linear at {inside} is called inside a JAX transformation in the model.s own code, where a rule cannot tap it; NNX.s transforms"):
      backprop, _ = _jit_update(rules.backprop(model, loss), params, (x, y))
    _close(backprop, gradient, atol=1e-6)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", nn.SiteWarning)
      cw, _ = _jit_update(rules.consequentialism(model, loss), params, (x, y))
      node, _ = _jit_update(rules.node_perturbation(model, loss, variant="np", sigma=1e-2, free_params="perturb"), params, (x, y))
    _close(cw[inside], gradient[inside], atol=1e-6)
    assert float(jnp.max(jnp.abs(node[inside]["kernel"][...]))) > 0  # weight perturbation


class MixedMLP(nnx.Module):
  def __init__(self, dtype, rngs):
    self.hidden = nnx.Linear(6, 16, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(16, 3, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_mixed_precision_gives_float32_updates_close_to_the_float32_rule(rule_name):
  """``param_dtype=float32, dtype=bfloat16``: the rules that differentiate the model's own passes
  (backprop, CW, the feedback-alignment family, forward gradients) compute in bfloat16 (updates
  within bfloat16's rounding); NP, TP and ER run their passes in float32 (the float32 rule
  exactly)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32)
  batch = (x, jnp.arange(32) % 3)
  updates = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    if rule_name in ("tp", "er"):  # altgrad's layers, with Flax's dtype arguments
      model = nn.MLP((6, 16, 3), param_dtype=jnp.float32, dtype=dtype, rngs=nnx.Rngs(0))
    else:
      model = MixedMLP(dtype, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    options = {"sigma": 1e-2} if rule_name in ("np", "inp", "anp") else {}
    updates[dtype], _ = _jit_update(make_rule(rule_name, model, **options), params, batch)
  low, full = (jnp.concatenate([u.ravel() for u in jax.tree.leaves(updates[d])]) for d in (jnp.bfloat16, jnp.float32))
  assert low.dtype == jnp.float32
  error = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
  assert error < (1e-6 if rule_name in ("np", "inp", "anp", "tp", "er") else 3e-2), error


class Block(nnx.Module):
  def __init__(self, width, heads, *, rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)


class LM(nnx.Module):
  """Written like Flax's lm1b transformer, small: token and position embeddings, causal
  self-attention blocks, dropout that takes its rngs at call time, a logit per token."""

  def __init__(self, vocab, length, *, width=32, heads=2, depth=2, rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.positions = nnx.Embed(length, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(depth)])
    self.dropout = nnx.Dropout(0.1)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens, *, rngs=None):
    length = tokens.shape[1]
    h = self.embed(tokens) + self.positions(jnp.arange(length))
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      h = h + self.dropout(block.attention(block.norm1(h), mask=mask), rngs=rngs)
      h = h + self.dropout(block.down(nnx.gelu(block.up(block.norm2(h)))), rngs=rngs)
    return self.head(self.norm(h))


def test_an_lm1b_style_transformer_trains_with_per_token_losses():
  """Next-token prediction on a cyclic sequence: the per-token loss falls for backprop and CW;
  ANP runs (finite updates) on the same model."""
  vocab, length = 6, 8
  start = np.random.default_rng(0).integers(0, vocab, 32)
  sequences = (start[:, None] + np.arange(length + 1)[None]) % vocab
  batch = {"inputs": jnp.asarray(sequences[:, :-1]), "targets": jnp.asarray(sequences[:, 1:])}
  options = dict(apply=lambda m, x, rngs: m(x, rngs=rngs), unpack=lambda b: (b["inputs"], b["targets"]))
  for rule_name, steps in (("backprop", 15), ("consequentialism", 15), ("anp", 2)):
    model = LM(vocab, length, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(make_rule(rule_name, model, **options), optax.adam(3e-3))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch, tx=tx):
      updates, state = tx.update(None, state, params, batch=batch)
      return optax.apply_updates(params, updates), state

    logged = []
    for _ in range(steps):
      params, state = step(params, state, batch)
      logged.append(float(optax.tree_utils.tree_get(state, "loss")))
    chex.assert_tree_all_finite(params)
    if rule_name != "anp":
      assert logged[-1] < 0.8 * logged[0], (rule_name, logged)


def test_vmapped_init_gives_each_run_its_own_noise_key():
  """``jax.vmap(tx.init)`` over runs of different seeds: each run's key (and so its noise)
  differs, though the rule was built with one seed."""
  models = [nn.MLP((6, 16, 3), rngs=nnx.Rngs(seed)) for seed in (0, 1)]
  tx = rules.node_perturbation(models[0], CE)
  params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(m, nnx.Param) for m in models])
  states = jax.vmap(tx.init)(params)
  keys = jax.random.key_data(states.common.key)
  assert not np.array_equal(keys[0], keys[1])
  same_params = jax.tree.map(lambda a: jnp.stack([a[0], a[0]]), params)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  updates, _ = jax.jit(jax.vmap(lambda p, s: tx.update(None, s, p, batch=(x, jnp.arange(16) % 3))))(same_params, states)
  kernel = updates["layers"][0]["kernel"][...]
  assert not np.allclose(kernel[0], kernel[1])  # the same params, other noise


class TextCNN(nnx.Module):
  """The JAX AI stack's text classifier, small: an embedding, two strided convolutions each
  under a LayerNorm and relu, max pooling over positions, two dense layers, dropout."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(32, 8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.conv1, self.norm1 = nnx.Conv(8, 8, 4, strides=2, rngs=rngs), nnx.LayerNorm(8, rngs=rngs)
    self.conv2, self.norm2 = nnx.Conv(8, 8, 4, strides=2, rngs=rngs), nnx.LayerNorm(8, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, tokens):
    x = self.dropout(self.embed(tokens))
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    x = nnx.max_pool(x, window_shape=(x.shape[1],)).reshape(x.shape[0], -1)
    return self.fc2(self.dropout(nnx.relu(self.fc1(x))))


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_every_param_of_a_text_cnn_moves_or_the_rule_says_why(rule_name):
  """The embedding and the LayerNorms' scales and biases are params outside linear layers: every
  rule moves them (TP by the loss gradient by default; node perturbation and activity forward
  gradients leave them unchanged by default and warn, naming them, and move them with
  free_params='gradient' or 'perturb'), or refuses (ER)."""
  model = TextCNN(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  batch = {"text": jnp.asarray(np.random.default_rng(0).integers(1, 32, (8, 16)), jnp.int32), "label": jnp.arange(8) % 2}
  unpack = lambda b: (b["text"], b["label"])  # noqa: E731
  frozen_by_default = rule_name in ("np", "inp", "anp", "fga")
  if frozen_by_default:
    with pytest.warns(UserWarning, match="unchanged by default .* They are embed/embedding, norm1/bias, norm1/scale, norm2/bias"):
      frozen, _ = _jit_update(make_rule(rule_name, model, unpack=unpack), params, batch)
    assert float(jnp.max(jnp.abs(frozen["embed"]["embedding"][...]))) == 0
  options = {"free_params": "gradient"} if frozen_by_default else {}
  tx = make_rule(rule_name, model, unpack=unpack, **options)
  if rule_name == "er":
    with pytest.raises(SiteError, match=r"lies norm1 \(flax.LayerNorm\)"):
      _jit_update(tx, params, batch)
    return
  updates, _ = _jit_update(tx, params, batch)
  chex.assert_tree_all_finite(updates)
  moved = {"/".join(map(str, path)): float(jnp.max(jnp.abs(u))) for path, u in nnx.to_flat_state(nnx.State(updates))}
  assert all(size > 0 for size in moved.values()), moved
  if rule_name == "tp":  # the embedding and norms get backprop's gradient
    gradient, _ = _jit_update(make_rule("backprop", model, unpack=lambda b: (b["text"], b["label"])), params, batch)
    for name in ("embed", "norm1", "norm2"):
      _close(updates[name], gradient[name], atol=1e-6)


class EmbeddedChain(nnx.Module):
  """A tanh chain on token embeddings, called with two inputs: the tokens and a scale."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(32, 6, rngs=rngs)
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, tokens, scale):
    return self.head(jnp.tanh(self.hidden(scale[:, None] * self.embed(tokens).mean(axis=1))))


def test_target_propagation_and_er_call_a_model_of_two_inputs_and_er_refuses_an_embedding():
  """``apply=`` reaches TP and ER as every other rule: TP's readout update is backprop's and the
  embedding gets the loss gradient; ER has no update for the embedding and says so, and with the
  layers' params alone (NNX's wrt=) it refits them."""
  model = EmbeddedChain(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 32, (8, 5)), jnp.int32), "scale": jnp.linspace(0.5, 1.5, 8), "label": jnp.arange(8) % 3}
  options = dict(apply=lambda m, x, rngs: m(*x), unpack=lambda b: ((b["tokens"], b["scale"]), b["label"]))
  params = nnx.state(model, nnx.Param)
  tp, _ = _jit_update(make_rule("tp", model, **options), params, batch)
  bp, _ = _jit_update(make_rule("backprop", model, **options), params, batch)
  _close(tp["head"], bp["head"], atol=1e-6)
  _close(tp["embed"], bp["embed"], atol=1e-6)
  er = make_rule("er", model, **options)
  with pytest.raises(SiteError, match=r"^expectation_reflection has no update for params outside linear layers .*They are embed/embedding"):
    _jit_update(er, params, batch)
  layers = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed"))))
  refit, _ = _jit_update(er, layers, batch)
  assert set(refit) == {"hidden", "head"} and float(jnp.max(jnp.abs(refit["head"]["kernel"][...]))) > 0


class BatchNormed(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(4)])
    self.norms = nnx.List([nnx.BatchNorm(6, rngs=rngs) for _ in range(4)])
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    for layer, norm in zip(self.layers, self.norms, strict=True):
      x = self.dropout(jnp.tanh(norm(layer(x))))
    return self.head(x)


def test_refusals_say_what_works_within_their_first_200_characters():
  """A refusal names the problem and the fix first; details (names of variables, layers) after."""
  ce = losses.softmax_cross_entropy
  mlp = nn.MLP((6, 4, 3), rngs=nnx.Rngs(0))
  normed = BatchNormed(nnx.Rngs(0))
  tokens = (jnp.zeros((2, 5), jnp.int32), jnp.ones(2)), jnp.zeros(2, jnp.int32)
  rnn = nnx.Sequential(nnx.RNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))), lambda h: h[:, -1], nnx.Linear(4, 3, rngs=nnx.Rngs(0)))

  def first_update(tx, params, batch):
    return tx.update(None, tx.init(params), params, batch=batch)

  cases = [
    (lambda: nnx.Optimizer(normed, rules.backprop(normed, ce), wrt=nnx.Param), "use altgrad.Optimizer(model, tx"),
    (
      lambda: first_update(rules.node_perturbation(mlp, lambda o, t: jnp.mean(ce(o, t))), nnx.state(mlp, nnx.Param), (jnp.ones((2, 6)), jnp.zeros(2, jnp.int32))),
      "return the per-example losses",
    ),
    (lambda: first_update(rules.backprop(mlp, ce), nnx.state(mlp, nnx.Param), _images()), "unpack=lambda batch"),
    (lambda: rules.expectation_reflection(rnn, data_size=8), "use target_propagation"),
    (
      lambda: first_update(make_rule("er", EmbeddedChain(nnx.Rngs(0)), apply=lambda m, x, rngs: m(*x)), nnx.state(EmbeddedChain(nnx.Rngs(0)), nnx.Param), tokens),
      "give the rule the layers' params only",
    ),
  ]
  for make, fix in cases:
    with pytest.raises((TypeError, ValueError)) as raised:
      make()
    message = str(raised.value)
    assert fix in message[:200], message
