"""Writes notebooks/*.ipynb from the cell sources below (run after editing them)."""

import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
#: Where the notebooks install altgrad from: pyproject's project.urls, the one place it is written.
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]

INSTALL = f"""\
# Installs altgrad where it is missing (Colab, a fresh environment) with pip alone: from its
# repository, or from ALTGRAD_SOURCE if set (a wheel, a path or any other pip requirement).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("altgrad") is None:
    source = os.environ.get("ALTGRAD_SOURCE", "altgrad @ git+{REPOSITORY}")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])
import jax
print(f"JAX {{jax.__version__}} on {{jax.default_backend()}}: {{jax.devices()}}")"""

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
    # ER fixes its own step (it lands on a least-squares refit); the others share Adam.
    # ER refits from statistics streamed over the training set: it is told the set's size.
    optimizer = optax.sgd(rules.OWN_STEP[name]) if name in rules.OWN_STEP else optax.adam(3e-3)
    options = {"data_size": len(digits.x_train)} if name == "er" else {}
    tx = optax.chain(make_rule(model, losses.softmax_cross_entropy, **options), optimizer)
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
    options = {"data_size": len(digits.x_train)} if name == "er" else {}
    tx = make_rule(model, losses.softmax_cross_entropy, **options)
    updates, _ = tx.update(None, tx.init(params), params, batch=batch)
    cosines = diagnostics.cosine_to_backprop(model, losses.softmax_cross_entropy, updates, params, batch)
    print(name, {layer: round(float(c), 3) for layer, c in cosines.items()})""",
  ),
]

IMPORTS = """\
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import matplotlib.pyplot as plt
from altgrad import data, diagnostics, losses, nn, rules, train
CE = losses.softmax_cross_entropy
digits = data.digits()"""

NODE_PERTURBATION = [
  (
    "md",
    """\
# Node perturbation (NP, INP, ANP) with decorrelation

Dalm, van Gerven and Ahmad, arXiv:2310.00965. Noise at every pre-activation changes the loss; the
change, times the noise (NP), or times the *measured* activity change normalized by its squared
norm (ANP), estimates each layer's error without a backward pass. INP perturbs one layer per pass.
NP and INP are unbiased; ANP is biased toward a descent direction with lower variance. A
decorrelating matrix in front of each layer makes these estimates far more useful.""",
  ),
  ("code", INSTALL),
  ("code", IMPORTS),
  ("md", "## Estimate quality against the number of noise samples (cosine to the backprop gradient)"),
  (
    "code",
    """\
model = nn.MLP((64, 64, 10), rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
batch = (jnp.asarray(digits.x_train[:128]), jnp.asarray(digits.y_train[:128]))
bp = rules.backprop(model, CE)
grad = bp.update(None, bp.init(params), params, batch=batch)[0]
flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])
cos = lambda a, b: float(flat(a) @ flat(b) / jnp.linalg.norm(flat(a)) / jnp.linalg.norm(flat(b)))
counts = [1, 4, 16, 64, 256]
for variant in ("np", "inp", "anp"):
    values = []
    for k in counts:
        tx = rules.node_perturbation(model, CE, variant=variant, samples=k)
        values.append(cos(tx.update(None, tx.init(params), params, batch=batch)[0], grad))
    plt.semilogx(counts, values, marker="o", label=variant)
