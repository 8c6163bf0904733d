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
# # Node perturbation (NP, INP, ANP) with decorrelation
#
# Dalm, van Gerven and Ahmad, arXiv:2310.00965. Noise at every pre-activation changes the loss; the
# change, times the noise (NP), or times the *measured* activity change normalized by its squared
# norm (ANP), estimates each layer's error without a backward pass. INP perturbs one layer per pass.
# NP and INP are unbiased; ANP is biased toward a descent direction with lower variance. A
# decorrelating matrix in front of each layer makes these estimates far more useful.

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
# ## Estimate quality against the number of noise samples (cosine to the backprop gradient)

# %%
model = nn.MLP((64, 64, 10), rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
batch = (jnp.asarray(digits.x_train[:128]), jnp.asarray(digits.y_train[:128]))
bp = rules.backprop(model, CE)
grad = bp.update(None, bp.init(params), params, batch=batch)[0]


def flat(t):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])


def cos(a, b):
  return float(flat(a) @ flat(b) / jnp.linalg.norm(flat(a)) / jnp.linalg.norm(flat(b)))


counts = [1, 4, 16, 64, 256]
for variant in ("np", "inp", "anp"):
  values = []
  for k in counts:
    tx = rules.node_perturbation(model, CE, variant=variant, samples=k)
    values.append(cos(tx.update(None, tx.init(params), params, batch=batch)[0], grad))
  plt.semilogx(counts, values, marker="o", label=variant)
plt.gca().set(xlabel="noise samples per step", ylabel="cosine to backprop")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## The effect of decorrelation

# %%
for name, decorrelation_lr in (("anp", None), ("danp", 1e-3)):
  model = nn.MLP((64, 64, 10), activation="leaky_relu", decorrelation_lr=decorrelation_lr, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.node_perturbation(model, CE, variant="anp"), optax.adam(1e-3))
  h = train.fit(model, tx, digits, loss_fn=CE, epochs=10, batch_size=32, progress=False)
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.gca().set(xlabel="epoch", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
