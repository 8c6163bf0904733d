"""Choosing settings fairly: a grid on a validation split, in one program, the test split unread."""

import json

import numpy as np
import optax
import pytest
from flax import nnx

from altgrad import data, losses, nn, rules, train
from altgrad._bench import _run
from altgrad._bench._suites import TUNE_SEEDS, Run

CE = losses.softmax_cross_entropy


def _build(seed):
  model = nn.MLP((64, 16, 10), rngs=nnx.Rngs(seed))
  return model, optax.chain(rules.backprop(model, CE), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))


def test_validation_split_holds_out_training_rows_and_drops_the_test_split():
  digits = data.load("digits")
  split = data.validation_split(digits, 0.25, seed=3)
  assert len(split.x_test) == round(0.25 * len(digits.x_train)) and len(split.x_train) + len(split.x_test) == len(digits.x_train)
  rows = {r.tobytes() for r in digits.x_train}
  assert all(r.tobytes() in rows for r in split.x_test)  # held-out training rows, not test rows
  assert not {r.tobytes() for r in split.x_test} & {r.tobytes() for r in split.x_train}
  with pytest.raises(ValueError, match="validation fraction is in"):
    data.validation_split(digits, 1.0)


def test_a_grid_trains_in_one_program_on_the_validation_split_alone():
  """Every point and seed compile once together; a data set without a test split tunes (nothing
  reads it), each point's runs are those of its own learning rate, and the best one is chosen."""
  digits = data.load("digits")
  no_test = digits._replace(x_test=None, y_test=None)
  grid = {"learning_rate": (1e-4, 0.1, 0.5)}
  tuning = train.tune(_build, grid, no_test, loss_fn=CE, epochs=1, batch_size=64, seeds=(7, 8), progress=False)
  assert tuning.compilations == 1 and tuning.points == [{"learning_rate": v} for v in grid["learning_rate"]]
  assert np.shape(tuning.scores) == (3, 2) and tuning.chosen == tuning.points[int(np.argmax(tuning.means))]
  # the middle point's runs are fit_seeds' runs at that learning rate, on the same split
  split = data.validation_split(digits, 0.1)
  alone = train.fit_seeds(_build, [7, 8], split, loss_fn=CE, epochs=1, batch_size=64, progress=False, hyperparams=[{"learning_rate": 0.1}] * 2)
  np.testing.assert_allclose(tuning.scores[1], [h.test_accuracy[-1] for _, h in alone], atol=1e-6)
  assert tuning.means[0] < tuning.means[1]  # 1e-4 barely moves in one epoch


def test_a_hyperparameter_outside_the_state_is_named():
  def plain(seed):
    model = nn.MLP((64, 10), rngs=nnx.Rngs(seed))
    return model, optax.chain(rules.backprop(model, CE), optax.sgd(0.1))

  with pytest.raises(ValueError, match="'learning_rate' is not in the optimizer state: build what takes it with optax.inject_hyperparams"):
    train.tune(plain, {"learning_rate": (0.1,)}, data.load("digits"), loss_fn=CE, epochs=1, batch_size=64, progress=False)

  def twice(seed):  # consequentialism's eps and Adam's, both in the state
    model = nn.MLP((64, 10), rngs=nnx.Rngs(seed))
    rule = optax.inject_hyperparams(rules.consequentialism, static_args=("model", "loss_fn"))(model, CE, eps=1.0)
    return model, optax.chain(rule, optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))

  with pytest.raises(ValueError, match="'eps' is in the optimizer state more than once"):
    train.tune(twice, {"eps": (0.1,)}, data.load("digits"), loss_fn=CE, epochs=1, batch_size=64, progress=False)


def test_a_tuned_bench_run_reports_its_grid_and_trains_the_chosen_point():
  """The bench tunes a rule option with the learning rate (node perturbation's sigma, in its
  state by optax.inject_hyperparams), in one program, then trains the choice on the run's seeds."""
  run = Run("digits", (16,), "np", "adam", 1e-3, 1, 64, seeds=2, rule_options=(("sigma", 1e-3),), tune=(("lr", (1e-3, 1e-2)), ("sigma", (1e-3, 30.0))))
  record = _run.execute(run)
  tuning = record["tuning"]
  assert tuning["compilations"] == 1 and tuple(tuning["seeds"]) == TUNE_SEEDS and len(tuning["points"]) == 4
  chosen = tuning["chosen"]
  assert record["lr"] == chosen["learning_rate"] and dict(record["rule_options"])["sigma"] == chosen["sigma"]
  assert record["name"] == run.name and "tuned" in record["name"]
  assert len(set(np.round(tuning["means"], 6))) > 1  # the points differ


