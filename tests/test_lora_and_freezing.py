"""LoRA layers and NNX's freezing (``wrt=``): a rule computes updates for the params it is
given, takes the others from the model, and consequentialism emends the LoRA factors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_rule
from flax import nnx

import altgrad
from altgrad import losses, rules
from altgrad.nn._sites import SiteError

CE = losses.softmax_cross_entropy


class LoRAMLP(nnx.Module):
  """Both of Flax's ways to add LoRA: ``nnx.LoRALinear`` and ``nnx.LoRA(base_module=...)``."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.LoRALinear(6, 16, lora_rank=2, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.head = nnx.LoRA(16, 2, 3, base_module=nnx.Linear(16, 3, rngs=rngs), rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.norm(self.hidden(x))))


def _model(seed=0):
  model = LoRAMLP(nnx.Rngs(seed))
  for lora in (model.hidden.lora, model.head):  # B starts at zero; a trained adapter has not
    lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 1), lora.lora_b.shape)
  return model


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.arange(8) % 3


def _update(tx, params, batch):
  return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, tx.init(params), batch)[0]


def test_wrt_lora_params_follows_the_nnx_loop():
  """``altgrad.Optimizer(model, chain(backprop, adam), wrt=nnx.LoRAParam)`` is the LoRA
  tutorial's ``nnx.Optimizer(..., wrt=nnx.LoRAParam)`` loop with ``nnx.DiffState``: the same
  params after every step, the base weights untouched."""
  x, y = _batch()
  reference, model = _model(), _model()
  frozen = nnx.state(model, nnx.Not(nnx.LoRAParam))
  nnx_optimizer = nnx.Optimizer(reference, optax.adam(1e-2), wrt=nnx.LoRAParam)
  optimizer = altgrad.Optimizer(model, optax.chain(rules.backprop(model, CE), optax.adam(1e-2)), wrt=nnx.LoRAParam)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss = lambda m: jnp.mean(CE(m(x), y))  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, None, batch=(x, y))

  for _ in range(3):
    nnx_step(reference, nnx_optimizer)
    step(model, optimizer)
    chex.assert_trees_all_close(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param), atol=1e-6)
  chex.assert_trees_all_equal(nnx.state(model, nnx.Not(nnx.LoRAParam)), frozen)
  assert not np.allclose(model.hidden.lora.lora_a[...], _model().hidden.lora.lora_a[...])


@pytest.mark.parametrize("rule_name", sorted(set(rules.RULES) - {"er"}))
def test_every_rule_updates_only_the_params_it_is_given(rule_name):
  """On a subset of the params (``tx.init``/``update`` with ``nnx.state(model, nnx.LoRAParam)``)
  the update has exactly that subset's structure, and equals the update of the same params
  computed with every param given where the rule's update of a layer does not depend on which
  params move (TP; node perturbation's noise key mixes in a hash of the params it is given)."""
  model, batch = _model(), _batch()
  lora = nnx.state(model, nnx.LoRAParam)
  options = {"free_params": "frozen"} if rule_name in ("np", "inp", "anp", "tp") else {}
  some = _update(make_rule(rule_name, model, **options), lora, batch)
  assert jax.tree.structure(some) == jax.tree.structure(lora)
  chex.assert_tree_all_finite(some)
  assert all(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(some))
  if rule_name == "tp":
    every = _update(make_rule(rule_name, model, **options), nnx.state(model, nnx.Param), batch)
    chex.assert_trees_all_close(some, nnx.state(nnx.State(every), nnx.LoRAParam), atol=1e-6)


def test_params_that_are_not_the_models_are_refused():
  model = _model()
  tx = rules.backprop(model, CE)
  with pytest.raises(ValueError, match="the model has no other/kernel"):
    tx.init({"other": {"kernel": jnp.zeros((2, 2))}})


def test_consequentialism_emends_the_lora_factors():
  """CW on a LoRA layer: the base ``x W + b`` and the up-projection ``(x A) B`` add into one
  output and are emended together; the down-projection ``A`` under ``B`` gets the error
  ``D B^T`` on rows ``x``. With the base frozen (``wrt=nnx.LoRAParam``) ``B`` alone is emended
  on rows ``x A``. It is not backprop's update."""
  model = _model()
  x, y = _batch()
  lora = nnx.state(model, nnx.LoRAParam)
  cw = _update(rules.consequentialism(model, CE), lora, (x, y))
  bp = _update(rules.backprop(model, CE), lora, (x, y))
  assert not np.allclose(cw["hidden"]["lora"]["lora_b"][...], bp["hidden"]["lora"]["lora_b"][...], atol=1e-3)
  # the hidden layer's factors by hand, from backprop's errors at its output
  back = altgrad.nn.PureModel(model).errors(nnx.state(model, nnx.Param), x, y, CE)
  tap, error = back.taps[0], 8 * back.errors[0]  # errors of the summed loss
  a, b = model.hidden.lora.lora_a[...], model.hidden.lora.lora_b[...]
  np.testing.assert_allclose(cw["hidden"]["lora"]["lora_b"][...], rules.emend(tap.inputs @ a, error, eps=1.0), atol=1e-6)
  np.testing.assert_allclose(cw["hidden"]["lora"]["lora_a"][...], rules.emend(tap.inputs, error @ b.T, eps=1.0), atol=1e-6)
  # every param given: the base and B side by side, one solve
  every = _update(rules.consequentialism(model, CE), nnx.state(model, nnx.Param), (x, y))
  rows = jnp.concatenate([tap.inputs, jnp.ones((8, 1)), tap.inputs @ a], axis=1)
  joint = rules.emend(rows, error, eps=1.0)
  np.testing.assert_allclose(every["hidden"]["kernel"][...], joint[:6], atol=1e-6)
  np.testing.assert_allclose(every["hidden"]["bias"][...], joint[6], atol=1e-6)
  np.testing.assert_allclose(every["hidden"]["lora"]["lora_b"][...], joint[7:], atol=1e-6)


def test_expectation_reflection_refuses_lora_layers_and_says_what_works():
  with pytest.raises(SiteError, match=r"\(flax.LoRA\) is not one matrix on its input features \(a LoRA layer's"):
    make_rule("er", _model())
