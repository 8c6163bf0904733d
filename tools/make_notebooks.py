"""Writes notebooks/*.ipynb from the cell sources below (run after editing them)."""

from pathlib import Path

import nbformat

INSTALL = """\
# In Colab or a fresh environment, install altgrad first (skipped where it is installed).
import importlib.util, subprocess, sys
if importlib.util.find_spec("altgrad") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "altgrad"])"""

QUICKSTART = [
  (
    "md",
    """\
# altgrad quick start

One model, every learning rule altgrad has, the same optimizer after each: a table and a plot.
Each rule is an optax transformation: `optax.chain(rule, optimizer)` is all that changes.""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
import jax, optax
from flax import nnx
import matplotlib.pyplot as plt
from altgrad import data, diagnostics, losses, nn, rules, train

digits = data.digits()  # 8x8 digits bundled with scikit-learn, standardized
print(digits.x_train.shape, digits.x_test.shape, "rules:", list(rules.RULES))""",
  ),
  (
    "code",
    """\
histories = {}
for name, make_rule in rules.RULES.items():
    model = nn.MLP((64, 128, 10), activation="tanh", rngs=nnx.Rngs(0))  # same init for every rule
    # ER fixes its own step (it lands on a least-squares refit); the others share Adam
    optimizer = optax.sgd(rules.OWN_STEP[name]) if name in rules.OWN_STEP else optax.adam(3e-3)
    tx = optax.chain(make_rule(model, losses.softmax_cross_entropy), optimizer)
    histories[name] = train.fit(model, tx, digits, loss_fn=losses.softmax_cross_entropy,
                                epochs=10, batch_size=64, progress=False)

reference = histories["backprop"].median_step_time
print(f"{'rule':<14}{'test acc':>10}{'ms/step':>10}{'x backprop':>12}")
for name, h in histories.items():
    print(f"{name:<14}{h.test_accuracy[-1]:>10.4f}{1e3 * h.median_step_time:>10.3f}"
          f"{h.median_step_time / reference:>12.2f}")""",
  ),
  (
    "code",
    """\
for name, h in histories.items():
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
  (
    "md",
    """\
## The contract, step by step

A rule's `update` ignores the incoming updates and returns a pseudo-gradient shaped like the
params; the per-layer cosine to the backprop gradient is the diagnostic the field reports.""",
  ),
  (
    "code",
    """\
model = nn.MLP((64, 128, 10), rngs=nnx.Rngs(1))
params = nnx.state(model, nnx.Param)
batch = (digits.x_train[:64], digits.y_train[:64])
for name, make_rule in rules.RULES.items():
    tx = make_rule(model, losses.softmax_cross_entropy)
    updates, _ = tx.update(None, tx.init(params), params, batch=batch)
    cosines = diagnostics.cosine_to_backprop(model, losses.softmax_cross_entropy, updates, params, batch)
    print(name, {layer: round(float(c), 3) for layer, c in cosines.items()})""",
  ),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART}


def build(cells):
  nb = nbformat.v4.new_notebook()
  nb.cells = [
    nbformat.v4.new_markdown_cell(s) if kind == "md" else nbformat.v4.new_code_cell(s) for kind, s in cells
  ]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


if __name__ == "__main__":
  out = Path(__file__).resolve().parent.parent / "notebooks"
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(cells), out / name)
    print("wrote", out / name)
