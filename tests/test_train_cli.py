"""The training helper and the command line, end to end on small settings."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODELS
from flax import nnx

from altgrad import _bench, _cli, data, losses, nn, rules, train
from altgrad._bench import _experiment, _run
from altgrad.train import _loop


def _small_digits():
  ds = data.digits()
  return ds._replace(x_train=ds.x_train[:512], y_train=ds.y_train[:512])


def test_fit_trains_in_place_without_recompiling():
  ds = _small_digits()
  model = nn.MLP((64, 32, 10), rngs=nnx.Rngs(0))
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = optax.chain(rules.backprop(model, losses.softmax_cross_entropy), optax.adam(1e-2))
  history = train.fit(model, tx, ds, loss_fn=losses.softmax_cross_entropy, epochs=3, batch_size=64)
  assert history.epoch == [1, 2, 3] and history.compilations == 1
  assert history.step_memory > 32 * 64 * 4  # at least the hidden activations of a batch
  assert len(history.test_accuracy) == len(history.step_time) == len(history.wall_time) == 3
  assert history.test_accuracy[-1] > 0.85
  assert history.train_loss[-1] < history.train_loss[0]
  assert np.all(np.diff(history.wall_time) > 0) and history.median_step_time > 0
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  assert not np.allclose(before["layers"][0]["kernel"], after["layers"][0]["kernel"])
  assert json.dumps(history.as_dict())


def test_fit_is_reproducible_from_its_seed():
  ds = _small_digits()
  runs = []
  for _ in range(2):
    model = nn.MLP((64, 16, 10), rngs=nnx.Rngs(0))
    tx = optax.chain(rules.backprop(model, losses.softmax_cross_entropy), optax.sgd(0.1))
    runs.append(train.fit(model, tx, ds, loss_fn=losses.softmax_cross_entropy, epochs=2, seed=5).test_loss)
  assert runs[0] == runs[1]


def test_fit_steps_a_convolution_per_batch_on_cpu_and_trains_as_its_scan(monkeypatch):
  """XLA:CPU runs a convolution inside a loop several times slower than outside one (jax#12868):
  fit calls a conv model's compiled step per batch there, and trains exactly as its scan would."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(96, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, size=96).astype(np.int32)
  ds = data.Dataset(x[:64], y[:64], x[64:], y[64:], 3, "toy-conv")
  chosen = []
  decide = _loop.steps_per_batch
  monkeypatch.setattr(_loop, "steps_per_batch", lambda lowered: chosen.append(decide(lowered)) or chosen[-1])

  def trained(model):
    tx = optax.chain(rules.backprop(model, losses.softmax_cross_entropy), optax.adam(1e-2))
    history = train.fit(model, tx, ds, loss_fn=losses.softmax_cross_entropy, epochs=2, batch_size=16)
    return history, nnx.as_pure(nnx.state(model, nnx.Param))

  per_batch, per_batch_params = trained(MODELS["conv"](0))
  trained(nn.Sequential(nn.Flatten(), nn.Dense(72, 3, activation="identity", rngs=nnx.Rngs(0))))
  assert chosen == [True, False]  # the conv net per batch, the MLP (no convolution) scanned
  monkeypatch.setattr(_loop, "steps_per_batch", lambda lowered: False)
  scanned, scanned_params = trained(MODELS["conv"](0))
  assert per_batch.compilations == scanned.compilations == 1 and per_batch.step_memory > 0
  for key in ("train_loss", "test_loss", "test_accuracy"):
    np.testing.assert_allclose(getattr(per_batch, key), getattr(scanned, key), rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close(per_batch_params, scanned_params, rtol=1e-5, atol=1e-6)


def test_fit_regression_on_a_sequence_task():
  ds = data.adding(10, num_train=256, num_test=64)
  model = nn.SimpleRNN(2, 16, 1, rngs=nnx.Rngs(0))
  tx = optax.chain(rules.backprop(model, losses.squared_error), optax.adam(1e-2))
  history = train.fit(model, tx, ds, loss_fn=losses.squared_error, epochs=3, batch_size=32)
  assert history.test_loss[-1] < history.test_loss[0]
  assert 0.0 <= history.test_accuracy[-1] <= 1.0


def test_fit_rejects_bad_data():
  ds = _small_digits()
  model = nn.MLP((64, 10), rngs=nnx.Rngs(0))
  tx = rules.backprop(model, losses.softmax_cross_entropy)
  fit = lambda d, **kw: train.fit(model, tx, d, loss_fn=losses.softmax_cross_entropy, epochs=1, **kw)  # noqa: E731
  with pytest.raises(ValueError, match="labels must be integers in"):
    fit(ds._replace(y_train=ds.y_train + 10))
  with pytest.raises(ValueError, match="NaN or infinite"):
    fit(ds._replace(x_test=np.full_like(ds.x_test, np.nan)))
  with pytest.raises(ValueError, match="batch_size must lie in"):
    fit(ds, batch_size=0)
  with pytest.raises(ValueError, match="Dense expects inputs shaped"):
    fit(ds._replace(x_train=ds.x_train[:, :10]))


def test_compare_runs_end_to_end(tmp_path, capsys):
  plot, out = tmp_path / "acc.png", tmp_path / "results.json"
  code = _cli.main(
    ["compare", "--epochs", "2", "--hidden", "16", "--plot", str(plot), "--json", str(out), "--no-progress"]
  )
  assert code == 0
  printed = capsys.readouterr().out
  assert "backprop" in printed and "x backprop" in printed
  assert plot.stat().st_size > 1000
  results = json.loads(out.read_text())["results"]
  assert set(results) == set(rules.RULES)
  assert results["backprop"]["step_time_ratio"] == 1.0
  assert results["backprop"]["test_accuracy"][-1] > 0.5


def test_compare_builds_the_model_for_the_data():
  seq = data.temporal_order(20, num_train=8, num_test=4)
  assert isinstance(_experiment.build_model(seq, "auto", (8,), "tanh", 0), nn.SimpleRNN)
  images = data.Dataset(
    np.zeros((4, 8, 8, 1), np.float32),
    np.zeros(4, np.int32),
    np.zeros((2, 8, 8, 1), np.float32),
    np.zeros(2, np.int32),
    3,
    "imgs",
  )
  conv = _experiment.build_model(images, "auto", (8,), "tanh", 0)
  assert conv(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 3)
  with pytest.raises(ValueError, match="--model rnn needs sequences"):
    _experiment.build_model(data.digits(), "rnn", (8,), "tanh", 0)


def test_command_line_errors_are_clear(capsys):
  with pytest.raises(SystemExit):
    _cli.main(["compare", "--rules", "nonsense"])
  assert "unknown rule" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    _cli.main(["compare", "--lr", "-1"])
  assert "must be a finite positive number" in capsys.readouterr().err


def test_models_fixture_kinds_all_fit():
  # every model family of the contract suite trains through fit's compiled epoch
  for kind, shape in (("conv", (6, 6, 2)), ("rnn", (7, 3))):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, *shape)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    ds = data.Dataset(x, y, x[:16], y[:16], 3, kind)
    model = MODELS[kind](0)
    tx = optax.chain(rules.backprop(model, losses.softmax_cross_entropy), optax.adam(1e-2))
    history = train.fit(model, tx, ds, loss_fn=losses.softmax_cross_entropy, epochs=2, batch_size=16)
    assert history.compilations == 1 and np.isfinite(history.test_loss[-1])


def test_bench_writes_json_markdown_and_plot_and_resumes(tmp_path, monkeypatch):
  suite = [
    _bench.Run("digits", (8, 8), "backprop", "adam", 1e-2, 2, 128, seeds=2),
    _bench.Run("digits", (8, 8), "anp", "adam", 1e-2, 2, 128, seeds=2),
    _bench.Run("digits", (8,), "er", "sgd", 1.0, 3, 1438, stop_on_discrepancy=True),
  ]
  monkeypatch.setitem(_bench.SUITES, "tiny", lambda: suite)
  results = _bench.run_suite("tiny", tmp_path, progress=False)
  runs = results["runs"]
  assert len(runs) == 4  # the ER run got its own backprop reference (same batch size)
  anp = runs[suite[1].name]
  assert (
    len(anp["test_accuracy_seeds"]) == 2 and anp["test_accuracy_seeds"][0] != anp["test_accuracy_seeds"][1]
  )
  assert np.allclose(anp["test_accuracy"], np.mean(anp["test_accuracy_seeds"], axis=0))
  assert [p["epoch"] for p in anp["probes"]] == [0, 1, 2] and len(anp["probes"][0]) == 4
  assert runs[suite[0].name]["step_time_ratio"] == 1.0
  assert all(r["step_memory_mib"] > 0 for r in runs.values())
  assert all(abs(v - 1) < 1e-4 for p in runs[suite[0].name]["probes"] for k, v in p.items() if k != "epoch")
  assert json.loads((tmp_path / "tiny.json").read_text())["runs"].keys() == runs.keys()
  table = (tmp_path / "tiny.md").read_text()
  assert table.count("\n| digits |") == 4 and re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", table)  # 95% CI
  assert (tmp_path / "tiny.png").stat().st_size > 10_000

  def fail(run, **kwargs):
    raise AssertionError(f"{run.name} ran again")

  monkeypatch.setattr(_bench._run, "execute", fail)
  resumed = _bench.run_suite("tiny", tmp_path, progress=False)["runs"]  # nothing reruns
  assert resumed == json.loads(json.dumps(runs))
  with pytest.raises(ValueError, match="data_parallel"):
    _bench.run_suite("tiny", tmp_path, progress=False, data_parallel=True)


def test_bench_runs_the_suites_decorrelated_runs_at_another_kappa(tmp_path, monkeypatch):
  plain = _bench.Run("digits", (8,), "backprop", "adam", 1e-2, 1, 128)
  decorrelated = _bench.Run("digits", (8,), "backprop", "adam", 1e-2, 1, 128, decorrelation_lr=1e-3)
  monkeypatch.setitem(_bench.SUITES, "tiny", lambda: [plain, decorrelated])
  ran = []

  def execute(run, **kwargs):  # records what would train, and stops the suite after the second
    ran.append(run)
    if len(ran) == 2:
      raise StopIteration
    return {}

  monkeypatch.setattr(_bench._run, "execute", execute)
  with pytest.raises(StopIteration):
    _cli.main(["bench", "--suite", "tiny", "--out", str(tmp_path), "--no-progress", "--decorrelation-kappa", "0.01"])
  assert ran[0] == plain and ran[1].decorrelation_kappa == 0.01 and "kappa=0.01" in ran[1].name
  with pytest.raises(SystemExit):
    _cli.main(["bench", "--suite", "tiny", "--decorrelation-kappa", "1.5"])
  with pytest.raises(SystemExit, match="perf"):
    _cli.main(["bench", "--suite", "perf", "--decorrelation-kappa", "0.01"])


def test_perf_times_steps_against_backprop_and_writes_json_and_markdown(tmp_path):
  from altgrad._bench import _perf

  shape = _perf._shape("MLP 8-16-4", "mlp", (8,), 4, 8, (16,), "leaky_relu")
  found = [
    _perf.Case(shape, "backprop"),
    _perf.Case(shape, "np"),
    _perf.Case(shape, "backprop", decorrelation=(1e-2, 0.5)),
  ]
  cases = _perf.run(tmp_path, found=found, progress=False, rounds=2, round_seconds=0.002)["cases"]
  reference = cases[f"{shape.name} / backprop"]
  assert reference["step_ratio"] == reference["compile_ratio"] == reference["memory_ratio"] == 1.0
  decorrelated = cases[f"{shape.name} / decorrelated backprop (lr 0.01, sample 0.5)"]
  assert decorrelated["gflop"] > reference["gflop"] > 0  # x R and the decorrelation update
  assert all(r["peak_mib"] > 0 and r["step_seconds"] > 0 and r["roofline_fraction"] > 0 for r in cases.values())
  assert all(r["largest_constant"] < 8 * 8 for r in cases.values())  # no step holds the batch (8 x 8)
  assert _perf.largest_constant("%constant.3 = f32[30,30]{1,0} constant({ {0, 1} })") == 900
  # A closed-over batch: JAX before 0.12 embeds it as a constant (which the detector finds), later
  # versions pass it as a parameter of the compiled step, which XLA cannot fold either.
  batch = jnp.arange(900.0).reshape(30, 30)
  closed_over = jax.jit(lambda w: w @ batch).lower(batch).compile().as_text()
  parameters = closed_over.split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
  assert _perf.largest_constant(closed_over) == 900 or parameters.count("f32[30,30]") == 2
  assert json.loads((tmp_path / "perf.json").read_text())["cases"].keys() == cases.keys()
  assert (tmp_path / "perf.md").read_text().count(f"\n| {shape.name} |") == 3


def test_perf_counts_the_lapack_calls_xla_leaves_out():
  """A Cholesky factor of n rows is n^3/3 FLOPs and a triangular solve for m right sides n^2 m,
  per matrix of a batch, a scan's body times its length and a cond's dearest branch."""
  from altgrad._bench import _perf

  spd = jnp.eye(6) * 2.0

  def solves(a, b):
    factor = jax.lax.linalg.cholesky(a)
    return jax.lax.linalg.triangular_solve(factor, b, left_side=True, lower=True)

  def step(a, b):
    looped = jax.lax.scan(lambda c, _: (c, solves(a, b)), 0.0, None, length=3)[1]
    chosen = jax.lax.cond(a[0, 0] > 0, lambda: solves(a, b), lambda: b)
    return looped, chosen, jax.vmap(jax.lax.linalg.cholesky)(jnp.stack([a, a]))

  once = 6**3 / 3 + 6**2 * 4
  jaxpr = jax.make_jaxpr(step)(spd, jnp.ones((6, 4))).jaxpr
  assert _perf.uncounted_flops(jaxpr).library == pytest.approx(3 * once + once + 2 * 6**3 / 3)
  right = jax.make_jaxpr(lambda a, b: jax.lax.linalg.triangular_solve(a, b, left_side=False))(spd, jnp.ones((5, 6)))
  assert _perf.uncounted_flops(right.jaxpr).library == pytest.approx(6**2 * 5)


def test_perf_counts_every_trip_of_a_loop():
  """XLA counts a loop's body once (or its unrolled copies): its count of a scanned recurrence
  plus the products of the other trips is its count of the same recurrence written out."""
  from altgrad._bench import _perf

  def xla_flops(lowered):
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  def written_out(w, h, trips):
    for _ in range(trips):
      h = jnp.tanh(h @ w)
    return h

  def scanned(w, h, trips, unroll):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=trips, unroll=unroll)[0]

  def nested(w, h):
    return jax.lax.scan(lambda c, _: (scanned(w, c, 6, 1), None), h, None, length=3)[0]

  w, h = jnp.ones((8, 8)), jnp.ones((4, 8))
  for step, args, trips in ((scanned, (6, 1), 6), (scanned, (6, 2), 6), (scanned, (6, True), 6), (nested, (), 18)):
    traced = jax.jit(step, static_argnums=(2, 3)[: len(args)]).trace(w, h, *args)
    total = xla_flops(traced.lower()) + _perf.uncounted_flops(traced.jaxpr.jaxpr).loops
    assert total == pytest.approx(xla_flops(jax.jit(written_out, static_argnums=2).lower(w, h, trips)), rel=1e-2)


