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
# # Consequentialism weight updates (mini-batch NLMS)
#
# Paeedeh and Ghiasi-Shirazi, arXiv:2003.05164; a **reconstruction** from the abstracts. Backprop's
# step on one example also moves the outputs of the others (interference) and scales with the
# inputs' norm. CW predicts the step's consequence on the batch's own outputs and emends it so each
# example moves by what it asked for: `X^T (X X^T + eps I)^-1 D`.

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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from altgrad import data, losses, nn, rules, train

CE = losses.softmax_cross_entropy
digits = data.digits()

# %% [markdown]
# ## Interference before and after emendation

# %%
from altgrad.rules import emend

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(16, 64)) * rng.uniform(0.1, 10, 64), jnp.float32)
rows = jnp.concatenate([x, jnp.ones((16, 1))], axis=1)
d = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
for name, update in (("backprop", rows.T @ d), ("cw", emend(rows, d, eps=1e-3))):
  consequence = rows @ update  # how each example's output moves
  scale = float(jnp.sum(consequence * d) / jnp.sum(d * d))
  print(
    f"{name:9s} relative residual of the consequence: {float(jnp.linalg.norm(consequence / scale - d) / jnp.linalg.norm(d)):.2e}"
  )

# %% [markdown]
# ## CW-SGD against SGD

# %%
for name, rule, lr in (("sgd", rules.backprop, 0.05), ("cw-sgd", rules.consequentialism, 0.5)):
  model = nn.MLP((64, 128, 10), rngs=nnx.Rngs(0))
  h = train.fit(
    model, optax.chain(rule(model, CE), optax.sgd(lr)), digits, loss_fn=CE, epochs=10, progress=False
  )
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.gca().set(xlabel="epoch", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