plt.xlabel("noise samples per step"); plt.ylabel("cosine to backprop"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
  ("md", "## The effect of decorrelation"),
  (
    "code",
    """\
for name, decorrelation_lr in (("anp", None), ("danp", 1e-3)):
    model = nn.MLP((64, 64, 10), activation="leaky_relu", decorrelation_lr=decorrelation_lr, rngs=nnx.Rngs(0))
    tx = optax.chain(rules.node_perturbation(model, CE, variant="anp"), optax.adam(1e-3))
    h = train.fit(model, tx, digits, loss_fn=CE, epochs=10, batch_size=32, progress=False)
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
]

TARGET_PROPAGATION = [
  (
    "md",
    """\
# Target propagation via regularized inversion

Roulet and Harchaoui, arXiv:2112.01453. The last hidden state gets a target one gradient step
away; targets travel back through each layer's (or each time step's) regularized inverse
`argmin_h ||a^-1(v) - linear(h)||^2 + reg ||h||^2`, and each layer moves toward its target. `reg`
sets how far back the targets carry signal.""",
  ),
  ("code", INSTALL),
  ("code", IMPORTS),
  ("md", "## Displacement norms over time, for several `reg`"),
  (
    "code",
    """\
task = data.temporal_order(60, num_train=64, num_test=8)
model = nn.SimpleRNN(6, 100, 4, rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
batch = (jnp.asarray(task.x_train), jnp.asarray(task.y_train))
for reg in (0.1, 1.0, 10.0):
    (d,) = rules.target_displacements(model, CE, params, batch, reg=reg)
    plt.semilogy(jnp.sqrt(jnp.mean(d * d, axis=(0, 2))), label=f"reg={reg}")
plt.xlabel("time step"); plt.ylabel("RMS displacement"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
  ("md", "## TP against BPTT on a short temporal-order task"),
  (
    "code",
    """\
task = data.temporal_order(30, num_train=4000, num_test=500)
for name, rule, optimizer in (
    ("bptt", lambda m: rules.backprop(m, CE), optax.sgd(1e-3, momentum=0.9, nesterov=True)),
    ("tp", lambda m: rules.target_propagation(m, CE, reg=1.0, lr_target=1e-2), optax.sgd(0.1)),
):
    model = nn.SimpleRNN(6, 100, 4, rngs=nnx.Rngs(0))
    h = train.fit(model, optax.chain(rule(model), optimizer), task, loss_fn=CE, epochs=5, batch_size=20, progress=False)
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
]

EXPECTATION_REFLECTION = [
  (
    "md",
    """\
# Expectation Reflection

Kim, Soh, Periwal and Jo, arXiv:2503.10144. The field of each output is multiplied by the ratio
of the observed to the expected output, then the weights are refit by least squares: no loss, no
learning rate, near-optimal weights in one iteration. The multilayer rule here is a
**reconstruction** from the paper's abstract (targets through regularized layer inverses), not
the paper's algorithm.""",
  ),
  ("code", INSTALL),
  ("code", IMPORTS),
  ("md", "## The single-layer classifier against logistic regression"),
  (
    "code",
    """\
from sklearn.linear_model import LogisticRegression
cancer = data.breast_cancer()
er = rules.ERClassifier().fit(cancer.x_train, cancer.y_train)
lr = LogisticRegression(max_iter=1000).fit(cancer.x_train, cancer.y_train)
print(f"ER {er.score(cancer.x_test, cancer.y_test):.4f} after {er.n_iter_} refits;",
      f"logistic regression {lr.score(cancer.x_test, cancer.y_test):.4f}")""",
  ),
  ("md", "## Accuracy after each sweep (full batch, `optax.sgd(1.0)` lands on the refit)"),
  (
    "code",
    """\
for hidden in ((), (100,)):
    model = nn.MLP((64, *hidden, 10), rngs=nnx.Rngs(0))
    tx = optax.chain(rules.expectation_reflection(model, data_size=len(digits.x_train)), optax.sgd(1.0))
    h = train.fit(model, tx, digits, loss_fn=CE, epochs=20, batch_size=len(digits.x_train),
                  stop_on_discrepancy=True, progress=False)
    print(f"hidden {hidden}: after one sweep {h.test_accuracy[0]:.4f}; kept epoch {h.restored_epoch}")
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=f"hidden {hidden}")
plt.xlabel("sweep"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
  (
    "md",
    """\
## Minibatches: moments streamed over the data set

A refit from one minibatch alone interpolates that batch (more unknowns per unit than rows) and
forgets the rest of the data set. ER keeps each layer's moments across batches,
`M <- (1 - B/N) M + moments(batch)` with `N = data_size`, so every refit sees statistics of about
the whole training set. `data_size="per_batch"` is the refit on each batch alone, for comparison.""",
  ),
  (
    "code",
    """\
for data_size in (len(digits.x_train), "per_batch"):
    model = nn.MLP((64, 128, 128, 10), rngs=nnx.Rngs(0))
    tx = optax.chain(rules.expectation_reflection(model, data_size=data_size), optax.sgd(1.0))
    h = train.fit(model, tx, digits, loss_fn=CE, epochs=5, batch_size=64, progress=False)
    print(f"data_size={data_size!r}:", " ".join(f"{a:.3f}" for a in h.test_accuracy))
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=f"data_size={data_size!r}")
plt.xlabel("epoch (batches of 64)"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
  ("md", "## The single-layer refit: moments add over batches, one solve"),
  (
    "code",
    """\
model = nn.MLP((64, 10), rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
moments = rules.reflection_moments(model, params, (x[:700], y[:700])) + rules.reflection_moments(model, params, (x[700:], y[700:]))
refit = rules.reflection_solution(model, params, moments)
whole = rules.reflection_solution(model, params, rules.reflection_moments(model, params, (x, y)))
print("max difference, two batches vs one:", max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(refit), jax.tree.leaves(whole))))""",
  ),
]

CONSEQUENTIALISM = [
  (
    "md",
    """\
# Consequentialism weight updates (mini-batch NLMS)

Paeedeh and Ghiasi-Shirazi, arXiv:2003.05164; a **reconstruction** from the abstracts. Backprop's
step on one example also moves the outputs of the others (interference) and scales with the
inputs' norm. CW predicts the step's consequence on the batch's own outputs and emends it so each
example moves by what it asked for: `X^T (X X^T + eps I)^-1 D`.""",
  ),
  ("code", INSTALL),
  ("code", IMPORTS),
  ("md", "## Interference before and after emendation"),
  (
    "code",
    """\
from altgrad.rules._consequentialism import emend
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(16, 64)) * rng.uniform(0.1, 10, 64), jnp.float32)
rows = jnp.concatenate([x, jnp.ones((16, 1))], axis=1)
d = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
for name, update in (("backprop", rows.T @ d), ("cw", emend(rows, d, eps=1e-3))):
    consequence = rows @ update  # how each example's output moves
    scale = float(jnp.sum(consequence * d) / jnp.sum(d * d))
    print(f"{name:9s} relative residual of the consequence: {float(jnp.linalg.norm(consequence / scale - d) / jnp.linalg.norm(d)):.2e}")""",
  ),
  ("md", "## CW-SGD against SGD"),
  (
    "code",
    """\
for name, rule, lr in (("sgd", rules.backprop, 0.05), ("cw-sgd", rules.consequentialism, 0.5)):
    model = nn.MLP((64, 128, 10), rngs=nnx.Rngs(0))
    h = train.fit(model, optax.chain(rule(model, CE), optax.sgd(lr)), digits, loss_fn=CE, epochs=10, progress=False)
    plt.plot(h.epoch, h.test_accuracy, marker="o", label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy"); plt.legend(); plt.grid(alpha=0.3); plt.show()""",
  ),
]

YOUR_OWN_MODEL = [
  (
    "md",
    """\
# Your own Flax NNX model in the NNX tutorial's loop, three learning rules

A CNN written as in the Flax NNX MNIST tutorial, with BatchNorm and dropout added, trained with
the tutorial's own loop (`nnx.Optimizer`, `nnx.jit`, `nnx.MultiMetric`, batches as dicts
`{'image', 'label'}`) on scikit-learn's 8x8 digits. The learning rule is the only line that
changes: backprop, consequentialism (CW) and activity-based node perturbation (ANP). The rule
makes the update from the batch (no gradient is passed), logs the loss of the pass it ran, and
`altgrad.Optimizer` (`nnx.Optimizer` for a rule) keeps the BatchNorm statistics and dropout's
RNG counts in the model, so `model.eval()` evaluates with current statistics.""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
from functools import partial
import numpy as np, optax
from flax import nnx
import matplotlib.pyplot as plt
import altgrad
from altgrad import data, losses, rules

digits = data.digits()  # 8x8 digits bundled with scikit-learn, standardized
train_images, test_images = digits.x_train.reshape(-1, 8, 8, 1), digits.x_test.reshape(-1, 8, 8, 1)

def batches(images, labels, batch_size, seed):
    \"\"\"Shuffled dict batches, as the tutorial's data pipeline gives them.\"\"\"
    order = np.random.default_rng(seed).permutation(len(images))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        yield {"image": images[order[i:i + batch_size]], "label": labels[order[i:i + batch_size]]}""",
  ),
  (
    "code",
    """\
class CNN(nnx.Module):
    \"\"\"The tutorial's CNN, sized for 8x8 images, with BatchNorm and dropout.\"\"\"

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
        return self.linear2(x)""",
  ),
  ("md", "## The tutorial's loop; one line changes: the rule"),
  (
    "code",
    """\
CE = losses.softmax_cross_entropy  # per-example losses: the rules take the mean
unpack = lambda batch: (batch["image"], batch["label"])
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
    print(f"{name:9s} train loss {history[name]['train_loss'][-1]:.3f}  test accuracy {history[name]['test_accuracy'][-1]:.3f}")""",
  ),
  (
    "code",
    """\
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, h in history.items():
    epochs = range(1, len(h["train_loss"]) + 1)
    left.plot(epochs, h["train_loss"], marker="o", label=name)
    right.plot(epochs, h["test_accuracy"], marker="o", label=name)
left.set(xlabel="epoch", ylabel="train loss (logged by the rule)"); right.set(xlabel="epoch", ylabel="test accuracy")
for ax in (left, right):
    ax.legend(); ax.grid(alpha=0.3)
plt.show()""",
  ),
]

NOTEBOOKS = {
  "quickstart.ipynb": QUICKSTART,
  "your_own_model.ipynb": YOUR_OWN_MODEL,
  "node_perturbation.ipynb": NODE_PERTURBATION,
  "target_propagation.ipynb": TARGET_PROPAGATION,
  "expectation_reflection.ipynb": EXPECTATION_REFLECTION,
  "consequentialism.ipynb": CONSEQUENTIALISM,
}


def build(cells):
  nb = nbformat.v4.new_notebook()
  nb.cells = [
    nbformat.v4.new_markdown_cell(s) if kind == "md" else nbformat.v4.new_code_cell(s) for kind, s in cells
  ]
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i}"  # stable ids: rewriting a notebook changes only the cells that changed
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


if __name__ == "__main__":
  out = ROOT / "notebooks"
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(cells), out / name)
    print("wrote", out / name)