def test_scaled_backprop_is_backprop_with_the_hidden_layers_scaled():
  model = nn.SimpleRNN(3, 8, 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  batch = (jax.random.normal(jax.random.key(0), (4, 5, 3)), jnp.array([0, 1, 1, 0]))
  loss = losses.softmax_cross_entropy
  plain = rules.backprop(model, loss)
  scaled = _bench.scaled_backprop(model, loss, hidden_scale=0.01)
  expected = plain.update(None, plain.init(params), params, batch=batch)[0]
  update = scaled.update(None, scaled.init(params), params, batch=batch)[0]
  chex.assert_trees_all_close(update["readout"], expected["readout"])
  chex.assert_trees_all_close(update["cell"], jax.tree.map(lambda g: 0.01 * g, expected["cell"]))


def test_perf_suite_is_well_formed():
  from altgrad._bench import _perf

  found = _perf.cases()
  assert len({(c.shape.name, c.label) for c in found}) == len(found)
  assert all(c.rule in _bench.BENCH_RULES for c in found)
  for shape in {c.shape for c in found}:  # every shape has its backprop reference
    assert any(c.shape == shape and c.rule == "backprop" and not c.decorrelation for c in found)


def test_bench_suites_are_well_formed():
  for name, make in _bench.SUITES.items():
    runs = make()
    assert len({r.name for r in runs}) == len(runs), f"{name}: two runs with one name"
    assert all(r.rule in _bench.BENCH_RULES for r in runs)
    added = [r.reference_key for r in _run.suite_runs(name)[len(runs) :]]  # a reference per setting lacking one,
    first = [r.reference_key for r in runs]  # in the order the suite lists the settings (not a set's)
    assert added == sorted(added, key=first.index) and len(set(added)) == len(added)
  assert {r.rule for r in _bench.SUITES["smoke"]()} == set(rules.RULES)
  assert len(_bench.SUITES["all"]()) == sum(len(make()) for s, make in _bench.SUITES.items() if s not in ("smoke", "all"))
  conv = _bench.SUITES["conv"]()  # one conv net, every kind of rule, plain and decorrelated
  assert {(r.rule, r.decorrelation_lr is None) for r in conv if r.model == "conv"} >= {
    (rule, True) for rule in ("backprop", "consequentialism", "anp", "tp", "er")
  } | {("backprop", False), ("anp", False)}


def test_rules_draw_noise_from_the_run_seed_and_decorrelation_is_refused_where_it_cannot_apply():
  dataset = data.digits()
  model = _experiment.build_model(dataset, "mlp", (8,), "tanh", 0)
  params = nnx.state(model, nnx.Param)
  keys = []
  for seed in (0, 3):
    state = _experiment.make_rule("np", model, losses.softmax_cross_entropy, seed, 100).init(params)
    given = rules.node_perturbation(model, losses.softmax_cross_entropy, key=jax.random.key(seed)).init(params)
    keys.append(jax.random.key_data(state.common.key))
    assert jnp.array_equal(keys[-1], jax.random.key_data(given.common.key))
  assert not jnp.array_equal(*keys)
  assert _experiment.make_rule("backprop", model, losses.softmax_cross_entropy, 3, 100).init(params) is not None
  images = data.Dataset(
    dataset.x_train.reshape(-1, 8, 8, 1), dataset.y_train, dataset.x_test.reshape(-1, 8, 8, 1), dataset.y_test, 10, "d"
  )
  conv = _experiment.build_model(images, "conv", (8,), "tanh", 0, decorrelation_lr=1e-3, decorrelation_sample=0.5)
  sites = [*conv.layers[:2], *conv.layers[-1].layers]  # the convolutions and the dense layers
  assert all(layer.decorrelation is not None and layer.decorrelation_sample == 0.5 for layer in sites)
  resnet = _experiment.build_model(images, "resnet", (4,), "relu", 0, decorrelation_lr=1e-3)
  assert resnet.stem.decorrelation is not None and resnet.head.decorrelation is not None
  sequences = data.temporal_order(10, num_train=8, num_test=4)
  with pytest.raises(ValueError, match="recurrent cells have no decorrelating matrix"):
    _experiment.build_model(sequences, "rnn", (8,), "tanh", 0, decorrelation_lr=1e-3)
  with pytest.raises(ValueError, match="needs --decorrelation-lr"):
    _experiment.build_model(images, "conv", (8,), "tanh", 0, decorrelation_sample=0.1)


def test_kernel_init_is_chosen_by_name_for_altgrad_layers_and_refused_elsewhere():
  dataset = data.digits()

  def first_kernel(kernel_init):
    model = _experiment.build_model(dataset, "mlp", (256,), "relu", 0, kernel_init=kernel_init)
    return np.asarray(model.layers[0].kernel.value)

  # He-normal draws with variance 2 / fan_in, LeCun-normal 1 / fan_in (both truncated: std ~0.88x)
  ratio = first_kernel("he_normal").std() / first_kernel(None).std()
  assert abs(ratio - np.sqrt(2)) < 0.05
  sequences = data.temporal_order(10, num_train=8, num_test=4)
  with pytest.raises(ValueError, match="the rnn model keeps its own"):
    _experiment.build_model(sequences, "rnn", (8,), "tanh", 0, kernel_init="he_normal")
  with pytest.raises(ValueError, match="unknown kernel init 'he'"):
    _experiment.build_model(dataset, "mlp", (8,), "tanh", 0, kernel_init="he")


def test_compare_builds_a_gru_for_sequences_and_the_tp_control_scales_its_cell():
  sequences = data.temporal_order(10, num_train=8, num_test=4)
  model = _experiment.build_model(sequences, "gru", (8,), "tanh", 0)
  assert isinstance(model, nn.GRU) and model(sequences.x_test).shape == (4, 4)
  params = nnx.state(model, nnx.Param)
  batch = (sequences.x_train, sequences.y_train)
  updates = {}
  for name, rule in (
    ("scaled", _bench.scaled_backprop(model, losses.softmax_cross_entropy, hidden_scale=0.5)),
    ("plain", rules.backprop(model, losses.softmax_cross_entropy)),
  ):
    updates[name] = rule.update(None, rule.init(params), params, batch=batch)[0]
  chex.assert_trees_all_close(updates["scaled"]["cell"], jax.tree.map(lambda u: 0.5 * u, updates["plain"]["cell"]))
  chex.assert_trees_all_close(updates["scaled"]["readout"], updates["plain"]["readout"])


def test_fit_trains_on_fresh_batches_reproducibly_and_refuses_them_for_a_fixed_data_set():
  ds = data.adding(10, num_train=64, num_test=32)

  def build(seed):
    model = nn.SimpleRNN(2, 8, 1, rngs=nnx.Rngs(seed))
    return model, optax.chain(rules.backprop(model, losses.squared_error), optax.adam(1e-2))

  common = dict(loss_fn=losses.squared_error, epochs=2, batch_size=16, fresh_steps=6)
  together = train.fit_seeds(build, [0, 1], ds, **common)
  alone = train.fit(*build(1), ds, seed=1, **common)
  np.testing.assert_allclose(together[1][1].test_loss, alone.test_loss, rtol=1e-5)
  assert together[0][1].test_loss != together[1][1].test_loss  # each seed its own batches
  assert len(alone.step_time) == 2 and alone.test_loss[-1] < alone.test_loss[0]
  with pytest.raises(ValueError, match="fixed is a fixed data set"):
    train.fit(*build(0), ds._replace(sampler=None, name="fixed"), **common)


def test_building_a_rule_that_factors_runs_lapack_on_one_thread_in_any_loop(monkeypatch):
  """On CPU, OpenBLAS's threads behind jaxlib's LAPACK calls (SciPy's library) would spin
  against XLA's: building CW, TP or ER sets that library to one thread for the process, so a
  hand-written loop runs as fit does; NumPy's own BLAS keeps its threads, and backprop (no
  LAPACK) changes nothing."""
  import threadpoolctl

  from altgrad import _lapack

  def threads():
    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

  scipy_libs = {c.filepath for c in _lapack._scipy_blas()}
  assert scipy_libs and scipy_libs < set(threads())  # SciPy's and NumPy's are separate libraries here
  model = nn.MLP((6, 4, 3), rngs=nnx.Rngs(0))
  for build in (rules.consequentialism, rules.target_propagation):
    monkeypatch.setattr(_lapack, "_DONE", False)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
      rules.backprop(model, losses.softmax_cross_entropy)
      assert set(threads().values()) == {2}
      build(model, losses.softmax_cross_entropy)
      assert {path: n for path, n in threads().items() if path in scipy_libs} == dict.fromkeys(scipy_libs, 1)
      assert {n for path, n in threads().items() if path not in scipy_libs} == {2}


def _history(rule, accuracies, seconds, *, seeds=None, optimizer="adam", machine="x86"):
  """A synthetic bench record: accuracy and training time per epoch."""
  return {
    "rule": rule,
    "optimizer": optimizer,
    "dataset": "digits",
    "model": "mlp",
    "hidden": [8],
    "batch_size": 32,
    "seeds": len(seeds) if seeds else 1,
    "epoch": list(range(1, len(accuracies) + 1)),
    "test_accuracy": accuracies,
    "wall_time": seconds,
    "test_accuracy_seeds": seeds or [accuracies],
    "environment": {"platform": machine, "processor": machine, "device": "cpu:0"},
  }


def test_time_to_accuracy_is_the_first_epoch_at_backprop_final_accuracy():
  from altgrad._bench import _report

  backprop = _history("backprop", [0.5, 0.7, 0.8], [2.0, 4.0, 6.0])
  faster = _history("tp", [0.6, 0.85, 0.9], [1.5, 3.0, 4.5])
  never = _history("np", [0.3, 0.6, 0.7], [1.0, 2.0, 3.0])
  records = {"bp": backprop, "tp": faster, "np": never}
  assert _report.reference_of(faster, records) is backprop
  assert _report.time_to(faster, 0.8) == (2, 3.0)
  assert _report.time_to(never, 0.8) is None
  assert _report.time_to_reference(faster, backprop) == "epoch 2, 3 s, 0.50x"  # 3 s against backprop's 6 s
  assert _report.time_to_reference(never, backprop) == "not reached (best 0.700 < 0.800)"
  elsewhere = _history("tp", [0.9], [1.0], machine="arm")
  assert _report.time_to_reference(elsewhere, backprop) == "epoch 1, 1 s"  # no ratio across machines
  other_data = dict(faster, dataset="mnist1d")
  assert _report.reference_of(other_data, records) is None


def test_paired_statistics_are_scipys_and_the_textbooks():
  """The paired comparison against scipy.stats (ttest_rel, wilcoxon, shapiro) and by hand (the
  interval, Cohen's d for paired samples, Holm's correction)."""
  from scipy import stats

  from altgrad._bench import _stats

  rng = np.random.default_rng(0)
  reference = rng.normal(0.8, 0.02, size=8)
  values = reference + rng.normal(0.01, 0.01, size=8)
  found = _stats.paired(values, reference)
  d = values - reference
  assert found.n == 8 and found.difference == pytest.approx(d.mean())
  assert found.t_p == pytest.approx(stats.ttest_rel(values, reference).pvalue)
  assert found.wilcoxon_p == pytest.approx(stats.wilcoxon(d).pvalue)
  assert found.normal == (stats.shapiro(d).pvalue >= 0.05)
  assert found.effect == pytest.approx(d.mean() / d.std(ddof=1))
  half = stats.t.ppf(0.975, 7) * d.std(ddof=1) / np.sqrt(8)
  np.testing.assert_allclose(found.interval, (d.mean() - half, d.mean() + half))
  assert (found.test, found.p) == ("paired t", found.t_p)
  skewed = _stats.paired(reference + np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]), reference)
  assert not skewed.normal and (skewed.test, skewed.p) == ("Wilcoxon", skewed.wilcoxon_p)
  assert _stats.paired([0.9], [0.8]).p is None and _stats.paired([0.9, 0.8], [0.8, 0.7]).p is None  # no spread
  # Holm: 3 p-values (None does not count): 0.01 * 3, max(0.03 * 2, .), max(0.04 * 1, 0.06)
  np.testing.assert_allclose(_stats.holm([0.01, 0.04, 0.03, None])[:3], [0.03, 0.06, 0.06])
  assert _stats.holm([0.01, 0.04, 0.03, None])[3] is None and _stats.holm([0.9, 0.8])[0] == 1.0


