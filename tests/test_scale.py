"""Many seeds at once, checkpoints, probes, and many devices (issue #8)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import CLASSES, INPUT_SHAPES, MODELS, XLA_FLAGS, make_rule
from flax import nnx

from altgrad import data, diagnostics, losses, nn, rules, train
from altgrad.rules._registry import OWN_STEP

UNSUPPORTED = {("tp", "conv"), ("er", "conv"), ("er", "rnn"), *((r, "rnn") for r in ("fa", "sign", "kp", "dfa", "drtp"))}
CE = losses.softmax_cross_entropy


TOY_TRAIN = 96


def _toy(kind, n_train=TOY_TRAIN, n_test=32, seed=0):
  """A random classification data set shaped for the conftest model ``kind``."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_train + n_test, *INPUT_SHAPES[kind])).astype(np.float32)
  y = rng.integers(0, CLASSES, size=n_train + n_test).astype(np.int32)
  return data.Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], CLASSES, f"toy-{kind}")


def _build(rule_name, kind, optimizer=None, sigma=1e-3):
  """``build(seed)``: the conftest model and ``rule_name`` chained with ``optimizer`` (default Adam)."""

  def build(seed):
    model = MODELS[kind](seed)
    options = {"key": seed, "sigma": sigma} if rule_name in ("np", "inp", "anp") else {}
    # ER with a ridge of 1: at 0.01 its refits of random labels on 16 rows (more unknowns than
    # rows) are near singular and amplify rounding a thousandfold from the first step
    options |= {"data_size": TOY_TRAIN, "reg": 1.0} if rule_name == "er" else {}
    rule = make_rule(rule_name, model, CE, **options)
    step = optax.sgd(OWN_STEP[rule_name]) if rule_name in OWN_STEP else (optimizer or optax.adam(1e-2))
    return model, optax.chain(rule, step)

  return build


def _params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


# Every rule on the MLP; the conv and recurrent sites with the rules of each kind of statistic
VMAPPED_CASES = [(r, "mlp") for r in sorted(rules.RULES)] + [
  (r, k)
  for k in ("conv", "rnn")
  for r in ("backprop", "consequentialism", "anp", "tp")
  if (r, k) not in UNSUPPORTED
]


def _check_seeds_equal_separate_runs(rule_name, model_kind, vectorize):
  """Two seeds trained together equal each trained alone, and differ from each other."""
  # Vmapped and separate programs round differently. SGD, as Adam's per-element normalization
  # would turn the rounding of near-zero gradients into steps of a full learning rate; NP's sigma
  # 0.1, as its loss differences at 1e-3 lose 4 of float32's 7 digits to cancellation.
  build = _build(rule_name, model_kind, optax.sgd(0.1), sigma=0.1)
  ds, seeds = _toy(model_kind), (3, 11)
  batch_size = 16
  together = train.fit_seeds(
    build, seeds, ds, loss_fn=CE, epochs=2, batch_size=batch_size, progress=False, vectorize=vectorize
  )
  for seed, (model, history) in zip(seeds, together, strict=True):
    alone_model, tx = build(seed)
    alone = train.fit(
      alone_model, tx, ds, loss_fn=CE, epochs=2, batch_size=batch_size, seed=seed, progress=False
    )
    np.testing.assert_allclose(history.test_loss, alone.test_loss, rtol=1e-4, atol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
      _params(model),
      _params(alone_model),
    )
  assert together[0][1].test_loss != together[1][1].test_loss  # the seeds differ


@pytest.mark.parametrize("rule_name, model_kind", VMAPPED_CASES)
def test_vmapped_seeds_equal_separate_runs(rule_name, model_kind):
  _check_seeds_equal_separate_runs(rule_name, model_kind, vectorize=True)


# the conv net in turn: on CPU its runs are written out in one step per batch (train._loop)
@pytest.mark.parametrize("rule_name, model_kind", [("er", "mlp"), ("anp", "mlp"), ("consequentialism", "conv")])
def test_seeds_in_turn_equal_separate_runs(rule_name, model_kind):
  _check_seeds_equal_separate_runs(rule_name, model_kind, vectorize=False)


def test_fit_seeds_rejects_repeated_seeds_and_different_models():
  ds = _toy("mlp")
  with pytest.raises(ValueError, match="distinct"):
    train.fit_seeds(_build("backprop", "mlp"), (1, 1), ds, loss_fn=CE)

  def build(seed):
    model = MODELS["mlp" if seed == 0 else "rnn"](seed)
    return model, rules.backprop(model, CE)

  with pytest.raises(ValueError, match="same model"):
    train.fit_seeds(build, (0, 1), ds, loss_fn=CE)


