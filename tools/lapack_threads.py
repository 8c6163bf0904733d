"""Whether a training loop of the user's own runs CW and TP as fast as ``fit`` does: each rule's
step time and its ratio to backprop's, in a hand-written loop (a jitted step called on batches
passed as arguments, as the README shows) and in ``fit``, at the node-perturbation authors' MLP
shape (784-1024x3-10, batch 1000) and on target propagation's RNN (100 units, T = 60, batch 20).
Building CW or TP sets the OpenBLAS behind jaxlib's LAPACK to one thread (altgrad._lapack); the
"as found" column forces it back to the machine's thread count in the hand-written loop, to show
what the setting saves. Cases alternate, three rounds each.

    python tools/lapack_threads.py      # about 5 minutes on 2 CPU cores
"""

import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _lapack, data, losses, nn, rules, train

CE = losses.softmax_cross_entropy
STEPS = {1000: 8, 20: 100}  # per batch size: about half a second of steps


def _shapes():
  rng = np.random.default_rng(0)
  images = data.Dataset(
    rng.normal(size=(STEPS[1000] * 1000, 784)).astype(np.float32),
    rng.integers(0, 10, STEPS[1000] * 1000).astype(np.int32),
    rng.normal(size=(1000, 784)).astype(np.float32),
    rng.integers(0, 10, 1000).astype(np.int32),
    10,
    "784 features",
  )
  sequences = data.temporal_order(60, num_train=STEPS[20] * 20, num_test=100)
  return [
    ("MLP 784-1024x3-10, batch 1000", lambda: nn.MLP((784, 1024, 1024, 1024, 10), rngs=nnx.Rngs(0)), images, 1000, "consequentialism"),
    ("RNN 100, T=60, batch 20", lambda: nn.SimpleRNN(6, 100, 4, rngs=nnx.Rngs(0)), sequences, 20, "tp"),
  ]


def _rule(name, model):
  if name == "tp":
    return rules.target_propagation(model, CE)
  return getattr(rules, name)(model, CE)


def own_loop(build, dataset, batch_size, rule_name) -> float:
  """Median seconds per step of a jitted step called in a Python loop (compilation excluded)."""
  model = build()
  tx = optax.chain(_rule(rule_name, model), optax.sgd(1e-3))
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state

  x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, STEPS[batch_size] * batch_size, batch_size)]
  params, state = jax.block_until_ready(step(params, state, *batches[0]))
  times = []
  for batch in batches:
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, *batch))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def in_fit(build, dataset, batch_size, rule_name) -> float:
  model = build()
  tx = optax.chain(_rule(rule_name, model), optax.sgd(1e-3))
  history = train.fit(model, tx, dataset, loss_fn=CE, epochs=2, batch_size=batch_size, progress=False)
  return history.step_time[-1]


@contextlib.contextmanager
def _lapack_threads(count: int):
  """SciPy's OpenBLAS (jaxlib's LAPACK) on ``count`` threads for the block."""
  controllers = _lapack._scipy_blas()
  before = [c.num_threads for c in controllers]
  for c in controllers:
    c.set_num_threads(count)
  try:
    yield
  finally:
    for c, n in zip(controllers, before, strict=True):
      c.set_num_threads(n)


def main(rounds: int = 3) -> None:
  rules.consequentialism(nn.MLP((2, 2), rngs=nnx.Rngs(0)), CE)  # sets LAPACK's threads, as any CW does
  threads = os.cpu_count()
  found = {}
  for _ in range(rounds):
    for label, build, dataset, batch_size, rule_name in _shapes():
      for rule in ("backprop", rule_name):
        for setting, measure in (("own loop", own_loop), ("fit", in_fit), ("own loop, as found", own_loop)):
          with _lapack_threads(threads) if setting.endswith("as found") else contextlib.nullcontext():
            found.setdefault((label, rule, setting), []).append(measure(build, dataset, batch_size, rule))
  print(f"jax {jax.__version__}, {threads} CPU cores; median over {rounds} rounds of the median step time")
  print()
  print("| shape | rule | own loop: ms/step | x backprop | fit: ms/step | x backprop | own loop, LAPACK threads as found | x backprop |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for label, _, _, _, rule_name in _shapes():
    for rule in ("backprop", rule_name):
      cells = []
      for setting in ("own loop", "fit", "own loop, as found"):
        ms = statistics.median(found[(label, rule, setting)])
        cells += [f"{1e3 * ms:.1f}", f"{ms / statistics.median(found[(label, 'backprop', setting)]):.2f}"]
      print(f"| {label} | {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
