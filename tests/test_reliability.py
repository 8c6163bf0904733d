"""Nothing lost, nothing mixed, nothing silent: checkpoints that know their run, one writer per
directory, hostile data caught before training, results never lost, clean stops."""

import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import nnx

from altgrad import _bench, _cli, _commands, data, losses, nn, rules, train
from altgrad.train import _checkpoints

CE = losses.softmax_cross_entropy


def _tiny(n_train=32, seed=0, classes=3, features=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_train + 16, features)).astype(np.float32)
  y = rng.integers(0, classes, n_train + 16).astype(np.int32)
  return data.Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, "tiny")


def _fit(directory, *, rule=rules.backprop, lr=1e-2, dataset=None, epochs=1, **options):
  model = nn.MLP((4, 8, 3), rngs=nnx.Rngs(0))
  tx = optax.chain(rule(model, CE), optax.adam(lr))
  return train.fit(
    model, tx, dataset or _tiny(), loss_fn=CE, epochs=epochs, batch_size=16, progress=False, checkpoint_dir=directory, **options
  )


# --- a checkpoint knows its run ----------------------------------------------------------------


def test_a_checkpoint_refuses_another_run_and_says_what_differs(tmp_path):
  directory = tmp_path / "run"
  _fit(directory)
  another = {
    "rule": (dict(rule=rules.consequentialism), "saved rule backprop, now rule consequentialism"),
    "learning rate": (dict(lr=1e-1), "step_size: saved -0.01, now -0.1"),
    "twice the data": (dict(dataset=_tiny(n_train=64)), r"data.train: saved 32 x \(4,\), now 64 x \(4,\)"),
    "other data of the same shape": (dict(dataset=_tiny(seed=1)), "data.checksum: saved"),
  }
  for options, difference in another.values():
    with pytest.raises(ValueError, match=f"is of another run(.|\n)*{difference}"):
      _fit(directory, **options)
  history = _fit(directory, epochs=2)  # more epochs: the same run, resumed
  assert history.epoch == [1, 2]
  with pytest.warns(UserWarning, match="resuming .* with other settings: .*step_size"):
    history = _fit(directory, lr=1e-1, epochs=3, resume_anyway=True)
  assert history.epoch == [1, 2, 3]


def test_damaged_checkpoints_and_bad_directories_are_named(tmp_path):
  directory = tmp_path / "run"
  _fit(directory)
  (directory / "1" / "record" / "metadata").write_text('{"histo')  # cut short
  with pytest.raises(ValueError, match=rf"the checkpoint {directory}/1 cannot be read"):
    _fit(directory, epochs=2)
  file = tmp_path / "a-file"
  file.write_text("")
  start = time.monotonic()
  with pytest.raises(ValueError, match="is a file, not a directory"):
    _fit(file)
  assert time.monotonic() - start < 5  # before anything is compiled


def test_one_writer_per_checkpoint_directory(tmp_path):
  directory = tmp_path / "run"
  holder = _checkpoints.Checkpoints(directory, {"run": "first"})
  with pytest.raises(ValueError, match=rf"being written by another run \(process {os.getpid()} on .*\); one run per"):
    _fit(directory)
  holder.close()
  _fit(directory)  # the lock is released with the writer
  # a writer that dies, however it dies, leaves no stale lock (the kernel releases it)
  script = (
    "import sys, time; from pathlib import Path; from altgrad.train import _checkpoints\n"
    "_checkpoints._hold_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"
  )
  writer = subprocess.Popen([sys.executable, "-c", script, str(directory)], stdout=subprocess.PIPE, text=True)
  assert writer.stdout.readline().strip() == "locked"
  with pytest.raises(ValueError, match="being written by another run"):
    _checkpoints._hold_lock(directory)
  writer.kill()
  writer.wait()
  os.close(_checkpoints._hold_lock(directory))


# --- hostile data caught before training -------------------------------------------------------


@pytest.mark.parametrize("rule_name", ["backprop", "anp"])
def test_labels_beyond_the_models_outputs_are_refused(rule_name):
  """Labels valid for the data set's 5 classes, a model of 3 outputs: refused, not trained with
  a NaN loss (backprop) or NaN params (ANP)."""
  model = nn.MLP((4, 8, 3), rngs=nnx.Rngs(0))
  tx = optax.chain(rules.RULES[rule_name](model, CE), optax.adam(1e-2))
  with pytest.raises(ValueError, match="labels go up to 4, but the model has 3 outputs"):
    train.fit(model, tx, _tiny(classes=5), loss_fn=CE, epochs=1, batch_size=16, progress=False)