def test_final_accuracy_has_a_t_interval_and_a_paired_test_against_backprop():
  from altgrad._bench import _report

  interval = _report.confidence_interval(np.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(interval, (2 - 4.3027 / np.sqrt(3), 2 + 4.3027 / np.sqrt(3)), rtol=1e-4)
  assert _report.confidence_interval(np.array([0.9])) is None
  base = dict(_history("backprop", [0.8], [1.0], seeds=[[0.80], [0.81], [0.79]]), name="bp")
  better = dict(_history("cw", [0.9], [1.0], seeds=[[0.90], [0.92], [0.89]]), name="cw")
  same = dict(_history("np", [0.8], [1.0], seeds=[[0.82], [0.78], [0.80]]), name="np")
  records = {r["name"]: r for r in (base, better, same)}
  compared = _report.comparisons(records)
  assert set(compared) == {"cw", "np"}  # the reference is not compared with itself
  p_cw = _report._stats.paired([0.90, 0.92, 0.89], [0.80, 0.81, 0.79]).p
  p_np = _report._stats.paired([0.82, 0.78, 0.80], [0.80, 0.81, 0.79]).p
  assert compared["cw"][1] == pytest.approx(min(1, 2 * p_cw)) and compared["np"][1] == pytest.approx(min(1, max(2 * p_cw, p_np)))
  text = _report.versus_reference(better, base, compared["cw"])
  assert text.startswith("higher: +0.103 [") and "paired t p = " in text and "(Holm), d = +" in text
  assert _report.versus_reference(same, base, compared["np"]).startswith("not significant: ")
  assert _report.versus_reference(base, base, None) == "(reference)"
  one = dict(_history("cw", [0.9], [1.0]), name="one")
  assert _report.versus_reference(one, base, (_report._stats.paired([0.9], [0.8]), None)) == "n/a (one seed)"
  assert _report.versus_reference(one, base, None) == "n/a (other seeds)"
