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
# # Target propagation via regularized inversion
#
# Roulet and Harchaoui, arXiv:2112.01453. The last hidden state gets a target one gradient step
# away; targets travel back through each layer's (or each time step's) regularized inverse
# `argmin_h ||a^-1(v) - linear(h)||^2 + reg ||h||^2`, and each layer moves toward its target. `reg`
# sets how far back the targets carry signal.

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
import optax
from flax import nnx

from altgrad import data, losses, nn, rules, train

CE = losses.softmax_cross_entropy
digits = data.digits()

# %% [markdown]
# ## Displacement norms over time, for several `reg`

# %%
task = data.temporal_order(60, num_train=64, num_test=8)
model = nn.SimpleRNN(6, 100, 4, rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
batch = (jnp.asarray(task.x_train), jnp.asarray(task.y_train))
for reg in (0.1, 1.0, 10.0):
  (d,) = rules.target_displacements(model, CE, params, batch, reg=reg)
  plt.semilogy(jnp.sqrt(jnp.mean(d * d, axis=(0, 2))), label=f"reg={reg}")
plt.gca().set(xlabel="time step", ylabel="RMS displacement")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## TP against BPTT on a short temporal-order task

# %%
task = data.temporal_order(30, num_train=4000, num_test=500)
for name, rule, optimizer in (
  ("bptt", lambda m: rules.backprop(m, CE), optax.sgd(1e-3, momentum=0.9, nesterov=True)),
  ("tp", lambda m: rules.target_propagation(m, CE, reg=1.0, lr_target=1e-2), optax.sgd(0.1)),
):
  model = nn.SimpleRNN(6, 100, 4, rngs=nnx.Rngs(0))
  h = train.fit(
    model, optax.chain(rule(model), optimizer), task, loss_fn=CE, epochs=5, batch_size=20, progress=False
  )
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.gca().set(xlabel="epoch", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
