# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Write your own rule: feedback alignment in a few lines
#
# Every rule in altgrad is written on the same public machinery (`altgrad.rules.Rule` and the
# model's view, `step.model`): a rule of your own is an optax transformation like theirs and
# gets their checks and tools (`altgrad.Optimizer`, `fit`, checkpoints, sharding, schedules). Here
# we write feedback alignment (Lillicrap et al. 2016): backprop's chain, but each layer's error
# crosses the layer backwards through fixed random weights `B` instead of its own `W`. The
# backward hook `nn.through(B)` does the crossing in the same backward pass, on any layer kind.
# The result is checked against the built-in `rules.feedback_alignment`, step for step.

# %%
# Installs altgrad where it is missing (Colab, a fresh environment) with pip alone: from its
# repository, or from ALTGRAD_SOURCE if set (a wheel, a path or any other pip requirement).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("altgrad") is None:
  source = os.environ.get("ALTGRAD_SOURCE", "altgrad @ git+https://github.com/altgrad/altgrad")
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])
import jax

print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.devices()}")


# %%
from typing import Any, NamedTuple

import numpy as np
import optax
from flax import nnx

from altgrad import data, losses, nn, rules


class MyFAState(NamedTuple):
  common: rules.Common  # what every rule carries: step count, key, last loss, model variables
  feedback: Any  # B, shaped like the linear layers' params


def my_feedback_alignment(model, loss_fn, *, key=0):
  rule = rules.Rule("my_feedback_alignment", model, loss_fn, key=key)

  def init(params):
    common = rule.common(params)
    return MyFAState(common, rules.feedback_weights(model, jax.random.fold_in(common.key, 1)))

  def step(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets)
    back = step.model.errors(params, inputs, targets, loss_fn, backward=nn.through(state.feedback))
    updates = optax.tree.add(step.model.updates_from_errors(params, back.taps, back.errors), back.residual)
    variables = step.model.next_variables(params, back.variables, back.taps)
    return updates, MyFAState(rule.finish(step, back.loss, variables), state.feedback)

  return rule.transformation(init, step)


# %% [markdown]
# ## Train it beside the built-in rule on the digits

# %%
digits = data.digits()
CE = losses.softmax_cross_entropy
runs = {}
for name, make in (("mine", my_feedback_alignment), ("built-in", rules.feedback_alignment)):
  model = nn.MLP((64, 32, 10), rngs=nnx.Rngs(0))
  tx = optax.chain(make(model, CE), optax.adam(3e-3))
  params, state = nnx.state(model, nnx.Param), None
  state = tx.init(params)
  step = jax.jit(lambda p, s, b, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(None, s, p, batch=b)))
  for _ in range(3):  # epochs
    for i in range(0, len(digits.x_train) - 63, 64):
      params, state = step(params, state, (digits.x_train[i : i + 64], digits.y_train[i : i + 64]))
  model = nnx.merge(nnx.graphdef(model), params)
  accuracy = float(np.mean(np.argmax(model(digits.x_test), -1) == digits.y_test))
  runs[name] = params
  print(f"{name}: test accuracy {accuracy:.3f}")

difference = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(runs["mine"]), jax.tree.leaves(runs["built-in"]), strict=True))
print(f"largest difference between the two runs' params: {difference:.1e}")
assert difference < 1e-5
