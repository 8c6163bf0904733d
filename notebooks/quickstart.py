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
# # altgrad quick start
#
# One model, every learning rule altgrad has, the same optimizer after each: a table and a plot.
# Each rule is an optax transformation: `optax.chain(rule, optimizer)` is all that changes.

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
import jax
import matplotlib.pyplot as plt
import optax
from flax import nnx

from altgrad import data, diagnostics, losses, nn, rules, train

digits = data.digits()  # 8x8 digits bundled with scikit-learn, standardized
print(digits.x_train.shape, digits.x_test.shape, "rules:", list(rules.RULES))

# %%
histories = {}
for name, make_rule in rules.RULES.items():
  model = nn.MLP((64, 128, 10), activation="tanh", rngs=nnx.Rngs(0))  # same init for every rule
  # ER fixes its own step (it lands on a least-squares refit); the others share Adam.
  # ER refits from statistics streamed over the training set: it is told the set's size.
  optimizer = optax.sgd(rules.OWN_STEP[name]) if name in rules.OWN_STEP else optax.adam(3e-3)
  options = {"data_size": len(digits.x_train)} if name == "er" else {}
  tx = optax.chain(make_rule(model, losses.softmax_cross_entropy, **options), optimizer)
  histories[name] = train.fit(
    model, tx, digits, loss_fn=losses.softmax_cross_entropy, epochs=10, batch_size=64, progress=False
  )

reference = histories["backprop"].median_step_time
print(f"{'rule':<14}{'test acc':>10}{'ms/step':>10}{'x backprop':>12}")
for name, h in histories.items():
  print(
    f"{name:<14}{h.test_accuracy[-1]:>10.4f}{1e3 * h.median_step_time:>10.3f}"
    f"{h.median_step_time / reference:>12.2f}"
  )

# %%
for name, h in histories.items():
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.gca().set(xlabel="epoch", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## The contract, step by step
#
# A rule's `update` ignores the incoming updates and returns a pseudo-gradient shaped like the
# params; the per-layer cosine to the backprop gradient is the diagnostic the field reports.

# %%
model = nn.MLP((64, 128, 10), rngs=nnx.Rngs(1))
params = nnx.state(model, nnx.Param)
batch = (digits.x_train[:64], digits.y_train[:64])
for name, make_rule in rules.RULES.items():
  options = {"data_size": len(digits.x_train)} if name == "er" else {}
  tx = make_rule(model, losses.softmax_cross_entropy, **options)
  updates, _ = tx.update(None, tx.init(params), params, batch=batch)
  cosines = diagnostics.cosine_to_backprop(model, losses.softmax_cross_entropy, updates, params, batch)
  print(name, {layer: round(float(c), 3) for layer, c in cosines.items()})
