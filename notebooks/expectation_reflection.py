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
# # Expectation Reflection
#
# Kim, Soh, Periwal and Jo, arXiv:2503.10144. The field of each output is multiplied by the ratio
# of the observed to the expected output, then the weights are refit by least squares: no loss, no
# learning rate, near-optimal weights in one iteration. The multilayer rule here is a
# **reconstruction** from the paper's abstract (targets through regularized layer inverses), not
# the paper's algorithm.

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
# ## The single-layer classifier against logistic regression

# %%
from sklearn.linear_model import LogisticRegression

cancer = data.breast_cancer()
er = rules.ERClassifier().fit(cancer.x_train, cancer.y_train)
lr = LogisticRegression(max_iter=1000).fit(cancer.x_train, cancer.y_train)
print(
  f"ER {er.score(cancer.x_test, cancer.y_test):.4f} after {er.n_iter_} refits;",
  f"logistic regression {lr.score(cancer.x_test, cancer.y_test):.4f}",
)

# %% [markdown]
# ## Accuracy after each sweep (full batch, `optax.sgd(1.0)` lands on the refit)

# %%
for hidden in ((), (100,)):
  model = nn.MLP((64, *hidden, 10), rngs=nnx.Rngs(0))
  tx = optax.chain(rules.expectation_reflection(model, data_size=len(digits.x_train)), optax.sgd(1.0))
  h = train.fit(
    model,
    tx,
    digits,
    loss_fn=CE,
    epochs=20,
    batch_size=len(digits.x_train),
    stop_on_discrepancy=True,
    progress=False,
  )
  print(f"hidden {hidden}: after one sweep {h.test_accuracy[0]:.4f}; kept epoch {h.restored_epoch}")
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=f"hidden {hidden}")
plt.gca().set(xlabel="sweep", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Minibatches: moments streamed over the data set
#
# A refit from one minibatch alone interpolates that batch (more unknowns per unit than rows) and
# forgets the rest of the data set. ER keeps each layer's moments across batches,
# `M <- (1 - B/N) M + moments(batch)` with `N = data_size`, so every refit sees statistics of about
# the whole training set. `data_size="per_batch"` is the refit on each batch alone, for comparison.

# %%
for data_size in (len(digits.x_train), "per_batch"):
  model = nn.MLP((64, 128, 128, 10), rngs=nnx.Rngs(0))
  tx = optax.chain(rules.expectation_reflection(model, data_size=data_size), optax.sgd(1.0))
  h = train.fit(model, tx, digits, loss_fn=CE, epochs=5, batch_size=64, progress=False)
  print(f"data_size={data_size!r}:", " ".join(f"{a:.3f}" for a in h.test_accuracy))
  plt.plot(h.epoch, h.test_accuracy, marker="o", label=f"data_size={data_size!r}")
plt.gca().set(xlabel="epoch (batches of 64)", ylabel="test accuracy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## The single-layer refit: moments add over batches, one solve

# %%
model = nn.MLP((64, 10), rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
moments = rules.reflection_moments(model, params, (x[:700], y[:700])) + rules.reflection_moments(
  model, params, (x[700:], y[700:])
)
refit = rules.reflection_solution(model, params, moments)
whole = rules.reflection_solution(model, params, rules.reflection_moments(model, params, (x, y)))
print(
  "max difference, two batches vs one:",
  max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(refit), jax.tree.leaves(whole), strict=False)
  ),
)