# A state of each kind: PRNG key (ANP), none beyond the model's (CW), per-layer norms (TP), a
# discrepancy (ER)
@pytest.mark.parametrize("rule_name", ["anp", "consequentialism", "tp", "er"])
def test_resumed_run_continues_bit_for_bit(rule_name, tmp_path):
  """Checkpointed after epoch 2, resumed to 4: the same params, rule state and history as 4 at once."""
  ds, build = _toy("mlp"), _build(rule_name, "mlp")
  fit = lambda model, tx, **kw: train.fit(  # noqa: E731
    model, tx, ds, loss_fn=CE, batch_size=16, seed=7, progress=False, **kw
  )
  straight_model, tx = build(0)
  straight = fit(straight_model, tx, epochs=4)
  model, tx = build(0)
  fit(model, tx, epochs=2, checkpoint_dir=tmp_path / "run")
  model, tx = build(0)  # a fresh process would start from scratch like this
  resumed = fit(model, tx, epochs=4, checkpoint_dir=tmp_path / "run")
  assert resumed.epoch == [1, 2, 3, 4]
  assert resumed.test_loss == straight.test_loss and resumed.train_loss == straight.train_loss
  jax.tree.map(np.testing.assert_array_equal, _params(model), _params(straight_model))


def test_resume_restores_prng_keys_and_decorrelation(tmp_path):
  ds = _toy("mlp")

  def build(seed):
    model = nn.MLP((6, 16, CLASSES), decorrelation_lr=1e-2, rngs=nnx.Rngs(seed))
    return model, optax.chain(rules.node_perturbation(model, CE, key=seed), optax.adam(1e-2))

  fit = lambda model, tx, **kw: train.fit(model, tx, ds, loss_fn=CE, batch_size=16, progress=False, **kw)  # noqa: E731
  straight_model, tx = build(0)
  fit(straight_model, tx, epochs=3)
  model, tx = build(0)
  fit(model, tx, epochs=1, checkpoint_dir=tmp_path)
  model, tx = build(0)
  fit(model, tx, epochs=3, checkpoint_dir=tmp_path)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(straight_model))
  assert not np.allclose(nnx.state(model, nn.Decorrelation)["layers"][0]["decorrelation"][...], np.eye(6))


def test_checkpoint_of_another_run_is_refused(tmp_path):
  ds, build = _toy("mlp"), _build("backprop", "mlp")
  model, tx = build(0)
  train.fit(model, tx, ds, loss_fn=CE, epochs=1, batch_size=16, checkpoint_dir=tmp_path, progress=False)
  model, tx = build(0)
  with pytest.raises(ValueError, match="another run"):
    train.fit(model, tx, ds, loss_fn=CE, epochs=2, batch_size=32, checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="cannot be checkpointed"):
    train.fit(model, tx, ds, loss_fn=CE, stop_on_discrepancy=True, checkpoint_dir=tmp_path)


def test_vmapped_seeds_resume_bit_for_bit(tmp_path):
  ds, build = _toy("mlp"), _build("anp", "mlp")
  fit = lambda epochs, **kw: train.fit_seeds(  # noqa: E731
    build, (0, 1), ds, loss_fn=CE, epochs=epochs, batch_size=16, progress=False, **kw
  )
  straight = fit(3)
  fit(1, checkpoint_dir=tmp_path)
  resumed = fit(3, checkpoint_dir=tmp_path)
  for (m, h), (sm, sh) in zip(resumed, straight, strict=True):
    assert h.test_loss == sh.test_loss
    jax.tree.map(np.testing.assert_array_equal, _params(m), _params(sm))


def test_cosine_probe_is_recorded_before_and_during_training():
  ds = _toy("mlp")
  model, _ = _build("backprop", "mlp")(0)
  rule = rules.node_perturbation(model, CE, variant="np")
  probe_batch = (ds.x_train[:64], ds.y_train[:64])
  probe = diagnostics.cosine_probe(model, CE, rule, probe_batch)
  history = train.fit(
    model,
    optax.chain(rule, optax.adam(1e-2)),
    ds,
    loss_fn=CE,
    epochs=2,
    batch_size=16,
    probe=probe,
    progress=False,
  )
  assert [p["epoch"] for p in history.probes] == [0, 1, 2]
  assert set(history.probes[0]) == {"epoch", "layers/0", "layers/1", "layers/2"}
  assert all(-1 <= v <= 1 for p in history.probes for k, v in p.items() if k != "epoch")
  # backprop's own probe is exactly aligned
  model, tx = _build("backprop", "mlp")(0)
  bp_probe = diagnostics.cosine_probe(model, CE, rules.backprop(model, CE), probe_batch)
  history = train.fit(model, tx, ds, loss_fn=CE, epochs=1, batch_size=16, probe=bp_probe, progress=False)
  assert all(abs(v - 1) < 1e-5 for p in history.probes for k, v in p.items() if k != "epoch")


