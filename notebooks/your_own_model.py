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
# # Your own Flax NNX model in the NNX tutorial's loop, three learning rules
#
# A CNN written as in the Flax NNX MNIST tutorial, with BatchNorm and dropout added, trained with
# the tutorial's own loop (`nnx.Optimizer`, `nnx.jit`, `nnx.MultiMetric`, batches as dicts
# `{'image', 'label'}`) on scikit-learn's 8x8 digits. The learning rule is the only line that
# changes: backprop, consequentialism (CW) and activity-based node perturbation (ANP). The rule
# makes the update from the batch (no gradient is passed), logs the loss of the pass it ran, and
# `altgrad.Optimizer` (`nnx.Optimizer` for a rule) keeps the BatchNorm statistics and dropout's
# RNG counts in the model, so `model.eval()` evaluates with current statistics.

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
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import altgrad
from altgrad import data, losses, rules

digits = data.digits()  # 8x8 digits bundled with scikit-learn, standardized
train_images, test_images = digits.x_train.reshape(-1, 8, 8, 1), digits.x_test.reshape(-1, 8, 8, 1)


def batches(images, labels, batch_size, seed):
  """Shuffled dict batches, as the tutorial's data pipeline gives them."""
  order = np.random.default_rng(seed).permutation(len(images))
  for i in range(0, len(order) - batch_size + 1, batch_size):
    yield {"image": images[order[i : i + batch_size]], "label": labels[order[i : i + batch_size]]}


# %%
class CNN(nnx.Module):
  """The tutorial's CNN, sized for 8x8 images, with BatchNorm and dropout."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
    x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)))
    return self.linear2(x)


# %% [markdown]
# ## The tutorial's loop; one line changes: the rule

# %%
CE = losses.softmax_cross_entropy  # per-example losses: the rules take the mean


def unpack(batch):
  return (batch["image"], batch["label"])


make_rule = {
  "backprop": lambda model: rules.backprop(model, CE, unpack=unpack),
  "cw": lambda model: rules.consequentialism(model, CE, unpack=unpack),
  "anp": lambda model: rules.node_perturbation(model, CE, variant="anp", unpack=unpack),
}


@nnx.jit
def train_step(model, optimizer, metrics, batch):
  optimizer.update(model, None, batch=batch)  # the rule makes the update from the batch
  metrics.update(loss=optax.tree_utils.tree_get(optimizer.opt_state, "loss"))  # the rule's own pass


@nnx.jit
def eval_step(model, metrics, batch):
  logits = model(batch["image"])
  metrics.update(loss=CE(logits, batch["label"]).mean(), logits=logits, labels=batch["label"])


history = {}
for name, rule_of in make_rule.items():
  model = CNN(rngs=nnx.Rngs(0))  # the same initial params for every rule
  optimizer = altgrad.Optimizer(model, optax.chain(rule_of(model), optax.adamw(3e-3)), wrt=nnx.Param)
  train_metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
  eval_metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  history[name] = {"train_loss": [], "test_loss": [], "test_accuracy": []}
  for epoch in range(5):
    model.train()
    for batch in batches(train_images, digits.y_train, 32, seed=epoch):
      train_step(model, optimizer, train_metrics, batch)
    history[name]["train_loss"].append(float(train_metrics.compute()["loss"]))
    train_metrics.reset()
    model.eval()  # running BatchNorm statistics (kept in the model), no dropout
    for batch in batches(test_images, digits.y_test, 120, seed=0):
      eval_step(model, eval_metrics, batch)
    result = eval_metrics.compute()
    history[name]["test_loss"].append(float(result["loss"]))
    history[name]["test_accuracy"].append(float(result["accuracy"]))
    eval_metrics.reset()
  print(
    f"{name:9s} train loss {history[name]['train_loss'][-1]:.3f}  test accuracy {history[name]['test_accuracy'][-1]:.3f}"
  )

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, h in history.items():
  epochs = range(1, len(h["train_loss"]) + 1)
  left.plot(epochs, h["train_loss"], marker="o", label=name)
  right.plot(epochs, h["test_accuracy"], marker="o", label=name)
left.set(xlabel="epoch", ylabel="train loss (logged by the rule)")
right.set(xlabel="epoch", ylabel="test accuracy")
for ax in (left, right):
  ax.legend()
  ax.grid(alpha=0.3)
plt.show()
