"""One process of tests/test_processes.py: ``python _processes_worker.py MODE OUT COORDINATOR
NUM_PROCESSES PROCESS_ID [EPOCHS [CHECKPOINT_DIR]]`` (see ``main``). With NUM_PROCESSES 1 it is the
single-process reference (on however many devices XLA_FLAGS gives it)."""

import sys

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from altgrad import _distributed, data, losses, nn, rules, train
from altgrad.train._devices import replicate

CE = losses.softmax_cross_entropy
RULES = ("backprop", "consequentialism", "anp", "er")


def build(name, size, widths=(64, 16, 10)):
  """The rule ``name`` on a small MLP (decorrelated for ANP), chained with its optimizer."""
  model = nn.MLP(widths, decorrelation_lr=1e-2 if name == "anp" else None, rngs=nnx.Rngs(0))
  options = {"sigma": 0.1} if name == "anp" else {"data_size": size} if name == "er" else {}
  rule = rules.RULES[name](model, CE, **options)
  return model, optax.chain(rule, optax.sgd(1.0) if name == "er" else optax.adam(1e-2))


def flat(model):
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))])


def check_one_step_updates(size, mesh):
  """Each rule's update on a global batch whose rows each process feeds for its own devices
  equals the update of the whole batch on one local device. A well-posed problem (8 random
  inputs; one layer for ER, whose refit of a hidden layer's saturated activities amplifies the
  order of a sum's rounding to ~1e-4)."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(128, 8)).astype(np.float32), rng.integers(0, 10, 128).astype(np.int32)
  rows = len(x) // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  sharding = NamedSharding(mesh, P("batch"))
  global_batch = tuple(jax.make_array_from_process_local_data(sharding, a[mine], a.shape) for a in (x, y))
  for name in RULES:
    model, tx = build(name, size, (8, 10) if name == "er" else (8, 16, 10))
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    step = jax.jit(lambda p, s, b, tx=tx: tx.update(None, s, p, batch=b)[0])
    local = step(params, state, (x, y))
    replicated = replicate((params, state), NamedSharding(mesh, P()))
    spread = step(*replicated, global_batch)
    for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(spread), strict=True):
      scale = max(1.0, float(np.max(np.abs(a))))
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * scale, err_msg=name)
  print("one-step updates equal", flush=True)


def train_rules(ds):
  """One epoch of backprop and CW, two full-batch refits of ER, two vmapped seeds of CW (ANP with
  decorrelation trains in train_resumable)."""
  trained = {}
  for name in ("backprop", "consequentialism", "er"):  # ER with one layer (see check_one_step_updates)
    model, tx = build(name, len(ds.x_train), (64, 10) if name == "er" else (64, 16, 10))
    batch_size, epochs = (len(ds.x_train) - len(ds.x_train) % 4, 2) if name == "er" else (64, 1)
    train.fit(model, tx, ds, loss_fn=CE, epochs=epochs, batch_size=batch_size, data_parallel=True, progress=False)
    trained[name] = flat(model)
  runs = train.fit_seeds(  # vmapped seeds, each batch sharded over every process's devices
    lambda seed: build("consequentialism", 0), [0, 1], ds, loss_fn=CE, epochs=1, data_parallel=True, progress=False
  )
  trained["seeds"] = np.concatenate([flat(model) for model, _ in runs])
  return trained


def train_resumable(ds, epochs, checkpoint_dir):
  """ANP with decorrelation, checkpointed every epoch (``checkpoint_dir`` None: not at all)."""
  model, tx = build("anp", len(ds.x_train))
  train.fit(model, tx, ds, loss_fn=CE, epochs=epochs, batch_size=32, data_parallel=True, checkpoint_dir=checkpoint_dir)
  return {"anp": flat(model)}


def main():
  """Modes: ``rules`` (two processes: the checks, then train_rules and train_resumable
  uncheckpointed), ``resume`` (two processes: train_resumable with a checkpoint directory) and
  ``reference`` (one process: train_rules)."""
  mode, out, coordinator, num_processes, process_id = sys.argv[1:6]
  if int(num_processes) > 1:
    _distributed.initialize(coordinator, int(num_processes), int(process_id), timeout=60)
  ds = data.digits()
  if mode == "rules":
    check_one_step_updates(len(ds.x_train), jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))
    try:
      train.fit(*build("backprop", 0), ds, loss_fn=CE, epochs=1, batch_size=30, data_parallel=True)
    except ValueError as error:
      print("refused:", error, flush=True)
    trained = train_rules(ds) | train_resumable(ds, int(sys.argv[6]), None)
  elif mode == "resume":
    trained = train_resumable(ds, int(sys.argv[6]), sys.argv[7])
  else:
    trained = train_rules(ds)
  if _distributed.is_primary():
    np.savez(out, **trained)


if __name__ == "__main__":
  main()