DATA_PARALLEL = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from flax import nnx
  from conftest import MODELS, make_batch, make_rule
  from altgrad import losses, nn, rules, train
  from altgrad._bench._suites import BASELINES
  from test_scale import UNSUPPORTED, _build, _toy

  assert jax.device_count() == 4, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  CE = losses.softmax_cross_entropy

  def update(tx, params, batch):
    return jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, tx.init(params), batch)

  def models():
    for kind in MODELS:
      yield kind, lambda kind=kind: MODELS[kind](0)
    yield "decorrelated", lambda: nn.MLP((6, 16, 12, 3), decorrelation_lr=1e-2, rngs=nnx.Rngs(0))

  def same(one, many, what):
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      scale = max(1.0, float(np.max(np.abs(a))))
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale, err_msg=what)

  def in_shard_map(tx, params, batch, check_vma=True):
    step = jax.shard_map(lambda p, s, b: tx.update(None, s, p, batch=b), mesh=mesh,
                         in_specs=(P(), P(), P("batch")), out_specs=(P(), P()), check_vma=check_vma)
    return jax.jit(step)(params, tx.init(params), batch)

  explicit = jax.make_mesh((4,), ("batch",))  # Explicit axes: jax.make_mesh's default
  assert explicit.axis_types == (jax.sharding.AxisType.Explicit,)
  # part "0" or "1": every other rule's updates; "training": the rest
  part = sys.argv[1]
  checked = []
  for name in [] if part == "training" else sorted(rules.RULES)[int(part) :: 2]:
    for kind, make in models():
      # the baselines' steps reduce over the batch as XLA partitions any site's update (no
      # reduction of their own), so the MLPs check them; the seeds' rules reduce per kind
      if (name, kind) in UNSUPPORTED or (name in BASELINES and kind in ("conv", "rnn")):
        continue
      model = make()
      # NP at sigma 0.1: at 1e-3 its loss differences keep 3 float32 digits, too few to compare.
      # ER at reg 0.1: its last layer refits on targets sent through two refits, each a solve of
      # moments summed in another order on 4 devices; at reg 0.01 the solves' conditioning turns
      # the sums' last-ulp differences into 2e-5 (on some CPUs), at 0.1 into 2e-6.
      options = {"sigma": 0.1} if name in ("np", "inp", "anp") else {"reg": 0.1} if name == "er" else {}
      tx = make_rule(name, model, CE, **options)
      params = nnx.state(model, nnx.Param)
      batch = make_batch("mlp" if kind == "decorrelated" else kind, batch_size=128)
      sharded = jax.device_put(batch, NamedSharding(mesh, P("batch")))
      assert len(sharded[0].sharding.device_set) == 4
      one = update(tx, params, batch)
      same(one, update(tx, params, sharded), f"{name} on {kind}")
      if kind in ("mlp", "decorrelated") and (kind == "mlp" or name in ("backprop", "er")):
        on_explicit = jax.device_put(batch, NamedSharding(explicit, P("batch")))
        with jax.set_mesh(explicit):
          same(one, update(tx, params, on_explicit), f"{name}, Explicit mesh")
        # without jax.set_mesh the rule reads the mesh from the batch's type, as jax.grad needs none
        same(one, update(tx, params, on_explicit), f"{name}, Explicit mesh without set_mesh")
        if name not in ("np", "inp", "anp", "fga"):  # their noise is drawn per device inside shard_map: below
          same(one, in_shard_map(tx, params, batch), f"{name} on {kind} in shard_map")
        if kind == "mlp" and name in ("backprop", "consequentialism"):  # untyped shard_map sums gradients itself
          same(one, in_shard_map(tx, params, batch, check_vma=False), f"{name} in shard_map, check_vma=False")
      checked.append((name, kind))
  if part != "training":
    print("checked", len(checked), "rule/model pairs")
    raise SystemExit(0)

  # Node perturbation and activity forward gradients inside shard_map at a fixed noise draw: each
  # device draws a pattern for its rows, which the one-device update gets tiled.
  import math

  def pattern(key, shape, dtype):
    return (0.1 * jnp.cos(0.37 * jnp.arange(math.prod(shape), dtype=jnp.float32) + 1.0)).reshape(shape).astype(dtype)

  def tiled(key, shape, dtype):
    return jnp.tile(pattern(key, (shape[0] // 4, *shape[1:]), dtype), (4,) + (1,) * (len(shape) - 1))

  model = MODELS["mlp"](0)
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=128)
  for variant in ("np", "inp", "anp"):
    one = update(rules.node_perturbation(model, CE, variant=variant, sigma=0.07, noise_fn=tiled), params, batch)
    many = in_shard_map(rules.node_perturbation(model, CE, variant=variant, sigma=0.07, noise_fn=pattern), params, batch)
    same(one, many, f"{variant} in shard_map")
  one = update(rules.forward_gradient(model, CE, perturb="activities", tangent_fn=tiled), params, batch)
  many = in_shard_map(rules.forward_gradient(model, CE, perturb="activities", tangent_fn=pattern), params, batch)
  same(one, many, "fga in shard_map")
  # ...and by default every device draws from a key of its own
  seen = []

  def recording(key, shape, dtype):
    jax.debug.callback(lambda k: seen.append(np.asarray(k).tobytes()), jax.random.key_data(key))
    return 0.1 * jax.random.normal(key, shape, dtype)

  jax.block_until_ready(in_shard_map(rules.node_perturbation(model, CE, noise_fn=recording), params, batch))
  assert len(seen) == 4 * 3 and len(set(seen)) == len(seen), seen  # 4 devices, 3 sites
  for tx in (rules.node_perturbation(model, CE), rules.forward_gradient(model, CE, perturb="activities")):
    drawn = in_shard_map(tx, params, batch)  # altgrad's own Gaussian, from each device's key
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(drawn[0]))

  # the training helper: all devices against one (the single updates above cover every rule;
  # ER's minibatch refits of random labels are too chaotic to follow for two epochs)
  for name in ("backprop", "consequentialism", "anp"):
    ds = _toy("mlp", n_train=128)
    runs = []
    for parallel in (False, True):
      model, tx = _build(name, "mlp", sigma=0.1)(0)
      h = train.fit(model, tx, ds, loss_fn=CE, epochs=2, batch_size=32, data_parallel=parallel, progress=False)
      runs.append((h.test_loss, nnx.as_pure(nnx.state(model, nnx.Param))))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-4, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name), runs[0][1], runs[1][1])
  model, tx = _build("backprop", "mlp")(0)
  try:
    train.fit(model, tx, _toy("mlp"), loss_fn=CE, batch_size=30, data_parallel=True)
  except ValueError as error:
    assert "must divide by the 4 devices" in str(error)
  else:
    raise AssertionError("a batch of 30 on 4 devices was accepted")
  # a sharded run checkpoints and resumes bit for bit too
  import tempfile

  with tempfile.TemporaryDirectory() as directory:
    fit = lambda model, tx, **kw: train.fit(model, tx, _toy("mlp"), loss_fn=CE, batch_size=16, progress=False,
                                           data_parallel=True, **kw)
    straight_model, tx = _build("anp", "mlp")(0)
    fit(straight_model, tx, epochs=3)
    model, tx = _build("anp", "mlp")(0)
    fit(model, tx, epochs=1, checkpoint_dir=directory + "/run")
    model, tx = _build("anp", "mlp")(0)
    fit(model, tx, epochs=3, checkpoint_dir=directory + "/run")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(straight_model))

  # the command line and the bench take the flag
  from altgrad import _bench, _cli

  assert _cli.main(["compare", "--epochs", "1", "--hidden", "16", "--rules", "anp", "--plot", "", "--no-progress",
                    "--data-parallel"]) == 0
  record = _bench.execute(_bench.Run("digits", (16,), "consequentialism", "adam", 1e-2, 1, 64, seeds=2),
                          data_parallel=True)
  assert record["test_accuracy"][-1] > 0.6, record["test_accuracy"]
  print("checked the training helper")
  """
)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["0", "1", "training"])
def test_every_rule_gives_the_same_update_on_four_devices(part):
  """Batch sharded over 4 (virtual CPU) devices, params replicated: the update of one device (in
  three processes, which the test workers share)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{XLA_FLAGS} --xla_force_host_platform_device_count=4")
  tests = Path(__file__).resolve().parent
  result = subprocess.run(
    [sys.executable, "-c", DATA_PARALLEL, part], cwd=tests, env=env, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert "checked" in result.stdout