def test_non_finite_targets_and_empty_splits_are_refused():
  model = nn.MLP((4, 8, 2), rngs=nnx.Rngs(0))
  tx = optax.chain(rules.backprop(model, losses.squared_error), optax.sgd(0.1))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 4)).astype(np.float32)
  y = rng.normal(size=(48, 2)).astype(np.float32)
  cases = {
    "the train targets contain NaN": data.Dataset(x[:32], np.where(y[:32] > 1, np.nan, y[:32]), x[32:], y[32:], None, "r"),
    "the test targets contain NaN or infinite": data.Dataset(x[:32], y[:32], x[32:], np.full_like(y[32:], np.inf), None, "r"),
    "the test split has 0 inputs": data.Dataset(x[:32], y[:32], x[:0], y[:0], None, "r"),
    "the train split has 0 inputs": data.Dataset(x[:0], y[:0], x[32:], y[32:], None, "r"),
  }
  for message, dataset in cases.items():
    with pytest.raises(ValueError, match=message):
      train.fit(model, tx, dataset, loss_fn=losses.squared_error, epochs=1, batch_size=16, progress=False)


def test_fit_refuses_a_model_other_than_the_rules():
  tanh = nn.MLP((4, 8, 3), activation="tanh", rngs=nnx.Rngs(0))
  relu = nn.MLP((4, 8, 3), activation="relu", rngs=nnx.Rngs(0))
  tx = optax.chain(rules.consequentialism(tanh, CE), optax.adam(1e-2))
  with pytest.raises(ValueError, match=r"another model than the one its consequentialism rule.*layers/0:activation: the rule's activation tanh, fit's activation relu"):
    train.fit(relu, tx, _tiny(), loss_fn=CE, epochs=1, batch_size=16, progress=False)


# --- results never lost ------------------------------------------------------------------------