def test_compare_tune_chooses_each_rules_learning_rate_and_says_so(tmp_path, capsys):
  from altgrad import _cli

  out = tmp_path / "results.json"
  args = ["compare", "--epochs", "1", "--hidden", "16", "--rules", "backprop,er", "--tune", "0.001,0.01"]
  assert _cli.main([*args, "--json", str(out), "--no-progress"]) == 0
  printed = capsys.readouterr().out
  results = json.loads(out.read_text())["results"]
  tuning = results["backprop"]["tuning"]
  assert [p["learning_rate"] for p in tuning["points"]] == [0.001, 0.01] and tuning["compilations"] == 1
  assert results["backprop"]["lr"] == tuning["chosen"]["learning_rate"] and "tuned lr" in printed
  assert f"tuned backprop: lr {results['backprop']['lr']:g}" in printed
  assert "tuning" not in results["er"]  # ER steps at its own rate


def test_a_value_that_shapes_the_program_is_tuned_a_program_each():
  """A layer's decorrelation rate is an attribute, not optimizer state: ``static`` hands it to
  ``build`` and compiles once per value; each point's runs are fit_seeds' at that point."""
  digits = data.load("digits")

  def build(seed, decorrelation_lr):
    model = nn.MLP((64, 16, 10), decorrelation_lr=decorrelation_lr, rngs=nnx.Rngs(seed))
    return model, optax.chain(rules.backprop(model, CE), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))

  grid = {"learning_rate": (0.03, 0.1), "decorrelation_lr": (1e-4, 1e-1)}
  tuning = train.tune(build, grid, digits, loss_fn=CE, epochs=1, batch_size=64, seeds=(7, 8), static=("decorrelation_lr",), progress=False)
  assert tuning.compilations == 2 and len(tuning.points) == 4 and tuning.points[1] == {"learning_rate": 0.03, "decorrelation_lr": 0.1}
  split = data.validation_split(digits, 0.1)
  alone = train.fit_seeds(
    lambda seed: build(seed, 0.1), [7, 8], split, loss_fn=CE, epochs=1, batch_size=64, progress=False, hyperparams=[{"learning_rate": 0.03}] * 2
  )
  np.testing.assert_allclose(tuning.scores[1], [h.test_accuracy[-1] for _, h in alone], atol=1e-6)
  assert tuning.scores[0] != tuning.scores[1]  # the rate reached the layers
  with pytest.raises(ValueError, match=r"static names values of the grid \(\['decorrelation_lr', 'learning_rate'\]\), got \['width'\]"):
    train.tune(build, grid, digits, loss_fn=CE, epochs=1, batch_size=64, static=("width",), progress=False)


def test_a_bench_run_tunes_its_decorrelation_rate_and_is_paired_with_backprop_tuned_on_the_same_grid():
  from altgrad._bench import _report

  grid = (("lr", (1e-3, 1e-2)), ("decorrelation_lr", (1e-4, 1e-2)))
  run = Run("digits", (16,), "backprop", "adam", 1e-3, 1, 64, seeds=2, decorrelation_lr=1e-3, tune=grid)
  record = _run.execute(run)
  tuning = record["tuning"]
  assert tuning["compilations"] == 2 and record["decorrelation_lr"] == tuning["chosen"]["decorrelation_lr"]
  assert record["lr"] == tuning["chosen"]["learning_rate"] and record["name"] == run.name
  assert "decorrelation lr" in _report._rule_label(record) and _report._rule_label(record).endswith(", tuned")
  other = dict(record, rule="anp", decorrelation_lr=1e-4 if record["decorrelation_lr"] == 1e-2 else 1e-2)
  assert _report.reference_of(other, {"bp": record}) is record  # each at its own choice from one grid
  untuned = dict(other, tuning=None)
  assert _report.reference_of(untuned, {"bp": record}) is None
  with pytest.raises(ValueError, match="tuning decorrelation_lr needs a decorrelated run"):
    _run.execute(Run("digits", (16,), "backprop", "adam", 1e-3, 1, 64, seeds=2, tune=grid))
