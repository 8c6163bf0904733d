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
# Your own Flax NNX model, three learning rules

An ordinary NNX CNN, written as anyone would (`nnx.Conv`, `nnx.BatchNorm`, dropout, a linear
head; no altgrad layers), trained with backprop, consequentialism (CW) and activity-based node
perturbation (ANP). The rule is the only line that changes. The model is never modified by a
rule: it is cloned and its linear layers are tapped; `fit` writes the trained params and the
BatchNorm statistics back.""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
import jax, optax
import jax.numpy as jnp
from flax import nnx
import matplotlib.pyplot as plt
from altgrad import data, diagnostics, losses, rules, train

print("running on", jax.devices()[0].platform)
digits = data.digits()
images = data.Dataset(digits.x_train.reshape(-1, 8, 8, 1), digits.y_train,
                      digits.x_test.reshape(-1, 8, 8, 1), digits.y_test, 10, "digits-8x8")
CE = losses.softmax_cross_entropy""",
  ),
  (
    "code",
    """\
class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.norm(self.conv1(x)))
        h = nnx.relu(self.conv2(h))
        return self.head(self.dropout(h.mean(axis=(1, 2))))""",
  ),
  ("md", "## One line changes: the rule"),
  (
    "code",
    """\
make_rule = {
    "backprop": lambda model: rules.backprop(model, CE),
    "cw": lambda model: rules.consequentialism(model, CE),
    "anp": lambda model: rules.node_perturbation(model, CE, variant="anp", sigma=1e-3),
}
histories, cosines = {}, {}
probe_batch = (images.x_train[:256], images.y_train[:256])
for name, rule_of in make_rule.items():
    model = CNN(nnx.Rngs(0))  # the same initial params for every rule
    rule = rule_of(model)
    probe = diagnostics.cosine_probe(model, CE, rule, probe_batch)
    histories[name] = train.fit(model, optax.chain(rule, optax.adam(3e-3)), images, loss_fn=CE,
                                epochs=6, batch_size=64, progress=False, probe=probe)
reference = histories["backprop"].median_step_time
for name, h in histories.items():
    print(f"{name:9s} test accuracy {h.test_accuracy[-1]:.3f}  {h.median_step_time / reference:.2f} x backprop's step")""",
  ),
  (
    "code",
    """\
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, h in histories.items():
    left.plot(h.epoch, h.test_accuracy, marker="o", label=name)
    layers = [k for k in h.probes[0] if k != "epoch"]
    right.plot([p["epoch"] for p in h.probes], [sum(p[k] for k in layers) / len(layers) for p in h.probes],
               marker="o", label=name)
left.set(xlabel="epoch", ylabel="test accuracy"); right.set(xlabel="epoch", ylabel="mean per-layer cosine to backprop")
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