def test_compare_checks_its_outputs_before_training(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking its outputs"))
  for flag, path, message in (
    ("--json", tmp_path / "missing" / "x.json", "does not exist"),
    ("--plot", tmp_path / "missing" / "x.png", "does not exist"),
    ("--json", tmp_path, "is a directory"),
  ):
    assert _cli.main(["compare", flag, str(path), "--no-progress"]) == _cli.ERROR
    err = capsys.readouterr().err
    assert f"altgrad compare: error: {flag} {path}" in err and message in err


def test_a_failed_plot_still_writes_the_json(tmp_path, monkeypatch, capsys):
  def broken(*args):
    raise RuntimeError("no backend")

  monkeypatch.setattr(_commands, "_plot", broken)
  out = tmp_path / "compare.json"
  argv = ["compare", "--rules", "backprop", "--hidden", "8", "--epochs", "1", "--no-progress"]
  assert _cli.main([*argv, "--json", str(out), "--plot", str(tmp_path / "x.png")]) == _cli.ERROR
  err = capsys.readouterr().err
  assert f"--plot {tmp_path / 'x.png'}: RuntimeError: no backend" in err
  assert json.loads(out.read_text())["results"]["backprop"]["epoch"] == [1]


def test_command_line_names_bad_numbers_and_files(tmp_path, capsys):
  for flag, value, message in (("--seed", "-1", "must be 0 or more"), ("--lr", "inf", "finite positive")):
    with pytest.raises(SystemExit):
      _cli.main(["compare", flag, value])
    assert message in capsys.readouterr().err
  file = tmp_path / "a-file"
  file.write_text("")
  assert _cli.main(["bench", "--suite", "smoke", "--out", str(file)]) == _cli.ERROR
  assert f"--out {file} is a file" in capsys.readouterr().err
  (tmp_path / "smoke.json").write_text('{"suite": "smoke", "runs": {"a": ')  # cut short
  assert _cli.main(["bench", "--suite", "smoke", "--out", str(tmp_path)]) == _cli.ERROR
  assert f"{tmp_path / 'smoke.json'} is not a results file" in capsys.readouterr().err


def _record(run, median):
  history = train.History(
    epoch=[1], train_loss=[1.0], test_loss=[1.0], test_accuracy=[0.5], step_time=[median], wall_time=[median]
  )
  return dataclasses.asdict(run) | _bench.summarize([history]) | {"name": run.name}


def test_a_resumed_bench_keeps_every_run_and_divides_only_by_references_timed_here(tmp_path, monkeypatch):
  base = _bench.Run("digits", (8,), "backprop", "adam", 1e-3, 1, 64)
  runs = [base, _bench.Run("digits", (8,), "consequentialism", "adam", 1e-3, 1, 64)]
  monkeypatch.setitem(_bench.SUITES, "tiny", lambda: list(runs))
  monkeypatch.setattr(_bench._run, "execute", lambda run, **kw: _record(run, 0.02))
  elsewhere = {"platform": "another", "processor": "machine", "device": "cpu:0"}
  previous = {
    base.name: _record(base, 0.01) | {"environment": elsewhere, "session": "old"},
    "a run the suite no longer has": _record(base, 0.5) | {"environment": elsewhere, "session": "old"},
  }
  (tmp_path / "tiny.json").write_text(json.dumps({"suite": "tiny", "data_parallel": False, "runs": previous}))
  results = _bench.run_suite("tiny", tmp_path, progress=False)
  saved = json.loads((tmp_path / "tiny.json").read_text())["runs"]
  assert set(saved) == {base.name, runs[1].name, "a run the suite no longer has"}
  assert saved[base.name]["environment"] == elsewhere  # each run keeps the machine it ran on
  assert saved[runs[1].name]["step_time_ratio"] is None  # its reference was timed on another machine
  assert "n/a (reference timed on another machine)" in (tmp_path / "tiny.md").read_text()
  # the reference timed on this machine, in another process: a ratio, marked as such
  here = _bench.environment()
  previous[base.name] |= {"environment": here}
  (tmp_path / "tiny.json").write_text(json.dumps({"suite": "tiny", "data_parallel": False, "runs": {base.name: previous[base.name]}}))
  results = _bench.run_suite("tiny", tmp_path, progress=False)
  assert results["runs"][runs[1].name]["step_time_ratio"] == pytest.approx(2.0)
  assert "2.00 (reference timed in another process)" in (tmp_path / "tiny.md").read_text()


# --- clean stops -------------------------------------------------------------------------------

COMPARE = [sys.executable, "-m", "altgrad", "compare", "--rules", "backprop", "--hidden", "8", "--no-progress", "--plot", ""]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.mark.slow
def test_ctrl_c_stops_compare_and_bench_cleanly_every_time(tmp_path):
  """Ctrl-C at random moments of a compare (importing, compiling, training): each stops
  with one line and status 130, no traceback, never a crash or a swallowed interrupt; a bench
  stopped after a run keeps it."""
  timings = random.Random(0)
  for attempt in range(5):  # 5 here to stay quick; tools/interrupts.py runs more
    process = subprocess.Popen([*COMPARE, "--epochs", "500"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(timings.uniform(0.3, 3.5))
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, (attempt, process.returncode, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("altgrad compare: interrupted; kept:"), err
  out = tmp_path / "bench"
  process = subprocess.Popen(
    [sys.executable, "-m", "altgrad", "bench", "--suite", "smoke", "--out", str(out), "--no-progress"],
    env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  while not (out / "smoke.json").exists():  # the first run has finished
    assert process.poll() is None, process.communicate()[1][-2000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
  kept = json.loads((out / "smoke.json").read_text())["runs"]
  assert kept and f"finished run(s) in {out / 'smoke.json'}" in err.strip().splitlines()[-1]


def _children(pid):
  found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
  return [int(p) for p in found]


def _gone(pids, within):
  deadline = time.monotonic() + within
  while time.monotonic() < deadline:
    if not any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text() for p in pids):
      return True
    time.sleep(0.1)
  return False


def _lines_into(stream, lines):
  for line in stream:
    lines.put(line)


@pytest.mark.slow
def test_local_processes_stop_together(tmp_path):
  """--processes 2: a worker killed stops the run at once, and an interrupted launcher leaves no
  worker behind."""
  for stop in ("kill a worker", "interrupt the launcher"):
    launcher = subprocess.Popen(  # process 0 says on stderr when both have joined
      [*COMPARE, "--epochs", "100000", "--processes", "2"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = queue.Queue()
    threading.Thread(target=_lines_into, args=(launcher.stderr, lines), daemon=True).start()
    while True:
      try:
        line = lines.get(timeout=180)
      except queue.Empty:
        launcher.kill()
        raise AssertionError("no 'processes joined' line within 180 s") from None
      if "2 processes joined" in line:
        break
    workers = _children(launcher.pid)
    assert len(workers) == 2
    start = time.monotonic()
    if stop == "kill a worker":
      os.kill(workers[1], signal.SIGKILL)
    else:
      launcher.send_signal(signal.SIGINT)
    launcher.wait(timeout=60)
    assert time.monotonic() - start < 10, stop
    assert launcher.returncode == (137 if stop == "kill a worker" else 130)
    assert _gone(workers, within=5), stop
